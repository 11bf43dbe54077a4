"""The run folder (`output_dir`): one process owns it at a time (an exclusive lock, which goes with its process: a
killed run's lock file holds nothing), `train` never writes over a run it was not asked to continue, temporaries left
by a killed run are removed, a resumed run is the saved run — its config and its data and model fingerprints — or it
is refused with the list of differences. Readers (`evaluate`, `export`, `push`) take no lock: they read a private view
of the last complete checkpoint (`checkpoint_view`), so a run that is training goes on undisturbed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
from filelock import FileLock, Timeout

from ..config.checks import invalid
from ..fileio import TMP_MARK, alive
from ..method.strategies.knobs import unrecorded_changes

LOCK = ".pm_hf.lock"
IN_USE = ("in use by another pm_hf process (a run training there); wait for it, or choose another output_dir "
          "(several processes launched on purpose: on a machine without a GPU set `use_cpu: true`).")  # fmt: skip
LOGS = "runs"  # TensorBoard's logs of the sequence (`report_to`), appended to by a resumed run
OWNED = ("latest.json", "results.json", "adapters", "merged_adapter", "tasks", "accuracy_matrix.png",
         "accuracy_curve.png")  # fmt: skip
# Fields that do not change what a run computes: paths, logging, progress bars, evaluation batching, Hub pushes.
INERT = {
    "output_dir", "logging_dir", "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter",
    "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
    "disable_tqdm", "log_level", "log_level_replica", "log_on_each_node", "per_device_eval_batch_size",
    "eval_accumulation_steps", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "save_strategy", "save_steps", "save_total_limit", "save_on_each_node",
    "save_only_model", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy",
    "hub_always_push", "hub_revision", "push_continual_state", "overwrite_hub_state", "overwrite_output_dir",
    "skip_memory_metrics",
    "ddp_timeout", "local_rank",
    "resume_from_checkpoint", "resume_from", "do_train", "do_eval", "do_predict", "debug", "divergence_threshold",
    "log_loss_increase",
}  # fmt: skip
APPENDABLE = ("class_groups", "task_datasets", "max_length_per_task")  # a longer list = more tasks appended
BATCH = ("per_device_train_batch_size", "gradient_accumulation_steps")  # only their product x processes matters
LAUNCH = ("deepspeed", "fsdp", "fsdp_config")  # how training ran: nothing a finished run's evaluation depends on


@contextlib.contextmanager
def output_lock(out: Path, enabled: bool = True) -> Iterator[None]:
    """An exclusive lock on output_dir for the run: a second process writing there fails at once."""
    if not enabled:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / LOCK)  # flock on POSIX, msvcrt on Windows; the file stays, the lock goes with the process
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise invalid("output_dir", str(out), IN_USE) from None
    try:
        yield
    finally:
        lock.release()


def in_use(out: Path) -> bool:
    """Whether a live process holds `out`'s lock (reading only: the lock file is not created, a stale one is free)."""
    path = Path(out) / LOCK
    if not path.is_file():
        return False
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


@contextlib.contextmanager
def lock_if_idle(out: Path) -> Iterator[bool]:
    """`out`'s lock when no process holds it (yields True), else nothing (False): a reader that would write into the
    run folder (`evaluate` rewriting results.json) does so only while no run trains there, and never waits."""
    lock = FileLock(Path(out) / LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def holds_run(out: Path) -> bool:
    return any(p.name in OWNED or p.name.startswith("checkpoint-task") for p in _others(out))


def remove_stale(out: Path) -> list[str]:
    """Remove temporaries that a killed run left (`.<name>.tmp-<pid>`, `.<name>.old-*`); returns their names."""
    stale = [p for folder in (out, out / "adapters") if folder.is_dir() for p in folder.iterdir()]
    stale = [p for p in stale if p.name.startswith(".") and (TMP_MARK in p.name or ".old-" in p.name)]
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return [p.name for p in stale]


def _others(out: Path) -> list[Path]:
    """What `out` holds besides the lock, a killed run's temporaries, its TensorBoard logs (`runs/`) and folders of a
    run's own that hold no file (a run stopped before its first checkpoint, e.g. diverged in its first task, leaves
    nothing to resume but its logs)."""
    is_stale = lambda p: p.name.startswith(".") and (TMP_MARK in p.name or ".old-" in p.name)  # noqa: E731
    empty = lambda p: not any(q.is_file() for q in p.rglob("*"))  # noqa: E731
    logs = lambda p: all(q.is_dir() or q.name.startswith("events.out.tfevents") for q in p.rglob("*"))  # noqa: E731
    is_bare = lambda p: p.is_dir() and ((p.name == LOGS and logs(p)) or (p.name in OWNED and empty(p)))  # noqa: E731
    return [p for p in out.iterdir() if p.name != LOCK and not is_stale(p) and not is_bare(p)] if out.is_dir() else []


def check_writable(out: Path) -> None:
    """`out` is a folder, or can be made one: no file in its place or above it, its nearest existing folder writable."""
    out = Path(out)
    existing = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing in (out, out.absolute()) else f"lies under {str(existing)!r}, which is a file"
        raise invalid("output_dir", str(out), f"{where}: give a folder (new or empty).")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise invalid("output_dir", str(out), f"{str(existing)!r} is not writable here: give a folder you can write.")


def check_claim(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse (reading only) a path that is not a folder one can create or write, a folder another live process holds
    (exit 2 at once, instead of waiting for or writing into a run in progress), and a folder that holds a run or
    foreign files, unless resuming or overwriting."""
    check_writable(out)
    if in_use(Path(out)):
        raise invalid("output_dir", str(out), IN_USE)
    _check_contents(out, resume, overwrite)


def _check_contents(out: Path, resume: bool, overwrite: bool) -> None:
    others = _others(out)
    if not others or ((resume or overwrite) and holds_run(out)):
        return
    names = sorted(p.name for p in others)[:3]
    if holds_run(out):
        fix = "holds a pm_hf run: pass --resume to continue it, or --overwrite_output_dir to replace it."
    elif resume:  # nothing of a run to continue, and files that are not a run's: never trained among them
        fix = f"is not empty and holds no pm_hf run to resume ({names}): check the path."
    elif overwrite:  # it replaces a run's own files only: a run is never written among other files
        fix = f"is not empty and holds no pm_hf run to replace ({names}): use a new or empty folder."
    else:
        fix = f"is not empty and holds no pm_hf run ({names}): use a new or empty folder."
    raise invalid("output_dir", str(out), fix)


def claim(out: Path, resume: bool, overwrite: bool) -> None:
    """Make `out` this run's folder (under its lock): temporaries of a killed run removed, an old run replaced when
    overwriting, a run or foreign files refused otherwise."""
    check_writable(out)
    _check_contents(out, resume, overwrite)
    remove_stale(out)
    if overwrite and not resume:
        for path in _others(out):
            if path.name in OWNED or path.name.startswith("checkpoint-task"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def _group_differences(name: str, saved: dict, new: dict, skip: tuple[str, ...] = ()) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(new)):
        if key in INERT or key in BATCH or key in skip or key.startswith("_"):
            continue
        old, now = saved.get(key), new.get(key)
        if key in APPENDABLE and isinstance(old, list) and isinstance(now, list) and now[: len(old)] == old:
            continue
        if old != now:
            out.append(f"{key}: {old!r} -> {now!r}")
    return out


def _global_batch(record: dict) -> int:
    args = record.get("PMConfig", {})
    return args.get(BATCH[0], 1) * args.get(BATCH[1], 1) * record.get("world_size", 1)


def _knob_differences(saved: dict, new: dict) -> list[str]:
    """The merge strategy's declared knobs as resolved (`merge_knobs`, defaults included) that differ. A knob the
    saved record lacks (a record of a pm_hf that kept none, or a knob added since) is reported only where its default
    may have differed then (`Knob.before`) and the saved config did not set it: a knob added since keeps, at its
    default, what that pm_hf computed."""
    old_knobs, new_knobs = saved.get("merge_knobs") or {}, new.get("merge_knobs")
    if new_knobs is None:
        return []
    unrecorded = {name: value for name, value in new_knobs.items() if name not in old_knobs}
    diffs = unrecorded_changes(saved.get("MergeArguments", {}).get("merge_parameters"), unrecorded)
    for name in sorted(old_knobs):
        if name not in new_knobs:
            diffs.append(f"merge knob {name}: {old_knobs[name]} -> not a knob of this pm_hf's strategy")
        elif old_knobs[name] != new_knobs[name]:
            diffs.append(f"merge knob {name} (its default where not set): {old_knobs[name]} -> {new_knobs[name]}")
    return diffs


def config_differences(saved: dict, new: dict, training: bool = True) -> list[str]:
    """What differs between a saved run record and a new one, in fields that change what is computed; with
    `training=False` (a finished run evaluated or exported) how its training was launched and batched is left out."""
    diffs = []
    for group in sorted({k for k in (*saved, *new) if k.endswith("Arguments") or k == "PMConfig"}):
        diffs += _group_differences(group, saved.get(group, {}), new.get(group, {}), () if training else LAUNCH)
    if training and _global_batch(saved) != _global_batch(new):
        what = "global batch (per-device x accumulation x processes)"
        diffs.append(f"{what}: {_global_batch(saved)} -> {_global_batch(new)}")
    if training:
        diffs += _knob_differences(saved, new)
    old_fp, new_fp = saved.get("fingerprints", {}), new.get("fingerprints", {})
    if old_fp.get("model") != new_fp.get("model"):
        diffs.append("the model's files (config, weights, tokenizer) differ from the saved run's")
    tasks = old_fp.get("tasks", [])
    changed = [t for t, (a, b) in enumerate(zip(tasks, new_fp.get("tasks", []))) if a != b]
    if changed or len(new_fp.get("tasks", [])) < len(tasks):
        diffs.append(f"the data of tasks {changed or 'at the end'} differs from the saved run's")
    return diffs


def refuse_changes(saved: dict, new: dict, out: Path, training: bool = True) -> None:
    diffs = config_differences(saved, new, training)
    if diffs:
        fix = "resume continues the same run; these differ from the saved one: " + "; ".join(diffs)
        raise invalid("resume", str(out), fix + ". Start a new output_dir for a different run.")


def dataset_digest(ds) -> str:
    """sha256 of a dataset's rows as stored (before lazy transforms), independent of how they are chunked."""
    table = ds.with_format("arrow")[:]
    table = pa.Table.from_batches(table.combine_chunks().to_batches()) if table.num_rows else table
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema.remove_metadata()) as writer:
        writer.write_table(table.replace_schema_metadata(None))
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ readers
VIEW_TRIES = 50  # the run wrote a new checkpoint this many times while a view was taken: give up


def _link(src: Path, dst: Path) -> None:
    """`dst` becomes `src`'s file: a hard link (the bytes stay even when the run removes or replaces `src`), or a
    copy where the file system has none."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError as err:
        if not src.exists():
            raise FileNotFoundError(src) from err
        shutil.copy2(src, dst)


def _pointer(out: Path) -> tuple[str, int, int] | None:
    """(checkpoint name, tasks completed, inode) of `latest.json`, None when there is none."""
    try:
        stat, record = (out / "latest.json").stat(), json.loads((out / "latest.json").read_text())
        return str(record["checkpoint"]), int(record["completed"]), stat.st_ino
    except (ValueError, KeyError, TypeError):  # damaged: the reader's own checks say so
        return "", -1, -1
    except OSError:  # none, or `out` is no folder
        return None


def _take_view(out: Path, view: Path, name: str, completed: int) -> None:
    """Link into `view` what a reader of the checkpoint `name` needs: the pointer, the checkpoint's files and the
    adapter log of its `completed` tasks. Not results.json and the plots: they are written after the checkpoint, one
    file after the other, so no file tells which task they describe; a reader rebuilds them from the checkpoint's
    log."""
    _link(out / "latest.json", view / "latest.json")
    for path in sorted((out / name).iterdir()):
        _link(path, view / name / path.name)
    for t in range(completed):
        record = out / "adapters" / f"task_{t}.safetensors"
        if record.exists():
            _link(record, view / "adapters" / record.name)


@contextlib.contextmanager
def _view_root(out: Path) -> Iterator[Path]:
    """A temporary folder inside `out` (hard links need the same file system; its name marks it as a temporary, so
    the next `train` or reader there removes one a killed reader left), or the system's where `out` is not writable."""
    for left in out.glob(f".view{TMP_MARK}*-*"):  # views of readers that were killed: nobody else removes them
        pid = left.name[len(f".view{TMP_MARK}") :].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    try:
        root = Path(tempfile.mkdtemp(prefix=f".view{TMP_MARK}{os.getpid()}-", dir=out))
    except OSError:
        root = Path(tempfile.mkdtemp(prefix="pm_hf-view-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def checkpoint_view(out: Path) -> Iterator[Path]:
    """A private folder that reads as `out` at its last complete checkpoint, for `evaluate`, `export` and `push` of
    a run that may be training: never a half-written checkpoint (only a renamed, complete one is named by
    latest.json), never files of two tasks (taken again when latest.json moved on meanwhile; results.json and the
    plots left to the reader to rebuild from the checkpoint), and the training is neither locked nor slowed (hard
    links: no bytes copied, the run's files untouched). A folder without latest.json is yielded as it is (nothing
    to be consistent with); the view is removed on exit."""
    out = Path(out)
    if _pointer(out) is None:
        yield out
        return
    with _view_root(out) as tmp:
        for attempt in range(VIEW_TRIES):
            view = Path(tmp) / str(attempt)
            name, completed, inode = _pointer(out) or ("", -1, -1)
            if not re.fullmatch(r"checkpoint-task\d+", name):  # no pointer now, or a damaged one: read as it is
                yield out
                return
            try:
                _take_view(out, view, name, completed)
            except FileNotFoundError:  # the run replaced that checkpoint while it was being linked
                time.sleep(0.01 * attempt)
                continue
            now = _pointer(out)
            if now is not None and now[0] == name and now[2] == inode:
                yield view
                return
            time.sleep(0.01 * attempt)
        raise invalid("output_dir", str(out), "its checkpoint kept changing while it was read: try again.")
