"""Making a checkpoint exist: staging, the manifest commit, publication and the ``latest`` pointers.

Two strategies behind one interface, chosen by the storage:

* **Local disk** (rename is atomic): files are written into a hidden staging directory
  (``.<name>.partial-<token>``), the manifest is written there last, then the directory is
  renamed to ``<name>`` (or atomically exchanged with an older ``<name>``, which is then deleted).
  A directory under its final name is therefore always complete; a crash leaves only a hidden
  partial directory that readers ignore.
* **Object stores** (no rename): files are written under ``<name>/`` directly and
  ``manifest.json`` is written last; a checkpoint without a manifest is not committed.

After the commit, ``latest`` pointers move: locally a ``latest`` symlink (swapped atomically)
plus a ``latest.symlink`` pointer file holding the checkpoint's name; remotely only the pointer.

What a save may replace (:func:`check_target`, called by :func:`stage_dir` before anything is
written and again by :func:`commit_dir`): nothing, a committed checkpoint of this format, a
directory holding only this format's files (a deletion or save that was killed half-way), or a
legacy single-file checkpoint written by ``torch.save`` (stock Lightning's ``last.ckpt``), which
the new directory replaces atomically. Anything else raises :class:`TargetExistsError`.

Staging directories left by a killed process: while a process writes one it holds a shared
``flock`` on the directory; a later save in the same folder removes hidden staging directories
nobody holds that are older than a minute (:func:`remove_stale_staging`), so they never pile up,
and another live process's staging is never touched.

Example:
    >>> import tempfile, os
    >>> from lightning_ckpt.storage import Storage
    >>> storage, folder = Storage.open(tempfile.mkdtemp())
    >>> staged = stage_dir(storage, folder, "ep0-ba4")
    >>> os.path.basename(staged).startswith(".ep0-ba4.partial-")
    True
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from typing import Literal

from lightning_ckpt import layout
from lightning_ckpt.errors import CorruptCheckpointError, TargetExistsError
from lightning_ckpt.manifest import Manifest
from lightning_ckpt.storage import Storage, _exchange_dirs, fsync_dir

__all__ = [
    "TargetExistsError",
    "check_target",
    "commit_dir",
    "is_legacy_checkpoint_file",
    "read_pointer",
    "remove_leftovers",
    "remove_stale_staging",
    "stage_dir",
    "update_latest",
]

STALE_AFTER_S = 60.0
"""A staging directory nobody holds is removed by a later save once it is this old (seconds)."""

_held: dict[str, int] = {}  # staging directories this process is writing: path -> descriptor holding its flock
_held_lock = threading.Lock()


def is_legacy_checkpoint_file(storage: Storage, path: str) -> bool:
    """Whether ``path`` is a file ``torch.save`` wrote (a zip archive holding ``data.pkl``).

    That is what stock Lightning writes (``last.ckpt``); a save of this format may replace it.

    Example:
        >>> import tempfile, torch
        >>> storage, folder = Storage.open(tempfile.mkdtemp())
        >>> torch.save({"epoch": 1}, os.path.join(folder, "last.ckpt"))
        >>> is_legacy_checkpoint_file(storage, os.path.join(folder, "last.ckpt"))
        True
    """
    try:
        with storage.open_read(path) as f:
            if f.read(4) != b"PK\x03\x04":
                return False
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                return any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _committed_here(storage: Storage, path: str) -> bool:
    """Whether directory ``path`` is a checkpoint of this format (its manifest parses) or what is left of one."""
    manifest = storage.join(path, layout.MANIFEST_FILENAME)
    if storage.exists(manifest):
        try:
            Manifest.from_json(storage.read_bytes(manifest), source=storage.url(manifest))
            return True
        except (CorruptCheckpointError, OSError):
            pass
    return all(_is_checkpoint_file(n) for n in storage.listdir(path))


def _refuse(storage: Storage, target: str, what: str) -> TargetExistsError:
    url = storage.url(target)
    return TargetExistsError(
        f"path={url!r} already exists and is not a lightning-ckpt checkpoint ({what}); saving there would"
        " replace it, and lightning-ckpt never deletes what it did not write. Nothing was written. Save under"
        f" a new name, e.g. {storage.url(storage.join(target, 'ep0-ba100'))!r} for a checkpoint inside that"
        " folder, or move it away first"
    )


def check_target(storage: Storage, target: str) -> Literal["absent", "checkpoint", "legacy"]:
    """What is at a save's ``target`` now; raise :class:`TargetExistsError` if a save may not replace it.

    ``"checkpoint"``: a checkpoint of this format (or the files of one whose save or deletion was
    killed); ``"legacy"``: a single-file ``torch.save`` checkpoint; ``"absent"``: nothing.

    Example:
        >>> import tempfile
        >>> storage, folder = Storage.open(tempfile.mkdtemp())
        >>> check_target(storage, os.path.join(folder, "ep0-ba4"))
        'absent'
    """
    if storage.is_local and os.path.islink(target):
        raise _refuse(storage, target, f"a symbolic link to {os.readlink(target)!r}")
    if not storage.exists(target):
        return "absent"
    if storage.isdir(target):
        if _committed_here(storage, target):
            return "checkpoint"
        names = [n for n in storage.listdir(target) if not _is_checkpoint_file(n)]
        shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise _refuse(storage, target, f"a directory that holds {shown}")
    if storage.isfile(target) and is_legacy_checkpoint_file(storage, target):
        return "legacy"
    raise _refuse(storage, target, "a file that torch.save did not write")


def stage_dir(storage: Storage, folder: str, name: str, token: str | None = None, *, leader: bool = True) -> str:
    """Create and return the directory the checkpoint's files are written into before the commit.

    ``token`` makes the local staging name unique; ranks that share a folder pass the same token.
    Only the ``leader`` un-commits an older checkpoint of the same name in an object store, holds
    the local staging directory's lock, and removes stale staging directories of the folder.

    Raises:
        TargetExistsError: ``<folder>/<name>`` may not be replaced (:func:`check_target`); nothing is written.
    """
    final = storage.join(folder, name)
    kind = check_target(storage, final)
    storage.makedirs(folder)
    if not storage.is_local:
        if leader:  # overwriting in a store: un-commit the old checkpoint first so it is never half-replaced
            if kind == "legacy":
                storage.remove_file(final)
            storage.remove_file(storage.join(final, layout.MANIFEST_FILENAME))
        storage.makedirs(final)
        return final
    staged = storage.join(folder, layout.partial_dirname(name, token or uuid.uuid4().hex[:12]))
    if leader:
        _forget_removed()
        remove_stale_staging(storage, folder)
        _hold(staged)
    else:
        storage.makedirs(staged)
    return staged


def commit_dir(storage: Storage, folder: str, name: str, staged: str, manifest: Manifest) -> str:
    """Write the manifest (the commit) and publish the checkpoint under its final name.

    Returns the path of the committed checkpoint. Locally, a target that may no longer be replaced
    (:func:`check_target`) raises :class:`TargetExistsError` and the staging directory is removed.
    """
    final = storage.join(folder, name)
    kind = "absent"
    if storage.is_local:
        try:
            kind = check_target(storage, final)
        except TargetExistsError:
            _discard(storage, staged)
            raise
    storage.write_bytes_atomic(storage.join(staged, layout.MANIFEST_FILENAME), manifest.to_json())
    if not storage.is_local:
        return staged
    fsync_dir(staged)
    old = _lock_dir(final) if kind == "checkpoint" else None  # the replaced inode stays ours until it is gone
    try:
        replaced = _replace_file(staged, final) if kind == "legacy" else storage.publish_dir(staged, final)
        if replaced is not None:
            if storage.isdir(replaced):
                storage.remove_file(storage.join(replaced, layout.MANIFEST_FILENAME))
            storage.remove_tree(replaced)
    finally:
        _release(staged)
        if old is not None:
            os.close(old)
    return final


def _replace_file(staged: str, final: str) -> str:
    """Put directory ``staged`` in place of the legacy file ``final`` (atomically where ``renameat2`` exists)."""
    parent = os.path.dirname(final)
    if _exchange_dirs(staged, final):
        fsync_dir(parent)
        return staged
    old = os.path.join(parent, layout.trash_dirname(os.path.basename(final), uuid.uuid4().hex[:8]))
    os.rename(final, old)
    os.rename(staged, final)
    fsync_dir(parent)
    return old


def _lock_dir(path: str, flags: int = fcntl.LOCK_SH) -> int | None:
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


def _hold(staged: str) -> None:
    """Create ``staged`` and hold a shared lock on it while this process writes it (released at the commit)."""
    while True:
        os.makedirs(staged, exist_ok=True)
        fd = _lock_dir(staged)
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


def _release(staged: str) -> None:
    with _held_lock:
        fd = _held.pop(staged, None)
    if fd is not None:
        os.close(fd)


def _forget_removed() -> None:
    """Release the locks of staging directories a failed save removed (no descriptor leaks)."""
    with _held_lock:
        gone = [path for path in _held if not os.path.lexists(path)]
    for path in gone:
        _release(path)


def _discard(storage: Storage, staged: str) -> None:
    storage.remove_tree(staged)
    _release(staged)


def _remove_if_stale(storage: Storage, path: str, min_age_s: float) -> bool:
    """Remove staging directory ``path`` if no process holds it, it is old enough and holds only our files."""
    try:
        if os.path.islink(path) or time.time() - os.stat(path).st_mtime < min_age_s:
            return False
    except FileNotFoundError:
        return False
    fd = _lock_dir(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is None:  # a live writer holds it (or this filesystem has no locks): leave it
        return False
    try:
        if not os.path.samestat(os.fstat(fd), os.lstat(path)):
            return False
        if not all(_is_checkpoint_file(n) for n in storage.listdir(path)):
            return False
        storage.remove_tree(path)
        return True
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTEMPTY):  # removed meanwhile by someone else
            return False
        raise
    finally:
        os.close(fd)


def remove_stale_staging(storage: Storage, folder: str, *, min_age_s: float = STALE_AFTER_S) -> list[str]:
    """Remove hidden staging directories of ``folder`` that a killed process left; return their names.

    A directory is removed only when no live process holds its lock, it is at least ``min_age_s``
    seconds old, and it holds nothing but this format's files. Local folders only (object stores
    have no staging directories).

    Example:
        >>> import tempfile
        >>> storage, folder = Storage.open(tempfile.mkdtemp())
        >>> os.makedirs(os.path.join(folder, ".ep0-ba4.partial-dead"))  # no process holds it
        >>> remove_stale_staging(storage, folder, min_age_s=0)
        ['.ep0-ba4.partial-dead']
    """
    if not storage.is_local:
        return []
    names = [n for n in storage.listdir(folder) if layout.is_partial_dirname(n)]
    return [n for n in names if _remove_if_stale(storage, storage.join(folder, n), min_age_s)]


def update_latest(storage: Storage, folder: str, name: str, latest_filename: str) -> None:
    """Point ``latest_filename`` (symlink, local only) and ``<latest_filename>.symlink`` at ``name``."""
    if storage.is_local:
        storage.symlink_atomic(name, storage.join(folder, latest_filename))
    storage.write_bytes_atomic(storage.join(folder, layout.pointer_filename(latest_filename)), name.encode())


def read_pointer(storage: Storage, pointer_path: str) -> str:
    """The checkpoint name a pointer file holds; it must be a plain name inside the pointer's folder."""
    raw = storage.read_bytes(pointer_path).decode(errors="replace").strip()
    if not layout.is_plain_name(raw):
        raise CorruptCheckpointError(
            f"{storage.url(pointer_path)}: pointer holds {raw!r}, expected the plain name of a checkpoint in its folder"
        )
    return raw


def _is_checkpoint_file(name: str) -> bool:
    return (
        layout.parse_shard_filename(name) is not None
        or name in (layout.OBJECTS_FILENAME, layout.MANIFEST_FILENAME)
        or (layout.is_hidden_name(name) and ".tmp-" in name)  # temporary files of an interrupted write
    )


def remove_leftovers(storage: Storage, folder: str, is_ours: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Delete what interrupted saves, uploads and deletions left in ``folder``; return the names removed.

    That is: hidden staging (``.<name>.partial-*``) directories no live process holds, trash
    (``.<name>.trash-*``) directories, and directories named like this saver's checkpoints
    (``is_ours``) that have no manifest and hold nothing but checkpoint files: an upload or a
    rotation killed half-way. Committed checkpoints (with a manifest) and anything holding other
    files are never touched. Call only while no other run saves into ``folder`` (the run holds its
    lock) and before this run saves anything there.

    Example:
        >>> import tempfile
        >>> storage, folder = Storage.open(tempfile.mkdtemp())
        >>> os.makedirs(os.path.join(folder, ".ep0-ba4.partial-dead"))  # a killed save's staging
        >>> remove_leftovers(storage, folder)
        ['.ep0-ba4.partial-dead']
    """
    if not storage.isdir(folder):
        return []
    removed = []
    for name in sorted(storage.listdir(folder)):
        path = storage.join(folder, name)
        if storage.is_local and os.path.islink(path):
            continue
        if storage.is_local and layout.is_partial_dirname(name) and storage.isdir(path):
            if _remove_if_stale(storage, path, min_age_s=0):
                removed.append(name)
            continue
        if layout.is_hidden_name(name):
            stale = storage.is_local and ".trash-" in name and storage.isdir(path)
        else:
            stale = (
                is_ours(name)
                and storage.isdir(path)
                and not storage.exists(storage.join(path, layout.MANIFEST_FILENAME))
                and all(_is_checkpoint_file(n) for n in storage.listdir(path))
            )
        if stale:
            storage.remove_tree(path)
            removed.append(name)
    return removed
