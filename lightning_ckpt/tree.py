"""Split a checkpoint dict into its raw tensors and a tensor-free skeleton, and merge them back.

Dense tensors are pulled out of the nested dicts, lists and tuples of a checkpoint and replaced
by a small marker dict naming a key; the skeleton (everything else) is pickled into
``objects.pt`` and stays loadable with ``torch.load(weights_only=True)``. Tensors this format
cannot store raw (sparse, quantized, complex, tensor subclasses) stay in the skeleton.

Example:
    >>> import torch
    >>> ckpt = {"state_dict": {"w": torch.ones(2)}, "epoch": 3, "opt": [{"step": torch.tensor(1.0)}]}
    >>> skeleton, tensors = split_tensors(ckpt)
    >>> sorted(tensors)
    ['opt/0/step', 'state_dict/w']
    >>> skeleton["epoch"], skeleton["state_dict"]
    (3, {'w': {'__lightning_ckpt_tensor__': 'state_dict/w'}})
    >>> merged = merge_tensors(skeleton, tensors)
    >>> torch.equal(merged["state_dict"]["w"], ckpt["state_dict"]["w"])
    True
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "DTYPE_TO_SAFETENSORS",
    "SAFETENSORS_TO_DTYPE",
    "TENSOR_MARKER",
    "drop_paths",
    "merge_tensors",
    "split_tensors",
]

TENSOR_MARKER = "__lightning_ckpt_tensor__"

DTYPE_TO_SAFETENSORS: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
SAFETENSORS_TO_DTYPE = {v: k for k, v in DTYPE_TO_SAFETENSORS.items()}


def _is_raw_storable(value: Any) -> bool:
    return (
        type(value) in (torch.Tensor, torch.nn.Parameter)
        and value.layout == torch.strided
        and not value.is_quantized
        and value.device.type != "meta"
        and value.dtype in DTYPE_TO_SAFETENSORS
    )


def _key_part(part: Any) -> str:
    return str(part).replace("/", "%2F")


def split_tensors(checkpoint: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Return ``(skeleton, tensors)``: the checkpoint with each dense tensor replaced by a marker.

    Keys are the ``/``-joined path to the tensor (``"state_dict/layer.weight"``), made unique if
    two paths collide. The input is not modified.
    """
    tensors: dict[str, torch.Tensor] = {}
    return _split(checkpoint, (), tensors), tensors


# The walkers are module functions, not closures that call themselves: a self-referencing closure
# is a reference cycle, which would keep every tensor of a loaded checkpoint (memory-mapped files)
# alive until the cycle collector happens to run.
def _split(value: Any, path: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> Any:
    if _is_raw_storable(value):
        key = "/".join(path) or "tensor"
        unique, n = key, 1
        while unique in tensors:
            unique, n = f"{key}#{n}", n + 1
        tensors[unique] = value.detach()
        return {TENSOR_MARKER: unique}
    if isinstance(value, dict):
        out = {k: _split(v, (*path, _key_part(k)), tensors) for k, v in value.items()}
        return out if type(value) is dict else _rebuild(value, out)
    if isinstance(value, list) and type(value) is list:
        return [_split(v, (*path, str(i)), tensors) for i, v in enumerate(value)]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_split(v, (*path, str(i)), tensors) for i, v in enumerate(value))
    return value


def _rebuild(original: Mapping[Any, Any], items: dict[Any, Any]) -> Any:
    """Rebuild a dict subclass (OrderedDict, AttributeDict) with new values, keeping its type."""
    try:
        rebuilt = type(original)()
        rebuilt.update(items)  # type: ignore[attr-defined]
        return rebuilt
    except TypeError:
        return items


def merge_tensors(
    skeleton: Any, tensors: Mapping[str, torch.Tensor], on_missing: Callable[[str], Any] | None = None
) -> Any:
    """Inverse of :func:`split_tensors`: put each tensor back where its marker stands.

    Args:
        skeleton: the tensor-free tree.
        tensors: the tensors by key.
        on_missing: called with a key that ``tensors`` lacks; by default a ``KeyError`` is raised.
    """

    return _merge(skeleton, tensors, on_missing)


def _merge(value: Any, tensors: Mapping[str, torch.Tensor], on_missing: Callable[[str], Any] | None) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and TENSOR_MARKER in value:
            key = value[TENSOR_MARKER]
            if key in tensors:
                return tensors[key]
            if on_missing is None:
                raise KeyError(key)
            return on_missing(key)
        out = {k: _merge(v, tensors, on_missing) for k, v in value.items()}
        return out if type(value) is dict else _rebuild(value, out)
    if type(value) is list:
        return [_merge(v, tensors, on_missing) for v in value]
    if type(value) is tuple:
        return tuple(_merge(v, tensors, on_missing) for v in value)
    return value


def drop_paths(checkpoint: dict[str, Any], patterns: Sequence[str]) -> dict[str, Any]:
    """Remove every dict entry whose ``/``-joined key path matches a glob pattern (in place).

    A matched entry goes with everything under it; ``*`` also crosses ``/``.

    Example:
        >>> ckpt = {"state_dict": {"a.weight": 1, "b.weight": 2}, "optimizer_states": [{}], "epoch": 0}
        >>> drop_paths(ckpt, ["state_dict/a.*", "optimizer_states"])
        {'state_dict': {'b.weight': 2}, 'epoch': 0}
    """

    _drop(checkpoint, "", patterns)
    return checkpoint


def _drop(node: Any, prefix: str, patterns: Sequence[str]) -> None:
    if not isinstance(node, dict):
        return
    for key in list(node):
        path = f"{prefix}/{key}" if prefix else str(key)
        if any(fnmatch.fnmatchcase(path, p) for p in patterns):
            del node[key]
        else:
            _drop(node[key], path, patterns)
