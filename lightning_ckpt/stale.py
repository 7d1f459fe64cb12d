"""Staging directories: a writer holds a shared ``flock`` on its own; a later save removes those nobody holds.

A killed process leaves its hidden staging directory (``.<name>.partial-<token>``) behind. A
staging directory is removed only when no live process holds its lock, it is older than
:data:`STALE_AFTER_S` (or the caller's age), and it holds nothing but this format's files, so
another live process's staging is never touched.

Example:
    >>> import os, tempfile
    >>> from lightning_ckpt.storage import Storage
    >>> storage, folder = Storage.open(tempfile.mkdtemp())
    >>> staged = os.path.join(folder, ".ba1.partial-live")
    >>> hold(staged)  # this process writes it: never stale
    >>> remove_if_stale(storage, staged, min_age_s=0)
    False
    >>> release(staged)
    >>> remove_if_stale(storage, staged, min_age_s=0)
    True
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

from lightning_ckpt.storage import Storage
from lightning_ckpt.targets import is_checkpoint_file

__all__ = ["STALE_AFTER_S", "discard", "forget_removed", "hold", "lock_dir", "release", "remove_if_stale"]

STALE_AFTER_S = 60.0
"""A staging directory nobody holds is removed by a later save once it is this old (seconds)."""

_held: dict[str, int] = {}  # staging directories this process is writing: path -> descriptor holding its flock
_held_lock = threading.Lock()


def lock_dir(path: str, flags: int = fcntl.LOCK_SH) -> int | None:
    """Open directory ``path`` and ``flock`` it; ``None`` when it is gone or locks fail (busy, unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, flags)
    except OSError:
        os.close(fd)
        return None
    return fd


def hold(staged: str) -> None:
    """Create ``staged`` and hold a shared lock on it while this process writes it (released at the commit)."""
    while True:
        os.makedirs(staged, exist_ok=True)
        fd = lock_dir(staged)
        if fd is None:  # no locks on this filesystem: the directory is never seen as stale (never removed)
            return
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(staged))
        except FileNotFoundError:
            same = False
        if same:
            with _held_lock:
                _held[staged] = fd
            return
        os.close(fd)  # a cleaner removed it between mkdir and lock: make it again


def release(staged: str) -> None:
    with _held_lock:
        fd = _held.pop(staged, None)
    if fd is not None:
        os.close(fd)


def forget_removed() -> None:
    """Release the locks of staging directories a failed save removed (no descriptor leaks)."""
    with _held_lock:
        gone = [path for path in _held if not os.path.lexists(path)]
    for path in gone:
        release(path)


def discard(storage: Storage, staged: str) -> None:
    storage.remove_tree(staged)
    release(staged)


def remove_if_stale(storage: Storage, path: str, min_age_s: float) -> bool:
    """Remove staging directory ``path`` if no process holds it, it is old enough and holds only our files."""
    try:
        if os.path.islink(path) or time.time() - os.stat(path).st_mtime < min_age_s:
            return False
    except FileNotFoundError:
        return False
    fd = lock_dir(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is None:  # a live writer holds it (or this filesystem has no locks): leave it
        return False
    try:
        if not os.path.samestat(os.fstat(fd), os.lstat(path)):
            return False
        if not all(is_checkpoint_file(n) for n in storage.listdir(path)):
            return False
        storage.remove_tree(path)
        return True
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTEMPTY):  # removed meanwhile by someone else
            return False
        raise
    finally:
        os.close(fd)
