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
# git's rules for a branch name (`git check-ref-format`), which the Hub applies: no control characters, spaces or
# ~^:?*[\, no '..', '@{' or '//', no part starting with '.', not starting with '-' or '/', not ending with '/', '.'
# or '.lock'


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
