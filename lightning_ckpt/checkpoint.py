"""One checkpoint's files: a shard of raw tensors, the pickled non-tensor skeleton, and deletion.

These are the building blocks of :mod:`lightning_ckpt.collective`, which orders them into a save.

Example:
    >>> import tempfile, torch
    >>> from lightning_ckpt.storage import Storage
    >>> storage, directory = Storage.open(tempfile.mkdtemp())
    >>> shard = prepare_shard({"w": torch.zeros(2)}, index=0, count=1)
    >>> files, tensors = write_prepared_shard(storage, directory, shard, rank=0)
    >>> files[0].name, files[0].size, tensors[0].offset
    ('shard-00000-of-00001.safetensors', 4104, 4096)
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any

import torch

from lightning_ckpt import _faults, layout
from lightning_ckpt.incremental import Base, Split, split_shard
from lightning_ckpt.manifest import ChunkOf, FileEntry, TensorEntry
from lightning_ckpt.plan import paused_gc
from lightning_ckpt.staging import StagedShard, StagingBuffer
from lightning_ckpt.storage import Storage
from lightning_ckpt.writer import ShardPlan, checksum_of, plan_shard, write_shard_local, write_shard_stream

__all__ = [
    "PreparedShard",
    "library_versions",
    "pickle_objects",
    "prepare_shard",
    "remove_checkpoint_dir",
    "write_objects",
    "write_prepared_shard",
]


def library_versions() -> dict[str, str]:
    """Versions of the libraries that matter for reading a checkpoint back."""
    versions: dict[str, str] = {"torch": str(torch.__version__)}
    for dist in ("lightning", "lightning-ckpt"):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class PreparedShard:
    """One rank's shard, laid out and (when staged) snapshotted, ready to be written.

    Attributes:
        plan: the shard plan; its tensors are the staged copies when ``staged`` is set.
        staged: the snapshot in a staging buffer, or ``None`` (written from the tensors' own memory).
        devices: each tensor's original device, recorded in the manifest for ``map_location``.
        split: for an incremental save of CPU tensors, what was hashed and referenced before staging
            (``plan`` then holds the changed pieces alone); ``None`` otherwise.
    """

    plan: ShardPlan
    staged: StagedShard | None
    devices: dict[str, str]
    split: Split | None = None

    @property
    def nbytes(self) -> int:
        """Size of the shard file."""
        return self.plan.total_size


def prepare_shard(
    tensors: Mapping[str, torch.Tensor],
    *,
    index: int,
    count: int,
    staging: StagingBuffer | None = None,
    chunks: Mapping[str, ChunkOf] | None = None,
    incremental: bool = False,
    base: Base | None = None,
) -> PreparedShard:
    """Lay out one shard of ``tensors``; with ``staging``, copy them into it (the point-in-time snapshot).

    Tensors on an accelerator are always staged (into pinned memory when ``staging`` is given,
    else into fresh host memory). With ``incremental`` and tensors all on the CPU, every piece is
    hashed first (:func:`~lightning_ckpt.incremental.split_shard`): the pieces whose bytes ``base``
    holds are neither staged nor written.
    """
    name = layout.shard_filename(index, count)
    with paused_gc():  # 100,000 small tensors: no collector passes over the entries being built
        devices = {k: str(t.device) for k, t in tensors.items()}
        if staging is None:
            tensors = {k: (t if t.device.type == "cpu" else t.to("cpu")) for k, t in tensors.items()}
        plan = plan_shard(tensors, file=name, devices=devices, chunks=chunks)
    split = None
    if incremental and all(t.device.type == "cpu" for t in tensors.values()):
        split = split_shard(plan, base)
        plan = split.plan
    staged = staging.stage(plan) if staging is not None else None
    return PreparedShard(plan=staged.plan if staged else plan, staged=staged, devices=devices, split=split)


def write_prepared_shard(
    storage: Storage,
    directory: str,
    shard: PreparedShard,
    *,
    rank: int,
    direct_io: bool = True,
    incremental: bool = False,
    base: Base | None = None,
) -> tuple[list[FileEntry], list[TensorEntry]]:
    """Write a prepared shard into ``directory``; return its file entries and tensor entries.

    With ``incremental`` every piece is hashed (:mod:`lightning_ckpt.incremental`), by
    :func:`prepare_shard` for CPU tensors, here (on the staged copy) for the others: pieces whose
    bytes ``base`` holds are referenced instead of written (their base files follow the shard's
    entry in the list), and the written ones carry their digests.
    """
    path = storage.join(directory, shard.plan.file)
    image = None
    if shard.staged is not None:
        shard.staged.ready()
        image = shard.staged.padded
    plan, split = shard.plan, shard.split
    if incremental and split is None:
        split = split_shard(plan, base)
        if split.references:
            plan, image = split.plan, None  # the staged image holds every piece: write the changed ones alone
    if storage.is_local:
        written = write_shard_local(path, plan, rank=rank, image=image, direct_io=direct_io)
    else:
        with storage.open_write(path) as stream:
            written = write_shard_stream(stream, plan, rank=rank, image=image)
    if split is None:
        return [written.file], written.entries
    entries = [dataclasses.replace(e, digest=split.digests[e.key]) for e in written.entries]
    return [written.file, *split.files], entries + split.references


def pickle_objects(skeleton: Any) -> bytes:
    """The tensor-free skeleton pickled as ``objects.pt`` (loadable with ``weights_only=True``)."""
    buffer = io.BytesIO()
    with paused_gc():
        torch.save(skeleton, buffer)
    return buffer.getvalue()


def write_objects(storage: Storage, directory: str, skeleton: Any, *, rank: int) -> FileEntry:
    """Write ``objects.pt``: ``skeleton`` is the tensor-free skeleton or its :func:`pickle_objects` bytes."""
    data = skeleton if isinstance(skeleton, bytes) else pickle_objects(skeleton)
    path = storage.join(directory, layout.OBJECTS_FILENAME)
    storage.write_bytes_atomic(path, data)
    return FileEntry(name=layout.OBJECTS_FILENAME, size=len(data), checksum=checksum_of(data), rank=rank)


def remove_checkpoint_dir(storage: Storage, ckpt_dir: str) -> None:
    """Delete a checkpoint: the manifest first, so a half-deleted checkpoint never looks committed."""
    if storage.isfile(ckpt_dir) or storage.islink(ckpt_dir):
        storage.remove_file(ckpt_dir)
        return
    storage.remove_file(storage.join(ckpt_dir, layout.MANIFEST_FILENAME))
    _faults.reached("rotation.during", 0)
    storage.remove_tree(ckpt_dir)
