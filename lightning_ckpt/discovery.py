"""Finding checkpoints: what a ``ckpt_path`` means, and which checkpoint of a folder is the newest.

A ``ckpt_path`` may be:

=============================  ====================================================================
checkpoint directory           ``/runs/a/ep3-ba1500`` (has ``manifest.json``)
folder of checkpoints          ``/runs/a`` → its newest *committed* checkpoint
``latest`` symlink             ``/runs/a/latest`` → the checkpoint it links to
pointer file                   ``/runs/a/latest.symlink`` (or ``.../latest`` where only the pointer exists)
legacy single file             ``/runs/old/epoch=2.ckpt`` written by ``torch.save``
a file inside a checkpoint     ``/runs/a/ep3-ba1500/manifest.json`` → that checkpoint (with a warning)
=============================  ====================================================================

"Newest" means most recently committed (manifest ``created`` time, then global step), so a run
that resumed from an earlier checkpoint with ``overwrite=True`` continues from its own saves.

Example:
    >>> import tempfile, os, torch
    >>> from lightning_ckpt.collective import save_checkpoint_dir
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_checkpoint_dir({"w": torch.ones(1), "global_step": 1}, os.path.join(folder, "a"))
    >>> _ = save_checkpoint_dir({"w": torch.ones(1), "global_step": 2}, os.path.join(folder, "b"))
    >>> os.path.basename(latest(folder))
    'b'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_ckpt import layout
from lightning_ckpt.commit import read_pointer
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigTypeError,
    CorruptCheckpointError,
    NewerFormatError,
)
from lightning_ckpt.manifest import Manifest
from lightning_ckpt.reader import MapLocation, load_checkpoint_dir, read_manifest, verify_files
from lightning_ckpt.storage import Storage

__all__ = ["Resolved", "latest", "list_committed", "load_resolved", "resolve"]

log = logging.getLogger("lightning_ckpt")


@dataclass(frozen=True)
class Resolved:
    """A resolved ``ckpt_path``: a committed checkpoint directory or a legacy single file."""

    storage: Storage
    path: str
    kind: Literal["dir", "file"]
    from_folder: bool = False

    @property
    def url(self) -> str:
        return self.storage.url(self.path)


def list_committed(storage: Storage, folder: str) -> list[tuple[str, Manifest]]:
    """Committed checkpoints directly inside ``folder``, oldest first; incomplete ones are skipped."""
    found: list[tuple[str, Manifest]] = []
    for name in storage.listdir(folder):
        if layout.is_hidden_name(name) or name.endswith(layout.POINTER_SUFFIX):
            continue
        path = storage.join(folder, name)
        if storage.islink(path) or not storage.exists(storage.join(path, layout.MANIFEST_FILENAME)):
            continue
        try:
            manifest = read_manifest(storage, path)
            verify_files(storage, path, manifest, checksums=False)
        except NewerFormatError as err:
            log.warning("Skipping checkpoint %s, written by a newer lightning-ckpt: %s", name, err)
            continue
        except CheckpointError as err:
            log.warning("Skipping checkpoint that does not verify: %s", err)
            continue
        found.append((name, manifest))
    found.sort(key=lambda item: (item[1].created, item[1].global_step))
    return found


def latest(folder: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The newest committed checkpoint in ``folder`` (a path or URL), or ``None`` if there is none.

    Example:
        >>> import tempfile
        >>> latest(tempfile.mkdtemp()) is None
        True
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise ConfigTypeError("folder", folder, "'/data/runs/a' or 's3://bucket/runs/a'", "It must be a path or URL")
    storage, root = Storage.open(folder, storage_options)
    if storage.isfile(root):
        raise NotADirectoryError(f"folder={os.fspath(folder)!r} is a file; pass the folder that holds checkpoints")
    committed = list_committed(storage, root)
    return storage.url(storage.join(root, committed[-1][0])) if committed else None


def _follow_pointer(storage: Storage, pointer: str) -> str:
    name = read_pointer(storage, pointer)
    target = storage.join(storage.dirname(pointer), name)
    if not storage.exists(storage.join(target, layout.MANIFEST_FILENAME)):
        raise CorruptCheckpointError(
            f"{storage.url(pointer)} names checkpoint {name!r}, but {storage.url(target)} is not a committed checkpoint"
        )
    return target


def _enclosing_checkpoint(storage: Storage, path: str) -> str | None:
    """The checkpoint directory holding file ``path`` (its manifest, a shard, ``objects.pt``), or ``None``.

    A file of a committed checkpoint stands for the checkpoint, with a warning; a file of a directory
    whose manifest is missing or damaged raises, since neither the file nor the directory can be loaded.
    """
    name, directory = storage.basename(path), storage.dirname(path)
    if name not in (layout.MANIFEST_FILENAME, layout.OBJECTS_FILENAME) and not layout.parse_shard_filename(name):
        return None
    siblings = storage.listdir(directory)
    looks_unfinished = layout.OBJECTS_FILENAME in siblings and any(layout.parse_shard_filename(n) for n in siblings)
    if layout.MANIFEST_FILENAME not in siblings and not looks_unfinished:
        return None  # e.g. a user's own torch.save file named objects.pt
    try:
        read_manifest(storage, directory)
    except CheckpointError as err:
        raise CorruptCheckpointError(
            f"ckpt_path={storage.url(path)!r} is one file of a lightning-ckpt checkpoint, and its directory"
            f" {storage.url(directory)!r} is not a committed checkpoint ({err}); pass a committed checkpoint"
            " directory or a folder of checkpoints"
        ) from err
    log.warning(
        "%s is one file of the checkpoint %s: loading that checkpoint", storage.url(path), storage.url(directory)
    )
    return directory


def resolve(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Resolved:
    """Turn any accepted ``ckpt_path`` into a committed checkpoint directory or a legacy file.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> path = save_checkpoint_dir({"w": torch.ones(1)}, os.path.join(tempfile.mkdtemp(), "ba1"))
        >>> resolve(os.path.join(path, "manifest.json")).path == path  # a file inside: the checkpoint
        True
    """
    storage, target = Storage.open(path, storage_options)
    if storage.islink(target):
        real = os.path.realpath(target)
        if not os.path.exists(real):
            raise CorruptCheckpointError(f"{target} links to {real}, which does not exist")
        target = real
    if storage.isdir(target):
        if storage.exists(storage.join(target, layout.MANIFEST_FILENAME)):
            return Resolved(storage, target, "dir")
        committed = list_committed(storage, target)
        if committed:
            return Resolved(storage, storage.join(target, committed[-1][0]), "dir", from_folder=True)
        if any(layout.parse_shard_filename(n) for n in storage.listdir(target)):
            raise CorruptCheckpointError(
                f"{storage.url(storage.join(target, layout.MANIFEST_FILENAME))} is missing:"
                f" {storage.url(target)} is not a committed checkpoint (its save did not finish)"
            )
        raise CheckpointNotFoundError(f"ckpt_path={os.fspath(path)!r}: the folder holds no committed checkpoint")
    if storage.isfile(target):
        if target.endswith(layout.POINTER_SUFFIX):
            return Resolved(storage, _follow_pointer(storage, target), "dir")
        enclosing = _enclosing_checkpoint(storage, target)
        return Resolved(storage, enclosing, "dir") if enclosing else Resolved(storage, target, "file")
    pointer = target + layout.POINTER_SUFFIX
    if storage.isfile(pointer):
        return Resolved(storage, _follow_pointer(storage, pointer), "dir")
    raise CheckpointNotFoundError(
        f"ckpt_path={os.fspath(path)!r} does not exist; pass a checkpoint directory, a folder of checkpoints,"
        " a 'latest' pointer or a .ckpt file"
    )


def load_resolved(
    resolved: Resolved,
    *,
    map_location: MapLocation = None,
    weights_only: bool | None = None,
    verify_checksums: bool = True,
) -> dict[str, Any]:
    """Load what :func:`resolve` found: a checkpoint directory, or a legacy file with ``torch.load``.

    ``weights_only=None`` means ``True`` for a legacy file too, whatever ``torch.load``'s default.

    Example:
        >>> import tempfile, os, torch
        >>> legacy = os.path.join(tempfile.mkdtemp(), "epoch=0.ckpt")
        >>> torch.save({"state_dict": {"w": torch.ones(1)}, "epoch": 0}, legacy)
        >>> load_resolved(resolve(legacy))["epoch"]
        0
    """
    if resolved.kind == "dir":
        return load_checkpoint_dir(
            resolved.storage,
            resolved.path,
            map_location=map_location,
            weights_only=weights_only,
            verify_checksums=verify_checksums,
        )
    with resolved.storage.open_read(resolved.path) as f:
        safe = True if weights_only is None else weights_only
        loaded = torch.load(f, map_location=map_location, weights_only=safe)
    if not isinstance(loaded, dict):
        raise TypeError(f"{resolved.url} holds a {type(loaded).__name__}, not a Lightning checkpoint dict")
    return loaded
