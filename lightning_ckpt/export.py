"""Export a checkpoint (any number of shards, v1 or v2, local or remote) as one ``.ckpt`` file or as safetensors.

:func:`consolidate` streams tensor by tensor: it never holds the whole model, only the tensor being
written (a ``Shard(0)`` tensor, the usual FSDP2 layout, is written chunk by chunk without being
assembled). Each stored piece is read with a ranged read (local ``pread``; a ranged GET on an object
store) and verified by its own CRC32 (format v1: each shard file's CRC32, streamed once first).

``format="ckpt"`` writes what ``torch.save`` writes (a zip of ``data.pkl`` and one record per tensor,
each aligned to 64 bytes, so ``torch.load(..., mmap=True)`` works too): the pickle is built first
from the manifest (shapes and dtypes are known), then each tensor's record is streamed. ``torch.load``
and ``LightningModule.load_from_checkpoint`` read it without lightning-ckpt installed.

``format="safetensors"`` writes the model's ``state_dict`` in the Hugging Face layout: one
``model.safetensors``, or ``model-00001-of-0000N.safetensors`` files and a
``model.safetensors.index.json`` (``weight_map``) when the weights exceed ``max_shard_bytes``. Each
file's header is written first (sizes are known from the manifest), then its tensors.

Every output appears atomically (temporary names in the same directory, fsync, rename; the index
last) and an existing output is refused unless ``force=True``.

Example:
    >>> import os, tempfile, torch
    >>> from lightning_ckpt.collective import save_checkpoint_dir
    >>> root = tempfile.mkdtemp()
    >>> src = save_checkpoint_dir({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, os.path.join(root, "a"))
    >>> [ckpt] = consolidate(src, os.path.join(root, "a.ckpt"))
    >>> torch.load(ckpt)["state_dict"]["w"]
    tensor([1., 1.])
    >>> [st] = consolidate(src, os.path.join(root, "hf"), format="safetensors", dtype="bf16")
    >>> os.path.basename(st)
    'model.safetensors'
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lightning_ckpt.errors import ConfigError, ConfigTypeError
from lightning_ckpt.export_ckpt import write_ckpt
from lightning_ckpt.export_safetensors import safetensors_base, weights_of, write_safetensors
from lightning_ckpt.export_source import CheckpointSource, Progress

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "DTYPES", "FORMATS", "WEIGHTS_ONLY_KEYS", "consolidate"]

FORMATS = ("ckpt", "safetensors")
"""The values of ``format``."""
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
"""The values of ``dtype``: what the floating-point weights are cast to."""
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""Hugging Face's default largest safetensors file (5 GB)."""
WEIGHTS_ONLY_KEYS = (
    "state_dict",
    "epoch",
    "global_step",
    "pytorch-lightning_version",
    "hyper_parameters",
    "hparams_name",
    "hparams_type",
    "datamodule_hyper_parameters",
    "datamodule_hparams_name",
)
"""The keys a ``weights_only`` ``.ckpt`` keeps: the weights and what ``load_from_checkpoint`` reads besides."""


def consolidate(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    format: str | None = None,
    dtype: str | None = None,
    weights_only: bool = False,
    storage_options: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    allow_pickle: bool = False,
    force: bool = False,
    weights_key: str = "state_dict",
    progress: Progress | None = None,
) -> list[str]:
    """Write the checkpoint at ``path`` as one ``.ckpt`` file or as safetensors files; return the files written.

    Args:
        path: a checkpoint directory, a folder of checkpoints (its newest) or a ``latest`` pointer; local or a URL.
        out: ``"ckpt"``: the file to write. ``"safetensors"``: a directory (``model.safetensors`` in it), or a
            path ending in ``.safetensors`` (that file, or its numbered parts and ``<out>.index.json``).
        format: ``"ckpt"`` or ``"safetensors"``; by default ``"safetensors"`` if ``out`` ends with
            ``.safetensors``, else ``"ckpt"``.
        dtype: cast the floating-point weights (``state_dict``) to ``"bf16"``, ``"fp16"`` or ``"fp32"``;
            optimizer state keeps its dtype (a resume needs it exact). ``None`` keeps every dtype.
        weights_only: ``"ckpt"`` only: keep :data:`WEIGHTS_ONLY_KEYS` (no optimizer, loops or callbacks).
            safetensors always hold the weights only.
        storage_options: fsspec options for a remote ``path``.
        max_shard_bytes: safetensors only: start a new file before one would exceed this many bytes.
        allow_pickle: unpickle ``objects.pt`` with ``weights_only=False`` (checkpoints you trust only).
        force: replace existing output files (and, for safetensors, remove the parts of an earlier export).
        weights_key: safetensors only: the checkpoint key holding the weights.
        progress: called after each write with (bytes written, bytes to write).

    Raises:
        ConfigError: a bad argument (named, with a valid example).
        FileExistsError: an output exists and ``force`` is False.
        CorruptCheckpointError: a piece does not match its checksum (the file and tensor are named).

    Example:
        >>> import tempfile, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> root = tempfile.mkdtemp()
        >>> src = save_checkpoint_dir({"state_dict": {"w": torch.ones(2)}, "optimizer_states": [{}], "epoch": 1},
        ...                           os.path.join(root, "ep1-ba8"))
        >>> [path] = consolidate(src, os.path.join(root, "weights.ckpt"), weights_only=True, dtype="bf16")
        >>> checkpoint = torch.load(path)
        >>> sorted(checkpoint), checkpoint["state_dict"]["w"]
        (['epoch', 'state_dict'], tensor([1., 1.], dtype=torch.bfloat16))
    """
    src, target, kind = _check_arguments(path, out, format, dtype, max_shard_bytes)
    cast = DTYPES[dtype] if dtype is not None else None
    source = CheckpointSource.open(src, storage_options, allow_pickle)
    if kind == "ckpt":
        skeleton = source.skeleton
        if weights_only:
            skeleton = {k: v for k, v in skeleton.items() if k in WEIGHTS_ONLY_KEYS}
        return [write_ckpt(source, skeleton, target, cast, force, progress)]
    entries = weights_of(source, weights_key)
    return write_safetensors(source, entries, safetensors_base(target), cast, max_shard_bytes, force, progress)


def _check_arguments(
    path: object, out: object, format: object, dtype: object, max_shard_bytes: object
) -> tuple[str, str, str]:
    """``(path, out, format)`` as strings, after every argument is checked (nothing is read before)."""
    paths = []
    for name, value in (("path", path), ("out", out)):
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise ConfigTypeError(name, value, "'/data/runs/a/ep3-ba1500' (path) or 'model.ckpt' (out)")
        paths.append(str(os.fspath(value)))
    if "://" in paths[1]:
        raise ConfigError("out", out, "'model.ckpt'", "The output is written on this machine; copy it afterwards")
    if format is not None and format not in FORMATS:
        raise ConfigError("format", format, "'ckpt' or 'safetensors'")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError("dtype", dtype, "'bf16', 'fp16' or 'fp32' (or None to keep the saved dtypes)")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ConfigError("max_shard_bytes", max_shard_bytes, f"{DEFAULT_MAX_SHARD_BYTES} (5 GB, a positive int)")
    kind = str(format) if format is not None else "safetensors" if paths[1].endswith(".safetensors") else "ckpt"
    return paths[0], paths[1], kind
