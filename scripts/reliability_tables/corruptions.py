"""The corruptions table of scripts/reliability.py: a copy of a finished 2-task run is damaged one way; `--resume` with
one more task must be refused by the contract (exit 2, one line naming output_dir, no traceback), no file changed."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
from pathlib import Path

import yaml

from reliability_tables.common import base_config, contract_error


def _tamper(run: Path, name: str) -> None:
    """Damage a finished run folder one way (a checkpoint, its pointer or its manifest)."""
    import torch
    from safetensors.torch import load_file, save_file

    from pm_hf.fileio import file_digest

    ckpt = run / json.loads((run / "latest.json").read_text())["checkpoint"]
    state = ckpt / "state.safetensors"

    def rewrite(tensors: dict) -> None:  # a consistent-looking file with a manifest that matches it
        save_file(tensors, str(state))
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["sha256"]["state.safetensors"] = file_digest([state])
        (ckpt / "manifest.json").write_text(json.dumps(manifest))

    tensors = load_file(str(state))
    key = next(k for k in tensors if k.startswith("weights/") and tensors[k].dim() == 2)
    if name == "truncated tensor file":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif name == "flipped byte":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0x01
        state.write_bytes(bytes(data))
    elif name == "NaN weight (manifest updated)":
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")
        rewrite(tensors)
    elif name == "wrong shape (manifest updated)":
        tensors[key] = tensors[key][:1].clone()
        rewrite(tensors)
    elif name == "missing key (manifest updated)":
        rewrite({k: v for k, v in tensors.items() if k != key})
    elif name == "extra key (manifest updated)":
        rewrite({**tensors, "weights/not.a.parameter": torch.zeros(2)})
    elif name == "edited state.json":
        meta = json.loads((ckpt / "state.json").read_text())
        meta["completed"] = 1
        (ckpt / "state.json").write_text(json.dumps(meta))
    elif name == "edited log":
        log = json.loads(gzip.decompress((ckpt / "log.json.gz").read_bytes()))
        log[0]["alpha"] = 0.5
        (ckpt / "log.json.gz").write_bytes(gzip.compress(json.dumps(log).encode()))
    elif name == "log not gzip (manifest updated)":
        (ckpt / "log.json.gz").write_text("[]")
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["sha256"]["log.json.gz"] = file_digest([ckpt / "log.json.gz"])
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    elif name == "missing manifest":
        (ckpt / "manifest.json").unlink()
    elif name == "pointer escapes the folder":
        other = run.parent / f"{run.name}-elsewhere"
        shutil.copytree(ckpt, other / ckpt.name)
        (run / "latest.json").write_text(json.dumps({"checkpoint": f"../{other.name}/{ckpt.name}", "completed": 2}))
    elif name == "absolute pointer":
        (run / "latest.json").write_text(json.dumps({"checkpoint": str(ckpt.resolve()), "completed": 2}))
    elif name == "missing pointer":
        (run / "latest.json").unlink()
    elif name == "pointer not JSON":
        (run / "latest.json").write_text("checkpoint-task2")
    else:
        raise ValueError(name)


CORRUPTIONS = {  # name -> the field its refusal must name (the run folder)
    name: "output_dir"
    for name in (
        "truncated tensor file", "flipped byte", "NaN weight (manifest updated)", "wrong shape (manifest updated)",
        "missing key (manifest updated)", "extra key (manifest updated)", "edited state.json", "edited log",
        "log not gzip (manifest updated)", "missing manifest",
        "pointer escapes the folder", "absolute pointer", "missing pointer", "pointer not JSON",
    )
}  # fmt: skip


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_corruption(name: str, finished: Path, assets: dict, work: Path) -> tuple[bool, str]:
    """Damage a copy of a finished 2-task run; resuming it with a third task must be refused, nothing changed."""
    from pm_hf.commands.cli import main

    run = work / "run"
    shutil.copytree(finished, run)
    _tamper(run, name)
    before = _snapshot(run)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(base_config(assets, run)))
    stderr = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(["train", "--config", str(config), "--resume"])
    except SystemExit as exit_:
        code = exit_.code
    except Exception as err:  # noqa: BLE001
        return False, f"raised {type(err).__name__}: {err}"
    changed = [p for p, data in _snapshot(run).items() if before.get(p) != data and not p.endswith(".lock")]
    if changed:
        return False, f"exit {code}, changed {changed[:3]}: {stderr.getvalue().strip()[-200:]}"
    return contract_error(code, stderr.getvalue(), CORRUPTIONS[name])  # exit 1 or a traceback is no refusal


def finished_run(assets: dict, out: Path) -> Path:
    """A finished 2-task run of the base config (the corruption tables damage copies of it)."""
    from pm_hf.commands.cli import main

    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(base_config(assets, out, class_groups=[[0, 1], [2, 3]])))
    with contextlib.redirect_stdout(io.StringIO()):
        main(["train", "--config", str(config)])
    return out
