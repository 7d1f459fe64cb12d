"""Background upload of locally committed checkpoints to an object store; the remote commit.

One :class:`Uploader` per rank. After a checkpoint is committed locally, every rank hands its
own files to its uploader. The jobs run on one background thread, one checkpoint after another,
each uploading ``num_concurrent_uploads`` files at once (each file multipart-parallel, retried;
see :mod:`lightning_ckpt.transfer`). Then:

1. (every rank) report "ok" or the error for this checkpoint (:meth:`~lightning_ckpt.dist.Exchange.report`);
2. (the committing rank) wait for every member's report
   (:meth:`~lightning_ckpt.dist.Exchange.await_reports`), upload ``manifest.json`` last
   (the remote commit, :class:`~lightning_ckpt.commit.ManifestLastCommit`: readers never see a
   half-uploaded checkpoint as committed), then the ``latest.symlink`` pointer, then run the queued
   rotation (deletions only after the new checkpoint is committed remotely).

No collective runs on the background thread: ranks talk only through the key-value store.
Errors keep their type and are raised once on the training thread by :meth:`Uploader.check`
(at the next save), :meth:`Uploader.wait` (fit end) or :meth:`Uploader.close` (teardown).

Example:
    >>> import os, tempfile, torch
    >>> from lightning_ckpt.collective import save_checkpoint_dir
    >>> local = save_checkpoint_dir({"w": torch.ones(2), "global_step": 1}, os.path.join(tempfile.mkdtemp(), "ba1"))
    >>> storage, remote = Storage.open("memory://upload-doc/run")
    >>> up = Uploader(storage, remote, upload_timeout_s=30)
    >>> _ = up.submit(UploadJob(local_dir=local, name="ba1", files=sorted(os.listdir(local)), commit=True,
    ...                         pointer="latest"))
    >>> up.wait(); up.close()
    >>> storage.read_bytes(storage.join(remote, "latest.symlink"))
    b'ba1'
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from lightning_ckpt import _faults, layout
from lightning_ckpt.commit import ManifestLastCommit
from lightning_ckpt.dist import Exchange
from lightning_ckpt.errors import CollectiveError, UploadError  # UploadError re-exported: its home was here
from lightning_ckpt.incremental import check_references
from lightning_ckpt.manifest import Manifest
from lightning_ckpt.stats import SaveStats
from lightning_ckpt.storage import Storage
from lightning_ckpt.transfer import DEFAULT_POLICY, RetryPolicy, put_file, with_retries

__all__ = ["UploadError", "UploadJob", "Uploader"]

log = logging.getLogger("lightning_ckpt")

_REPORT = "uploaded"  # the phase of each rank's report: "ok", "skipped" or its error
_SKIP = "superseded"  # announced by the committing rank when a newer checkpoint replaces this upload


@dataclass
class UploadJob:
    """One checkpoint's upload from this rank.

    Attributes:
        local_dir: the locally committed checkpoint directory.
        name: the checkpoint's name (its directory name remotely too).
        files: the names of this rank's files to upload (the manifest is never among them).
        commit: whether this rank uploads the manifest and pointer once every member is done.
        members: global ranks whose uploads must finish first (the writer group).
        exchange: where the members report their part, one namespace per checkpoint (the same on every
            member); ``None``: a single process, nothing to report.
        pointer: the pointer file name to update after the commit (``None``: none).
        after_commit: work to run once committed remotely (rotation); committing rank only.
        stats: the save's :class:`~lightning_ckpt.stats.SaveStats`, given this rank's upload time and bytes.
        on_uploaded: called with ``stats`` and whether this rank committed, once this rank's part is done.

    A job :meth:`Uploader.supersede` named before its upload started is not uploaded: the committing
    rank decides, once, when it picks the job up; the other members stop at their next file. Its
    ``after_commit`` then runs after the next remote commit, and its local copy is pruned with the
    uploaded ones.
    """

    local_dir: str
    name: str
    files: Sequence[str]
    commit: bool
    members: Sequence[int] = (0,)
    exchange: Exchange | None = None
    pointer: str | None = None
    after_commit: Callable[[], None] | None = None
    stats: SaveStats | None = None
    on_uploaded: Callable[[SaveStats, bool], None] | None = None
    sequence: int = field(default=0, init=False)  # set by Uploader.submit: the order of submission
    submitted_at: float = field(default=0.0, init=False)  # time.monotonic() at submission (the local commit)
    started: bool = field(default=False, init=False)  # picked up by the upload thread

    @property
    def rank(self) -> int:
        """This rank (0 without an exchange)."""
        return self.exchange.rank if self.exchange is not None else 0


class Uploader:
    """Uploads checkpoints in the background, in order, and reports errors on the training thread.

    Args:
        storage: the remote storage.
        remote_folder: the remote checkpoint folder.
        num_concurrent_uploads: files uploaded at once.
        upload_timeout_s: bound on waiting for one checkpoint's uploads (all ranks) and on ``wait``.
        policy: retry policy for each file.
        max_backlog: the most checkpoints queued or uploading at once; :meth:`submit` waits (bounded by
            ``upload_timeout_s``, with a warning) while that many are, so the local cache stays bounded.
    """

    def __init__(
        self,
        storage: Storage,
        remote_folder: str,
        *,
        num_concurrent_uploads: int = 4,
        upload_timeout_s: float = 3600.0,
        policy: RetryPolicy = DEFAULT_POLICY,
        max_backlog: int = 4,
    ) -> None:
        self.storage, self.remote_folder, self.max_backlog = storage, remote_folder, max_backlog
        self.num_concurrent_uploads, self.upload_timeout_s, self.policy = (
            num_concurrent_uploads,
            upload_timeout_s,
            policy,
        )
        self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-upload")
        self._files = ThreadPoolExecutor(max_workers=num_concurrent_uploads, thread_name_prefix="lightning_ckpt-put")
        self._pending: list[tuple[Future[None], UploadJob]] = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.committed: list[str] = []
        self.skipped: list[str] = []  # superseded before their upload started: never committed in the store
        self._superseded: dict[str, int] = {}  # name -> the last job submitted when it was superseded
        self._deferred: list[Callable[[], None]] = []  # skipped jobs' after_commit, run at the next commit
        self._submitted = 0
        self._newest_step: int | None = None

    def submit(self, job: UploadJob) -> Future[None]:
        """Queue ``job``; raises first if an earlier upload failed (the error is reported once).

        While ``max_backlog`` checkpoints are queued or uploading, waits for the oldest first.
        """
        self.check()
        self._wait_for_room()
        with self._lock:
            self._submitted += 1
            job.sequence, job.submitted_at = self._submitted, time.monotonic()
            step = job.stats.step if job.stats is not None else None
            if step is not None:
                self._newest_step = max(step, self._newest_step if self._newest_step is not None else step)
        future = self._jobs.submit(self._run, job)
        with self._lock:
            self._pending = [(f, j) for f, j in self._pending if not f.done()] + [(future, job)]
        return future

    def supersede(self, names: Collection[str]) -> None:
        """A newer checkpoint's retention drops ``names``: those whose upload has not started are not uploaded
        (what would be uploaded only to be deleted). Call it once that newer checkpoint is committed locally."""
        with self._lock:
            for name in names:  # only jobs submitted so far: a later save under the same name is uploaded
                self._superseded[name] = self._submitted

    @property
    def backlog(self) -> int:
        """Checkpoints this rank still has to upload: the one uploading and those queued, less superseded ones."""
        return len(self._to_upload())

    def _to_upload(self) -> list[Future[None]]:
        with self._lock:
            return [f for f, j in self._pending if not f.done() and (j.started or not self._is_superseded(j))]

    def _is_superseded(self, job: UploadJob) -> bool:
        return job.sequence <= self._superseded.get(job.name, 0)

    def _wait_for_room(self) -> None:
        pending = self._to_upload()
        if len(pending) < self.max_backlog:
            return
        log.warning(
            "Uploads to %s are behind: %d checkpoints to upload (max_upload_backlog=%d); the next save waits for"
            " the oldest. Faster storage or fewer saves avoid this; a queued upload is dropped once a newer"
            " checkpoint's retention (num_checkpoints_to_keep) drops that checkpoint",
            self.storage.url(self.remote_folder), len(pending), self.max_backlog,
        )  # fmt: skip
        for future in pending[: len(pending) - self.max_backlog + 1]:
            try:
                future.result(timeout=self.upload_timeout_s)
            except Exception:
                pass  # recorded by _run, raised by check()

    def check(self) -> None:
        """Raise the first background error not yet reported (with its own type)."""
        with self._lock:
            if self._errors:
                error, self._errors = self._errors[0], []
                raise error

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until every queued upload finished (or the timeout), logging progress; then :meth:`check`."""
        deadline = time.monotonic() + (self.upload_timeout_s if timeout_s is None else timeout_s)
        with self._lock:
            pending = [f for f, _ in self._pending]
        if pending:
            log.info("Waiting for %d checkpoint upload(s) to %s", len(pending), self.storage.url(self.remote_folder))
        for future in pending:
            remaining = deadline - time.monotonic()
            try:
                future.result(timeout=max(0.0, remaining))
            except TimeoutError:
                with self._lock:
                    self._errors.append(
                        TimeoutError(
                            f"checkpoint uploads to {self.storage.url(self.remote_folder)} did not finish"
                            f" within {self.upload_timeout_s:g} s (upload_timeout_in_seconds)"
                        )
                    )
                break
            except Exception:
                continue  # recorded by _run
        self.check()

    def close(self) -> None:
        """Wait for pending uploads (bounded), stop the threads, raise any unreported error."""
        try:
            self.wait()
        finally:
            self._jobs.shutdown(wait=False, cancel_futures=True)
            self._files.shutdown(wait=False, cancel_futures=True)

    # -- background thread ---------------------------------------------------------------------
    def _run(self, job: UploadJob) -> None:
        job.started = True
        try:
            if job.commit and self._is_superseded(job):
                self._skip(job)
                return
            if not self._upload_files(job):
                self._exchange(job).report(_REPORT, "skipped")
                return
            self._exchange(job).report(_REPORT, "ok")
            if job.commit:
                self._await_members(job)
                self._commit(job)
                if job.after_commit is not None:
                    job.after_commit()
                self._run_deferred()
            if job.stats is not None and job.on_uploaded is not None:
                job.on_uploaded(job.stats, job.commit)
        except BaseException as err:
            err.add_note(
                f"lightning_ckpt: while uploading checkpoint {job.name} to {self.storage.url(self.remote_folder)};"
                f" its local committed copy is kept in {job.local_dir}"
            )
            if not job.commit:
                self._exchange(job).report(_REPORT, f"{type(err).__name__}: {err}")
            with self._lock:
                self._errors.append(err)
            log.error("Upload of checkpoint %s failed: %s: %s", job.name, type(err).__name__, err)
            raise

    def _retry(self, action: Callable[[], None], what: str) -> None:
        with_retries(action, what=what, policy=self.policy)

    def _remote(self, job: UploadJob, name: str) -> str:
        return self.storage.join(self.remote_folder, job.name, name)

    def _upload_files(self, job: UploadJob) -> bool:
        """Upload this rank's files of ``job``; ``False`` if the committing rank skipped the checkpoint meanwhile."""
        start = time.monotonic()
        exchange = self._exchange(job)

        def put(name: str) -> bool:
            if exchange.announced([_SKIP]) is not None:
                return False
            put_file(self.storage, os.path.join(job.local_dir, name), self._remote(job, name), policy=self.policy)
            return True

        if exchange.announced([_SKIP]) is not None:
            return False
        futures = [self._files.submit(put, name) for name in job.files]
        uploaded = True
        for future in futures:
            uploaded = future.result(timeout=self.upload_timeout_s) and uploaded  # each file bounded by the timeout
            _faults.reached("upload.during", job.rank)
        if not uploaded:
            return False
        size = sum(os.path.getsize(os.path.join(job.local_dir, n)) for n in job.files)
        elapsed = time.monotonic() - start
        if job.stats is not None:
            job.stats.upload_s, job.stats.upload_bytes = elapsed, size
        log.debug("Uploaded %d file(s) of %s (%.1f MB) in %.2f s", len(job.files), job.name, size / 1e6, elapsed)
        return True

    def _skip(self, job: UploadJob) -> None:
        """Do not upload ``job``: a newer checkpoint's retention dropped it. The members stop; what they already
        uploaded of it (the files its local manifest lists, never anything else) is removed from the store."""
        exchange = self._exchange(job)
        exchange.announce([_SKIP], "skip")
        exchange.report(_REPORT, "skipped")
        self._await_members(job, allowed=("ok", "skipped"))
        with open(os.path.join(job.local_dir, layout.MANIFEST_FILENAME), "rb") as f:
            # its own files only: an incremental checkpoint also lists its base's files, which stay
            names = [entry.name for entry in Manifest.from_json(f.read(), source=job.local_dir).own_files]
        for name in [layout.MANIFEST_FILENAME, *names]:  # the manifest first: under overwrite=True an older
            remote = self._remote(job, name)  # commit of this name is deleted as rotation deletes, never half
            self._retry(functools.partial(self.storage.remove_file, remote), f"removal of {remote}")
        with self._lock:
            self.skipped.append(job.name)
            if job.after_commit is not None:
                self._deferred.append(job.after_commit)
        log.info(
            "Checkpoint %s is not uploaded: a newer checkpoint's retention drops it (%d queued after it)",
            job.name, self._submitted - job.sequence,
        )  # fmt: skip

    def _run_deferred(self) -> None:
        with self._lock:
            deferred, self._deferred = self._deferred, []
        for action in deferred:
            action()

    def _exchange(self, job: UploadJob) -> Exchange:
        """Where the members of ``job`` report (only :meth:`~Exchange.report` / :meth:`~Exchange.await_reports`,
        never a collective: this is the background thread); alone when the job has none."""
        if job.exchange is None:
            return Exchange(None, 0, 1, prefix="upload", timeout_s=self.upload_timeout_s)
        return job.exchange.with_timeout(self.upload_timeout_s)  # the uploader's bound: upload_timeout_in_seconds

    def _await_members(self, job: UploadJob, allowed: Sequence[str] = ("ok",)) -> None:
        try:
            statuses = self._exchange(job).await_reports(_REPORT, job.members)
        except CollectiveError as err:
            raise UploadError(
                f"checkpoint {job.name}: rank(s) {err.missing} did not finish uploading within"
                f" {self.upload_timeout_s:g} s"
            ) from err
        failed = {r: s for r, s in statuses.items() if s not in allowed}
        if failed:
            raise UploadError(f"checkpoint {job.name}: upload failed on rank(s) {sorted(failed)}: {failed}")

    def _commit(self, job: UploadJob) -> None:
        with open(os.path.join(job.local_dir, layout.MANIFEST_FILENAME), "rb") as f:
            data = f.read()
        remote_dir = self.storage.join(self.remote_folder, job.name)
        if b'"../' in data:  # an incremental checkpoint: its base's files must already be in the store
            check_references(self.storage, remote_dir, Manifest.from_json(data, source=job.local_dir))
        commit = ManifestLastCommit(self.storage, retry=self._retry)
        commit.write_manifest(remote_dir, data)
        if job.pointer is not None:
            commit.point_latest(self.remote_folder, job.name, job.pointer)
        with self._lock:
            self.committed.append(job.name)
            newest = self._newest_step
            backlog = self._submitted - job.sequence
        if job.stats is not None:
            job.stats.upload_lag_s = time.monotonic() - job.submitted_at
            if job.stats.step is not None and newest is not None:
                job.stats.upload_lag_steps = newest - job.stats.step
            job.stats.upload_backlog = backlog
        log.debug("Committed checkpoint %s in %s", job.name, self.storage.url(self.remote_folder))
