"""Making a checkpoint exist: staging, the manifest commit, publication and the ``latest`` pointers.

Two strategies behind one interface, :class:`Commit`, chosen once from the storage's type
(:meth:`Commit.for_storage`):

* :class:`RenameCommit`, local disk (rename is atomic): files are written into a hidden staging
  directory (``.<name>.partial-<token>``), the manifest there last, then the directory is renamed
  to ``<name>`` (or atomically exchanged with an older ``<name>``, which is then deleted). A
  directory under its final name is always complete; a crash leaves only hidden staging.
* :class:`ManifestLastCommit`, object stores and anything else that writes files in place (uploads,
  downloads into a local cache): files under ``<name>/`` directly, ``manifest.json`` last; a
  checkpoint without a manifest is not committed. :meth:`Commit.write_manifest` is that one write.

After the commit :meth:`Commit.point_latest` moves the ``latest`` pointers: a ``latest.symlink``
file holding the checkpoint's name, plus (locally) a ``latest`` symlink swapped atomically.

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

import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable

from lightning_ckpt import layout, stale
from lightning_ckpt.errors import CorruptCheckpointError, TargetExistsError
from lightning_ckpt.localfs import fsync_dir
from lightning_ckpt.manifest import Manifest
from lightning_ckpt.storage import LocalStorage, Storage
from lightning_ckpt.targets import check_target, is_checkpoint_file

__all__ = [
    "Commit",
    "ManifestLastCommit",
    "RenameCommit",
    "Retry",
    "TargetExistsError",
    "commit_dir",
    "read_pointer",
    "remove_leftovers",
    "remove_stale_staging",
    "stage_dir",
    "update_latest",
]


Retry = Callable[[Callable[[], None], str], None]
"""Runs an action (its description second), retrying as it sees fit: how a commit's writes are retried."""


def _once(action: Callable[[], None], what: str) -> None:
    action()


class Commit(ABC):
    """How a checkpoint becomes visible, and how the ``latest`` pointers move: one strategy per storage type.

    The sequence (every writer, then one committing process):

    1. :meth:`stage` (every writer; the leader first): the directory the files are written into;
    2. the writers write their files there;
    3. :meth:`commit` (the leader, once every file is written): the manifest, then publication;
    4. :meth:`point_latest` (the leader): the ``latest`` pointers.

    Args:
        storage: where the checkpoint is written.
        retry: wraps each write of the commit (e.g. retries of transient object-store errors).

    Example:
        >>> import tempfile
        >>> type(Commit.for_storage(Storage.open(tempfile.mkdtemp())[0])).__name__
        'RenameCommit'
        >>> type(Commit.for_storage(Storage.open("memory://commit-doc")[0])).__name__
        'ManifestLastCommit'
    """

    def __init__(self, storage: Storage, retry: Retry = _once) -> None:
        self.storage, self.retry = storage, retry

    @staticmethod
    def for_storage(storage: Storage, retry: Retry = _once) -> Commit:
        """The strategy for ``storage``: a rename where rename is atomic (local disk), else manifest last."""
        return RenameCommit(storage, retry) if isinstance(storage, LocalStorage) else ManifestLastCommit(storage, retry)

    @abstractmethod
    def stage(self, folder: str, name: str, token: str | None = None, *, leader: bool = True) -> str:
        """Create and return the directory ``name``'s files are written into (see :func:`stage_dir`)."""

    @abstractmethod
    def commit(self, folder: str, name: str, staged: str, manifest: Manifest) -> str:
        """Write the manifest and make the checkpoint visible under ``<folder>/<name>``; return its path."""

    @abstractmethod
    def abort(self, staged: str) -> None:
        """Undo :meth:`stage` for a save that failed before its commit."""

    def write_manifest(self, ckpt_dir: str, data: bytes) -> None:
        """Write ``manifest.json`` into ``ckpt_dir``, atomically: the one write that commits a checkpoint."""
        path = self.storage.join(ckpt_dir, layout.MANIFEST_FILENAME)
        self.retry(lambda: self.storage.write_bytes_atomic(path, data), f"upload of {path}")

    def point_latest(self, folder: str, name: str, latest_filename: str) -> None:
        """Point ``<latest_filename>.symlink`` (and a ``latest_filename`` symlink where there are links) at ``name``."""
        pointer = self.storage.join(folder, layout.pointer_filename(latest_filename))
        self.retry(lambda: self.storage.write_bytes_atomic(pointer, name.encode()), f"upload of {pointer}")

    def remove_stale_staging(self, folder: str, min_age_s: float = stale.STALE_AFTER_S) -> list[str]:
        """Remove the staging directories of ``folder`` that killed processes left (none by default)."""
        return []

    def remove_hidden_leftover(self, path: str, name: str) -> bool:
        """Remove hidden ``path`` if an interrupted save or deletion of this strategy left it; whether it did."""
        return False


class ManifestLastCommit(Commit):
    """Files written under ``<name>/`` directly, ``manifest.json`` last: object stores, downloads into a cache.

    A checkpoint without a manifest is not committed, so readers never see a half-written one.

    Example:
        >>> storage, folder = Storage.open("memory://manifest-last-doc")
        >>> commit = ManifestLastCommit(storage)
        >>> commit.write_manifest(commit.stage(folder, "ba1"), b"{}")
        >>> storage.listdir(storage.join(folder, "ba1"))
        ['manifest.json']
    """

    def stage(self, folder: str, name: str, token: str | None = None, *, leader: bool = True) -> str:
        final = self.storage.join(folder, name)
        kind = check_target(self.storage, final)
        self.storage.makedirs(folder)
        if leader:  # overwriting: un-commit the old checkpoint first so it is never half-replaced
            if kind == "legacy":
                self.storage.remove_file(final)
            self.uncommit(final)
        self.storage.makedirs(final)
        return final

    def uncommit(self, ckpt_dir: str) -> None:
        """Remove ``ckpt_dir``'s manifest, so files about to be overwritten never look committed."""
        self.storage.remove_file(self.storage.join(ckpt_dir, layout.MANIFEST_FILENAME))

    def commit(self, folder: str, name: str, staged: str, manifest: Manifest) -> str:
        self.write_manifest(staged, manifest.to_json())
        return staged

    def abort(self, staged: str) -> None:
        pass  # the files stay un-committed (no manifest) until a later save or :func:`remove_leftovers`


class RenameCommit(Commit):
    """Files written into a hidden staging directory, then renamed into place: local disk (rename is atomic).

    Example:
        >>> import tempfile
        >>> storage, folder = Storage.open(tempfile.mkdtemp())
        >>> os.path.basename(RenameCommit(storage).stage(folder, "ba1")).startswith(".ba1.partial-")
        True
    """

    storage: LocalStorage

    def stage(self, folder: str, name: str, token: str | None = None, *, leader: bool = True) -> str:
        check_target(self.storage, self.storage.join(folder, name))
        self.storage.makedirs(folder)
        staged = self.storage.join(folder, layout.partial_dirname(name, token or uuid.uuid4().hex[:12]))
        if leader:
            stale.forget_removed()
            self.remove_stale_staging(folder)
            stale.hold(staged)
        else:
            self.storage.makedirs(staged)
        return staged

    def commit(self, folder: str, name: str, staged: str, manifest: Manifest) -> str:
        final = self.storage.join(folder, name)
        try:
            kind = check_target(self.storage, final)
        except TargetExistsError:
            stale.discard(self.storage, staged)
            raise
        self.write_manifest(staged, manifest.to_json())
        fsync_dir(staged)
        old = stale.lock_dir(final) if kind == "checkpoint" else None  # the replaced inode stays ours until it is gone
        try:
            replaced = (
                self.storage.exchange(staged, final) if kind == "legacy" else self.storage.publish_dir(staged, final)
            )
            if replaced is not None:
                if self.storage.isdir(replaced):
                    self.storage.remove_file(self.storage.join(replaced, layout.MANIFEST_FILENAME))
                self.storage.remove_tree(replaced)
        finally:
            stale.release(staged)
            if old is not None:
                os.close(old)
        return final

    def abort(self, staged: str) -> None:
        stale.discard(self.storage, staged)

    def point_latest(self, folder: str, name: str, latest_filename: str) -> None:
        self.storage.symlink_atomic(name, self.storage.join(folder, latest_filename))
        super().point_latest(folder, name, latest_filename)

    def remove_stale_staging(self, folder: str, min_age_s: float = stale.STALE_AFTER_S) -> list[str]:
        names = [n for n in self.storage.listdir(folder) if layout.is_partial_dirname(n)]
        return [n for n in names if stale.remove_if_stale(self.storage, self.storage.join(folder, n), min_age_s)]

    def remove_hidden_leftover(self, path: str, name: str) -> bool:
        if not self.storage.isdir(path):
            return False
        if layout.is_partial_dirname(name):
            return stale.remove_if_stale(self.storage, path, min_age_s=0)
        if layout.is_trash_dirname(name):
            self.storage.remove_tree(path)
            return True
        return False


def stage_dir(storage: Storage, folder: str, name: str, token: str | None = None, *, leader: bool = True) -> str:
    """Create and return the directory the checkpoint's files are written into before the commit.

    ``token`` makes the local staging name unique; ranks that share a folder pass the same token.
    Only the ``leader`` un-commits an older checkpoint of the same name in an object store, holds
    the local staging directory's lock, and removes stale staging directories of the folder.

    Raises:
        TargetExistsError: ``<folder>/<name>`` may not be replaced (:func:`check_target`); nothing is written.
    """
    return Commit.for_storage(storage).stage(folder, name, token, leader=leader)


def commit_dir(storage: Storage, folder: str, name: str, staged: str, manifest: Manifest) -> str:
    """Write the manifest (the commit) and publish the checkpoint under its final name.

    Returns the path of the committed checkpoint. Locally, a target that may no longer be replaced
    (:func:`check_target`) raises :class:`TargetExistsError` and the staging directory is removed.
    """
    return Commit.for_storage(storage).commit(folder, name, staged, manifest)


def remove_stale_staging(storage: Storage, folder: str, *, min_age_s: float = stale.STALE_AFTER_S) -> list[str]:
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
    return Commit.for_storage(storage).remove_stale_staging(folder, min_age_s)


def update_latest(storage: Storage, folder: str, name: str, latest_filename: str) -> None:
    """Point ``latest_filename`` (symlink, local only) and ``<latest_filename>.symlink`` at ``name``."""
    Commit.for_storage(storage).point_latest(folder, name, latest_filename)


def read_pointer(storage: Storage, pointer_path: str) -> str:
    """The checkpoint name a pointer file holds; it must be a plain name inside the pointer's folder."""
    raw = storage.read_bytes(pointer_path).decode(errors="replace").strip()
    if not layout.is_plain_name(raw):
        raise CorruptCheckpointError(
            f"{storage.url(pointer_path)}: pointer holds {raw!r}, expected the plain name of a checkpoint in its folder"
        )
    return raw


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
    commit, removed = Commit.for_storage(storage), []
    for name in sorted(storage.listdir(folder)):
        path = storage.join(folder, name)
        if storage.islink(path):
            continue
        if layout.is_hidden_name(name):
            if commit.remove_hidden_leftover(path, name):
                removed.append(name)
            continue
        if (
            is_ours(name)
            and storage.isdir(path)
            and not storage.exists(storage.join(path, layout.MANIFEST_FILENAME))
            and all(is_checkpoint_file(n) for n in storage.listdir(path))
        ):
            storage.remove_tree(path)
            removed.append(name)
    return removed
