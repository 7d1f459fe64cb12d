"""One checkpoint's files: a shard of raw tensors, the pickled non-tensor skeleton, and deletion.

These are the building blocks of :mod:`lightning_ckpt.collective`, which orders them into a save.

Example:
    >>> import tempfile, torch
    >>> from lightning_ckpt.storage import Storage
    >>> storage, directory = Storage.open(tempfile.mkdtemp())
    >>> entry, tensors = write_shard(storage, directory, {"w": torch.zeros(2)}, index=0, count=1, rank=0)
    >>> entry.name, entry.size, tensors[0].offset
    ('shard-00000-of-00001.safetensors', 4104, 4096)
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from typing import Any

import torch

from lightning_ckpt import layout
from lightning_ckpt.manifest import FileEntry, TensorEntry
from lightning_ckpt.storage import Storage
from lightning_ckpt.writer import checksum_of, plan_shard, write_shard_local, write_shard_stream

__all__ = ["library_versions", "remove_checkpoint_dir", "write_objects", "write_shard"]


def library_versions() -> dict[str, str]:
    """Versions of the libraries that matter for reading a checkpoint back."""
    versions: dict[str, str] = {"torch": str(torch.__version__)}
    for dist in ("lightning", "lightning-ckpt"):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def _to_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (t if t.device.type == "cpu" else t.to("cpu")) for k, t in tensors.items()}


def write_shard(
    storage: Storage,
    directory: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    index: int,
    count: int,
    rank: int,
) -> tuple[FileEntry, list[TensorEntry]]:
    """Write one shard file of ``tensors`` into ``directory``; return its file and tensor entries."""
    name = layout.shard_filename(index, count)
    devices = {k: str(t.device) for k, t in tensors.items()}
    plan = plan_shard(_to_cpu(tensors), file=name)
    path = storage.join(directory, name)
    if storage.is_local:
        entry = write_shard_local(path, plan, rank=rank)
    else:
        with storage.open_write(path) as stream:
            entry = write_shard_stream(stream, plan, rank=rank)
    entries = [TensorEntry(**{**e.__dict__, "device": devices[e.key]}) for e in plan.entries]
    return entry, entries


def write_objects(storage: Storage, directory: str, skeleton: Any, *, rank: int) -> FileEntry:
    """Pickle the tensor-free skeleton into ``objects.pt`` (loadable with ``weights_only=True``)."""
    buffer = io.BytesIO()
    torch.save(skeleton, buffer)
    data = buffer.getvalue()
    path = storage.join(directory, layout.OBJECTS_FILENAME)
    storage.write_bytes_atomic(path, data)
    return FileEntry(name=layout.OBJECTS_FILENAME, size=len(data), checksum=checksum_of(data), rank=rank)


def remove_checkpoint_dir(storage: Storage, ckpt_dir: str) -> None:
    """Delete a checkpoint: the manifest first, so a half-deleted checkpoint never looks committed."""
    if storage.isfile(ckpt_dir) or (storage.is_local and os.path.islink(ckpt_dir)):
        storage.remove_file(ckpt_dir)
        return
    storage.remove_file(storage.join(ckpt_dir, layout.MANIFEST_FILENAME))
    storage.remove_tree(ckpt_dir)
