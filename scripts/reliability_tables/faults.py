"""The killed-runs table of scripts/reliability.py: a run in a child process (`reliability.py child`) is killed with
SIGKILL (or sees a full disk) at one point of the loop, then resumed in a second child; results.json and the last
checkpoint's tensors must equal an uninterrupted run's. `install_fault` also serves the in-process tests."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from reliability_tables.common import base_config

SCRIPT = Path(__file__).resolve().parents[1] / "reliability.py"  # its `child` command runs `_child` below

FAULTS = [  # (name, the function whose call is the fault point, which call of it)
    ("training, task 0", "train", 1),
    ("training, task 2", "train", 3),
    ("Fisher, task 1", "fisher", 2),
    ("merge, task 1", "merge", 2),
    ("task record write, task 1", "record", 2),
    ("checkpoint write, task 1", "checkpoint", 2),
    ("before the pointer, task 2", "pointer", 3),
    ("before results.json, task 1", "results", 2),
    ("export", "export", 1),
    ("full disk at the checkpoint, task 1", "disk", 2),
]


def _fault_points():
    """(module, attribute) of every step a fault can hit."""
    import pm_hf.hub.export as export
    import pm_hf.run.checkpoint as checkpoint
    import pm_hf.run.loop as continual
    import pm_hf.run.task_passes as passes

    return [(continual, "task_trainer"), (passes, "estimate_fisher"), (continual, "merge_task"),
            (continual, "write_outputs"), (export, "save_file"), (export, "export_merged_adapter"),
            (checkpoint, "save_file"), (checkpoint, "atomic_write_text")]  # fmt: skip


@contextlib.contextmanager
def fault_points_restored():
    """Undo `install_fault` when the block ends (for in-process use)."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in _fault_points()]
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def install_fault(point: str, nth: int, die) -> None:
    """Make the nth call of the loop's step `point` end the process (`die()`), before or in the middle of it."""
    from transformers import TrainerCallback

    import pm_hf.hub.export as export
    import pm_hf.run.checkpoint as checkpoint
    import pm_hf.run.loop as continual
    import pm_hf.run.task_passes as passes

    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == nth

    def wrap(owner, name, partial=None, error=None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if hit():
                if error is not None:
                    raise error
                if partial is not None:
                    partial(*args, **kwargs)
                die()
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    class Kill(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.armed = hit()

        def on_step_end(self, args, state, control, **kwargs):
            if self.armed and state.global_step == 2:
                die()

    partial_file = lambda tensors, path, **kw: Path(path).write_bytes(b"partial")  # noqa: E731
    if point == "train":
        make = continual.task_trainer
        continual.task_trainer = lambda loop, t, task: _with_callback(make(loop, t, task), Kill())
    elif point == "fisher":
        wrap(passes, "estimate_fisher")
    elif point in ("merge", "results", "export"):
        names = {"merge": "merge_task", "results": "write_outputs"}
        wrap(export if point == "export" else continual, names.get(point, "export_merged_adapter"))
    elif point == "record":
        wrap(export, "save_file", partial=partial_file)
    elif point == "checkpoint":
        wrap(checkpoint, "save_file", partial=partial_file)
    elif point == "pointer":
        wrap(checkpoint, "atomic_write_text")
    elif point == "disk":
        wrap(checkpoint, "save_file", error=OSError(28, "No space left on device"))
    else:
        raise ValueError(point)


def _with_callback(trainer, callback):
    trainer.add_callback(callback)
    return trainer


def _child(config: str, point: str | None, nth: int, resume: bool) -> int:
    from pm_hf.commands.cli import main

    if point:
        install_fault(point, nth, lambda: os.kill(os.getpid(), signal.SIGKILL))
    argv = ["train", "--config", config] + (["--resume"] if resume else [])
    try:
        return main(argv)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        return 3  # the full disk: the process ends with the error, state intact


def run_fault(name: str, point: str, nth: int, assets: dict, work: Path, reference: dict) -> tuple[bool, str]:
    """Kill a run at the fault point in a child process, resume it in another; compare with the reference."""
    work.mkdir(parents=True)
    out = work / "run"
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(base_config(assets, out)))
    child = [sys.executable, str(SCRIPT), "child", str(config)]
    first = subprocess.run([*child, "--point", point, "--nth", str(nth)], capture_output=True, text=True)
    struck, detail = fault_struck(point, first.returncode, first.stderr)
    if not struck:
        return False, detail
    second = subprocess.run([*child, "--resume"], capture_output=True, text=True)
    if second.returncode != 0:
        return False, f"resume failed: {second.stderr.strip()[-300:]}"
    return compare_with_reference(out, reference)


def fault_struck(point: str, code: int, stderr: str) -> tuple[bool, str]:
    """Whether the first child ended by the fault itself: SIGKILL, or exit 3 for the full disk (`_child`). Any other
    end (exit 1 with a traceback, an input error, a clean finish) is a failure of the case, not a fault survived."""
    expected = 3 if point == "disk" else -signal.SIGKILL
    if code == expected:
        return True, ""
    if code == 0:
        return False, "the fault did not happen"
    return False, f"the first run ended with exit {code}, not by the fault ({expected}): {stderr.strip()[-300:]}"


def run_outputs(out: Path) -> dict:
    from safetensors.torch import load_file

    results = json.loads((out / "results.json").read_text())
    ckpt = out / json.loads((out / "latest.json").read_text())["checkpoint"]
    tensors = load_file(str(ckpt / "state.safetensors"))
    keys = ("accuracy_matrix", "til_accuracy_matrix", "alphas", "alphas_raw", "pre_merge_acc")
    return {"results": {k: results[k] for k in keys}, "tensors": tensors}


def compare_with_reference(out: Path, reference: dict) -> tuple[bool, str]:
    import torch

    got = run_outputs(out)
    if got["results"] != reference["results"]:
        return False, f"results differ: {got['results']['alphas']} vs {reference['results']['alphas']}"
    differ = [k for k, v in reference["tensors"].items() if not torch.equal(v, got["tensors"].get(k, torch.empty(0)))]
    if differ or set(got["tensors"]) != set(reference["tensors"]):
        return False, f"checkpoint tensors differ: {differ[:3]}"
    return True, "identical to the uninterrupted run"
