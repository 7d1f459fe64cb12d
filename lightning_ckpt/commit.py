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
from collections.abc import Callable

from lightning_ckpt import layout
from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.manifest import Manifest
from lightning_ckpt.storage import Storage, fsync_dir

__all__ = ["commit_dir", "read_pointer", "remove_leftovers", "stage_dir", "update_latest"]


def stage_dir(storage: Storage, folder: str, name: str, token: str | None = None, *, leader: bool = True) -> str:
    """Create and return the directory the checkpoint's files are written into before the commit.

    ``token`` makes the local staging name unique; ranks that share a folder pass the same token.
    Only the ``leader`` un-commits an older checkpoint of the same name in an object store.
    """
    storage.makedirs(folder)
    if not storage.is_local:
        final = storage.join(folder, name)
        if leader:  # overwriting in a store: un-commit the old checkpoint first so it is never half-replaced
            storage.remove_file(storage.join(final, layout.MANIFEST_FILENAME))
        storage.makedirs(final)
        return final
    staged = storage.join(folder, layout.partial_dirname(name, token or uuid.uuid4().hex[:12]))
    storage.makedirs(staged)
    return staged


def commit_dir(storage: Storage, folder: str, name: str, staged: str, manifest: Manifest) -> str:
    """Write the manifest (the commit) and publish the checkpoint under its final name.

    Returns the path of the committed checkpoint.
    """
    storage.write_bytes_atomic(storage.join(staged, layout.MANIFEST_FILENAME), manifest.to_json())
    if not storage.is_local:
        return staged
    fsync_dir(staged)
    final = storage.join(folder, name)
    replaced = storage.publish_dir(staged, final)
    if replaced is not None:
        storage.remove_file(storage.join(replaced, layout.MANIFEST_FILENAME))
        storage.remove_tree(replaced)
    return final


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
        or layout.is_hidden_name(name)  # temporary files of an interrupted write
    )


def remove_leftovers(storage: Storage, folder: str, is_ours: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Delete what interrupted saves, uploads and deletions left in ``folder``; return the names removed.

    That is: hidden staging (``.<name>.partial-*``) and trash (``.<name>.trash-*``) directories, and
    directories named like this saver's checkpoints (``is_ours``) that have no manifest and hold
    nothing but checkpoint files: an upload or a rotation killed half-way. Committed checkpoints
    (with a manifest) and anything holding other files are never touched. Call only while no other
    run saves into ``folder`` (the run holds its lock) and before this run saves anything there.

    Example:
        >>> import tempfile
        >>> storage, folder = Storage.open(tempfile.mkdtemp())
        >>> _ = stage_dir(storage, folder, "ep0-ba4", token="dead")
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
        if layout.is_hidden_name(name):
            stale = storage.is_local and (layout.is_partial_dirname(name) or ".trash-" in name) and storage.isdir(path)
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
