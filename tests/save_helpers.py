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

from collections.abc import Mapping
from typing import Any

from lightning_ckpt.collective import SaveResult, finish_save, prepare_save

__all__ = ["collective_save"]


def collective_save(checkpoint: Mapping[str, Any], path: str, **options: Any) -> SaveResult:
    """Save ``checkpoint`` at ``path`` from every rank (see :mod:`lightning_ckpt.collective`); returns when committed.

    ``options`` are :func:`~lightning_ckpt.collective.prepare_save`'s (``exchange`` and ``nonce`` at least),
    without staging: the save is written on the calling thread.
    """
    return finish_save(prepare_save(checkpoint, path, **options))
