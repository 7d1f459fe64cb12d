"""``collective_save``: a whole collective save in one call, for tests that drive ranks by hand (threads over a store).

The package saves through :class:`~lightning_ckpt.ShardedCheckpointIO`, which runs
:func:`~lightning_ckpt.collective.prepare_save` and :func:`~lightning_ckpt.collective.finish_save`
itself (with staging and a background thread); tests use this to write checkpoints of any world size.

Example:
    >>> import tempfile, os, torch
    >>> from lightning_ckpt.dist import Exchange
    >>> folder = tempfile.mkdtemp()
    >>> result = collective_save({"w": torch.ones(2), "global_step": 3}, os.path.join(folder, "ba3"),
    ...                          exchange=Exchange.current(prefix="doc", timeout_s=10), nonce="n1")
    >>> result.leader, sorted(os.listdir(result.path))
    (True, ['manifest.json', 'objects.pt', 'shard-00000-of-00001.safetensors'])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_ckpt.collective import SaveResult, WriterHook, finish_save, prepare_save
from lightning_ckpt.dist import Exchange

__all__ = ["collective_save"]


def collective_save(
    checkpoint: Mapping[str, Any],
    path: str,
    *,
    exchange: Exchange,
    nonce: str,
    peers: Sequence[int] = (0,),
    storage_options: Mapping[str, Any] | None = None,
    latest_filename: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    hooks: Sequence[WriterHook] = (),
    previous: Exchange | None = None,
    replicated: Any = None,
) -> SaveResult:
    """Save ``checkpoint`` at ``path`` from every rank (see :mod:`lightning_ckpt.collective`); returns when committed.

    Args:
        checkpoint: this rank's checkpoint dict (identical on every rank for replicated DDP state).
        path: this rank's checkpoint directory (path or URL).
        exchange: the ranks' exchange for this save (a fresh prefix per save).
        nonce: a run-unique token shared by all ranks (names the staging directory).
        peers: ranks that see the same storage as this rank (:func:`~lightning_ckpt.collective.discover_peers`).
        storage_options: fsspec options for remote paths.
        latest_filename: the pointer to move after the commit, or ``None``.
        metadata: JSON-able extras stored in the manifest.
        hooks: :class:`~lightning_ckpt.WriterHook` instances.
        previous: the previous save's exchange; its last keys are deleted once every rank is here.
        replicated: tensors identical on every rank by construction (keys, or ``(key, tensor) -> bool``),
            written split across the group; the rest comes from the leader (:mod:`lightning_ckpt.plan`).
    """
    prepared = prepare_save(
        checkpoint,
        path,
        exchange=exchange,
        nonce=nonce,
        peers=peers,
        storage_options=storage_options,
        latest_filename=latest_filename,
        metadata=metadata,
        hooks=hooks,
        previous=previous,
        replicated=replicated,
    )
    return finish_save(prepared)
