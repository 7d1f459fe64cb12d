"""Where checkpoints live: local disk (fast path, atomic renames) or any fsspec filesystem.

This is the only module that imports ``fsspec``. A :class:`Storage` wraps one filesystem; paths
handed to its methods are absolute paths on that filesystem (for local disk, ordinary paths).

Local writes are atomic: data goes to a hidden temporary name, is fsynced, renamed into place,
and the directory is fsynced so the rename itself survives a power cut. Object stores have no
rename; there a file is visible only once its upload completes, and the manifest written last
is the commit (see :mod:`lightning_ckpt.commit`).

Example:
    >>> import tempfile, os
    >>> storage, root = Storage.open(tempfile.mkdtemp())
    >>> storage.write_bytes_atomic(storage.join(root, "hello.txt"), b"hi")
    >>> storage.read_bytes(storage.join(root, "hello.txt"))
    b'hi'
    >>> storage.is_local
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import inspect
import os
import shutil
import uuid
from collections.abc import Mapping
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations, registry

from lightning_ckpt import layout
from lightning_ckpt.errors import ConfigError, ConfigTypeError
from lightning_ckpt.redact import register_secrets

__all__ = ["HIDDEN", "Storage", "check_storage_options", "check_url", "fsync_dir", "is_url"]

HIDDEN = "<hidden>"
"""How ``storage_options`` appear in messages: their values may be credentials, so they never do."""

_OPTIONS_EXAMPLE = "{'key': ..., 'secret': ..., 'client_kwargs': {'endpoint_url': 'https://...'}}"
# Filesystems that silently keep options they do not know (s3fs hands them to aiobotocore's AioSession
# only when it first connects, which then fails with a TypeError that does not say where it came from).
_CHECKED_PROTOCOLS = frozenset({"s3", "s3a"})

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def is_url(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` names a non-local fsspec location (``s3://``, ``memory://``, ...).

    Example:
        >>> is_url("s3://bucket/x"), is_url("/tmp/x"), is_url("file:///tmp/x")
        (True, False, False)
    """
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def check_url(url: str, argument: str, example: str) -> None:
    """Raise :class:`ConfigError` naming ``argument`` when ``url`` uses a protocol fsspec does not know.

    Example:
        >>> check_url("s4://bucket/run", "folder", "'s3://bucket/run'")
        Traceback (most recent call last):
        ...
        lightning_ckpt.errors.ConfigError: folder='s4://bucket/run' is not valid. Unknown protocol 's4'; ...
    """
    if not is_url(url) or "::" in url:  # chained URLs (simplecache::s3://...) name several protocols
        return
    protocol = url.split("://", 1)[0]
    if protocol not in known_implementations and protocol not in registry:
        reason = f"Unknown protocol {protocol!r}; use a local path or an fsspec URL (s3://, gs://, az://, memory://)"
        raise ConfigError(argument, url, example, reason)


@functools.cache
def _accepted_options(protocol: str) -> frozenset[str] | None:
    """Option names the filesystem of ``protocol`` accepts, or ``None`` when they cannot be listed."""
    if protocol not in _CHECKED_PROTOCOLS:
        return None
    try:
        fs_class = fsspec.get_filesystem_class(protocol)
        from aiobotocore.session import AioSession
    except ImportError:  # opening the URL reports the missing package
        return None
    names = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}  # fsspec's own
    for init in [klass.__dict__["__init__"] for klass in fs_class.__mro__ if "__init__" in klass.__dict__] + [
        AioSession.__init__
    ]:
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names.update(p.name for p in parameters if p.kind in kinds and p.name != "self")
    return frozenset(names)


def check_storage_options(
    options: object, url: str | None = None, *, argument: str = "storage_options"
) -> dict[str, Any]:
    """Validate ``storage_options`` (for ``url`` when given) and return them as a new dict.

    Messages name the argument and, for an unknown option, the option's name, but never a value:
    values may be credentials.

    Raises:
        ConfigTypeError: ``options`` is not a mapping of option names.
        ConfigError: an option that the filesystem of ``url`` does not have (S3).

    Example:
        >>> check_storage_options({"key": "AKIA...", "secret": "..."}, "s3://bucket/run")["key"]
        'AKIA...'
        >>> check_storage_options({"secret_key": "..."}, "s3://bucket/run")
        Traceback (most recent call last):
        ...
        lightning_ckpt.errors.ConfigError: storage_options='<hidden>' is not valid. 'secret_key' is not an ...
    """
    if options is None:
        return {}
    if isinstance(options, Mapping):
        register_secrets(options)  # scrubbed from every log record from now on, whoever logs them
    if not isinstance(options, Mapping):
        reason = f"{argument} must be a dict of fsspec options, got {type(options).__name__}"
        raise ConfigTypeError(argument, HIDDEN, _OPTIONS_EXAMPLE, reason)
    for name in options:
        if not isinstance(name, str):
            reason = f"Its keys must be option names (str), not {type(name).__name__}"
            raise ConfigTypeError(argument, HIDDEN, _OPTIONS_EXAMPLE, reason)
    if url is not None and is_url(url) and "::" not in url:
        protocol = url.split("://", 1)[0]
        accepted = _accepted_options(protocol)
        unknown = sorted(set(options) - accepted) if accepted is not None else []
        if unknown:
            fs_class = fsspec.get_filesystem_class(protocol)
            reason = (
                f"{unknown[0]!r} is not an option of {protocol}:// ({fs_class.__module__}.{fs_class.__name__});"
                f" its options are {', '.join(sorted(accepted or ()))}"
            )
            raise ConfigError(argument, HIDDEN, _OPTIONS_EXAMPLE, reason)
    return dict(options)


def fsync_dir(path: str) -> None:
    """Fsync a local directory so that renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange_dirs(a: str, b: str) -> bool:
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


class Storage:
    """One filesystem: local disk or any fsspec protocol.

    Use :meth:`Storage.open` to get a storage and the root path for a path or URL.

    Args:
        fs: the fsspec filesystem.
        protocol: the URL protocol (``"file"`` for local disk).
    """

    def __init__(self, fs: Any, protocol: str) -> None:
        self.fs = fs
        self.protocol = protocol
        self.is_local = isinstance(fs, LocalFileSystem)
        self.clients: dict[str, Any] = {}  # other clients for the same store (e.g. boto3), made once

    @classmethod
    def open(cls, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> tuple[Storage, str]:
        """Return the storage for ``url`` and the path inside it.

        Example:
            >>> storage, path = Storage.open("memory://runs/a")
            >>> storage.protocol, path
            ('memory', '/runs/a')
        """
        text = os.fspath(url)
        options = check_storage_options(storage_options, text)
        if not is_url(text):
            local = text[len("file://") :] if text.startswith("file://") else text
            return cls(LocalFileSystem(), "file"), os.path.abspath(os.path.expanduser(local))
        fs, path = fsspec.core.url_to_fs(text, **options)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        return cls(fs, protocol), path

    def __repr__(self) -> str:
        return f"Storage(protocol={self.protocol!r})"

    def url(self, path: str) -> str:
        """The path as a user would type it: plain for local disk, ``protocol://path`` otherwise."""
        if self.is_local:
            return path
        return self.fs.unstrip_protocol(path)

    def join(self, *parts: str) -> str:
        """Join path components with the filesystem's separator."""
        if self.is_local:
            return os.path.join(*parts)
        return "/".join(p.rstrip("/") for p in parts[:-1]) + "/" + parts[-1].lstrip("/")

    def basename(self, path: str) -> str:
        return path.rstrip("/").rsplit("/", 1)[-1] if not self.is_local else os.path.basename(path)

    def dirname(self, path: str) -> str:
        return os.path.dirname(path) if self.is_local else path.rstrip("/").rsplit("/", 1)[0]

    # -- queries ---------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return os.path.lexists(path) if self.is_local else bool(self.fs.exists(path))

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path) if self.is_local else bool(self.fs.isdir(path))

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path) if self.is_local else bool(self.fs.isfile(path))

    def size(self, path: str) -> int:
        return os.path.getsize(path) if self.is_local else int(self.fs.size(path))

    def listdir(self, path: str) -> list[str]:
        """Names (not paths) of the entries of a directory; empty when it does not exist."""
        if self.is_local:
            try:
                return sorted(os.listdir(path))
            except (FileNotFoundError, NotADirectoryError):
                return []
        if not self.fs.exists(path):
            return []
        self.fs.invalidate_cache(path)
        return sorted(self.basename(p) for p in self.fs.ls(path, detail=False) if p.rstrip("/") != path)

    # -- reading ---------------------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        if self.is_local:
            with open(path, "rb") as f:
                return f.read()
        return bytes(self.fs.cat_file(path))

    def open_read(self, path: str) -> IO[bytes]:
        if self.is_local:
            return open(path, "rb")
        return self.fs.open(path, "rb")

    # -- writing ---------------------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        if self.is_local:
            os.makedirs(path, exist_ok=True)
        else:
            self.fs.makedirs(path, exist_ok=True)

    def open_write(self, path: str) -> IO[bytes]:
        """Open a new file for writing (remote stores only; local writers use file descriptors)."""
        return self.fs.open(path, "wb")

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Write a small file so that readers see either nothing, the old bytes, or all new bytes."""
        if not self.is_local:
            self.fs.pipe_file(path, data)
            return
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, layout.temp_filename(name, uuid.uuid4().hex[:8]))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException as err:
            os.close(fd)
            os.unlink(tmp)
            if isinstance(err, OSError) and not err.filename:  # os.write names no file: say which one
                err.add_note(f"lightning_ckpt: while writing {path}")
            raise
        os.close(fd)
        os.replace(tmp, path)
        fsync_dir(directory)

    def symlink_atomic(self, target: str, link: str) -> None:
        """Point local symlink ``link`` at ``target`` (a relative name), replacing any old link atomically."""
        directory, name = os.path.split(link)
        tmp = os.path.join(directory, layout.temp_filename(name, uuid.uuid4().hex[:8]))
        os.symlink(target, tmp)
        try:
            if os.path.isdir(link) and not os.path.islink(link):
                raise IsADirectoryError(f"{link} is a directory, not the 'latest' symlink; remove or rename it")
            os.replace(tmp, link)
        except BaseException:
            os.unlink(tmp)
            raise
        fsync_dir(directory)

    def publish_dir(self, staged: str, final: str) -> str | None:
        """Move a fully written local directory into place atomically.

        When ``final`` already exists the two are exchanged atomically (``renameat2``), so a reader
        always sees a complete checkpoint under ``final``. Returns the path now holding the old
        contents (to be deleted by the caller), or ``None``.
        """
        parent = os.path.dirname(final)
        if not os.path.lexists(final):
            os.rename(staged, final)
            fsync_dir(parent)
            return None
        if os.path.islink(final) or not os.path.isdir(final):
            raise FileExistsError(f"{final} exists and is not a checkpoint directory; remove it or choose another name")
        if not _exchange_dirs(staged, final):
            old = os.path.join(parent, layout.trash_dirname(os.path.basename(final), uuid.uuid4().hex[:8]))
            os.rename(final, old)
            os.rename(staged, final)
            fsync_dir(parent)
            return old
        fsync_dir(parent)
        return staged

    def remove_file(self, path: str) -> None:
        if self.is_local:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        elif self.fs.exists(path):
            self.fs.rm_file(path)

    def remove_tree(self, path: str) -> None:
        """Delete a directory tree; missing paths are fine."""
        if self.is_local:
            if os.path.islink(path):
                os.unlink(path)
            else:
                shutil.rmtree(path, ignore_errors=False) if os.path.isdir(path) else self.remove_file(path)
            return
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
