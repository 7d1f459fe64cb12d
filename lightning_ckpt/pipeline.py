"""The save pipeline: one save in flight, its blocking part on the caller, the rest in the background.

:meth:`SavePipeline.run` waits for the previous save, runs the blocking part (plan, stage), then
writes and commits on the calling thread or on one background thread, and returns a
:class:`PendingSave`: what the save will be (path, writer group, files) at once, the committed
result only from :meth:`PendingSave.wait`. Errors keep their type and are raised once: by the
handle's ``wait`` or by :meth:`SavePipeline.wait` (the next save, fit end, teardown). Each finished
save leaves its :class:`~lightning_ckpt.stats.SaveStats` in a bounded queue that
:meth:`SavePipeline.drain` empties on the training thread (metrics for the loggers).

Example:
    >>> pipeline = SavePipeline()
    >>> pending = pipeline.submit(lambda: print("removed ba1"))  # runs now: nothing is in flight
    removed ba1
    >>> pending.done()
    True
    >>> pipeline.close()
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lightning_ckpt import inflight
from lightning_ckpt.collective import PreparedSave, SaveResult, finish_save
from lightning_ckpt.staging import StagingBuffer
from lightning_ckpt.stats import SaveStats

__all__ = ["BACKGROUND_NICENESS", "PendingSave", "SavePipeline"]

log = logging.getLogger("lightning_ckpt")
MAX_FINISHED_SAVES = 1024  # drain() keeps at most this many undrained results
BACKGROUND_NICENESS = 10


class PendingSave:
    """A save that was started: what it will be now, the committed result from :meth:`wait`.

    ``path``, ``group``, ``leader`` and ``files`` are known when the save call returns (the plan is
    agreed then); the checkpoint is committed only once :meth:`done` is true and :meth:`wait` returns.

    Example:
        >>> import os, tempfile, torch
        >>> from lightning_ckpt import ShardedCheckpointIO
        >>> io = ShardedCheckpointIO(async_save=True)
        >>> pending = io.save_collective({"w": torch.ones(2)}, os.path.join(tempfile.mkdtemp(), "ba1"))
        >>> committed = pending.wait()  # blocks until the background write is committed
        >>> pending.done(), committed.path == pending.path, committed.files
        (True, True, ('shard-00000-of-00001.safetensors', 'objects.pt'))
        >>> io.teardown()
    """

    def __init__(self, planned: SaveResult | None, future: Future[Any], url: str | None = None) -> None:
        self._planned, self._future, self._url = planned, future, url
        self._raised = False

    def in_store(self, url: str) -> PendingSave:
        """This save, named by its place in the object store (it is committed locally first, then uploaded)."""
        self._url = url
        return self

    @classmethod
    def finished(cls, result: Any) -> PendingSave:
        """A handle for work that already ran on the calling thread."""
        future: Future[Any] = Future()
        future.set_result(result)
        return cls(result if isinstance(result, SaveResult) else None, future)

    def _plan(self) -> SaveResult:
        if self._planned is None:
            raise AttributeError("this pending work is not a save")
        return self._planned

    @property
    def path(self) -> str:
        """The checkpoint being saved (path or URL)."""
        return self._url or self._plan().path

    @property
    def group(self) -> tuple[int, ...]:
        """The global ranks of the writer group this rank belongs to."""
        return self._plan().group

    @property
    def leader(self) -> bool:
        """Whether this rank commits the checkpoint."""
        return self._plan().leader

    @property
    def files(self) -> tuple[str, ...]:
        """The files this rank writes."""
        return self._plan().files

    def done(self) -> bool:
        """Whether the save has finished (committed, or failed: :meth:`wait` raises then)."""
        return self._future.done()

    def wait(self, timeout_s: float | None = None) -> Any:
        """Block until committed and return the :class:`~lightning_ckpt.collective.SaveResult`; raise its error."""
        try:
            result = self._future.result(timeout_s)
        except Exception:
            self._raised = True
            raise
        if self._url is not None and isinstance(result, SaveResult):
            result = SaveResult(path=self._url, group=result.group, leader=result.leader, files=result.files)
        return result


class SavePipeline:
    """One save in flight: ``run`` returns once staged (or committed, synchronously); ``wait`` drains."""

    def __init__(self, *, direct_io: bool = True) -> None:
        self.direct_io = direct_io
        self.staging = StagingBuffer()
        self.last_save: SaveStats | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: list[PendingSave] = []
        # Appended in the background, drained on the training loop; bounded for users who never drain it.
        self._events: deque[tuple[str, SaveStats]] = deque(maxlen=MAX_FINISHED_SAVES)

    def background(self) -> ThreadPoolExecutor:
        """The one background thread saves run on (made on first use, at a lower CPU priority)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="lightning_ckpt-save", initializer=_yield_cpu_to_training
            )
        return self._executor

    def run(
        self,
        prepare: Callable[[StagingBuffer | None], PreparedSave],
        *,
        asynchronous: bool,
        committed: Callable[[SaveResult, SaveStats], None] | None = None,
        step: int | None = None,
        uploads: bool = False,
        announce: str | None = None,
    ) -> PendingSave:
        """Wait for the previous save, run ``prepare`` (the blocking part), then write and commit,
        in the background when ``asynchronous``.

        ``committed`` runs after the commit (on the thread that committed). With ``uploads`` the
        save's log line waits for its upload. An asynchronous save of ``announce`` (a path one
        rank saves alone) is marked pending for the other ranks until written
        (:mod:`lightning_ckpt.inflight`).
        """
        start = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - start
        prepared = prepare(self.staging if asynchronous else None)
        stats = SaveStats(path=prepared.url, nbytes=prepared.nbytes, waited_s=waited, asynchronous=asynchronous,
                          step=step)  # fmt: skip
        self.last_save = stats

        def finish() -> SaveResult:
            began = time.perf_counter()
            result = finish_save(prepared, direct_io=self.direct_io)
            done = time.perf_counter()
            stats.finished(write_s=done - began, durable_s=done - start)
            if result.leader and not uploads:  # one line per save; a remote save's comes with its upload
                log.info(stats.summary())
            self._events.append(("write", stats))
            if committed is not None:
                committed(result, stats)
            return result

        if not asynchronous:
            pending = PendingSave.finished(finish())
            stats.blocking_s = time.perf_counter() - start
            return pending
        written = inflight.announce(announce) if announce is not None else None

        def finish_and_tell() -> SaveResult:
            try:
                result = finish()
            except BaseException:
                if written is not None:
                    written(False)
                raise
            if written is not None:
                written(True)
            return result

        pending = PendingSave(prepared.result, self.background().submit(finish_and_tell))
        self._in_flight.append(pending)
        stats.blocking_s = time.perf_counter() - start
        return pending

    def submit(self, work: Callable[[], Any]) -> PendingSave:
        """Run ``work`` after the save in flight, in order (now, if none is in flight)."""
        if not self._in_flight:
            return PendingSave.finished(work())
        pending = PendingSave(None, self.background().submit(work))
        self._in_flight.append(pending)
        return pending

    @property
    def busy(self) -> bool:
        """Whether work is queued that :meth:`wait` has not collected."""
        return bool(self._in_flight)

    def wait(self) -> None:
        """Block until the work in flight is done; raise the first error not raised yet (once, with its type)."""
        pending, self._in_flight = self._in_flight, []
        if pending and not all(p.done() for p in pending):
            log.info("Waiting for the previous checkpoint save to finish")
        errors = []
        for item in pending:
            raised_before = item._raised
            try:
                item.wait()
            except Exception as err:
                if not raised_before:
                    errors.append(err)
        if errors:
            raise errors[0]

    def record(self, kind: str, stats: SaveStats) -> None:
        """Queue a finished save's or upload's stats for :meth:`drain` (any thread)."""
        self._events.append((kind, stats))

    @property
    def has_finished(self) -> bool:
        """Whether :meth:`drain` has something to return (one deque test)."""
        return bool(self._events)

    def drain(self) -> list[tuple[str, SaveStats]]:
        """Saves and uploads finished since the last call, oldest first."""
        events = []
        while self._events:
            events.append(self._events.popleft())
        return events

    def close(self) -> None:
        """Stop the background thread (after its queued work) and release the staging buffers."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.staging.release()


def _yield_cpu_to_training() -> None:
    """Lower the background save thread's CPU priority (threads it starts inherit it).

    Writing is mostly waiting for the disk, but the checksum and the copies need a core; on a
    machine whose cores all run training, equal priority slows every training step while a save is
    in flight (measured with ``benchmarks/bench_fit.py``), so the save yields instead.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: keep the default priority
        pass
