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

import functools
from collections.abc import Mapping
from typing import Any

__all__ = ["distributed_tensor_kind", "find_distributed_tensor"]


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
