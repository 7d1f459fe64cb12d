"""Durable local-disk primitives: fsync of a directory, an atomic exchange of two paths, files fsynced on close.

Example:
    >>> import os, tempfile
    >>> a, b = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> open(os.path.join(a, "x"), "w").close()
    >>> exchange_dirs(a, b) in (True, False)  # False where the kernel or filesystem lacks renameat2
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import io
import os

__all__ = ["SyncedFile", "exchange_dirs", "fsync_dir"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_dir(path: str) -> None:
    """Fsync a local directory so that renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exchange_dirs(a: str, b: str) -> bool:
    """Atomically swap two local paths with ``renameat2(RENAME_EXCHANGE)``; False when unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), a)


class SyncedFile(io.FileIO):
    """A local file that is fsynced when closed, so a file that was closed survives a power cut."""

    def close(self) -> None:
        if not self.closed:
            os.fsync(self.fileno())
        super().close()
