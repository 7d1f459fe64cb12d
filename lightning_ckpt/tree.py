"""Split a checkpoint dict into its raw tensors and a tensor-free skeleton, and merge them back.

Dense tensors are pulled out of the nested dicts, lists and tuples of a checkpoint and replaced
by a small marker dict naming a key; the skeleton (everything else) is pickled into
``objects.pt`` and stays loadable with ``torch.load(weights_only=True)``. Tensors this format
cannot store raw (sparse, quantized, complex, nested, tensor subclasses) stay in the skeleton.

What stands in the skeleton (every form is a plain ``dict``):

=========================================================  ===========================================
``{TENSOR_MARKER: key}``                                   the raw tensor ``key`` (no grad, not a
                                                           ``Parameter``); every marker naming ``key``
                                                           is the same object, as ``torch.load`` gives
                                                           for one tensor saved twice
``{TENSOR_MARKER: key, TENSOR_ATTRS: {"parameter": True,   the same memory as an ``nn.Parameter`` and/or
"requires_grad": True}}`` (flags that are set only)        requiring grad
``{ESCAPED_MARKER: d}``                                    the user's dict ``d``, which holds one of
                                                           these reserved keys: data, not a marker
=========================================================  ===========================================

A tensor that is the same view (dtype, shape, strides, offset) of the same memory as one met
earlier in the walk (tied weights) is stored once: its marker names the earlier key. Readers
before these forms existed load the first form and tied weights as they are; they return the
other two as dicts.

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

import copy
import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "DTYPE_TO_SAFETENSORS",
    "ESCAPED_MARKER",
    "SAFETENSORS_TO_DTYPE",
    "join_key",
    "TENSOR_ATTRS",
    "TENSOR_MARKER",
    "drop_paths",
    "merge_tensors",
    "split_tensors",
]

TENSOR_MARKER = "__lightning_ckpt_tensor__"
"""Key of a tensor marker: ``{TENSOR_MARKER: key}`` stands where the tensor ``key`` was."""
TENSOR_ATTRS = "__lightning_ckpt_tensor_attrs__"
"""Second key of a marker whose tensor was an ``nn.Parameter`` or required grad: ``{"parameter": True, ...}``."""
ESCAPED_MARKER = "__lightning_ckpt_escaped__"
"""``{ESCAPED_MARKER: d}`` stands for a user dict ``d`` holding a reserved key: data, not a marker."""

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
        and not value.is_nested  # strided nested tensors report the strided layout; torch.save pickles them
        and not value.is_quantized
        and value.device.type != "meta"
        and value.dtype in DTYPE_TO_SAFETENSORS
    )


def _key_part(part: Any) -> str:
    return str(part).replace("/", "%2F")


def join_key(*parts: Any) -> str:
    """The key :func:`split_tensors` gives the value at this path of dict keys and list indices.

    Example:
        >>> join_key("optimizer_states", 0, "state", "enc/dec.weight", "exp_avg")
        'optimizer_states/0/state/enc%2Fdec.weight/exp_avg'
    """
    return "/".join(_key_part(part) for part in parts)


@dataclass
class _SplitState:
    """What a split has found so far: the raw tensors by key, and the key of each tensor view seen.

    Views are found by their first byte's address (an int key: no tuple per tensor for the garbage
    collector to walk); the rare second view starting at an address is kept by its whole description.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    by_address: dict[int, str] = field(default_factory=dict)
    other_views: dict[tuple[Any, ...], str] = field(default_factory=dict)
    is_distributed: Callable[[Any], bool] | None = None
    distributed: dict[str, Any] = field(default_factory=dict)


def split_tensors(
    checkpoint: Any, *, is_distributed: Callable[[Any], bool] | None = None, distributed: dict[str, Any] | None = None
) -> tuple[Any, dict[str, torch.Tensor]]:
    """Return ``(skeleton, tensors)``: the checkpoint with each dense tensor replaced by a marker.

    Keys are the ``/``-joined path to the tensor (``"state_dict/layer.weight"``), made unique if
    two paths collide. A tensor that is the same view of the same memory as one met before (tied
    weights) gets no key of its own: its marker names the first one. The input is not modified.

    Example:
        >>> w = torch.ones(2)
        >>> skeleton, tensors = split_tensors({"enc": w, "dec": w.detach(), "p": torch.nn.Parameter(torch.ones(1))})
        >>> list(tensors), skeleton["dec"]
        (['enc', 'p'], {'__lightning_ckpt_tensor__': 'enc'})
        >>> skeleton["p"][TENSOR_ATTRS]
        {'parameter': True, 'requires_grad': True}

    With ``is_distributed`` (:func:`lightning_ckpt.sharded.is_distributed`), each value it accepts
    (a ``DTensor`` or ``ShardedTensor``) gets a marker too and goes into ``distributed`` by its key:
    its chunks are written by the ranks holding them, and a load puts the whole tensor at the marker.
    """
    state = _SplitState(is_distributed=is_distributed)
    if distributed is not None:
        state.distributed = distributed
    return _split(checkpoint, (), state), state.tensors


# The walkers are module functions, not closures that call themselves: a self-referencing closure
# is a reference cycle, which would keep every tensor of a loaded checkpoint alive until the cycle
# collector happens to run.
def _split(value: Any, path: tuple[str, ...], state: _SplitState) -> Any:
    if _is_raw_storable(value):
        return _tensor_marker(value, path, state)
    if state.is_distributed is not None and state.is_distributed(value):
        key = _new_key(path, state.tensors, state.distributed)
        state.distributed[key] = value
        return {TENSOR_MARKER: key}
    if isinstance(value, dict):
        out = {k: _split(v, (*path, _key_part(k)), state) for k, v in value.items()}
        rebuilt = out if type(value) is dict else _rebuild(value, out)
        return {ESCAPED_MARKER: rebuilt} if TENSOR_MARKER in value or ESCAPED_MARKER in value else rebuilt
    if isinstance(value, list) and type(value) is list:
        return [_split(v, (*path, str(i)), state) for i, v in enumerate(value)]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(_split(v, (*path, str(i)), state) for i, v in enumerate(value))
    return value


def _tensor_marker(value: torch.Tensor, path: tuple[str, ...], state: _SplitState) -> dict[str, Any]:
    address = value.data_ptr() if value.numel() else None  # an empty tensor has no memory to share
    first = state.by_address.get(address) if address is not None else None
    key = first if first is None or _same_view(state.tensors[first], value) else _other_view(value, state)
    if key is None:
        key = _new_key(path, state.tensors, state.distributed)
        state.tensors[key] = value.detach()
        if first is not None:  # another view starting at the same address (rare)
            state.other_views[_view_of(value)] = key
        elif address is not None:
            state.by_address[address] = key
    if type(value) is torch.Tensor and not value.requires_grad:
        return {TENSOR_MARKER: key}
    attrs = {"parameter": type(value) is torch.nn.Parameter, "requires_grad": value.requires_grad}
    return {TENSOR_MARKER: key, TENSOR_ATTRS: {name: True for name, is_set in attrs.items() if is_set}}


def _new_key(path: tuple[str, ...], tensors: Mapping[str, Any], other: Mapping[str, Any] | None = None) -> str:
    key = base = "/".join(path) or "tensor"
    n = 1
    while key in tensors or (other is not None and key in other):
        key, n = f"{base}#{n}", n + 1
    return key


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device


def _view_of(value: torch.Tensor) -> tuple[Any, ...]:
    return (value.data_ptr(), value.dtype, value.shape, value.stride(), value.device)


def _other_view(value: torch.Tensor, state: _SplitState) -> str | None:
    return state.other_views.get(_view_of(value))


def _rebuild(original: dict[Any, Any], items: dict[Any, Any]) -> Any:
    """A dict subclass (OrderedDict, a defaultdict and its factory, AttributeDict) with new values.

    A shallow copy keeps the type and what its constructor took (a ``defaultdict``'s factory);
    a type that cannot be copied and refilled is rebuilt empty, and a plain dict is the last resort.
    """
    try:
        rebuilt = copy.copy(original)
        rebuilt.clear()
        rebuilt.update(items)
        return rebuilt
    except (TypeError, AttributeError, ValueError, copy.Error):
        pass
    try:
        rebuilt = type(original)()
        rebuilt.update(items)
        return rebuilt
    except TypeError:
        return items


@dataclass
class _MergeState:
    """The tensors of a merge, and the ``nn.Parameter`` (or grad-requiring tensor) made of each, made once."""

    tensors: Mapping[str, torch.Tensor]
    on_missing: Callable[[str], Any] | None
    made: dict[tuple[str, bool, bool], torch.Tensor] = field(default_factory=dict)


def merge_tensors(
    skeleton: Any, tensors: Mapping[str, torch.Tensor], on_missing: Callable[[str], Any] | None = None
) -> Any:
    """Inverse of :func:`split_tensors`: put each tensor back where its marker stands.

    Markers naming the same key give the same tensor object (tied weights stay tied); an
    ``nn.Parameter`` or a tensor that required grad comes back as one, sharing the loaded memory.

    Args:
        skeleton: the tensor-free tree.
        tensors: the tensors by key.
        on_missing: called with a key that ``tensors`` lacks; by default a ``KeyError`` is raised.

    Example:
        >>> skeleton, tensors = split_tensors({"enc": torch.ones(2), "n": {TENSOR_MARKER: "not a tensor"}})
        >>> skeleton["n"]
        {'__lightning_ckpt_escaped__': {'__lightning_ckpt_tensor__': 'not a tensor'}}
        >>> merge_tensors(skeleton, tensors)["n"]
        {'__lightning_ckpt_tensor__': 'not a tensor'}
    """

    return _merge(skeleton, _MergeState(tensors, on_missing))


def _merge(value: Any, state: _MergeState) -> Any:
    if type(value) is dict:  # markers are plain dicts; user dicts shaped like one were escaped by the split
        if TENSOR_MARKER in value and _is_marker(value):
            return _tensor_of(value, state)
        if len(value) == 1 and isinstance(value.get(ESCAPED_MARKER), dict):
            return _merge_items(value[ESCAPED_MARKER], state)
    if isinstance(value, dict):
        return _merge_items(value, state)
    if type(value) is list:
        return [_merge(v, state) for v in value]
    if type(value) is tuple:
        return tuple(_merge(v, state) for v in value)
    return value


def _merge_items(value: dict[Any, Any], state: _MergeState) -> Any:
    out = {k: _merge(v, state) for k, v in value.items()}
    return out if type(value) is dict else _rebuild(value, out)


def _is_marker(value: dict[Any, Any]) -> bool:
    if len(value) == 1:
        return True
    return len(value) == 2 and isinstance(value.get(TENSOR_ATTRS), dict)


def _tensor_of(marker: dict[str, Any], state: _MergeState) -> Any:
    key = marker[TENSOR_MARKER]
    if key not in state.tensors:
        if state.on_missing is None:
            raise KeyError(key)
        return state.on_missing(key)
    tensor = state.tensors[key]
    attrs = marker.get(TENSOR_ATTRS)
    if not attrs:
        return tensor
    parameter, requires_grad = bool(attrs.get("parameter")), bool(attrs.get("requires_grad"))
    made = state.made.get((key, parameter, requires_grad))
    if made is None:
        if parameter:
            made = torch.nn.Parameter(tensor, requires_grad=requires_grad)
        else:
            made = tensor.detach().requires_grad_(requires_grad)
        state.made[(key, parameter, requires_grad)] = made
    return made


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
