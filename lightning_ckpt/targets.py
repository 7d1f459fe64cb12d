"""What a save may replace: nothing, a checkpoint of this format (or what is left of one), or a ``torch.save`` file.

Anything else at a save's target (a user's directory, a symlink, another program's file) is
refused with :class:`~lightning_ckpt.errors.TargetExistsError` before anything is written:
lightning-ckpt never deletes what it did not write.

Example:
    >>> is_checkpoint_file("shard-00000-of-00002.safetensors"), is_checkpoint_file("notes.txt")
    (True, False)
"""

from __future__ import annotations

import os
import zipfile
from typing import Literal

from lightning_ckpt import layout
from lightning_ckpt.errors import CorruptCheckpointError, TargetExistsError
from lightning_ckpt.incremental import references_in
from lightning_ckpt.manifest import Manifest
from lightning_ckpt.storage import Storage

__all__ = ["check_target", "is_checkpoint_file", "is_legacy_checkpoint_file"]


def is_checkpoint_file(name: str) -> bool:
    """Whether ``name`` is a file of this format (a shard, ``objects.pt``, the manifest, or a temporary file)."""
    return (
        layout.parse_shard_filename(name) is not None
        or name in (layout.OBJECTS_FILENAME, layout.MANIFEST_FILENAME)
        or layout.is_temp_filename(name)  # temporary files of an interrupted write
    )


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
    return all(is_checkpoint_file(n) for n in storage.listdir(path))


def _refuse(storage: Storage, target: str, what: str) -> TargetExistsError:
    url = storage.url(target)
    return TargetExistsError(
        f"path={url!r} already exists and is not a lightning-ckpt checkpoint ({what}); saving there would"
        " replace it, and lightning-ckpt never deletes what it did not write. Nothing was written. Save under"
        f" a new name, e.g. {storage.url(storage.join(target, 'ep0-ba100'))!r} for a checkpoint inside that"
        " folder, or move it away first"
    )


def _refuse_if_referenced(storage: Storage, target: str) -> None:
    folder, name = storage.dirname(target.rstrip("/")), storage.basename(target.rstrip("/"))
    dependants = sorted(n for n, refs in references_in(storage, folder).items() if name in refs)
    if dependants:
        raise TargetExistsError(
            f"cannot replace checkpoint {name!r} in {storage.url(folder)}: the incremental checkpoints"
            f" {dependants} read tensors from its files; nothing was written. Save under a new name (a"
            " filename with {batch}), or delete those checkpoints first"
        )


def check_target(storage: Storage, target: str, *, replacing: bool = True) -> Literal["absent", "checkpoint", "legacy"]:
    """What is at a save's ``target`` now; raise :class:`TargetExistsError` if a save may not replace it.

    ``"checkpoint"``: a checkpoint of this format (or the files of one whose save or deletion was
    killed); ``"legacy"``: a single-file ``torch.save`` checkpoint; ``"absent"``: nothing. With
    ``replacing`` (a save), a committed checkpoint that incremental checkpoints of its folder read
    from is refused too (:func:`lightning_ckpt.incremental.references_in`); ``replacing=False`` only
    asks whether the target is a checkpoint (a deletion, which keeps such a base itself).

    Example:
        >>> import tempfile
        >>> storage, folder = Storage.open(tempfile.mkdtemp())
        >>> check_target(storage, os.path.join(folder, "ep0-ba4"))
        'absent'
    """
    if storage.islink(target):
        raise _refuse(storage, target, f"a symbolic link to {os.readlink(target)!r}")
    if not storage.exists(target):
        return "absent"
    if storage.isdir(target):
        if _committed_here(storage, target):
            if replacing:
                _refuse_if_referenced(storage, target)
            return "checkpoint"
        names = [n for n in storage.listdir(target) if not is_checkpoint_file(n)]
        shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise _refuse(storage, target, f"a directory that holds {shown}")
    if storage.isfile(target) and is_legacy_checkpoint_file(storage, target):
        return "legacy"
    raise _refuse(storage, target, "a file that torch.save did not write")
