"""Tell the other ranks about a checkpoint that one rank alone is still writing in the background.

Fabric's ``fabric.save`` and Lightning's ``trainer.save_checkpoint`` call the plugin on rank 0 only
and then meet at a barrier. With ``ShardedCheckpointIO(async_save=True)`` rank 0 returns before the
checkpoint is committed, so a rank that loads it right after the barrier could find nothing. Rank 0
therefore marks the path as *pending* in the process group's key-value store before its save call
returns, and as *done* (or *failed*) when the background write ends; ``load_checkpoint`` on any rank
waits while the path it asks for, or the folder holding it, is pending. A single process has no
store and nothing to wait for. The marks go through :class:`~lightning_ckpt.dist.Exchange`
(``announce`` / ``announced`` / ``wait_announced``): store writes and reads, never a collective, so
the background thread that finishes the save can set them.

Example:
    >>> from torch.distributed import HashStore
    >>> store = HashStore()
    >>> finished = announce("/data/run/ep0-ba8", store)
    >>> state("/data/run/ep0-ba8", store), state("/data/run", store)
    ('pending', 'pending')
    >>> finished(True)
    >>> wait_until_written("/data/run/ep0-ba8", timeout_s=1.0, store=store)  # returns at once
    >>> state("/data/run/ep0-ba8", store)
    'done'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from lightning_ckpt.dist import Exchange
from lightning_ckpt.errors import CheckpointError

__all__ = ["announce", "state", "wait_until_written"]

_PREFIX = "inflight"  # the store namespace of the marks


def _names(path: str) -> list[str]:
    """The names of a checkpoint path and of its folder (a load may name either)."""
    full = path.rstrip("/") if "://" in path else os.path.abspath(path)
    folder = full.rsplit("/", 1)[0] if "/" in full else full
    return [full, folder + "/"]


def _exchange(store: Any, timeout_s: float = 0.0) -> Exchange:
    """The exchange over ``store`` (default: the process group's; none for a single process)."""
    return Exchange.current(prefix=_PREFIX, timeout_s=timeout_s, store=store)


def announce(path: str, store: Any = None) -> Callable[[bool], None]:
    """Mark ``path`` pending; return the function that marks it done (``True``) or failed (``False``).

    Without a multi-rank process group (and no ``store`` given) nothing is stored.
    """
    exchange, names = _exchange(store), _names(path)
    exchange.announce(names, "pending")

    def finished(ok: bool) -> None:
        try:
            exchange.announce(names, "done" if ok else "failed")
        except Exception:  # the process group is gone (the job is ending): nobody is left to wait
            pass

    return finished


def _looked_up(path: str) -> list[str]:
    """The names a load of ``path`` waits on: the checkpoint itself, or ``path`` as the folder of one."""
    full = _names(path)[0]
    return [full, full + "/"]


def state(path: str, store: Any = None) -> str | None:
    """``"pending"``, ``"done"``, ``"failed"``, or ``None`` if no rank announced ``path`` (or its folder).

    A path is pending while a save of it, or of any checkpoint in it (when ``path`` is a folder), is.
    """
    return _exchange(store).announced(_looked_up(path))


def wait_until_written(path: str, timeout_s: float, store: Any = None) -> None:
    """Block while another rank is still writing ``path`` (or a checkpoint in the folder ``path``).

    Raises:
        CheckpointError: still pending after ``timeout_s`` seconds (names the path and the limit).
    """
    if not _exchange(store, timeout_s).wait_announced(_looked_up(path)):
        raise CheckpointError(
            f"{path}: another rank was still writing this checkpoint after {timeout_s:g} s "
            "(ShardedCheckpointIO(barrier_timeout_s=...) sets the limit)"
        )
