"""What `pm-hf evaluate | export | push | merge` (and `export_run_dir`, `push_run_dir` from Python) check before they
load a model or write a byte: the run folder (a
folder holding a verified checkpoint), the destination folder (new, empty or a previous export: never a file, nor a
folder of other files, which the export would replace), the export's mode and rank, the repository id and branch the
Hub would refuse. A refused command leaves no folder it made. Errors are `<field> = <value>: <fix>`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError, invalid

MODES = ("adapter", "adapter-svd", "merged", "per-task")
EXPORT_INFO = "pm_hf_export.json"  # `pm_hf.hub.export.INFO`: what marks a folder as an export


def run_folder(value: str) -> Path:
    """The output_dir of a `pm-hf train` run: a folder holding a checkpoint that verifies (read, nothing written)."""
    from .checkpoint import load_checkpoint

    path = Path(value)
    if not path.is_dir():
        what = "is a file" if path.exists() else "not found"
        raise invalid("run_dir", value, f"{what}: pass the output_dir of a `pm-hf train` run.")
    with as_run_dir():
        if load_checkpoint(path) is None:
            raise invalid("run_dir", value, "holds no checkpoint (latest.json): pass the output_dir of a run.")
    return path


def holds_checkpoint(value: str) -> bool:
    """Whether `value` is a run's folder (its `latest.json` there), not an export or a model."""
    from .checkpoint import LATEST

    return (Path(value) / LATEST).is_file()


@contextlib.contextmanager
def as_run_dir() -> Iterator[None]:
    """A run folder's errors name the command's argument, `run_dir` (the checkpoint's readers say `output_dir`)."""
    try:
        yield
    except InputError as err:
        field, sep, rest = str(err).partition(" = ")
        if sep and field == "output_dir":
            err.args = (f"run_dir = {rest}",)
        raise


def export_target(run_dir: str, output: str) -> Path:
    """`destination(output)` for an export of the run in `run_dir`: never the run folder, nor a folder in it (its own
    merged_adapter/ or tasks/ would be replaced)."""
    target, run = Path(output).resolve(), Path(run_dir).resolve()
    if target == run or run in target.parents:
        raise invalid("output", output, "give a new folder outside the run folder, not the run folder or one in it.")
    return destination(output)


def destination(value: str, field: str = "output") -> Path:
    """A folder the command may write as a whole: new, empty or a previous export (replaced), with no file in its
    place or above it, and writable."""
    path = Path(value)
    existing = next((p for p in (path, *path.absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing in (path, path.absolute()) else f"lies under {str(existing)!r}, a file"
        raise invalid(field, value, f"{where}: give a new folder (or a previous export to replace).")
    if path.is_dir():
        others = sorted(p.name for p in path.iterdir())
        if others and not _is_export(path):
            fix = f"holds other files ({others[:3]}) that the export would replace: give a new or empty folder."
            raise invalid(field, value, fix)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise invalid(field, value, f"{str(existing)!r} is not writable here: give a folder you can write.")
    return path


def _is_export(path: Path) -> bool:
    """An export folder (`pm_hf_export.json`), or one of per-task adapters (`task_<t>/pm_hf_export.json`)."""
    if (path / EXPORT_INFO).is_file():
        return True
    entries = list(path.iterdir())
    return all(p.is_dir() and p.name.startswith("task_") and (p / EXPORT_INFO).is_file() for p in entries)


def export_mode(mode: str, rank: int | None) -> None:
    if mode not in MODES:
        raise invalid("mode", mode, "use 'adapter', 'adapter-svd', 'merged' or 'per-task'.")
    if rank is not None and mode != "adapter-svd":
        raise invalid("rank", rank, "only --mode adapter-svd keeps a rank: drop --rank, or use that mode.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):  # a TypeError, before
        raise invalid("rank", rank, "give an integer rank K >= 1.")
    if mode == "adapter-svd" and (rank is None or rank < 1):
        raise invalid("rank", rank, "adapter-svd needs the rank to keep: give --rank K with K >= 1.")


def repo_id(value: str) -> None:
    """A repository id the Hub accepts (`huggingface_hub`'s own rules: NAME or USER/NAME, 96 characters at most)."""
    from ..hub.repository import check_repo_id  # here: `pm-hf --help` loads no Hub client

    check_repo_id(value, "hub_model_id")


def branch(value: str | None) -> None:
    from ..hub.repository import check_branch

    check_branch(value, "revision")


@contextlib.contextmanager
def no_new_folders(path: str) -> Iterator[None]:
    """On an error, remove the folders above `path` that did not exist before (only while they are empty)."""
    absolute = Path(path).absolute()
    missing = [p for p in absolute.parents if not p.exists()]
    try:
        yield
    except BaseException:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def check_objects(*values) -> None:
    """`ContinualTrainer`'s objects: the argument groups (lora, fisher, merge, data, model) are their dataclasses (or
    None), the processor an object, compute_metrics a function."""
    from ..config.groups import DataArguments, FisherArguments, LoraArguments, MergeArguments, ModelArguments

    kinds = {"lora_args": LoraArguments, "fisher_args": FisherArguments, "merge_args": MergeArguments,
             "data_args": DataArguments, "model_args": ModelArguments}  # fmt: skip
    *groups, processing_class, compute_metrics = values
    for (name, kind), value in zip(kinds.items(), groups):
        if value is not None and not isinstance(value, kind):
            raise invalid(name, type(value).__name__, f"give a `{kind.__name__}` (pm_hf.config.groups), or None.")
    if isinstance(processing_class, (str, os.PathLike)):
        fix = "give the tokenizer or image processor object (AutoTokenizer.from_pretrained(...)), or None."
        raise invalid("processing_class", str(processing_class), fix)
    if compute_metrics is not None and not callable(compute_metrics):
        raise invalid("compute_metrics", compute_metrics, "give a function `fn(EvalPrediction) -> dict`, or None.")


def resume_flag(resume, output_dir: str, stop_after) -> bool:
    """`train`'s arguments: `resume_from_checkpoint` True/False, or output_dir's path (Trainer takes a checkpoint's
    path; a run resumes from its own folder only); `stop_after` a count of tasks >= 1, or None."""
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise invalid("stop_after", stop_after, "give the number of tasks to have completed (>= 1), or None.")
    if resume is None:  # Trainer.train's default (and PMConfig's resume_from_checkpoint): no resume
        return False
    if isinstance(resume, (str, os.PathLike)):
        if Path(resume).resolve() != Path(output_dir).resolve():
            fix = "a run resumes from its own folder: pass True (args.output_dir's run), or start a new run from that "
            raise invalid("resume", str(resume), fix + "one with args.resume_from.")  # train()'s argument, so named
        return True
    if not isinstance(resume, bool):
        raise invalid("resume", resume, "give True (resume args.output_dir's run) or False.")
    return resume


def callback_instances(callbacks) -> list:
    """`ContinualCallback`s and `TrainerCallback`s, a class made an instance (as Trainer takes them)."""
    from transformers import TrainerCallback

    from ..method.callbacks import ContinualCallback

    out = []
    for callback in callbacks or []:
        callback = callback() if isinstance(callback, type) else callback
        if not isinstance(callback, (ContinualCallback, TrainerCallback)):
            fix = "give `ContinualCallback`s and `TrainerCallback`s (classes or instances)."
            raise invalid("callbacks", type(callback).__name__, fix)
        out.append(callback)
    return out
