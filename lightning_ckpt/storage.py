"""Where checkpoints live: the :class:`Storage` interface and its two types, chosen once by :meth:`Storage.open`.

* :class:`LocalStorage`: local disk, through ``os`` (fast path, atomic renames, symlinks);
* :class:`FsspecStorage`: any fsspec filesystem (``s3://``, ``gs://``, ``memory://``, ...).

This and :mod:`lightning_ckpt.locations` (which checks URLs and options before any I/O) are the
only modules that import ``fsspec``; only this one touches a filesystem object. Paths handed to a
storage's methods are absolute paths on it (for local disk, ordinary paths).

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

import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import IO, Any

import fsspec

from lightning_ckpt import layout
from lightning_ckpt.localfs import SyncedFile, exchange_dirs, fsync_dir
from lightning_ckpt.locations import check_storage_options, is_url

__all__ = ["FsspecStorage", "LocalStorage", "Storage"]


class Storage(ABC):
    """One filesystem, behind one interface: :class:`LocalStorage` or :class:`FsspecStorage`.

    Use :meth:`Storage.open` to get a storage and the root path for a path or URL. Callers that
    must know whether a folder is on this machine (to keep a local cache of a remote one) read
    :attr:`is_local`; every difference in *how* files are handled lives in the two types.

    Attributes:
        protocol: the URL protocol (``"file"`` for local disk).
        clients: other clients for the same store (e.g. boto3), made once by their user.
    """

    protocol: str

    def __init__(self) -> None:
        self.clients: dict[str, Any] = {}

    @property
    def is_local(self) -> bool:
        """Whether paths are on this machine's disk (read-only)."""
        return False

    @classmethod
    def open(cls, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> tuple[Storage, str]:
        """Return the storage for ``url`` (its type chosen here, once) and the path inside it.

        Example:
            >>> storage, path = Storage.open("memory://runs/a")
            >>> type(storage).__name__, storage.protocol, path
            ('FsspecStorage', 'memory', '/runs/a')
        """
        text = os.fspath(url)
        options = check_storage_options(storage_options, text)
        if not is_url(text):
            local = text[len("file://") :] if text.startswith("file://") else text
            return LocalStorage(), os.path.abspath(os.path.expanduser(local))
        fs, path = fsspec.core.url_to_fs(text, **options)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        return FsspecStorage(fs, protocol), path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(protocol={self.protocol!r})"

    # -- names -----------------------------------------------------------------------------------
    @abstractmethod
    def url(self, path: str) -> str:
        """The path as a user would type it: plain for local disk, ``protocol://path`` otherwise."""

    def join(self, *parts: str) -> str:
        """Join path components with ``/``; ``..`` in the last part (a file of a sibling checkpoint) is resolved.

        Example:
            >>> FsspecStorage(None, "s3").join("bucket/run/ba8", "../ba4/shard-00000-of-00001.safetensors")
            'bucket/run/ba4/shard-00000-of-00001.safetensors'
        """
        head = "/".join(p.rstrip("/") for p in parts[:-1])
        tail = parts[-1].lstrip("/")
        while tail.startswith("../") and "/" in head:
            head, tail = head.rsplit("/", 1)[0], tail[3:]
        return head + "/" + tail

    def basename(self, path: str) -> str:
        """The last component of ``path``."""
        return path.rstrip("/").rsplit("/", 1)[-1]

    def dirname(self, path: str) -> str:
        """``path`` without its last component."""
        return path.rstrip("/").rsplit("/", 1)[0]

    # -- queries ---------------------------------------------------------------------------------
    @abstractmethod
    def exists(self, path: str) -> bool:
        """Whether anything (a file, a directory, a link) is at ``path``."""

    @abstractmethod
    def isdir(self, path: str) -> bool:
        """Whether ``path`` is a directory (a prefix with objects under it, in an object store)."""

    @abstractmethod
    def isfile(self, path: str) -> bool:
        """Whether ``path`` is a file."""

    def islink(self, path: str) -> bool:
        """Whether ``path`` is a symbolic link (never, where the filesystem has none)."""
        return False

    def settings(self, *names: str) -> dict[str, Any]:
        """The filesystem's settings of these names that it has (credentials, endpoints), to make another client."""
        return {}

    @abstractmethod
    def size(self, path: str) -> int:
        """The size of file ``path`` in bytes."""

    @abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Names (not paths) of the entries of a directory, sorted; empty when it does not exist."""

    # -- reading ---------------------------------------------------------------------------------
    @abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """The whole content of file ``path``."""

    @abstractmethod
    def read_range(self, path: str, start: int, length: int) -> bytes:
        """``length`` bytes of file ``path`` from byte ``start`` (a ranged GET on an object store); fewer at its end."""

    def read_range_into(self, path: str, start: int, buffer: memoryview) -> int:
        """Fill ``buffer`` from byte ``start`` of file ``path``; returns how many bytes it holds (fewer at its end).

        Local files are read straight into ``buffer`` (no copy in between), e.g. a tensor's own memory.
        """
        data = self.read_range(path, start, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    @abstractmethod
    def open_read(self, path: str) -> IO[bytes]:
        """File ``path`` open for reading (seekable)."""

    @abstractmethod
    def get_file(self, path: str, local_path: str, **options: Any) -> None:
        """Copy file ``path`` to ``local_path`` on this machine (``options``: the filesystem's transfer options)."""

    # -- writing ---------------------------------------------------------------------------------
    @abstractmethod
    def makedirs(self, path: str) -> None:
        """Create directory ``path`` and its parents; an existing one is fine."""

    @abstractmethod
    def open_write(self, path: str) -> IO[bytes]:
        """A new file ``path`` open for writing; it is complete (and durable) once closed."""

    @abstractmethod
    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Write a small file so that readers see either nothing, the old bytes, or all new bytes."""

    @abstractmethod
    def put_file(self, local_path: str, path: str, **options: Any) -> None:
        """Copy file ``local_path`` of this machine to ``path`` (``options``: the filesystem's transfer options)."""

    def symlink_atomic(self, target: str, link: str) -> None:
        """Point symlink ``link`` at ``target`` (a relative name), replacing an old link atomically."""
        raise NotImplementedError(f"{self!r} has no symbolic links")

    def publish_dir(self, staged: str, final: str) -> str | None:
        """Move a fully written directory into place atomically; return the path holding what it replaced."""
        raise NotImplementedError(f"{self!r} has no atomic rename")

    @abstractmethod
    def remove_file(self, path: str) -> None:
        """Delete file (or link) ``path``; a missing one is fine."""

    @abstractmethod
    def remove_tree(self, path: str) -> None:
        """Delete a directory tree; missing paths are fine."""


class LocalStorage(Storage):
    """Local disk through ``os``: atomic writes (temporary name, fsync, rename, directory fsync), symlinks.

    Example:
        >>> import tempfile
        >>> storage, root = Storage.open(tempfile.mkdtemp())
        >>> isinstance(storage, LocalStorage), storage.is_local
        (True, True)
    """

    def __init__(self) -> None:
        super().__init__()
        self.protocol = "file"

    @property
    def is_local(self) -> bool:
        """Always true: paths are on this machine's disk."""
        return True

    def url(self, path: str) -> str:
        return path

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)  # "../ba4/x" is left to the OS: it resolves it from the real directory

    def basename(self, path: str) -> str:
        return os.path.basename(path)

    def dirname(self, path: str) -> str:
        return os.path.dirname(path)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def islink(self, path: str) -> bool:
        return os.path.islink(path)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def read_range(self, path: str, start: int, length: int) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, length, start)
        finally:
            os.close(fd)

    def read_range_into(self, path: str, start: int, buffer: memoryview) -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < len(buffer):
                n = os.preadv(fd, [buffer[done:]], start + done)
                if n == 0:
                    break
                done += n
            return done
        finally:
            os.close(fd)

    def open_read(self, path: str) -> IO[bytes]:
        return open(path, "rb")

    def get_file(self, path: str, local_path: str, **options: Any) -> None:
        shutil.copyfile(path, local_path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def open_write(self, path: str) -> IO[bytes]:
        return SyncedFile(path, "wb")

    def put_file(self, local_path: str, path: str, **options: Any) -> None:
        shutil.copyfile(local_path, path)

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
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
        """Move directory ``staged`` to ``final`` atomically; return the path now holding the old contents.

        An existing ``final`` directory is exchanged atomically (:meth:`exchange`), so a reader always
        sees a complete checkpoint under ``final``; the caller deletes what is returned (``None``: nothing).
        """
        parent = os.path.dirname(final)
        if not os.path.lexists(final):
            os.rename(staged, final)
            fsync_dir(parent)
            return None
        if os.path.islink(final) or not os.path.isdir(final):
            raise FileExistsError(f"{final} exists and is not a checkpoint directory; remove it or choose another name")
        return self.exchange(staged, final)

    def exchange(self, staged: str, final: str) -> str:
        """Put ``staged`` under the name ``final`` (a directory or a file); return where the old ``final`` went."""
        parent = os.path.dirname(final)
        if exchange_dirs(staged, final):
            fsync_dir(parent)
            return staged
        old = os.path.join(parent, layout.trash_dirname(os.path.basename(final), uuid.uuid4().hex[:8]))
        os.rename(final, old)
        os.rename(staged, final)
        fsync_dir(parent)
        return old

    def remove_file(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        if os.path.islink(path):
            os.unlink(path)
        elif os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=False)
        else:
            self.remove_file(path)


class FsspecStorage(Storage):
    """Any fsspec filesystem; in an object store a file is visible only once its upload completed.

    Args:
        fs: the fsspec filesystem.
        protocol: its URL protocol.

    Example:
        >>> storage, root = Storage.open("memory://fsspec-storage-doc")
        >>> storage.write_bytes_atomic(storage.join(root, "a"), b"x"); storage.listdir(root), storage.is_local
        (['a'], False)
    """

    def __init__(self, fs: Any, protocol: str) -> None:
        super().__init__()
        self.fs = fs
        self.protocol = protocol

    def url(self, path: str) -> str:
        return str(self.fs.unstrip_protocol(path))

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def isdir(self, path: str) -> bool:
        return bool(self.fs.isdir(path))

    def isfile(self, path: str) -> bool:
        return bool(self.fs.isfile(path))

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def listdir(self, path: str) -> list[str]:
        if not self.fs.exists(path):
            return []
        self.fs.invalidate_cache(path)
        return sorted(self.basename(p) for p in self.fs.ls(path, detail=False) if p.rstrip("/") != path)

    def read_bytes(self, path: str) -> bytes:
        return bytes(self.fs.cat_file(path))

    def read_range(self, path: str, start: int, length: int) -> bytes:
        return bytes(self.fs.cat_file(path, start=start, end=start + length)) if length else b""

    def open_read(self, path: str) -> IO[bytes]:
        return self.fs.open(path, "rb")

    def get_file(self, path: str, local_path: str, **options: Any) -> None:
        self.fs.get_file(path, local_path, **options)

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def open_write(self, path: str) -> IO[bytes]:
        return self.fs.open(path, "wb")

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)  # one request: the object appears whole or not at all

    def put_file(self, local_path: str, path: str, **options: Any) -> None:
        self.fs.put_file(local_path, path, **options)

    def settings(self, *names: str) -> dict[str, Any]:
        return {name: getattr(self.fs, name) for name in names if hasattr(self.fs, name)}

    def remove_file(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm_file(path)

    def remove_tree(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
