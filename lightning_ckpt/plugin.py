"""``ShardedCheckpointIO``: the Lightning ``CheckpointIO`` adapter (mechanism, no policy).

Two ways in:

* ``save_checkpoint`` — Lightning's contract, called on global rank 0 only (stock
  ``ModelCheckpoint``, ``trainer.save_checkpoint``): a one-shard checkpoint, written atomically,
  never waiting on other ranks, so nothing can deadlock.
* ``save_collective`` — called by :class:`~lightning_ckpt.CheckpointSaver` on **every** rank:
  each rank writes its share of the tensors, ranks meet at a barrier with a timeout, each
  writer group's leader commits (:mod:`lightning_ckpt.collective`).

Loading runs on every rank and accepts everything :func:`lightning_ckpt.discovery.resolve`
does, including legacy single-file ``.ckpt`` files. When a *folder* is given with several ranks
running, the ranks agree on the newest checkpoint committed in every rank's folder (node-local
disks can differ if a job died mid-commit).

Example:
    >>> import lightning as L
    >>> trainer = L.Trainer(plugins=[ShardedCheckpointIO()], logger=False, enable_progress_bar=False)
    >>> type(trainer.strategy.checkpoint_io).__name__
    'ShardedCheckpointIO'
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_ckpt import inflight, layout
from lightning_ckpt._lightning import install_directory_loader
from lightning_ckpt.checkpoint import remove_checkpoint_dir
from lightning_ckpt.collective import (
    PreparedSave,
    SaveResult,
    WriterHook,
    discover_peers,
    finish_save,
    new_nonce,
    prepare_save,
)
from lightning_ckpt.commit import check_target
from lightning_ckpt.discovery import Resolved, list_committed, load_resolved, resolve
from lightning_ckpt.dist import Exchange, default_store, exchange_rank
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    TargetExistsError,
)
from lightning_ckpt.plan import ReplicatedTest
from lightning_ckpt.reader import MapLocation
from lightning_ckpt.staging import StagingBuffer
from lightning_ckpt.stats import SaveStats
from lightning_ckpt.storage import Storage, check_storage_options
from lightning_ckpt.transfer import DEFAULT_POLICY, RetryPolicy, download_checkpoint, with_retries
from lightning_ckpt.upload import Uploader, UploadJob

__all__ = ["ShardedCheckpointIO"]

log = logging.getLogger("lightning_ckpt")
_MAX_FINISHED_SAVES = 1024  # finished_saves() keeps at most this many undrained results


class ShardedCheckpointIO(CheckpointIO):
    """Checkpoint IO that stores each checkpoint as a directory of raw tensor shards plus a manifest.

    Args:
        storage_options: fsspec options for remote paths (``s3://...``); never logged.
        verify_checksums: compare each file's CRC32 with the manifest when loading.
        barrier_timeout_s: how long ranks wait for each other during a collective save or load.
        writer_hooks: :class:`~lightning_ckpt.WriterHook` instances called around each collective commit.
        num_concurrent_uploads: files each rank uploads at once (each one multipart-parallel).
        upload_timeout_in_seconds: bound on waiting for uploads (per checkpoint, and at fit end).
        cache_dir: local directory for checkpoints of remote folders (uploads and downloads);
            default ``~/.cache/lightning_ckpt``.
        upload_retry: how transient object-store failures are retried: uploads, manifest downloads and
            the folder lease (default ``RetryPolicy()``: 8 tries, exponential backoff from 0.5 s).
        async_save: return from a save once the tensors are copied into reused staging buffers
            (pinned memory for CUDA tensors) and write, commit and upload in the background, one
            save in flight. Off by default here, because Lightning's own callers
            (``ModelCheckpoint``, ``trainer.save_checkpoint``) expect the file on return;
            :class:`~lightning_ckpt.CheckpointSaver` saves asynchronously by default.
        direct_io: write shards with ``O_DIRECT`` (large aligned writes, no page-cache copy) where
            the filesystem supports it; ``False`` uses buffered writes.
        verify_replicas: before a collective save, compare a CRC32 of every tensor the plan writes
            once for all ranks (DDP parameters and their optimizer state) across the ranks, and refuse
            the save naming the first one that differs (a diagnostic: it reads those bytes once more).

    Example:
        >>> import tempfile, os, torch
        >>> io = ShardedCheckpointIO()
        >>> path = os.path.join(tempfile.mkdtemp(), "epoch=0-step=1.ckpt")
        >>> io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)
        >>> io.load_checkpoint(path)["state_dict"]["w"]
        tensor([1., 1.])
    """

    _instances = 0

    def __init__(
        self,
        *,
        storage_options: Mapping[str, Any] | None = None,
        verify_checksums: bool = True,
        barrier_timeout_s: float = 600.0,
        writer_hooks: Sequence[WriterHook] = (),
        num_concurrent_uploads: int = 4,
        upload_timeout_in_seconds: float = 3600.0,
        cache_dir: str | None = None,
        upload_retry: RetryPolicy | None = None,
        async_save: bool = False,
        direct_io: bool = True,
        verify_replicas: bool = False,
    ) -> None:
        options = check_storage_options(storage_options)  # a TypeError too; values are never shown
        for argument, value, example in (("barrier_timeout_s", barrier_timeout_s, "600 (seconds)"),
                                         ("upload_timeout_in_seconds", upload_timeout_in_seconds, "3600")):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(argument, value, example, "It must be a positive, finite number of seconds")
        hooks_example = "[MyHook()] where MyHook subclasses lightning_ckpt.WriterHook"
        if isinstance(writer_hooks, (WriterHook, str)) or not isinstance(writer_hooks, Iterable):
            raise ConfigError("writer_hooks", writer_hooks, hooks_example, "It must be a list of hooks")
        writer_hooks = list(writer_hooks)
        if not all(isinstance(h, WriterHook) for h in writer_hooks):
            raise ConfigError("writer_hooks", writer_hooks, hooks_example)
        uploads = num_concurrent_uploads
        if isinstance(uploads, bool) or not isinstance(uploads, int) or uploads < 1:
            raise ConfigError("num_concurrent_uploads", num_concurrent_uploads, "4", "It must be an int >= 1")
        if cache_dir is not None and (not isinstance(cache_dir, (str, os.PathLike)) or not os.fspath(cache_dir)):
            raise ConfigError("cache_dir", cache_dir, "'/local/nvme/lightning_ckpt' or None (~/.cache/lightning_ckpt)")
        if upload_retry is not None and not isinstance(upload_retry, RetryPolicy):
            raise ConfigError("upload_retry", upload_retry, "lightning_ckpt.RetryPolicy(attempts=8) or None")
        for argument, flag in (
            ("async_save", async_save),
            ("direct_io", direct_io),
            ("verify_checksums", verify_checksums),
            ("verify_replicas", verify_replicas),
        ):
            if not isinstance(flag, bool):
                raise ConfigError(argument, flag, "True or False")
        self.async_save = async_save
        self.direct_io = direct_io
        self.verify_replicas = verify_replicas
        self._staging = StagingBuffer()
        self._executor: ThreadPoolExecutor | None = None
        self._in_flight: list[Future[Any]] = []
        self.last_save: SaveStats | None = None
        # Appended in the background, drained on the training loop; bounded for users who never drain it.
        self._events: deque[tuple[str, SaveStats]] = deque(maxlen=_MAX_FINISHED_SAVES)
        self.storage_options = options
        self.verify_checksums = verify_checksums
        self.num_concurrent_uploads = num_concurrent_uploads
        self.upload_timeout_s = float(upload_timeout_in_seconds)
        self.cache_dir = os.fspath(cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "lightning_ckpt"))
        self._uploaders: dict[str, Uploader] = {}
        self.upload_retry = upload_retry or DEFAULT_POLICY
        self.barrier_timeout_s = float(barrier_timeout_s)
        self.writer_hooks = list(writer_hooks)
        # Instances are created in the same order on every rank, so this names the same object everywhere.
        ShardedCheckpointIO._instances += 1
        self._namespace = f"io{ShardedCheckpointIO._instances}"
        self._saves = 0
        self._loads = 0
        self._nonce: str | None = None
        self._peers: dict[str, list[int]] = {}
        self._local_only: dict[str, list[str]] = {}  # node cache -> checkpoints committed there and never uploaded
        self._previous: Exchange | None = None
        self._redirects: dict[str, list[str]] = {}
        self.skipped: list[str] = []  # checkpoints "last" fell back past (they did not verify)
        self.loaded_path: str | None = None

    def __repr__(self) -> str:
        return f"ShardedCheckpointIO(async_save={self.async_save}, verify_checksums={self.verify_checksums})"

    def _options(self, storage_options: Any) -> dict[str, Any]:
        if storage_options is None:
            return self.storage_options
        return {**self.storage_options, **check_storage_options(storage_options)}

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` as a one-shard checkpoint directory at ``path`` (atomic locally).

        Lightning calls it on global rank 0 only (``ModelCheckpoint``, ``trainer.save_checkpoint``);
        Fabric and scripts call it directly. With ``async_save=True`` this returns once the tensors are
        staged; see :meth:`wait_for_save`.

        Example:
            >>> import os, tempfile, torch
            >>> io = ShardedCheckpointIO()
            >>> path = os.path.join(tempfile.mkdtemp(), "epoch=0-step=10.ckpt")  # a directory, despite .ckpt
            >>> io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 10}, path)
            >>> sorted(os.listdir(path))
            ['manifest.json', 'objects.pt', 'shard-00000-of-00001.safetensors']
        """
        options = self._options(storage_options)
        target = os.fspath(path)
        name = os.path.basename(target.rstrip("/"))
        if not layout.is_plain_name(name):
            raise ValueError(f"path={target!r} must name a checkpoint directory, e.g. '/data/ckpts/ep0-ba100'")
        check_target(*Storage.open(target, options))  # refuse before staging anything (the commit checks again)
        install_directory_loader()  # Model.load_from_checkpoint(path) in this process reads what this wrote
        alone = Exchange(None, 0, 1, prefix="single", timeout_s=0)

        def prepare(staging: StagingBuffer | None) -> PreparedSave:
            return prepare_save(checkpoint, target, exchange=alone, nonce=new_nonce(), storage_options=options,
                                staging=staging)  # fmt: skip

        self._run_save(prepare, asynchronous=self.async_save, step=_step_of(checkpoint), announce=target)

    def save_collective(
        self,
        checkpoint: dict[str, Any],
        path: Any,
        *,
        latest_filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        local_folder: str | None = None,
        after_commit: Callable[[], None] | None = None,
        async_save: bool | None = None,
        replicated: Collection[str] | ReplicatedTest | None = None,
    ) -> SaveResult:
        """Save from every rank at once (all ranks must call this together).

        For a remote ``path`` the checkpoint is committed in ``local_folder`` (default: a cache
        directory for that remote folder) and uploaded in the background by the writer group of
        rank 0 alone: with node-local caches each node commits its own complete copy, and only rank
        0's copy (one plan, rank 0's values) becomes the remote checkpoint; other nodes keep their
        newest copy for a local resume. ``after_commit`` runs on the committing rank once the
        checkpoint is committed where it is kept (in the store for a remote ``path``): the place for
        rotation. ``async_save`` overrides the plugin's setting.

        ``replicated`` names the tensors that are identical on every rank by construction (keys as
        ``lightning-ckpt inspect`` shows them, e.g. ``"state_dict/layer.weight"``, or a test
        ``(key, tensor) -> bool``): they are written once, split across the ranks by bytes. Every
        other tensor is written from rank 0's copy, which is always right and what stock Lightning
        saves; ``None`` (the default) writes everything that way. :class:`~lightning_ckpt.CheckpointSaver`
        passes DDP's parameters and their optimizer state (see :mod:`lightning_ckpt.plan`).

        Example:
            >>> import os, tempfile, torch
            >>> folder = tempfile.mkdtemp()
            >>> result = ShardedCheckpointIO().save_collective(
            ...     {"w": torch.ones(2), "global_step": 3}, os.path.join(folder, "ba3"), latest_filename="latest")
            >>> result.leader, result.group, os.readlink(os.path.join(folder, "latest"))
            (True, (0,), 'ba3')
        """
        asynchronous = self.async_save if async_save is None else async_save
        remote_storage, remote_target = Storage.open(os.fspath(path), self.storage_options)
        target = os.fspath(path)
        if not remote_storage.is_local:
            remote_folder = remote_storage.url(remote_storage.dirname(remote_target))
            local_root = local_folder or self.cache_for(remote_folder, "uploads")
            target = os.path.join(local_root, remote_storage.basename(remote_target))
        exchange = Exchange.current(prefix=f"{self._namespace}/save{self._saves}", timeout_s=self.barrier_timeout_s)
        self._saves += 1
        upload_key = f"lightning_ckpt/{self._namespace}/upload{self._saves}"

        def prepare(staging: StagingBuffer | None) -> PreparedSave:
            if self._nonce is None:
                self._nonce = exchange.child("nonce").broadcast("value", new_nonce() if exchange.rank == 0 else None)
            storage, local_target = Storage.open(target, self.storage_options)
            folder = storage.dirname(local_target)
            if folder not in self._peers:
                self._peers[folder] = discover_peers(exchange.child("peers"), storage, folder)
            previous, self._previous = self._previous, exchange
            return prepare_save(
                checkpoint,
                target,
                exchange=exchange,
                previous=previous,
                nonce=f"{self._nonce}{self._saves}",
                peers=self._peers[folder],
                storage_options=self.storage_options,
                latest_filename=latest_filename,
                metadata=metadata,
                hooks=self.writer_hooks,
                staging=staging,
                replicated=replicated,
                verify_replicas=self.verify_replicas,
            )

        def committed(result: SaveResult, stats: SaveStats) -> None:
            if remote_storage.is_local:
                if after_commit is not None and result.leader:
                    after_commit()
                return
            if 0 not in result.group:  # another node's cache: its bytes follow its own leader's plan, never uploaded
                self._keep_newest_local_copy(result)
                return
            self._submit_upload(result, remote_storage, remote_target, latest_filename, upload_key, after_commit, stats)

        result = self._run_save(
            prepare, asynchronous=asynchronous, committed=committed, step=_step_of(checkpoint),
            uploads=not remote_storage.is_local,
        )  # fmt: skip
        if not remote_storage.is_local:
            return SaveResult(path=remote_storage.url(remote_target), group=result.group, leader=result.leader,
                              files=result.files)  # fmt: skip
        return result

    def _keep_newest_local_copy(self, local: SaveResult) -> None:
        """A node cache whose writer group lacks rank 0 uploads nothing (every object of a remote checkpoint comes
        from rank 0's group, one plan); it keeps its newest committed copy for a local resume, nothing older."""
        if not local.leader:
            return
        root, name = os.path.split(local.path.rstrip("/"))
        earlier = self._local_only.setdefault(root, [])
        prune_local_copies(root, keep=name, uploaded=earlier)
        earlier[:] = [name]

    def _submit_upload(
        self,
        local: SaveResult,
        remote_storage: Storage,
        remote_target: str,
        latest_filename: str | None,
        key: str,
        after_commit: Callable[[], None] | None,
        stats: SaveStats | None = None,
    ) -> None:
        """Queue the upload of a locally committed checkpoint of a remote folder (on every rank)."""
        remote_folder = remote_storage.url(remote_storage.dirname(remote_target))
        name = remote_storage.basename(remote_target)
        local_root = os.path.dirname(local.path)
        uploader = self.uploader(remote_folder)
        if stats is not None:  # its log line and metrics describe the checkpoint in the store
            stats.path = remote_storage.url(remote_target)

        def committed_remotely() -> None:
            if after_commit is not None:
                after_commit()
            prune_local_copies(local_root, keep=name, uploaded=uploader.committed)

        uploader.submit(
            UploadJob(
                local_dir=local.path,
                name=name,
                files=local.files,
                commit=local.leader,
                members=local.group,
                store=default_store(),
                key=key,
                rank=exchange_rank(),
                pointer=latest_filename,
                after_commit=committed_remotely,
                stats=stats,
                on_uploaded=self._record_upload,
            )
        )

    # -- the save pipeline: one save in flight ---------------------------------------------------
    def _run_save(
        self,
        prepare: Callable[[StagingBuffer | None], PreparedSave],
        *,
        asynchronous: bool,
        committed: Callable[[SaveResult, SaveStats], None] | None = None,
        step: int | None = None,
        uploads: bool = False,
        announce: str | None = None,
    ) -> SaveResult:
        """Wait for the previous save, run ``prepare`` (the blocking part), then write and commit,
        in the background when ``asynchronous``. Returns what the save does on this rank.

        With ``uploads`` the save's log line is written once the upload is committed too. An
        asynchronous save of ``announce`` (a path one rank saves alone) is marked pending for the
        other ranks until it is written (:mod:`lightning_ckpt.inflight`).
        """
        start = time.perf_counter()
        self.wait_for_save()
        waited = time.perf_counter() - start
        prepared = prepare(self._staging if asynchronous else None)
        stats = SaveStats(path=prepared.url, nbytes=prepared.nbytes, waited_s=waited, asynchronous=asynchronous,
                          step=step)  # fmt: skip

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

        self.last_save = stats
        if not asynchronous:
            result = finish()
            stats.blocking_s = time.perf_counter() - start
            return result
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

        self._in_flight.append(self._background().submit(finish_and_tell))
        stats.blocking_s = time.perf_counter() - start
        return prepared.result

    def _record_upload(self, stats: SaveStats, committed_here: bool) -> None:
        """An upload finished on this rank (background thread): log its line where committed, queue its metrics."""
        if committed_here:
            log.info(stats.summary())
        self._events.append(("upload", stats))

    @property
    def has_finished_saves(self) -> bool:
        """Whether :meth:`finished_saves` has something to return (one deque test: cheap at every step).

        Example:
            >>> import os, tempfile, torch
            >>> io = ShardedCheckpointIO()
            >>> io.has_finished_saves
            False
            >>> io.save_checkpoint({"w": torch.ones(2)}, os.path.join(tempfile.mkdtemp(), "ba1"))
            >>> io.has_finished_saves
            True
        """
        return bool(self._events)

    def finished_saves(self) -> list[tuple[str, SaveStats]]:
        """Saves and uploads that finished since the last call: ``("write" | "upload", stats)``, oldest first.

        :class:`~lightning_ckpt.CheckpointSaver` turns them into logger metrics on the training thread.
        Undrained results beyond the newest 1024 are dropped, so a plugin used without the saver
        (``ModelCheckpoint``) never grows without bound.

        Example:
            >>> import os, tempfile, torch
            >>> io = ShardedCheckpointIO()
            >>> io.save_checkpoint({"w": torch.ones(2), "global_step": 5}, os.path.join(tempfile.mkdtemp(), "ba5"))
            >>> [(kind, stats.step, stats.nbytes > 0) for kind, stats in io.finished_saves()]
            [('write', 5, True)]
            >>> io.finished_saves()  # each event is returned once
            []
        """
        events = []
        while self._events:
            events.append(self._events.popleft())
        return events

    def _background(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="lightning_ckpt-save", initializer=_yield_cpu_to_training
            )
        return self._executor

    def wait_for_save(self) -> None:
        """Block until the save in flight (if any) is durably committed; raise its error (once, with its type).

        Example:
            >>> import tempfile, os, torch
            >>> io = ShardedCheckpointIO(async_save=True)
            >>> path = os.path.join(tempfile.mkdtemp(), "ba1")
            >>> io.save_checkpoint({"w": torch.ones(2), "global_step": 1}, path)
            >>> io.wait_for_save()
            >>> sorted(os.listdir(path))[0], io.last_save.durable_s > 0
            ('manifest.json', True)
        """
        pending, self._in_flight = self._in_flight, []
        if pending and not all(f.done() for f in pending):
            log.info("Waiting for the previous checkpoint save to finish")
        errors = []
        for future in pending:
            try:
                future.result()
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]

    def cache_for(self, remote_folder_url: str, kind: str) -> str:
        """The local cache directory of a remote folder (``kind``: ``"uploads"`` or ``"downloads"``).

        Example:
            >>> io = ShardedCheckpointIO(cache_dir="/local/nvme/ckpt-cache")
            >>> io.cache_for("s3://bucket/runs/a", "uploads")  # one directory per remote folder
            '/local/nvme/ckpt-cache/uploads/4d896d9c6b21898f'
        """
        digest = hashlib.sha1(remote_folder_url.encode()).hexdigest()[:16]
        return os.path.join(self.cache_dir, kind, digest)

    def uploader(self, remote_folder_url: str) -> Uploader:
        """This rank's background uploader for a remote folder (made on first use).

        The plugin owns the upload settings (``num_concurrent_uploads``, ``upload_timeout_s``, ``upload_retry``);
        an uploader built with other values (they changed after it was made, e.g. set by a
        :class:`~lightning_ckpt.CheckpointSaver`) first finishes its queued uploads, in order, and is replaced.

        Example:
            >>> import tempfile
            >>> io = ShardedCheckpointIO(cache_dir=tempfile.mkdtemp(), num_concurrent_uploads=8)
            >>> uploader = io.uploader("memory://bucket/runs/a")
            >>> uploader is io.uploader("memory://bucket/runs/a"), uploader.num_concurrent_uploads
            (True, 8)
            >>> io.teardown()  # stops the uploader's threads
        """
        current = self._uploaders.get(remote_folder_url)
        if current is not None and _settings_of(current) == self._upload_settings():
            return current
        storage, folder = Storage.open(remote_folder_url, self.storage_options)
        fresh = Uploader(
            storage,
            folder,
            num_concurrent_uploads=self.num_concurrent_uploads,
            upload_timeout_s=self.upload_timeout_s,
            policy=self.upload_retry,
        )
        self._uploaders[remote_folder_url] = fresh
        if current is not None:
            try:
                current.close()  # its queued uploads finish first: checkpoints reach the store in order
            finally:
                fresh.committed[:0] = current.committed  # local copies of those are still pruned
        return fresh

    def _upload_settings(self) -> tuple[int, float, RetryPolicy]:
        """What every uploader of this plugin is built with (the plugin's attributes are the one owner)."""
        return self.num_concurrent_uploads, self.upload_timeout_s, self.upload_retry

    def wait_for_uploads(self) -> None:
        """Block until this rank's uploads are done (bounded by ``upload_timeout_in_seconds``); raise their error.

        Example:
            >>> import os, tempfile, torch
            >>> from lightning_ckpt import latest
            >>> io, remote = ShardedCheckpointIO(cache_dir=tempfile.mkdtemp()), "memory://wait-for-uploads-doc/run"
            >>> _ = io.save_collective({"w": torch.ones(2), "global_step": 1}, f"{remote}/ba1")  # uploads in background
            >>> io.wait_for_uploads()
            >>> os.path.basename(latest(remote))
            'ba1'
            >>> io.teardown()
        """
        self.wait_for_save()  # its upload is queued once it commits locally
        for uploader in list(self._uploaders.values()):
            uploader.wait()

    def _download(self, resolved: Resolved) -> Resolved:
        """Copy a remote checkpoint into the local cache once per node (a file lock), then use the copy."""
        storage = resolved.storage
        folder_url = storage.url(storage.dirname(resolved.path))
        name = storage.basename(resolved.path)
        local = os.path.join(self.cache_for(folder_url, "downloads"), name)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        manifest_path = storage.join(resolved.path, layout.MANIFEST_FILENAME)
        remote_manifest = with_retries(
            lambda: storage.read_bytes(manifest_path), what=f"download of {storage.url(manifest_path)}",
            policy=self.upload_retry,
        )  # fmt: skip
        with open(local + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            local_manifest = os.path.join(local, layout.MANIFEST_FILENAME)
            if os.path.exists(local_manifest) and open(local_manifest, "rb").read() == remote_manifest:
                log.info("Using the local copy of %s", resolved.url)
                return Resolved(Storage.open(local)[0], local, "dir")
            download_checkpoint(storage, resolved.path, local, remote_manifest, self.num_concurrent_uploads * 2)
        return Resolved(Storage.open(local)[0], local, "dir")

    def redirect(self, path: str, candidates: Sequence[str]) -> None:
        """The next load of ``path`` loads ``candidates[0]`` (the saver's ``"last"``), falling back in order.

        A candidate that does not verify (missing, truncated or corrupt files) is skipped with a
        warning naming it and what was wrong. With several ranks the lists are aligned by step,
        and ranks move to the next candidate together when any of them fails to verify.

        Example:
            >>> import os, shutil, tempfile, torch
            >>> io, folder = ShardedCheckpointIO(), tempfile.mkdtemp()
            >>> ba1, ba2 = os.path.join(folder, "ba1"), os.path.join(folder, "ba2")
            >>> for step, path in ((1, ba1), (2, ba2)):
            ...     io.save_checkpoint({"w": torch.ones(1), "global_step": step}, path)
            >>> io.redirect(folder, [ba2, ba1])
            >>> shutil.rmtree(ba2)  # the newest one is gone: the load falls back to ba1, with a warning
            >>> io.load_checkpoint(folder)["global_step"], io.skipped == [ba2]
            (1, True)
        """
        self._redirects[path] = list(candidates)

    def _agree_on_newest(self, resolved: Resolved) -> Resolved:
        """With several ranks, pick the newest checkpoint committed in *every* rank's folder."""
        exchange = Exchange.current(prefix=f"{self._namespace}/load{self._loads}", timeout_s=self.barrier_timeout_s)
        self._loads += 1
        if exchange.world_size == 1:
            return resolved
        storage = resolved.storage
        folder = storage.dirname(resolved.path)
        mine = [[name, m.global_step] for name, m in list_committed(storage, folder)]
        views = exchange.barrier("committed", payload=mine)
        common = set.intersection(*({(n, s) for n, s in view} for view in views.values()))
        if not common:
            empty = [r for r, view in views.items() if not view]
            raise CheckpointNotFoundError(
                f"ranks found no checkpoint committed in every rank's folder (rank(s) {empty or 'none'} have none;"
                f" this rank's folder is {storage.url(folder)}); use a folder every node can read"
            )
        name = max(common, key=lambda item: (item[1], item[0]))[0]
        return Resolved(storage, storage.join(folder, name), "dir")

    @override
    def load_checkpoint(
        self, path: Any, map_location: MapLocation = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load a checkpoint directory, folder (newest committed), pointer, URL or legacy ``.ckpt`` file.

        Lightning calls it on every rank to resume; Fabric and scripts call it directly.

        Example:
            >>> import os, tempfile, torch
            >>> io, folder = ShardedCheckpointIO(), tempfile.mkdtemp()
            >>> for step in (1, 2): io.save_checkpoint({"w": torch.full((2,), step), "global_step": step},
            ...                                        os.path.join(folder, f"ba{step}"))
            >>> io.load_checkpoint(folder, map_location="cpu")["w"]  # a folder: its newest committed checkpoint
            tensor([2, 2])
        """
        install_directory_loader()  # Model.load_from_checkpoint(path) in this process reads this format too
        self.wait_for_save()
        inflight.wait_until_written(os.fspath(path), self.barrier_timeout_s)  # a save another rank began alone
        candidates = self._redirects.pop(os.fspath(path), None)
        if candidates:
            return self._load_first_that_verifies(candidates, map_location, weights_only)
        resolved = resolve(os.fspath(path), self.storage_options)
        if resolved.from_folder:
            resolved = self._agree_on_newest(resolved)
        return self._load_resolved(resolved, map_location, weights_only)

    def _load_first_that_verifies(
        self, candidates: Sequence[str], map_location: MapLocation, weights_only: bool | None
    ) -> dict[str, Any]:
        """Load the first candidate that every rank can load; warn about each one skipped."""
        exchange = Exchange.current(prefix=f"{self._namespace}/load{self._loads}", timeout_s=self.barrier_timeout_s)
        self._loads += 1
        failures: list[str] = []
        for index, candidate in enumerate(candidates):
            loaded: dict[str, Any] | None = None
            problem = ""
            try:
                loaded = self._load_resolved(resolve(candidate, self.storage_options), map_location, weights_only)
            except CheckpointError as err:  # corrupt, truncated, missing files: never a reason to stop resuming
                problem = str(err)
            if exchange.world_size > 1:
                views = exchange.barrier(f"verified{index}", payload=problem)
                problem = problem or "; ".join(f"rank {r}: {p}" for r, p in sorted(views.items()) if p)
            if not problem:
                assert loaded is not None
                return loaded
            failures.append(f"{candidate}: {problem}")
            self.skipped.append(candidate)
            following = f"falling back to {candidates[index + 1]}" if index + 1 < len(candidates) else "none is left"
            rank_zero_warn(f'ckpt_path="last": {candidate} does not verify ({problem}); {following}.')
        raise CorruptCheckpointError(
            'ckpt_path="last": no committed checkpoint verifies:\n  '
            + "\n  ".join(failures)
            + "\nResume from an explicit checkpoint or start without ckpt_path."
        )

    def _load_resolved(
        self, resolved: Resolved, map_location: MapLocation, weights_only: bool | None
    ) -> dict[str, Any]:
        self.loaded_path = resolved.url
        if resolved.kind == "dir" and not resolved.storage.is_local:
            resolved = self._download(resolved)
        return load_resolved(
            resolved, map_location=map_location, weights_only=weights_only, verify_checksums=self.verify_checksums
        )

    @override
    def remove_checkpoint(self, path: Any) -> None:
        """Delete a checkpoint (manifest first) or a legacy file; a missing path is not an error.

        Anything else (a directory or file this package did not write) is refused and kept.

        With a save in flight (``async_save=True``) the removal runs after it, in order.

        Example:
            >>> import os, tempfile, torch
            >>> io, path = ShardedCheckpointIO(), os.path.join(tempfile.mkdtemp(), "ba1")
            >>> io.save_checkpoint({"w": torch.ones(2)}, path)
            >>> io.remove_checkpoint(path)
            >>> os.path.exists(path)
            False
            >>> io.remove_checkpoint(path)  # already gone: nothing happens
        """
        storage, target = Storage.open(os.fspath(path), self.storage_options)

        def remove() -> None:
            if storage.is_local and os.path.islink(target):
                storage.remove_file(target)  # a link (save_last="link"): no data goes with it
            elif storage.exists(target):
                try:
                    check_target(storage, target)
                except TargetExistsError as err:  # never delete what this package did not write
                    raise TargetExistsError(
                        f"remove_checkpoint({storage.url(target)!r}): not a lightning-ckpt checkpoint or a"
                        " torch.save .ckpt file; it was not deleted"
                    ) from err
                remove_checkpoint_dir(storage, target)

        if self._in_flight:  # after the save in flight, in order (ModelCheckpoint removes right after saving)
            self._in_flight.append(self._background().submit(remove))
        else:
            remove()

    @override
    def teardown(self) -> None:
        """Wait (bounded) for background uploads, stop them, and raise an unreported upload error once.

        Lightning calls it when a fit ends; call it yourself with Fabric or in a script.

        Example:
            >>> import os, tempfile, torch
            >>> io, path = ShardedCheckpointIO(async_save=True), os.path.join(tempfile.mkdtemp(), "ba1")
            >>> io.save_checkpoint({"w": torch.ones(2)}, path)  # returns once staged
            >>> io.teardown()  # waits for the commit, releases the staging buffers
            >>> "manifest.json" in os.listdir(path)
            True
        """
        errors = []
        try:  # first: the save in flight queues its upload when it commits (Lightning tears down before on_fit_end)
            self.wait_for_save()
        except Exception as err:
            errors.append(err)
        uploaders, self._uploaders = self._uploaders, {}
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._staging.release()
        for uploader in uploaders.values():
            try:
                uploader.close()
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]


BACKGROUND_NICENESS = 10


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


def _settings_of(uploader: Uploader) -> tuple[int, float, RetryPolicy]:
    """The settings ``uploader`` was built with, comparable with :meth:`ShardedCheckpointIO._upload_settings`."""
    return uploader.num_concurrent_uploads, uploader.upload_timeout_s, uploader.policy


def prune_local_copies(local_root: str, *, keep: str, uploaded: Sequence[str]) -> None:
    """Delete local copies of checkpoints already committed in the store, except ``keep`` (the newest)."""
    storage, root = Storage.open(local_root)
    for name in set(uploaded) - {keep}:
        if storage.exists(storage.join(root, name)):
            remove_checkpoint_dir(storage, storage.join(root, name))


def _step_of(checkpoint: Mapping[str, Any]) -> int | None:
    step = checkpoint.get("global_step")
    return int(step) if isinstance(step, int) else None
