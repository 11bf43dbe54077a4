"""The parts of the export_faults table: a Hub stand-in kept on disk (so a killed child's pushes survive it), the fault
points, and the comparisons of folders and of pushed records with an uninterrupted run's."""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import pickle
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

from reliability_tables.common import ROOT, hub_client

sys.path.insert(0, str(ROOT / "tests"))  # the Hub stand-in

from hub_standin import GOOD_TOKEN, FakeHub, RecordingApi  # noqa: E402
from huggingface_hub import CommitOperationAdd  # noqa: E402

REPO, TOKEN = "me/faults", GOOD_TOKEN
VOLATILE = {"peak_rss_mb", "timings", "output_dir"}  # what differs between two uninterrupted runs (or their folders)


class Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing in the library catches it."""


# ------------------------------------------------------------------------------------------------ the Hub on disk
class DiskHub(FakeHub):
    """The stand-in with its record in `folder/state.pkl` (rewritten atomically after every change) and its cache in
    `folder/cache`: what a child pushed before it was killed is there for the rerun."""

    def __init__(self, folder: Path):
        super().__init__(cache_dir=Path(folder) / "cache")
        self.file = Path(folder) / "state.pkl"
        if self.file.exists():
            self.repos = pickle.loads(self.file.read_bytes())

    def api(self, *args, **kwargs) -> RealishApi:
        client = super().api(*args, **kwargs)
        client.__class__ = RealishApi
        return client

    def save(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(self.repos))
        os.replace(tmp, self.file)


class RealishApi(RecordingApi):
    """The stand-in's client, kept on disk after each change, and skipping a commit that changes nothing as
    `HfApi.create_commit` does (it drops the additions whose content the Hub holds, and with none left returns the
    branch's head without committing: "No files have been modified since last commit. Skipping to prevent empty
    commit.")."""

    def create_commit(self, repo_id: str, operations, *, commit_message: str, revision=None, **kwargs):
        repo, branch = self._writable(repo_id), revision or "main"
        head = repo["branches"].get(branch)
        held = repo["commits"][head]["files"] if head else {}
        same = [op for op in operations if isinstance(op, CommitOperationAdd) and op.path_in_repo in held and
                Path(op.path_or_fileobj).read_bytes() == held[op.path_in_repo]]  # fmt: skip
        if head and len(same) == len(operations):
            self._call("create_commit (nothing changed: skipped)", repo_id, revision=branch)
            return SimpleNamespace(oid=head, commit_url=f"https://huggingface.co/{repo_id}/commit/{head}")
        info = RecordingApi.create_commit(self, repo_id, operations, commit_message=commit_message, revision=revision,
                                          **kwargs)  # fmt: skip
        self.hub.save()
        return info

    def create_tag(self, repo_id: str, **kwargs) -> None:
        RecordingApi.create_tag(self, repo_id, **kwargs)
        self.hub.save()

    def delete_tag(self, repo_id: str, **kwargs) -> None:
        RecordingApi.delete_tag(self, repo_id, **kwargs)
        self.hub.save()

    def create_branch(self, repo_id: str, **kwargs) -> None:
        RecordingApi.create_branch(self, repo_id, **kwargs)
        self.hub.save()

    def create_repo(self, repo_id: str, **kwargs):
        url = RecordingApi.create_repo(self, repo_id, **kwargs)
        self.hub.save()
        return url


@contextlib.contextmanager
def hub_installed(folder: Path):
    """pm_hf's Hub client replaced by the stand-in kept in `folder` (made if new); no logged-in token."""

    Path(folder).mkdir(parents=True, exist_ok=True)
    with hub_client(DiskHub(folder)) as fake:
        yield fake


# ------------------------------------------------------------------------------------------------ fault points
def _points() -> dict:
    """point -> (owner, attribute, when): when is before (nothing of the call done), after (done, then the end), or
    partial (some bytes written where the call writes, then the end)."""
    import pm_hf.fileio as fileio
    import pm_hf.hub.export as export
    import pm_hf.run.checkpoint as checkpoint
    import pm_hf.run.run_export as run_export

    return {
        "adapter": (export, "export_merged_adapter", "partial"),
        "card": (export, "write_card", "before"),
        "rename": (fileio, "replace_dir", "before"),
        "swap": (fileio, "_exchange", "after"),
        "aside": (fileio, "_move_aside", "after"),  # with `_exchange` refused: a file system without it
        "push-export": (run_export, "export_run", "before"),
        "commit-before": (RealishApi, "create_commit", "before"),
        "commit-after": (RealishApi, "create_commit", "after"),
        "tag-before": (RealishApi, "create_tag", "before"),
        "checkpoint": (checkpoint, "save_file", "partial"),
    }


def _partial(owner_name: str, args) -> None:
    """Some bytes where the call would write: the adapter file of `export_merged_adapter(..., out_dir, ...)`, the
    file of `save_file(tensors, path)`."""
    path = Path(args[4]) / "adapter_model.safetensors" if owner_name == "export_merged_adapter" else Path(args[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"partial")


@contextlib.contextmanager
def points_restored():
    """Undo `install` when the block ends (in-process use)."""
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in _points().values()]
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def install(point: str, nth: int, how: str, die) -> None:
    """At the nth call of `point`: `die()` (how = kill) or OSError ENOSPC (how = disk), before, after or in the
    middle of the call."""
    if point == "none":
        return
    owner, name, when = _points()[point]
    original = owner.__dict__[name]
    if point == "aside":
        import pm_hf.fileio as fileio

        fileio._exchange = lambda a, b: False
    calls = {"n": 0}

    def end():
        if how == "disk":
            raise OSError(errno.ENOSPC, "No space left on device")
        die()

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] != nth:
            return original(*args, **kwargs)
        if when == "partial":
            _partial(name, args)
        if when in ("before", "partial"):
            end()
        result = original(*args, **kwargs)
        end()
        return result

    setattr(owner, name, wrapper)


# ------------------------------------------------------------------------------------------------ running, comparing
def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def stale_beside(out: Path) -> list[str]:
    """Temporaries next to `out` (`.<name>.tmp-*`, `.<name>.old-*`, a merge's `.<name>.run-*`) or in it."""
    near = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] if out.parent.is_dir() else []
    inside = [str(p) for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name] if out.is_dir() else []
    return near + inside


def _normal(path: str, data: bytes):
    """A file's content for comparison: tensors of a safetensors file, JSON without `VOLATILE` keys (a manifest
    without the digest of the log, which holds timings; the log itself as JSON), else the bytes."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load

        return {k: (v.dtype, tuple(v.shape), v.flatten().tolist()) for k, v in load(data).items()}
    if path.endswith(".json.gz"):  # a checkpoint's log
        return _drop(json.loads(gzip.decompress(data)))
    if path.endswith(".json"):
        value = _drop(json.loads(data))
        if path.endswith("manifest.json"):
            for name in ("state.json", "log.json.gz"):  # their VOLATILE keys are dropped below, not their digests
                value.get("sha256", {}).pop(name, None)
        return value
    return data


def _drop(value):
    if isinstance(value, dict):
        return {k: _drop(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_drop(v) for v in value]
    return value


def same_files(got: dict[str, bytes], ref: dict[str, bytes]) -> list[str]:
    """The paths whose content differs (or that only one side has)."""
    paths = sorted(set(got) | set(ref))
    return [p for p in paths if p not in got or p not in ref or _normal(p, got[p]) != _normal(p, ref[p])]


def same_folders(got: Path, ref: Path) -> tuple[bool, str]:
    files = lambda f: {k: v for k, v in tree(f).items() if v is not None}  # noqa: E731
    differ = same_files(files(got), files(ref))
    if differ:
        return False, f"differs from the uninterrupted run's output: {differ[:4]}"
    return True, f"{len(files(ref))} files equal (tensors, JSON)"


def same_record(got_hub: Path, ref_hub: Path) -> tuple[bool, str]:
    """The stand-in's record equals the uninterrupted run's: per branch the same commits in order (message, files
    whole), the same tags on the same commits; so no commit twice, none partial, none missing."""
    got, ref = DiskHub(got_hub).repos.get(REPO), DiskHub(ref_hub).repos.get(REPO)
    if got is None or ref is None:
        return False, f"no repository {REPO} pushed"
    for branch in sorted(set(got["branches"]) | set(ref["branches"])):
        a, b = _chain(got, branch), _chain(ref, branch)
        if [c["message"] for c in a] != [c["message"] for c in b]:
            return False, f"{branch}: commits {[c['message'][:40] for c in a]} vs {[c['message'][:40] for c in b]}"
        for i, (x, y) in enumerate(zip(a, b)):
            differ = same_files(x["files"], y["files"])
            if differ:
                return False, f"{branch}: commit {i + 1} differs in {differ[:3]}"
    tags = lambda repo: {t: repo["commits"][o]["message"] for t, o in repo["tags"].items()}  # noqa: E731
    if tags(got) != tags(ref):
        return False, f"tags {sorted(tags(got))} vs {sorted(tags(ref))}"
    count = sum(len(_chain(ref, b)) for b in ref["branches"])
    return True, f"the record equals an uninterrupted push's ({count} commits, {len(ref['tags'])} tags)"


def _chain(repo: dict, branch: str) -> list[dict]:
    """A branch's commits, oldest first."""
    out, oid = [], repo["branches"].get(branch)
    while oid:
        out.append(repo["commits"][oid])
        oid = repo["commits"][oid]["parent"]
    return out[::-1]


@contextlib.contextmanager
def damaged_download(damage: str, always: bool, folder: Path):
    """`snapshot_download` returns a copy of the snapshot damaged one way (a file cut short, a record dropped,
    latest.json dropped), on the first call or on every call: a download cut short, or a cache left half-filled."""
    original = RecordingApi.snapshot_download
    calls = {"n": 0}

    def damaged(self, repo_id, **kwargs):
        snapshot = Path(original(self, repo_id, **kwargs))
        calls["n"] += 1
        if calls["n"] > 1 and not always:
            return str(snapshot)
        copy = folder / str(calls["n"])
        shutil.copytree(snapshot, copy)
        state = copy / "continual_state"
        if damage == "truncate":
            target = sorted(state.glob("checkpoint-task*/state.safetensors"))[0]
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        elif damage == "drop":
            sorted(state.glob("adapters/*.safetensors"))[-1].unlink()
        else:
            (state / "latest.json").unlink()
        return str(copy)

    RealishApi.snapshot_download = damaged
    try:
        yield
    finally:
        del RealishApi.snapshot_download
