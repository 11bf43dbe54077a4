"""The continual state and its atomic checkpoint: everything needed to continue after task t.

`ContinualState` is assembled from each component's state: the merged weights (`ModelWeights.state()`), the merge
strategy's `state_dict()` and each continual callback's `state_dict()`, plus the per-task log, the RNG states and
the config. None of it grows with the number of tasks except the log (and a strategy that keeps every task, `ties`).
Tensors go to one safetensors file (`weights/`, `strategy/`, `callbacks/<key>/` prefixes), the log to gzipped JSON
(lossless; it is the only part that grows), the rest to JSON; the folder `checkpoint-task<t>` is written under a
temporary name and renamed, then `latest.json` is replaced atomically, so an interruption never leaves a half-written
state.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import set_seed

from ..config.checks import NonFiniteError, check_finite, invalid
from ..config.groups import DataArguments, FisherArguments, LoraArguments, MergeArguments, ModelArguments, PMConfig
from ..fileio import atomic_dir, atomic_write_text, file_digest
from ..hub.export import ADAPTERS_DIR

LATEST = "latest.json"
STATE, META, MANIFEST, LOG = "state.safetensors", "state.json", "manifest.json", "log.json.gz"
FORMAT = 3  # 1: wave-1 checkpoints (one string-keyed `rule` namespace, log as lists per key); 2: the log in state.json
READABLE = (2, 3)  # format 2 differs only in where the log is: it is read as it was written


def log_bytes(log: list[dict]) -> bytes:
    """The per-task log as the checkpoint stores it: compact JSON, gzipped with no timestamp (the same log gives the
    same bytes)."""
    return gzip.compress(json.dumps(log, separators=(",", ":"), default=float).encode(), compresslevel=9, mtime=0)


def read_log(folder: Path, meta: dict) -> list[dict]:
    """The per-task log of a verified checkpoint (format 2: inside its meta)."""
    if meta.get("format") == 2:
        return meta["log"]
    try:
        log = json.loads(gzip.decompress((folder / LOG).read_bytes()))
    except (OSError, EOFError, ValueError):
        log = None
    if not isinstance(log, list):
        raise invalid("output_dir", str(folder.parent), f"{folder.name}/{LOG} is not a readable log: it is damaged.")
    return log


def _files(meta: dict) -> tuple[str, ...]:
    """The files a checkpoint of this meta's format holds (its manifest records their sha256)."""
    return (STATE, META) if meta.get("format") == 2 else (STATE, META, LOG)


@dataclass
class ContinualState:
    """The loop's state after `completed` tasks."""

    completed: int = 0
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # theta_hat_t by merge key
    strategy: dict[str, torch.Tensor] = field(default_factory=dict)  # MergeStrategy.state_dict()
    callbacks: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # key -> ContinualCallback state
    log: list[dict] = field(default_factory=list)  # one entry per completed task (the rows of results.json)
    rng: dict | None = None  # global RNG states when the checkpoint was written (`capture_rng` / `restore_rng`)


def capture_rng() -> dict:
    """The global RNG states of torch, numpy and python."""
    state = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": state[1].tolist(),
        "numpy_pos": int(state[2]),
        "python": list(random.getstate()),
    }


def restore_rng(rng: dict) -> None:
    """Put the global RNG states of `capture_rng` back (the loop does this explicitly when it resumes)."""
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), rng["numpy_pos"], 0, 0.0))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))


def _tensors(state: ContinualState) -> dict[str, torch.Tensor]:
    out = {f"weights/{k}": v.detach().float() for k, v in state.weights.items()}
    out.update({f"strategy/{k}": v.detach() for k, v in state.strategy.items()})
    for key, tensors in state.callbacks.items():
        if "/" in key:
            raise ValueError(f"callback state key {key!r} must not contain '/'")
        out.update({f"callbacks/{key}/{k}": v.detach() for k, v in tensors.items()})
    check_finite(out, f"the continual state after task {state.completed}")
    return {k: v.cpu().contiguous() for k, v in out.items()}


def save_checkpoint(out_dir: Path, state: ContinualState, config: dict) -> Path:
    """Write `checkpoint-task<completed>` (state, meta and a manifest of their sha256) and point `latest.json` at it;
    older checkpoints are removed after. Non-finite tensors are refused before anything is written."""
    out_dir = Path(out_dir)
    name = f"checkpoint-task{state.completed}"
    meta = {"format": FORMAT, "completed": state.completed, "rng": state.rng, "config": config}
    tensors = _tensors(state)
    with atomic_dir(out_dir / name) as tmp:
        save_file(tensors, str(tmp / STATE))
        (tmp / META).write_text(json.dumps(meta, separators=(",", ":"), default=float))
        (tmp / LOG).write_bytes(log_bytes(state.log))
        digests = {f: file_digest([tmp / f]) for f in _files(meta)}
        (tmp / MANIFEST).write_text(json.dumps({"sha256": digests}, indent=1))
    atomic_write_text(out_dir / LATEST, json.dumps({"checkpoint": name, "completed": state.completed}))
    for old in out_dir.glob("checkpoint-task*"):  # keep only the newest
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir / name


def _checkpoint_folder(out_dir: Path) -> Path | None:
    """The folder `latest.json` points at, which must be a checkpoint directly inside `out_dir`."""
    pointer = out_dir / LATEST
    if not pointer.exists():
        if any(out_dir.glob("checkpoint-task*")):
            fix = "latest.json is missing next to the checkpoints: the run folder is damaged; start a new output_dir."
            raise invalid("output_dir", str(out_dir), fix)
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError, TypeError):
        raise invalid("output_dir", str(out_dir), "latest.json is not a checkpoint pointer (damaged).") from None
    folder = out_dir / str(name)
    inside = re.fullmatch(r"checkpoint-task\d+", str(name)) and folder.resolve().parent == out_dir.resolve()
    if not inside or not folder.is_dir():
        raise invalid("output_dir", str(out_dir), f"latest.json points at {name!r}, not a checkpoint of this folder.")
    return folder


def _verify(folder: Path, meta: dict) -> None:
    """Every file of the checkpoint has the sha256 its manifest recorded."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        raise invalid(
            "output_dir", str(folder.parent), f"{folder.name} has no readable {MANIFEST} (damaged)."
        ) from None
    for name in _files(meta):
        if not (folder / name).is_file() or file_digest([folder / name]) != recorded.get(name):
            fix = f"{folder.name}/{name} does not match the sha256 of its manifest: the checkpoint is damaged."
            raise invalid("output_dir", str(folder.parent), fix)


def saved_config(out_dir: Path) -> dict | None:
    """The run record (config and fingerprints) of the last complete checkpoint under `out_dir`, verified against its
    manifest, without loading its tensors; None if the folder holds no checkpoint."""
    folder = _checkpoint_folder(Path(out_dir))
    return None if folder is None else _checked_meta(folder, out_dir).get("config", {})


def _checked_meta(folder: Path, out_dir: Path) -> dict:
    """The checkpoint's meta (state.json): of this pm_hf's format (an earlier one is refused with its own message),
    then every file verified against the manifest."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        meta = None  # unreadable: the manifest check below says it is damaged
    if isinstance(meta, dict) and meta.get("format") not in READABLE:
        version = meta.get("format", 1)
        fix = f"{folder.name} was written by an earlier pm_hf (checkpoint format {version}, this version reads "
        fix += f"{' and '.join(map(str, READABLE))}); it cannot be resumed: start the run again in a new output_dir."
        raise invalid("output_dir", str(out_dir), fix)
    _verify(folder, meta if isinstance(meta, dict) else {})
    return meta


def load_checkpoint(out_dir: Path) -> tuple[ContinualState, dict] | None:
    """The last complete checkpoint under `out_dir` as (state, config), verified against its manifest; None if the
    folder holds no checkpoint."""
    folder = _checkpoint_folder(Path(out_dir))
    if folder is None:
        return None
    meta = _checked_meta(folder, out_dir)
    tensors = load_file(str(folder / STATE))
    try:
        check_finite(tensors, folder.name)
    except NonFiniteError as err:  # a damaged checkpoint is bad input: refused by the contract, nothing written
        raise invalid("output_dir", str(out_dir), f"{err} The checkpoint is damaged.") from None

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    callbacks: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in group("callbacks/").items():
        owner, name = key.split("/", 1)
        callbacks.setdefault(owner, {})[name] = value
    state = ContinualState(
        meta["completed"], group("weights/"), group("strategy/"), callbacks, read_log(folder, meta), meta.get("rng")
    )
    return state, meta["config"]


def copy_checkpoint(src: Path, dst: Path) -> int:
    """Put the last checkpoint of the run in `src` (verified) into `dst` as its own; returns its completed tasks."""
    folder = _checkpoint_folder(Path(src))
    if folder is None:
        raise invalid("resume_from", str(src), "holds no checkpoint (latest.json): give the output_dir of a run.")
    state, _ = load_checkpoint(Path(src))  # verifies the manifest and every tensor
    shutil.copytree(folder, Path(dst) / folder.name)
    atomic_write_text(Path(dst) / LATEST, json.dumps({"checkpoint": folder.name, "completed": state.completed}))
    return state.completed


def state_files(out_dir: Path) -> dict[str, Path]:
    """What a run continues from, by name relative to the run folder: latest.json, the checkpoint it points at, the
    per-task adapter log and results.json."""
    out_dir = Path(out_dir)
    folder = _checkpoint_folder(out_dir)
    if folder is None:
        raise invalid("output_dir", str(out_dir), "holds no checkpoint yet: train a task first.")
    files = {LATEST: out_dir / LATEST, **{f"{folder.name}/{p.name}": p for p in sorted(folder.iterdir())}}
    files.update({f"{ADAPTERS_DIR}/{p.name}": p for p in sorted((out_dir / ADAPTERS_DIR).glob("task_*.safetensors"))})
    if (out_dir / "results.json").is_file():
        files["results.json"] = out_dir / "results.json"
    return files


ARGUMENT_GROUPS = (ModelArguments, DataArguments, PMConfig, LoraArguments, FisherArguments, MergeArguments)


def config_dict(*groups) -> dict:
    """A JSON-safe record of the run's argument dataclasses, keyed by class name."""
    out = {}
    for dc in groups:
        d = dc.to_dict() if hasattr(dc, "to_dict") else asdict(dc)
        out[type(dc).__name__] = json.loads(json.dumps(d, default=str))
    return out


def dataclasses_from_config(config: dict, overrides: dict[str, dict] | None = None) -> tuple:
    """Rebuild (ModelArguments, DataArguments, PMConfig, LoraArguments, FisherArguments, MergeArguments) from
    `config_dict` output (fields that are not constructor arguments are ignored); `overrides` replaces fields per
    class name."""
    out = []
    for cls in ARGUMENT_GROUPS:
        names = {f.name for f in fields(cls) if f.init}
        values = {k: v for k, v in config.get(cls.__name__, {}).items() if k in names}
        values.update((overrides or {}).get(cls.__name__, {}))
        if cls is PMConfig:
            values = {
                k: v for k, v in values.items() if not (isinstance(v, str) and v.startswith("<") and v.endswith(">"))
            }
        out.append(cls(**values))
    return tuple(out)


@contextlib.contextmanager
def seeded(seed: int):
    """Seed every RNG for a block (model loading initialises new heads from the global RNG, as in HF scripts), then
    give the caller's global RNG states back."""
    rng = capture_rng()
    with torch.random.fork_rng():
        set_seed(seed)
        yield
    restore_rng(rng)
