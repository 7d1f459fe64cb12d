"""Tell the other ranks about a checkpoint that one rank alone is still writing in the background.

Fabric's ``fabric.save`` and Lightning's ``trainer.save_checkpoint`` call the plugin on rank 0 only
and then meet at a barrier. With ``ShardedCheckpointIO(async_save=True)`` rank 0 returns before the
checkpoint is committed, so a rank that loads it right after the barrier could find nothing. Rank 0
therefore marks the path as *pending* in the process group's key-value store before its save call
returns, and as *done* (or *failed*) when the background write ends; ``load_checkpoint`` on any rank
waits while the path it asks for, or the folder holding it, is pending. A single process has no
store and nothing to wait for.

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
import time
from collections.abc import Callable
from typing import Any

from lightning_ckpt.dist import default_store
from lightning_ckpt.errors import CheckpointError

__all__ = ["announce", "state", "wait_until_written"]

_PREFIX = "lightning_ckpt/inflight/"
_POLL_S = 0.05


def _keys(path: str) -> list[str]:
    """The store keys of a checkpoint path and of its folder (a load may name either)."""
    full = path.rstrip("/") if "://" in path else os.path.abspath(path)
    folder = full.rsplit("/", 1)[0] if "/" in full else full
    return [_PREFIX + full, _PREFIX + folder + "/"]


def announce(path: str, store: Any = None) -> Callable[[bool], None]:
    """Mark ``path`` pending; return the function that marks it done (``True``) or failed (``False``).

    Without a multi-rank process group (and no ``store`` given) nothing is stored.
    """
    store = store if store is not None else default_store()
    if store is None:
        return lambda ok: None
    keys = _keys(path)
    for key in keys:
        store.set(key, "pending")

    def finished(ok: bool) -> None:
        try:
            for key in keys:
                store.set(key, "done" if ok else "failed")
        except Exception:  # the process group is gone (the job is ending): nobody is left to wait
            pass

    return finished


def state(path: str, store: Any = None) -> str | None:
    """``"pending"``, ``"done"``, ``"failed"``, or ``None`` if no rank announced ``path`` (or its folder).

    A path is pending while a save of it, or of any checkpoint in it (when ``path`` is a folder), is.
    """
    store = store if store is not None else default_store()
    if store is None:
        return None
    full = _keys(path)[0]
    for key in (full, full + "/"):  # the checkpoint itself, or ``path`` as the folder of one
        if store.check([key]):
            return bytes(store.get(key)).decode()
    return None


def wait_until_written(path: str, timeout_s: float, store: Any = None) -> None:
    """Block while another rank is still writing ``path`` (or a checkpoint in the folder ``path``).

    Raises:
        CheckpointError: still pending after ``timeout_s`` seconds (names the path and the limit).
    """
    store = store if store is not None else default_store()
    if store is None:
        return
    deadline = time.monotonic() + timeout_s
    while state(path, store) == "pending":
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"{path}: another rank was still writing this checkpoint after {timeout_s:g} s "
                "(ShardedCheckpointIO(barrier_timeout_s=...) sets the limit)"
            )
        time.sleep(_POLL_S)
