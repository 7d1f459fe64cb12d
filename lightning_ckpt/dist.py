"""Coordination between ranks through the process group's key-value store (the only torch.distributed importer).

Every exchange goes through the store that ``torch.distributed`` was initialised with (a
``TCPStore`` under torchrun and Lightning), never through NCCL or gloo collectives, so it
behaves the same for every backend, has a real timeout, and can name the ranks that failed.

============================  ===========================================  ========================
operation                     with a process group (N ranks)               single process
============================  ===========================================  ========================
:meth:`Exchange.barrier`      every rank posts ``ok`` or its error plus a  returns own payload;
                              payload, then waits for all; raises          raises own error
                              :class:`CollectiveError` naming failed and
                              missing ranks
:meth:`Exchange.broadcast`    rank ``src`` posts a value, others wait      returns the value
============================  ===========================================  ========================

Example:
    >>> ex = Exchange.current(prefix="doc", timeout_s=5)
    >>> ex.rank, ex.world_size
    (0, 1)
    >>> ex.barrier("written", payload={"files": 1})
    {0: {'files': 1}}
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from lightning_ckpt.errors import CheckpointError

__all__ = ["CollectiveError", "Exchange", "default_store", "exchange_rank"]


def default_store() -> Any:
    """The key-value store of the initialised default process group (``None`` for a single process).

    Example:
        >>> default_store() is None
        True
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.distributed_c10d._get_default_store()
    return None


def exchange_rank() -> int:
    """This process's global rank (0 without a process group).

    Example:
        >>> exchange_rank()
        0
    """
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class CollectiveError(CheckpointError):
    """One or more ranks failed or did not arrive; raised on every rank that is still alive.

    Attributes:
        phase: the step of the protocol that failed (e.g. ``"written"``).
        failed: ``{rank: error message}`` of ranks that reported an error.
        missing: ranks that did not arrive within the timeout.

    Example:
        >>> err = CollectiveError("written", {1: "OSError: disk full"}, missing=[3], timeout_s=600)
        >>> print(err)
        checkpoint written failed on rank(s) [1, 3]: rank 1: OSError: disk full; rank(s) 3 did not arrive within 600 s
        >>> err.failed, err.missing
        ({1: 'OSError: disk full'}, [3])
    """

    def __init__(self, phase: str, failed: dict[int, str], missing: list[int], timeout_s: float) -> None:
        self.phase, self.failed, self.missing = phase, failed, missing
        parts = [f"rank {r}: {msg}" for r, msg in sorted(failed.items())]
        if missing:
            parts.append(f"rank(s) {', '.join(map(str, missing))} did not arrive within {timeout_s:g} s")
        super().__init__(f"checkpoint {phase} failed on rank(s) {self.ranks}: " + "; ".join(parts))

    @property
    def ranks(self) -> list[int]:
        """Every rank that failed or went missing, sorted.

        Example:
            >>> CollectiveError("committed", {2: "OSError: quota"}, missing=[0], timeout_s=60).ranks
            [0, 2]
        """
        return sorted({*self.failed, *self.missing})


class Exchange:
    """Named rounds of messages between ranks over the default store.

    Args:
        store: the key-value store (``None`` for a single process).
        rank: this process's global rank.
        world_size: number of ranks.
        prefix: namespace of this exchange's keys (one per save, so rounds never mix).
        timeout_s: how long to wait for the other ranks.
    """

    def __init__(self, store: Any, rank: int, world_size: int, prefix: str, timeout_s: float) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.prefix, self.timeout_s = prefix, timeout_s
        self._stale: list[str] = []  # own keys every rank has read: safe to delete
        self._fresh: list[str] = []  # own keys of the latest round: others may still be reading them

    @classmethod
    def current(cls, *, prefix: str, timeout_s: float) -> Exchange:
        """The exchange for the initialised default process group (or a single-process one)."""
        store = default_store()
        if store is None:
            return cls(None, 0, 1, prefix, timeout_s)
        return cls(store, dist.get_rank(), dist.get_world_size(), prefix, timeout_s)

    def child(self, prefix: str) -> Exchange:
        """An exchange with the same ranks under another namespace."""
        return Exchange(self.store, self.rank, self.world_size, f"{self.prefix}/{prefix}", self.timeout_s)

    def _key(self, phase: str, rank: int) -> str:
        return f"lightning_ckpt/{self.prefix}/{phase}/{rank}"

    def _post(self, key: str, value: str) -> None:
        self.store.set(key, value)
        self._fresh.append(key)

    def _passed(self, keep: str) -> None:
        """Every rank is past the rounds before the one that posted ``keep``: forget those keys."""
        self._stale += [k for k in self._fresh if k != keep]
        self._fresh = [keep]
        self._delete(self._stale)
        self._stale = []

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.store.delete_key(key)
            except RuntimeError:
                continue

    def barrier(self, phase: str, *, payload: Any = None, error: BaseException | None = None) -> dict[int, Any]:
        """Post this rank's status, wait for every rank, return ``{rank: payload}`` or raise for all."""
        message = {
            "ok": error is None,
            "error": f"{type(error).__name__}: {error}" if error else "",
            "payload": payload,
        }
        if self.store is None:
            if error is not None:
                raise error  # alone, the error keeps its own type
            return {0: payload}
        own = self._key(phase, self.rank)
        self._post(own, json.dumps(message))
        keys = [self._key(phase, r) for r in range(self.world_size)]
        missing: list[int] = []
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout_s))
        except RuntimeError:  # DistStoreError on timeout
            missing = [r for r, k in enumerate(keys) if not self.store.check([k])]
        arrived = [r for r in range(self.world_size) if r not in missing]
        messages = {r: json.loads(self.store.get(self._key(phase, r))) for r in arrived}
        failed = {r: m["error"] for r, m in messages.items() if not m["ok"]}
        if failed or missing:
            raise CollectiveError(phase, failed, missing, self.timeout_s) from error
        self._passed(keep=own)
        return {r: m["payload"] for r, m in messages.items()}

    def broadcast(self, phase: str, value: Any = None, *, src: int = 0) -> Any:
        """``value`` of rank ``src`` on every rank (JSON-able values)."""
        if self.store is None:
            return value
        key = self._key(phase, src)
        if self.rank == src:
            self._post(key, json.dumps(value))
            return value
        try:
            self.store.wait([key], timedelta(seconds=self.timeout_s))
        except RuntimeError as err:
            raise CollectiveError(phase, {}, [src], self.timeout_s) from err
        return json.loads(self.store.get(key))

    def cleanup(self) -> None:
        """Delete this rank's remaining keys. Call only once every rank has passed the last round
        (e.g. after the first barrier of the next exchange); earlier rounds clean up by themselves."""
        if self.store is not None:
            self._delete(self._fresh)
        self._fresh = []
