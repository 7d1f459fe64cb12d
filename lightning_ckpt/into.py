"""Load a checkpoint into tensors that already exist, as ``torch.distributed.checkpoint.load`` does.

:func:`load_into` walks a nested state (dicts and lists, e.g. ``{"model": model.state_dict(),
"optim": ...}`` or a Lightning checkpoint dict) and fills every tensor in it, in place, from the
stored tensor at the same path: plain tensors, ``DTensor`` and ``ShardedTensor`` alike, whatever the
layout the checkpoint was saved with. A tensor whose memory is exactly one stored piece is read
straight into that memory (one ``preadv``, then the piece's CRC32 over the same bytes), so no fresh
memory is touched and nothing is copied: on a cold page cache this is as fast as the disk
(``benchmarks/README.md``). Only the byte ranges the state needs are read, locally or from an object
store. Non-tensor values in dicts are replaced by the stored ones (see :func:`load_into`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from lightning_ckpt.discovery import resolve
from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.inplace import PieceReader, markers, open_pieces
from lightning_ckpt.manifest import LogicalTensor
from lightning_ckpt.sharded import distributed_tensor_kind
from lightning_ckpt.tree import join_key

__all__ = ["load_into"]

_Container = dict[Any, Any] | list[Any]


def load_into(
    path: str | os.PathLike[str],
    state: _Container,
    *,
    strict: bool = True,
    verify_checksums: bool = True,
    weights_only: bool | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> _Container:
    """Fill every tensor of ``state`` in place from the checkpoint at ``path``; return ``state``.

    Args:
        path: a checkpoint directory, a folder of checkpoints (its newest), a ``latest`` pointer, or a
            URL of one (``s3://...``), as for ``trainer.fit(ckpt_path=...)``.
        state: nested dicts and lists whose tensors receive the stored values (same shape and dtype,
            any device). Its keys are the checkpoint's: ``{"state_dict": {...}}`` for a Lightning
            checkpoint. Entries the checkpoint holds but ``state`` does not are not read.
        strict: raise if ``state`` has a tensor or value the checkpoint does not hold; with ``False``
            those are left as they are.
        verify_checksums: check each piece's CRC32 as it is read.
        weights_only: read the non-tensor values with ``torch.load(weights_only=...)`` (``None``: ``True``).
        storage_options: fsspec options for a URL (credentials, endpoint).

    Raises:
        CorruptCheckpointError: a stored tensor has another shape or dtype, a piece fails its
            checksum, or (``strict``) a key is missing. A failed checksum leaves that tensor partly
            overwritten: load again, or from another checkpoint.

    Example:
        >>> import os, tempfile, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> path = save_checkpoint_dir({"w": torch.arange(3.0), "step": 7}, os.path.join(tempfile.mkdtemp(), "c"))
        >>> state = {"w": torch.zeros(3), "step": 0}
        >>> memory = state["w"].data_ptr()
        >>> _ = load_into(path, state)
        >>> state, state["w"].data_ptr() == memory
        ({'w': tensor([0., 1., 2.]), 'step': 7}, True)
    """
    if not isinstance(state, (dict, list)):
        raise TypeError(
            "state must be a dict or list of tensors (e.g. {'model': model.state_dict()}),"
            f" not {type(state).__name__}"
        )
    resolved = resolve(os.fspath(path), storage_options)
    storage, ckpt_dir = resolved.storage, resolved.path
    if resolved.kind != "dir":
        raise CorruptCheckpointError(
            f"{storage.url(ckpt_dir)} is a single-file checkpoint; load_into reads checkpoint directories of this"
            " package (use torch.load, or lightning-ckpt cp, for other files)"
        )
    reader, tensors, stored = open_pieces(storage, ckpt_dir, verify=verify_checksums, weights_only=weights_only)
    missing: list[str] = []
    _walk(reader, tensors, state, stored, (), missing)
    if strict and missing:
        shown = ", ".join(repr(k) for k in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CorruptCheckpointError(
            f"{storage.url(ckpt_dir)} does not hold {shown}, which the state to load into has: it was saved from"
            " a different model or with other keys. Pass strict=False to load the rest"
        )
    reader.run_queued()
    return state


def _walk(
    reader: PieceReader,
    tensors: Mapping[str, LogicalTensor],
    state: _Container,
    stored: Any,
    path: tuple[Any, ...],
    missing: list[str],
) -> None:
    """Queue a read for every tensor in ``state``; replace its non-tensor dict values by ``stored``'s."""
    items = list(state.items()) if isinstance(state, dict) else list(enumerate(state))
    for name, value in items:
        here = (*path, name)
        below = _child(stored, name)
        if isinstance(value, torch.Tensor) or distributed_tensor_kind(value) is not None:
            key = join_key(*here)
            if key in tensors:
                reader.fill(key, tensors[key], value)
            else:
                missing.append(key)
        elif isinstance(value, (dict, list)):
            _walk(reader, tensors, value, below if below is not _ABSENT else None, here, missing)
        elif below is _ABSENT:
            missing.append(join_key(*here))
        elif isinstance(state, dict) and not markers(below):
            state[name] = below


_ABSENT = object()


def _child(stored: Any, name: Any) -> Any:
    if isinstance(stored, dict) and name in stored:
        return stored[name]
    if isinstance(stored, (list, tuple)) and isinstance(name, int) and name < len(stored):
        return stored[name]
    return _ABSENT
