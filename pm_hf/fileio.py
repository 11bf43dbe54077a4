"""Atomic writes: a file or a folder is written under a temporary name next to its target, flushed to disk (every
file, then the folders), then renamed over it, so an interruption (a kill, a full disk, a power cut) leaves either the
old or the new version, never a half-written one. An existing folder is swapped with the new one in one step
(`renameat2(RENAME_EXCHANGE)` on Linux); where the file system cannot, it is moved aside first, and a folder a kill
left moved aside is put back by the next writer. Temporaries of writers that died are removed by the next one. Every
file the library writes goes through here."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp-"  # temporary names contain this, followed by the writer's process id


OLD_MARK = ".old-"  # an existing folder moved aside while its replacement is renamed in (followed by the pid)


def _tmp_name(path: Path, mark: str = TMP_MARK) -> Path:
    return path.with_name(f".{path.name}{mark}{os.getpid()}")


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a writer whose temporaries must stay)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_dead_temporaries(final: Path) -> list[str]:
    """Clean up after writers of `final` that died (a kill): their temporaries (`.<name>.tmp-<pid>`) are removed,
    and an old `final` moved aside (`.<name>.old-<pid>`) is put back when no `final` replaced it. Temporaries of
    live writers are left alone. Returns the names handled."""
    final = Path(final)
    pattern = re.compile(rf"^\.{re.escape(final.name)}({re.escape(TMP_MARK)}|{re.escape(OLD_MARK)})(\d+)$")
    found = [(p, m) for p in final.parent.iterdir() if (m := pattern.match(p.name))] if final.parent.is_dir() else []
    handled = []
    for path, match in found:
        if int(match.group(2)) == os.getpid() or alive(int(match.group(2))):
            continue
        if match.group(1) == OLD_MARK and not final.exists() and not os.path.islink(final):
            os.replace(path, final)  # killed between the two renames: the old version comes back
        else:
            _remove(path)
        handled.append(path.name)
    if handled:
        fsync_path(final.parent)
    return handled


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (best effort where the platform cannot open folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)` to produce the file, then move it over `path`. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(path)
    tmp = _tmp_name(path)
    try:
        write(str(tmp))
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_path(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then every folder (deepest first), so a rename after it publishes only
    bytes that are on disk."""
    folders = [Path(folder)]
    for root, dirs, files in os.walk(folder):
        folders += [Path(root) / d for d in dirs]
        for name in files:
            fsync_path(Path(root) / name)
    for path in reversed(folders):
        fsync_path(path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the platform or file system
    cannot."""
    call = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
    if call is None:
        return False
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if call(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except (OSError, TypeError):  # no C library to call (Windows: CDLL(None) is refused)
    _LIBC = None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _move_aside(final: Path, old: Path) -> None:
    os.replace(final, old)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` (flushed first) to `final`. An existing `final` is swapped with it in one
    step, or where that cannot be done moved aside to `.<name>.old-<pid>` first (a kill in between leaves no
    `final`, and the next writer puts the old one back: `remove_dead_temporaries`); the old version is then removed.
    `final` never holds a half-written folder."""
    fsync_tree(tmp)
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):  # `tmp` now holds the old version
        _remove(tmp)
    else:
        old = _tmp_name(final, OLD_MARK)
        _remove(old)
        _move_aside(final, old)
        os.replace(tmp, final)
        _remove(old)
    fsync_path(final.parent)


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `final`; when the block succeeds it replaces `final` as a whole,
    when it raises the temporary folder is removed and `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(final)
    tmp = _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_digest(paths: list[Path]) -> str:
    """sha256 over the contents of `paths` (sorted by name)."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tree_digests(folder: Path, skip: str = "") -> dict[str, str]:
    """`file_digest` of every file under `folder` but `skip` and its temporaries (`.<skip>.tmp-<pid>`, another
    writer's), by its path relative to `folder` (with '/'), as a checkpoint's manifest records them."""
    mine = lambda p: p.name == skip or (bool(skip) and p.name.startswith(f".{skip}{TMP_MARK}"))  # noqa: E731
    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not mine(p))
    return {path.relative_to(folder).as_posix(): file_digest([path]) for path in paths}
