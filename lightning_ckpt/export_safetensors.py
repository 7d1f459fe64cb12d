"""The safetensors writer of an export: the model's ``state_dict`` in the Hugging Face layout.

One ``model.safetensors``, or ``model-00001-of-0000N.safetensors`` files and a
``model.safetensors.index.json`` (``weight_map``) when the weights exceed ``max_shard_bytes``. Each
file's header is written first (sizes are known from the manifest), then its tensors, streamed from
the source. The entry point is :func:`lightning_ckpt.export.consolidate`.

Example:
    >>> safetensors_base("out"), safetensors_base("model.safetensors")
    ('out/model.safetensors', 'model.safetensors')
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from lightning_ckpt.errors import CheckpointError, ConfigError
from lightning_ckpt.export_source import (
    ByteCounter,
    CheckpointSource,
    Progress,
    atomic_outputs,
    cast_blocks,
    target_dtype,
)
from lightning_ckpt.manifest import LogicalTensor
from lightning_ckpt.tree import DTYPE_TO_SAFETENSORS, TENSOR_MARKER

__all__ = ["safetensors_base", "weights_of", "write_safetensors"]


def safetensors_base(out: str) -> str:
    return out if out.endswith(".safetensors") else os.path.join(out, "model.safetensors")


def weights_of(source: CheckpointSource, weights_key: str) -> list[tuple[str, LogicalTensor]]:
    """``(name, tensor)`` for each tensor of the model's ``state_dict``, in its order."""
    weights = source.skeleton.get(weights_key)
    if not isinstance(weights, Mapping):
        raise ConfigError(
            "weights_key", weights_key, "'state_dict'",
            f"The checkpoint holds no dict under it; its keys are {sorted(map(str, source.skeleton))}",
        )  # fmt: skip
    entries, skipped = [], []
    for name, value in weights.items():
        key = value.get(TENSOR_MARKER) if isinstance(value, dict) else None
        if isinstance(key, str) and key in source.tensors:
            entries.append((str(name), source.tensors[key]))
        elif isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{weights_key}/{name} is a {value.dtype} {value.layout} tensor, which safetensors cannot hold;"
                " export with format='ckpt'"
            )
        else:
            skipped.append(str(name))
    if skipped:
        warnings.warn(f"safetensors hold tensors only; not exported: {', '.join(skipped)}", stacklevel=3)
    return entries


def _plan_files(
    entries: list[tuple[str, LogicalTensor, torch.dtype]], max_shard_bytes: int
) -> list[list[tuple[str, LogicalTensor, torch.dtype]]]:
    """Entries split into files of at most ``max_shard_bytes`` (a larger tensor gets a file of its own)."""
    files: list[list[tuple[str, LogicalTensor, torch.dtype]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = torch.Size(entry[1].shape).numel() * entry[2].itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += nbytes
    return files


def _header(entries: list[tuple[str, LogicalTensor, torch.dtype]]) -> tuple[bytes, int]:
    """A safetensors header (length prefix, JSON padded to 8 bytes) and the data size that follows it."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor, dtype in entries:
        end = offset + torch.Size(tensor.shape).numel() * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_TO_SAFETENSORS[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def write_safetensors(
    source: CheckpointSource,
    weights: list[tuple[str, LogicalTensor]],
    base: str,
    cast: torch.dtype | None,
    max_shard_bytes: int,
    force: bool,
    progress: Progress | None,
) -> list[str]:
    typed = [(name, t, target_dtype("", t.dtype, cast, "")) for name, t in weights]
    groups = [sorted(g, key=lambda e: (-e[2].itemsize, e[0])) for g in _plan_files(typed, max_shard_bytes)]
    stem = base.removesuffix(".safetensors")
    names = (
        [base]
        if len(groups) == 1
        else [f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    )
    index = base + ".index.json"
    finals = names if len(groups) == 1 else [*names, index]
    counter = ByteCounter(sum(_header(g)[1] for g in groups), progress)
    with atomic_outputs(finals, force, stale=_earlier_export(base, index)) as files:
        for f, group in zip(files, groups, strict=False):
            header, _ = _header(group)
            f.write(header)
            for _, tensor, dtype in group:
                for block in cast_blocks(source, tensor, dtype):
                    f.write(block)
                    counter.add(len(block))
        if len(groups) > 1:
            weight_map = {
                name: os.path.basename(file) for file, group in zip(names, groups, strict=True) for name, _, _ in group
            }
            document = {"metadata": {"total_size": counter.total}, "weight_map": weight_map}
            files[-1].write(json.dumps(document, indent=2, sort_keys=True).encode() + b"\n")
    return finals


def _earlier_export(base: str, index: str) -> list[str]:
    """The files of an earlier export to ``base`` (its single file, or its index and the parts the index names)."""
    found = [base, index]
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        found += sorted({os.path.join(os.path.dirname(base), os.path.basename(str(v))) for v in weight_map.values()})
    except (OSError, ValueError, AttributeError):
        pass
    return found
