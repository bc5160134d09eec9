"""Scratch space that cannot outlive its owner: locked temporary folders and files, and a sweep of
those whose owner died (SIGKILL, power loss) so that the next run removes them.

A scratch entry is locked (flock) for as long as its process lives; the kernel drops the lock
when the process dies however it dies, so an entry whose lock can be taken has no owner. Where
flock is not available (Windows) entries are still removed on normal exit and signals, but not
swept.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

CACHE_PREFIX = "onnxzip-"
LOCK_NAME = ".owner.lock"
TEMP_SUFFIX = ".tmp"
# A folder without a lock file is being created (mkdtemp, then the lock) or is from an onnxzip
# that did not lock its caches; only one this old is taken for an orphan.
UNLOCKED_GRACE_S = 3600.0


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _owned_lock(folder: Path) -> int | None:
    """Create ``folder``'s lock file already locked (made under another name, renamed once locked)."""
    if fcntl is None:
        return None
    fd, tmp = tempfile.mkstemp(prefix=".lock.", dir=folder)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.replace(tmp, folder / LOCK_NAME)
    return fd


def _orphaned(folder: Path) -> bool:
    """True when no living process owns the scratch folder."""
    lock = folder / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_S
        except OSError:
            return False
    except OSError:
        return False
    try:
        return _try_lock(fd)
    finally:
        os.close(fd)


def sweep_orphans(root: Path | None = None) -> list[Path]:
    """Remove the scratch folders (``onnxzip-*`` in the temp folder) that no living process owns.

    Returns what was removed. Entries of other users and anything that cannot be read are left alone.
    """
    if fcntl is None:
        return []
    root = Path(root or tempfile.gettempdir())
    removed = []
    try:
        entries = [p for p in root.iterdir() if p.name.startswith(CACHE_PREFIX)]
    except OSError:
        return removed
    for entry in entries:
        try:
            if entry.is_symlink() or not entry.is_dir() or entry.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if _orphaned(entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextmanager
def scratch_dir(prefix: str = CACHE_PREFIX) -> Iterator[Path]:
    """A private temporary folder, locked while it lives and removed on exit; orphans are swept first."""
    if not prefix.startswith(CACHE_PREFIX):
        raise ValueError(f"internal error: scratch folders are named {CACHE_PREFIX}*, got '{prefix}'")
    sweep_orphans()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        fd = _owned_lock(Path(tmp))
        try:
            yield Path(tmp)
        finally:
            if fd is not None:
                os.close(fd)


def temp_pattern(target: Path) -> str:
    """The glob of the temporary files written beside ``target`` before it is renamed into place."""
    return f".{target.name}.*{TEMP_SUFFIX}"


@contextmanager
def temp_beside(target: Path, folder: bool = False) -> Iterator[Path]:
    """A locked temporary file (or folder) beside ``target``, in its folder so that a rename is
    atomic; removed on exit unless renamed. Stale ones that a dead process left for the same
    target are removed first."""
    for stale in target.parent.glob(temp_pattern(target)):
        _remove_if_orphan(stale)
    if folder:
        name = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
        fd = os.open(name, os.O_RDONLY)
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    tmp = Path(name)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    finally:
        os.close(fd)
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _remove_if_orphan(path: Path) -> None:
    """Remove a temporary file or folder beside an output if no living process holds its lock."""
    if fcntl is None or path.is_symlink():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        if _try_lock(fd):
            _remove(path)
    finally:
        os.close(fd)
