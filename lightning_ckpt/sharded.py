"""Distributed tensors in a checkpoint dict (``DTensor``, ``ShardedTensor``): their local chunks, never communicated.

This and :mod:`lightning_ckpt.dist` are the only modules that import ``torch.distributed``; this
one only looks at tensors. A sharded value is saved as the chunks this rank holds: each with its
global offsets (``DTensor``: from its mesh and placements; ``ShardedTensor``: from its shard
metadata) and its local tensor, written raw. ``Partial`` placements (a pending reduction) and
local tensors that are themselves subclasses (float8 and the like) are refused, because their
bytes are not the value.

Example:
    >>> import torch
    >>> find_distributed_tensor({"state_dict": {"w": torch.ones(2)}, "epoch": 0}) is None
    True
    >>> is_distributed(torch.ones(2))
    False
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from lightning_ckpt.errors import PlanError

__all__ = [
    "LocalChunk",
    "distributed_tensor_kind",
    "find_distributed_tensor",
    "global_shape",
    "is_distributed",
    "local_chunks",
    "local_regions",
]


class LocalChunk(NamedTuple):
    """One chunk of a sharded tensor that this rank holds: where it starts in the tensor, and its values."""

    offsets: tuple[int, ...]
    tensor: torch.Tensor


@functools.cache
def _distributed_classes() -> dict[type, str]:
    """The distributed tensor classes of this torch build, looked up once: ``{class: kind}``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return {}
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return {DTensor: "DTensor", ShardedTensor: "ShardedTensor"}


def distributed_tensor_kind(value: Any) -> str | None:
    """``"DTensor"`` or ``"ShardedTensor"`` for a distributed tensor, else ``None``.

    Example:
        >>> import torch
        >>> distributed_tensor_kind(torch.ones(1)) is None
        True
    """
    for cls, kind in _distributed_classes().items():
        if isinstance(value, cls):
            return kind
    return None


def find_distributed_tensor(tree: Any) -> tuple[str, str] | None:
    """The first ``(key, kind)`` of a distributed tensor in a nested dict/list/tuple, else ``None``.

    Keys are ``/``-joined like :func:`lightning_ckpt.tree.split_tensors`'s. One ``isinstance`` per value
    and no string work until a hit: it runs on every save, over every value of the checkpoint dict.
    """
    classes = tuple(_distributed_classes())
    if not classes:
        return None
    containers = (Mapping, list, tuple)
    wanted = (*containers, *classes)
    stack: list[tuple[tuple[Any, ...], Any]] = [((), tree)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, classes):
            return "/".join(map(str, path)) or "tensor", str(distributed_tensor_kind(value))
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        children = [((*path, k), v) for k, v in items if isinstance(v, wanted)]
        stack.extend(reversed(children))
    return None


def is_distributed(value: Any) -> bool:
    """Whether ``value`` is a ``DTensor`` or ``ShardedTensor`` (a leaf of :func:`lightning_ckpt.tree.split_tensors`)."""
    classes = tuple(_distributed_classes())
    return bool(classes) and isinstance(value, classes)


def global_shape(value: Any) -> tuple[int, ...]:
    """The global shape of a distributed tensor."""
    return tuple(value.size() if distributed_tensor_kind(value) == "ShardedTensor" else value.shape)


def local_chunks(key: str, value: Any) -> list[LocalChunk]:
    """The chunks of the distributed tensor ``value`` that this rank holds (empty chunks left out).

    A ``DTensor`` replicated on some mesh dimensions gives the same chunk on several ranks; the save
    plan writes it once. Raises :class:`~lightning_ckpt.errors.PlanError` for what cannot be stored raw.
    """
    kind = distributed_tensor_kind(value)
    if kind == "DTensor":
        chunks = [_dtensor_chunk(key, value)]
    elif kind == "ShardedTensor":
        chunks = [
            LocalChunk(tuple(shard.metadata.shard_offsets), _plain(key, shard.tensor)) for shard in value.local_shards()
        ]
    else:
        raise TypeError(f"{key!r}: not a distributed tensor ({type(value).__name__})")
    return [chunk for chunk in chunks if chunk.tensor.numel() > 0]


def _dtensor_chunk(key: str, value: Any) -> LocalChunk:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    partial = [p for p in value.placements if p.is_partial()]
    if partial:
        raise PlanError(
            f"{key!r} is a DTensor with a Partial placement ({value.placements}): its local values are a pending"
            " reduction, not the tensor. Nothing was written. Redistribute it to Shard or Replicate before saving"
        )
    local = _plain(key, value.to_local())
    shape, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
    if tuple(local.shape) != tuple(shape):
        raise PlanError(
            f"{key!r}: the DTensor's local tensor has shape {tuple(local.shape)}, its placements give {tuple(shape)}"
            " (padded or uneven local shards). Nothing was written"
        )
    return LocalChunk(tuple(offsets), local)


def _plain(key: str, local: Any) -> torch.Tensor:
    if type(local) not in (torch.Tensor, torch.nn.Parameter):
        raise PlanError(
            f"{key!r}: its local shard is a {type(local).__name__}, not a plain tensor, so its bytes are not its"
            " values. Nothing was written. Convert it to a plain dtype before saving (e.g. float8 training: save"
            " the high-precision weights)"
        )
    return local.detach()


def local_regions(value: Any) -> list[LocalChunk]:
    """Where this rank's part of ``value`` lies in the whole tensor, and that part (written in place by a load).

    A ``DTensor`` gives its local tensor, a ``ShardedTensor`` each local shard, a plain tensor itself.

    Example:
        >>> [(r.offsets, r.tensor.shape) for r in local_regions(torch.zeros(2, 3))]
        [((0, 0), torch.Size([2, 3]))]
    """
    kind = distributed_tensor_kind(value)
    if kind == "DTensor":
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        return [LocalChunk(tuple(offsets), value.to_local())]
    if kind == "ShardedTensor":
        return [LocalChunk(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
    return [LocalChunk((0,) * value.dim(), value)]


def sharded_state_dicts(state: Mapping[str, Any], *, full: bool = False) -> dict[str, Any]:
    """``state`` with each module replaced by its state dict and each optimizer by its state, as sharded
    ``DTensor`` values on the CPU (``full``: full tensors, on rank 0 only), keyed by parameter name.

    Modules and optimizers are found by type; optimizers need the one module of ``state``.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> sorted(sharded_state_dicts({"model": model, "step": 3}))
        ['model', 'step']
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=full, cpu_offload=True)
    modules = [value for value in state.values() if isinstance(value, torch.nn.Module)]
    converted: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.nn.Module):
            converted[key] = get_model_state_dict(value, options=options)
        elif isinstance(value, torch.optim.Optimizer):
            if len(modules) != 1:
                raise PlanError(
                    f"state[{key!r}] is an optimizer, which is saved by parameter name through its model; state holds"
                    f" {len(modules)} models. Save one model with its optimizers per checkpoint"
                )
            converted[key] = get_optimizer_state_dict(modules[0], value, options=options)
        else:
            converted[key] = (
                value.state_dict() if hasattr(value, "state_dict") and hasattr(value, "load_state_dict") else value
            )
    return converted
