"""Distributed tensor types in a checkpoint dict (``DTensor``, ``ShardedTensor``): recognised, never communicated.

This and :mod:`lightning_ckpt.dist` are the only modules that import ``torch.distributed``; this
one only looks at tensor types. Until sharded state is supported, the save plan refuses every
distributed tensor (:class:`~lightning_ckpt.errors.PlanError`), because pickling one keeps only
the shards of the rank that writes ``objects.pt``.

Example:
    >>> import torch
    >>> find_distributed_tensor({"state_dict": {"w": torch.ones(2)}, "epoch": 0}) is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["distributed_tensor_kind", "find_distributed_tensor"]


def distributed_tensor_kind(value: Any) -> str | None:
    """``"DTensor"`` or ``"ShardedTensor"`` for a distributed tensor, else ``None``.

    Example:
        >>> import torch
        >>> distributed_tensor_kind(torch.ones(1)) is None
        True
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    if isinstance(value, DTensor):
        return "DTensor"
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return "ShardedTensor"
    return None


def find_distributed_tensor(tree: Any) -> tuple[str, str] | None:
    """The first ``(key, kind)`` of a distributed tensor in a nested dict/list/tuple, else ``None``.

    Keys are ``/``-joined like :func:`lightning_ckpt.tree.split_tensors`'s.
    """
    stack: list[tuple[str, Any]] = [("", tree)]
    while stack:
        path, value = stack.pop()
        kind = distributed_tensor_kind(value)
        if kind is not None:
            return path or "tensor", kind
        if isinstance(value, Mapping):
            items = list(value.items())
        elif isinstance(value, (list, tuple)):
            items = list(enumerate(value))
        else:
            continue
        stack.extend((f"{path}/{k}" if path else str(k), v) for k, v in reversed(items))
    return None
