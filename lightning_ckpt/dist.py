"""Coordination between ranks through the process group's key-value store (the only torch.distributed importer).

Every exchange goes through the store that ``torch.distributed`` was initialised with (a
``TCPStore`` under torchrun and Lightning), never through NCCL or gloo collectives, so it
behaves the same for every backend, has a real timeout, and can name the ranks that failed.
No other module touches the store: uploads (:mod:`lightning_ckpt.upload`) and pending async
saves (:mod:`lightning_ckpt.inflight`) report and announce through :class:`Exchange` too.

================================  ===========================================  ========================
operation                         with a process group (N ranks)               single process
================================  ===========================================  ========================
:meth:`Exchange.barrier`          every rank posts ``ok`` or its error plus a  returns own payload;
                                  payload, then waits for all; raises          raises own error
                                  :class:`CollectiveError` naming failed and
                                  missing ranks
:meth:`Exchange.broadcast`        rank ``src`` posts a value, others wait      returns the value
:meth:`Exchange.report`           posts this rank's status, returns at once    does nothing
:meth:`Exchange.await_reports`    waits for the statuses of the given ranks;   returns ``{}``
                                  raises :class:`CollectiveError` naming
                                  those that did not report
:meth:`Exchange.announce`         sets a named status any rank can read        does nothing
:meth:`Exchange.announced`        the status of the first announced name       returns ``None``
:meth:`Exchange.wait_announced`   polls while that status is ``"pending"``     returns ``True``
================================  ===========================================  ========================

``report`` / ``await_reports`` and the three ``announce`` methods only set, read and poll store
keys: they never run a collective, so they are safe on a background thread (uploads, async saves).
The training thread's collectives live here too: :func:`decide_on_rank_zero` (the strategy's
broadcast of rank 0's answer) and :func:`max_across_ranks` (preemption flags, one all-reduce per
agreed step).

Example:
    >>> ex = Exchange.current(prefix="doc", timeout_s=5)
    >>> ex.rank, ex.world_size
    (0, 1)
    >>> ex.barrier("written", payload={"files": 1})
    {0: {'files': 1}}
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from lightning_ckpt.errors import CollectiveError  # re-exported: its home was this module

__all__ = [
    "CollectiveError",
    "Exchange",
    "TrainingRanks",
    "decide_on_rank_zero",
    "default_store",
    "exchange_rank",
    "max_across_ranks",
]

T = TypeVar("T")
_POLL_S = 0.05  # how often wait_announced reads the store
_MAX_POLL_S = 0.01  # the longest pause between two polls of a barrier or a report (they start at 0.5 ms)


def default_store() -> Any:
    """The key-value store of the initialised default process group (``None`` for a single process).

    Example:
        >>> default_store() is None
        True
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.distributed_c10d._get_default_store()
    return None


class TrainingRanks(Protocol):
    """What the training-thread collectives need of a Lightning ``Trainer`` (duck-typed: no Lightning import)."""

    @property
    def world_size(self) -> int: ...
    @property
    def is_global_zero(self) -> bool: ...
    @property
    def strategy(self) -> Any: ...


def decide_on_rank_zero(trainer: TrainingRanks, decide: Callable[[], T]) -> T:
    """Evaluate ``decide`` on global rank 0 only and give every rank its answer (the strategy's broadcast).

    For decisions ranks could disagree on (clocks, user callables, who holds a lock); a disagreement
    about whether to save would leave some ranks waiting at the barrier. Training thread only.

    Example:
        >>> from types import SimpleNamespace
        >>> decide_on_rank_zero(SimpleNamespace(world_size=1, is_global_zero=True, strategy=None), lambda: "save")
        'save'
    """
    if trainer.world_size == 1:
        return decide()
    decision = decide() if trainer.is_global_zero else None
    return trainer.strategy.broadcast(decision, src=0)


def max_across_ranks(trainer: TrainingRanks, values: Sequence[int]) -> list[int]:
    """Element-wise maximum of small integers over every rank: one all-reduce on the strategy's device
    (the strategy's own ``reduce`` without a ``torch.distributed`` group). Training thread only.

    Example:
        >>> from types import SimpleNamespace
        >>> max_across_ranks(SimpleNamespace(world_size=1, is_global_zero=True, strategy=None), [1, 0])
        [1, 0]
    """
    if trainer.world_size == 1:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.int64, device=trainer.strategy.root_device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)  # no barrier: one collective
    else:
        tensor = trainer.strategy.reduce(tensor, reduce_op="max")
    return [int(v) for v in tensor.tolist()]


def exchange_rank() -> int:
    """This process's global rank (0 without a process group).

    Example:
        >>> exchange_rank()
        0
    """
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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
    def current(cls, *, prefix: str, timeout_s: float, store: Any = None) -> Exchange:
        """The exchange for the initialised default process group (or a single-process one).

        ``store`` replaces the default group's store (e.g. a ``HashStore`` in tests).
        """
        store = store if store is not None else default_store()
        if store is None:
            return cls(None, 0, 1, prefix, timeout_s)
        initialised = dist.is_available() and dist.is_initialized()
        return cls(store, exchange_rank(), dist.get_world_size() if initialised else 1, prefix, timeout_s)

    def child(self, prefix: str) -> Exchange:
        """An exchange with the same ranks under another namespace."""
        return Exchange(self.store, self.rank, self.world_size, f"{self.prefix}/{prefix}", self.timeout_s)

    def with_timeout(self, timeout_s: float) -> Exchange:
        """The same exchange (ranks, namespace) waiting at most ``timeout_s`` for the other ranks."""
        return Exchange(self.store, self.rank, self.world_size, self.prefix, timeout_s)

    def _key(self, phase: str, rank: int) -> str:
        return self._named(f"{phase}/{rank}")

    def _named(self, name: str) -> str:
        return f"lightning_ckpt/{self.prefix}/{name}"

    def _wait_for(self, keys: Sequence[str], timeout_s: float) -> bool:
        """Whether every key was set within ``timeout_s``, found by polling the store.

        Never ``store.wait``: a c10d store client serves one request at a time, so a blocking wait on
        one thread (the uploader waiting for other ranks' reports) would hold back every other thread's
        requests (the training thread's save barrier) until it ends. Each poll is one short ``check``.
        """
        assert self.store is not None
        deadline, delay = time.monotonic() + timeout_s, 0.0005
        while not self.store.check(list(keys)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _MAX_POLL_S)
        return True

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
        if not self._wait_for(keys, self.timeout_s):
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
        if not self._wait_for([key], self.timeout_s):
            raise CollectiveError(phase, {}, [src], self.timeout_s)
        return json.loads(self.store.get(key))

    def report(self, phase: str, status: str) -> None:
        """Post this rank's ``status`` of ``phase`` and return at once (safe on a background thread).

        Example:
            >>> from torch.distributed import HashStore
            >>> rank1 = Exchange(HashStore(), rank=1, world_size=2, prefix="doc", timeout_s=5)
            >>> rank1.report("uploaded", "ok")
            >>> Exchange(rank1.store, 0, 2, prefix="doc", timeout_s=5).await_reports("uploaded", ranks=[1])
            {1: 'ok'}
        """
        if self.store is not None:
            self.store.set(self._key(phase, self.rank), status)

    def await_reports(self, phase: str, ranks: Sequence[int]) -> dict[int, str]:
        """Wait up to ``timeout_s`` for the :meth:`report` of every rank in ``ranks``; return ``{rank: status}``.

        Raises:
            CollectiveError: some ranks did not report in time (``missing`` names them).

        Example:
            >>> from torch.distributed import HashStore
            >>> rank0 = Exchange(HashStore(), rank=0, world_size=2, prefix="doc", timeout_s=0.1)
            >>> rank0.report("uploaded", "ok")
            >>> try:
            ...     rank0.await_reports("uploaded", ranks=[0, 1])
            ... except CollectiveError as err:
            ...     print(err.missing)
            [1]
        """
        if self.store is None:
            return {}
        keys = [self._key(phase, r) for r in ranks]
        if not self._wait_for(keys, self.timeout_s):
            missing = [r for r, k in zip(ranks, keys, strict=True) if not self.store.check([k])]
            raise CollectiveError(phase, {}, missing, self.timeout_s)
        return {r: bytes(self.store.get(k)).decode() for r, k in zip(ranks, keys, strict=True)}

    def announce(self, names: Sequence[str], status: str) -> None:
        """Set ``status`` under each of ``names`` for any rank to read (safe on a background thread).

        Example:
            >>> from torch.distributed import HashStore
            >>> ex = Exchange(HashStore(), rank=0, world_size=2, prefix="doc", timeout_s=1)
            >>> ex.announce(["/runs/a/ep0-ba8", "/runs/a/"], "pending")
            >>> ex.announced(["/runs/a/ep0-ba4", "/runs/a/"]), ex.announced(["/runs/b/"])
            ('pending', None)
        """
        if self.store is not None:
            for name in names:
                self.store.set(self._named(name), status)

    def announced(self, names: Sequence[str]) -> str | None:
        """The status of the first of ``names`` that was announced (``None``: none was).

        Example:
            >>> Exchange(None, 0, 1, prefix="doc", timeout_s=1).announced(["/runs/a/ep0-ba8"]) is None
            True
        """
        if self.store is None:
            return None
        for name in names:
            key = self._named(name)
            if self.store.check([key]):
                return bytes(self.store.get(key)).decode()
        return None

    def wait_announced(self, names: Sequence[str], pending: str = "pending") -> bool:
        """Poll every 50 ms while :meth:`announced` is ``pending``; ``False`` if it still is after ``timeout_s``.

        Example:
            >>> from torch.distributed import HashStore
            >>> ex = Exchange(HashStore(), rank=0, world_size=2, prefix="doc", timeout_s=0.1)
            >>> ex.announce(["/runs/a/ep0-ba8"], "pending")
            >>> ex.wait_announced(["/runs/a/ep0-ba8"]), ex.wait_announced(["/runs/b/ep0-ba8"])
            (False, True)
        """
        deadline = time.monotonic() + self.timeout_s
        while self.announced(names) == pending:
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL_S)
        return True

    def cleanup(self) -> None:
        """Delete this rank's remaining keys. Call only once every rank has passed the last round
        (e.g. after the first barrier of the next exchange); earlier rounds clean up by themselves."""
        if self.store is not None:
            self._delete(self._fresh)
        self._fresh = []
