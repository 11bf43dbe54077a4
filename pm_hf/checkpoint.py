"""Continual state and its atomic checkpoint: everything needed to continue after task t (merged weights of the
adapted modules, fully trained parameters and head, S and G, the score matrices, RNG states and the config). Its
size does not grow with the number of tasks. Each task's (alpha, A, B, s) record, needed only for the exact
rank-sum(r) export, is written once to `adapters/task_<t>.safetensors` (an append-only log, never held in memory).
Tensors go to safetensors, the rest to JSON; a checkpoint folder is written under a temporary
name and renamed, then `latest.json` is replaced atomically, so an interruption never leaves a half-written state."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .adapters import TaskRecord

LATEST = "latest.json"


@dataclass
class ContinualState:
    """The loop's state after `completed` tasks."""

    completed: int = 0
    S: dict[str, torch.Tensor] = field(default_factory=dict)
    G: dict[str, torch.Tensor] = field(default_factory=dict)
    log: dict[str, list] = field(default_factory=dict)  # per-task lists: R, R_til, alphas, timings, ...
    rule: dict[str, torch.Tensor] = field(default_factory=dict)  # what a merge rule keeps across tasks (see merge.py)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, replacing any old `final` with two renames (never half-written)."""
    import tempfile

    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / "model")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": list(np.random.get_state()[1].tolist()),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": list(random.getstate()),
    }


def save_checkpoint(out_dir: Path, state: ContinualState, weights: dict[str, torch.Tensor], config: dict) -> Path:
    """Write checkpoint `task_<completed>`; `weights` are the model tensors to restore (merge key -> tensor)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-task{state.completed}"
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"weights/{k}": v.detach().float().cpu().contiguous() for k, v in weights.items()}
    tensors.update({f"S/{k}": v.cpu().contiguous() for k, v in state.S.items()})
    tensors.update({f"G/{k}": v.cpu().contiguous() for k, v in state.G.items()})
    tensors.update({f"rule/{k}": v.cpu().contiguous() for k, v in state.rule.items()})
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {
        "completed": state.completed,
        "log": state.log,
        "rng": _rng_state(),
        "config": config,
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    final = out_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(out_dir / LATEST, json.dumps({"checkpoint": name, "completed": state.completed}))
    for old in out_dir.glob("checkpoint-task*"):  # keep only the newest
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out_dir: Path) -> tuple[ContinualState, dict[str, torch.Tensor], dict] | None:
    """The last complete checkpoint under `out_dir` as (state, weights, config), or None if there is none."""
    pointer = out_dir / LATEST
    if not pointer.exists():
        return None
    folder = out_dir / json.loads(pointer.read_text())["checkpoint"]
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    state = ContinualState(meta["completed"], group("S/"), group("G/"), meta["log"], group("rule/"))
    _restore_rng(meta["rng"])
    return state, group("weights/"), meta["config"]


def _restore_rng(rng: dict) -> None:
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), rng["numpy_pos"], 0, 0.0))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def config_dict(*dataclasses) -> dict:
    """A JSON-safe record of the run's argument dataclasses."""
    out = {}
    for dc in dataclasses:
        d = dc.to_dict() if hasattr(dc, "to_dict") else asdict(dc)
        out[type(dc).__name__] = json.loads(json.dumps(d, default=str))
    return out


def dataclasses_from_config(config: dict) -> tuple:
    """Rebuild (ModelArguments, DataArguments, PMConfig, LoraArguments, FisherArguments, MergeArguments) from
    `config_dict` output (fields that are not constructor arguments are ignored)."""
    from dataclasses import fields

    from .config import DataArguments, FisherArguments, LoraArguments, MergeArguments, ModelArguments, PMConfig

    out = []
    for cls in (ModelArguments, DataArguments, PMConfig, LoraArguments, FisherArguments, MergeArguments):
        names = {f.name for f in fields(cls) if f.init}
        values = {k: v for k, v in config.get(cls.__name__, {}).items() if k in names}
        if cls is PMConfig:
            values = {
                k: v for k, v in values.items() if not (isinstance(v, str) and v.startswith("<") and v.endswith(">"))
            }
        out.append(cls(**values))
    return tuple(out)


def save_task_record(out_dir: Path, t: int, rec: TaskRecord) -> Path:
    """Write task t's adapter record once (atomically) to `out_dir/adapters/task_<t>.safetensors`."""
    folder = out_dir / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"task_{t}.safetensors"
    tmp = folder / f".task_{t}.safetensors.tmp-{os.getpid()}"
    tensors = {f"A/{k}": v.contiguous() for k, v in rec.A.items()}
    tensors.update({f"B/{k}": v.contiguous() for k, v in rec.B.items()})
    meta = {
        "alpha": json.dumps(rec.alpha),
        "scaling": json.dumps(rec.scaling),
        "fan_in_fan_out": str(rec.fan_in_fan_out),
    }
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_task_records(out_dir: Path, count: int) -> list[TaskRecord]:
    """The records of tasks 0..count-1 (files of tasks not yet completed are ignored)."""
    from safetensors import safe_open

    records = []
    for t in range(count):
        path = out_dir / "adapters" / f"task_{t}.safetensors"
        if not path.exists():
            raise ValueError(
                f"{path} is missing: the run's adapter log is incomplete, so it cannot be exported exactly."
            )
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        A = {k[2:]: v for k, v in tensors.items() if k.startswith("A/")}
        B = {k[2:]: v for k, v in tensors.items() if k.startswith("B/")}
        records.append(
            TaskRecord(json.loads(meta["alpha"]), json.loads(meta["scaling"]), A, B, meta["fan_in_fan_out"] == "True")
        )
    return records
