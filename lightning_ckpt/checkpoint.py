"""One checkpoint's bytes: split a checkpoint dict, write its files, build its manifest, commit it.

This is the single-writer path used by :class:`~lightning_ckpt.ShardedCheckpointIO.save_checkpoint`
(Lightning calls it on global rank 0 only) and the building block of the collective save.

Example:
    >>> import tempfile, os, torch
    >>> folder = tempfile.mkdtemp()
    >>> path = save_checkpoint_dir({"state_dict": {"w": torch.zeros(2)}, "epoch": 0, "global_step": 4},
    ...                            os.path.join(folder, "ep0-ba4"), latest_filename="latest")
    >>> sorted(os.listdir(path))
    ['manifest.json', 'objects.pt', 'shard-00000-of-00001.safetensors']
    >>> os.readlink(os.path.join(folder, "latest"))
    'ep0-ba4'
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from typing import Any

import torch

from lightning_ckpt import layout
from lightning_ckpt.commit import commit_dir, stage_dir, update_latest
from lightning_ckpt.manifest import FileEntry, Manifest, TensorEntry
from lightning_ckpt.storage import Storage
from lightning_ckpt.tree import split_tensors
from lightning_ckpt.writer import checksum_of, plan_shard, write_shard_local, write_shard_stream

__all__ = ["library_versions", "remove_checkpoint_dir", "save_checkpoint_dir", "write_objects", "write_shard"]


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


def save_checkpoint_dir(
    checkpoint: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    latest_filename: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Save ``checkpoint`` as a one-shard checkpoint directory at ``path`` and commit it.

    An existing checkpoint at ``path`` is replaced atomically (locally) only once the new one is
    complete. ``metadata`` (JSON-able) is stored in the manifest, e.g. the monitored metric.
    Returns the committed path (a URL for remote stores).
    """
    storage, target = Storage.open(path, storage_options)
    folder, name = storage.dirname(target), storage.basename(target)
    if not layout.is_plain_name(name):
        raise ValueError(f"path={os.fspath(path)!r} must name a checkpoint directory, e.g. '/data/ckpts/ep0-ba100'")
    skeleton, tensors = split_tensors(dict(checkpoint))
    staged = stage_dir(storage, folder, name)
    try:
        shard, tensor_entries = write_shard(storage, staged, tensors, index=0, count=1, rank=0)
        objects = write_objects(storage, staged, skeleton, rank=0)
        manifest = Manifest(
            name=name,
            epoch=int(checkpoint.get("epoch", 0)),
            global_step=int(checkpoint.get("global_step", 0)),
            world_size=1,
            files=[shard, objects],
            tensors={e.key: e for e in tensor_entries},
            weights_only="optimizer_states" not in checkpoint,
            versions=library_versions(),
            metadata=dict(metadata or {}),
        )
        final = commit_dir(storage, folder, name, staged, manifest)
    except BaseException:
        if storage.is_local:
            storage.remove_tree(staged)
        raise
    if latest_filename is not None:
        update_latest(storage, folder, name, latest_filename)
    return storage.url(final)


def remove_checkpoint_dir(storage: Storage, ckpt_dir: str) -> None:
    """Delete a checkpoint: the manifest first, so a half-deleted checkpoint never looks committed."""
    if storage.isfile(ckpt_dir) or (storage.is_local and os.path.islink(ckpt_dir)):
        storage.remove_file(ckpt_dir)
        return
    storage.remove_file(storage.join(ckpt_dir, layout.MANIFEST_FILENAME))
    storage.remove_tree(ckpt_dir)
