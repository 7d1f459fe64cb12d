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

import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from typing_extensions import override

from lightning_ckpt import inflight
from lightning_ckpt._checks import check_bool, check_count, check_directory, check_seconds
from lightning_ckpt._lightning import InPlaceWeights, install_directory_loader
from lightning_ckpt.collective import PreparedSave, SaveResult, WriterHook, checkpoint_dir_path, prepare_alone
from lightning_ckpt.discovery import Resolved, list_committed, load_resolved, resolve
from lightning_ckpt.dist import Exchange
from lightning_ckpt.errors import ConfigError, TargetExistsError
from lightning_ckpt.hooks import check_hooks
from lightning_ckpt.incremental import IncrementalState
from lightning_ckpt.inplace import load_in_place, load_weights_in_place
from lightning_ckpt.locations import check_storage_options
from lightning_ckpt.mirror import RemoteMirror, default_cache_dir
from lightning_ckpt.pipeline import PendingSave, SavePipeline
from lightning_ckpt.plan import ReplicatedTest
from lightning_ckpt.reader import MapLocation
from lightning_ckpt.resume import Resumed, ResumePlan, agree, listing, load_first_verified, plan_resume
from lightning_ckpt.rotation import delete_checkpoints
from lightning_ckpt.saves import CollectiveSaves
from lightning_ckpt.staging import StagingBuffer
from lightning_ckpt.stats import SaveStats
from lightning_ckpt.storage import Storage
from lightning_ckpt.targets import check_target
from lightning_ckpt.transfer import DEFAULT_POLICY, RetryPolicy

__all__ = ["ShardedCheckpointIO"]

log = logging.getLogger("lightning_ckpt")


class ShardedCheckpointIO(CheckpointIO):
    """Checkpoint IO that stores each checkpoint as a directory of raw tensor shards plus a manifest.

    Args:
        storage_options: fsspec options for remote paths (``s3://...``); never logged.
        verify_checksums: compare each file's CRC32 with the manifest when loading.
        barrier_timeout_s: how long ranks wait for each other during a collective save or load.
        writer_hooks: :class:`~lightning_ckpt.WriterHook` instances called around each collective commit.
        num_concurrent_uploads: files each rank uploads at once (each one multipart-parallel).
        upload_timeout_in_seconds: bound on waiting for uploads (per checkpoint, and at fit end).
        max_upload_backlog: the most checkpoints queued or uploading at once on a rank; a save that
            would queue one more waits for the oldest (with a warning), so the local cache stays bounded.
            With :class:`~lightning_ckpt.CheckpointSaver` a queued upload is dropped once a newer
            checkpoint's retention (``num_checkpoints_to_keep``) drops that checkpoint.
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
        incremental: write only the tensors whose bytes changed since the last full checkpoint of
            the same folder (the *base*) and reference the base's copy of the rest
            (:mod:`lightning_ckpt.incremental`). Every byte is hashed at each save (xxh3-128); a base is
            deleted only once no remaining checkpoint references it. Off by default: it pays only when
            most bytes do not change (frozen weights, adapters), and its checkpoints need this
            version of lightning-ckpt or newer to load.
        full_every: with ``incremental``, every this many saves writes everything and becomes the new
            base (``1``: every save is full).

    The parts it delegates to: :class:`~lightning_ckpt.pipeline.SavePipeline` (one save in flight),
    :class:`~lightning_ckpt.mirror.RemoteMirror` (caches, uploads, downloads) and
    :mod:`lightning_ckpt.resume` (which checkpoint a load of ``"last"`` or a folder means).

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
        max_upload_backlog: int = 4,
        cache_dir: str | None = None,
        upload_retry: RetryPolicy | None = None,
        async_save: bool = False,
        direct_io: bool = True,
        verify_replicas: bool = False,
        incremental: bool = False,
        full_every: int = 10,
    ) -> None:
        self.storage_options = check_storage_options(storage_options)  # a TypeError too; values are never shown
        self.barrier_timeout_s = check_seconds("barrier_timeout_s", barrier_timeout_s, "600 (seconds)")
        self.upload_timeout_s = check_seconds("upload_timeout_in_seconds", upload_timeout_in_seconds, "3600")
        self.writer_hooks = check_hooks(writer_hooks)
        self.num_concurrent_uploads = check_count("num_concurrent_uploads", num_concurrent_uploads, "4")
        self.max_upload_backlog = check_count("max_upload_backlog", max_upload_backlog, "4")
        example = "'/local/nvme/lightning_ckpt' or None (~/.cache/lightning_ckpt)"
        self.cache_dir = check_directory("cache_dir", cache_dir, example) or default_cache_dir()
        if upload_retry is not None and not isinstance(upload_retry, RetryPolicy):
            raise ConfigError("upload_retry", upload_retry, "lightning_ckpt.RetryPolicy(attempts=8) or None")
        self.upload_retry = upload_retry or DEFAULT_POLICY
        self.async_save = check_bool("async_save", async_save)
        self.verify_checksums = check_bool("verify_checksums", verify_checksums)
        self.verify_replicas = check_bool("verify_replicas", verify_replicas)
        self.full_every = check_count("full_every", full_every, "10 (every 10th save writes everything)")
        self._incremental = IncrementalState(self.full_every) if check_bool("incremental", incremental) else None
        self._held: dict[str, set[str]] = {}  # folder -> checkpoints remove_checkpoint kept for their dependants
        self._pipeline = SavePipeline(direct_io=check_bool("direct_io", direct_io))
        self.mirror = RemoteMirror(self)  # reads the settings above at each use: the plugin owns them
        # Instances are created in the same order on every rank, so this names the same object everywhere.
        ShardedCheckpointIO._instances += 1
        self._namespace = f"io{ShardedCheckpointIO._instances}"
        self._saves = CollectiveSaves(self._namespace)
        self._loads = 0
        self._expected: dict[str, ResumePlan] = {}
        self.last_resume: Resumed | None = None

    def __repr__(self) -> str:
        return f"ShardedCheckpointIO(async_save={self.async_save}, verify_checksums={self.verify_checksums})"

    @property
    def incremental(self) -> bool:
        """Whether saves reference the unchanged tensors of their base instead of writing them again.

        Example:
            >>> ShardedCheckpointIO().incremental, ShardedCheckpointIO(incremental=True).incremental
            (False, True)
        """
        return self._incremental is not None

    def start_incremental(self, full_every: int) -> None:
        """Turn incremental saves on with a new ``full_every``; the next save is full (a new base).

        Example:
            >>> io = ShardedCheckpointIO()
            >>> io.start_incremental(full_every=5)
            >>> io.incremental, io.full_every
            (True, 5)
        """
        self.full_every = check_count("full_every", full_every, "10 (every 10th save writes everything)")
        self._incremental = IncrementalState(self.full_every)

    @property
    def direct_io(self) -> bool:
        """Whether shards are written with ``O_DIRECT`` where the filesystem supports it.

        Example:
            >>> ShardedCheckpointIO(direct_io=False).direct_io
            False
        """
        return self._pipeline.direct_io

    @direct_io.setter
    def direct_io(self, value: bool) -> None:
        self._pipeline.direct_io = check_bool("direct_io", value)

    @property
    def last_save(self) -> SaveStats | None:
        """What the last save through this plugin cost (:class:`~lightning_ckpt.stats.SaveStats`), or ``None``.

        Example:
            >>> import os, tempfile, torch
            >>> io = ShardedCheckpointIO()
            >>> io.save_checkpoint({"w": torch.ones(2), "global_step": 1}, os.path.join(tempfile.mkdtemp(), "ba1"))
            >>> io.last_save.step, io.last_save.asynchronous
            (1, False)
        """
        return self._pipeline.last_save

    @property
    def loaded_path(self) -> str | None:
        """What the last load really loaded (``"last"`` may fall back past checkpoints that do not verify).

        Example:
            >>> import os, tempfile, torch
            >>> io, folder = ShardedCheckpointIO(), tempfile.mkdtemp()
            >>> io.save_checkpoint({"w": torch.ones(1), "global_step": 1}, os.path.join(folder, "ba1"))
            >>> _ = io.load_checkpoint(folder)
            >>> io.loaded_path == os.path.join(folder, "ba1")
            True
        """
        return self.last_resume.loaded if self.last_resume is not None else None

    def _options(self, storage_options: Any) -> dict[str, Any]:
        if storage_options is None:
            return self.storage_options
        return {**self.storage_options, **check_storage_options(storage_options)}

    # -- saving ----------------------------------------------------------------------------------
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
        target = checkpoint_dir_path(path)
        check_target(*Storage.open(target, options))  # refuse before staging anything (the commit checks again)
        install_directory_loader()  # Model.load_from_checkpoint(path) in this process reads what this wrote

        def prepare(staging: StagingBuffer | None) -> PreparedSave:
            return prepare_alone(checkpoint, target, storage_options=options, staging=staging,
                                 incremental=self._incremental)  # fmt: skip

        self._pipeline.run(prepare, asynchronous=self.async_save, step=_step_of(checkpoint), announce=target)

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
        supersedes: Collection[str] = (),
    ) -> PendingSave:
        """Save from every rank at once (all ranks call it together); returns a pending-save handle.

        The handle (:class:`~lightning_ckpt.pipeline.PendingSave`) names the checkpoint, this rank's
        writer group and files at once; the checkpoint is committed when ``handle.wait()`` returns (at
        once for a synchronous save). For a remote ``path`` the checkpoint is committed in
        ``local_folder`` (default: a cache directory for that remote folder) and uploaded in the
        background by the writer group of rank 0 alone: with node-local caches each node commits its
        own complete copy, and only rank 0's copy (one plan, rank 0's values) becomes the remote
        checkpoint; other nodes keep their newest copy for a local resume. ``after_commit`` runs on
        the committing rank once the checkpoint is committed where it is kept (in the store for a
        remote ``path``): the place for rotation. ``async_save`` overrides the plugin's setting.
        ``supersedes`` names older checkpoints of the same folder that this one's retention drops: once this
        one is committed locally, their uploads that have not started are not made (never uploaded only to
        be deleted; each one's ``after_commit`` runs after the next remote commit).

        ``replicated`` names the tensors that are identical on every rank by construction (keys as
        ``lightning-ckpt inspect`` shows them, e.g. ``"state_dict/layer.weight"``, or a test
        ``(key, tensor) -> bool``): they are written once, split across the ranks by bytes. Every
        other tensor is written from rank 0's copy, which is always right and what stock Lightning
        saves; ``None`` (the default) writes everything that way. :class:`~lightning_ckpt.CheckpointSaver`
        passes DDP's parameters and their optimizer state (see :mod:`lightning_ckpt.plan`).

        Example:
            >>> import os, tempfile, torch
            >>> folder = tempfile.mkdtemp()
            >>> pending = ShardedCheckpointIO().save_collective(
            ...     {"w": torch.ones(2), "global_step": 3}, os.path.join(folder, "ba3"), latest_filename="latest")
            >>> pending.leader, pending.group, pending.done(), os.readlink(os.path.join(folder, "latest"))
            (True, (0,), True, 'ba3')
        """
        asynchronous = self.async_save if async_save is None else async_save
        remote_storage, remote_target = Storage.open(os.fspath(path), self.storage_options)
        remote = not remote_storage.is_local
        target = self.mirror.local_target(remote_storage, remote_target, local_folder) if remote else os.fspath(path)
        saves = self._saves
        exchange = saves.next_exchange(self.barrier_timeout_s)
        upload_key = saves.upload_key

        def prepare(staging: StagingBuffer | None) -> PreparedSave:
            return saves.prepare(exchange, checkpoint, target, storage_options=self.storage_options,
                                 latest_filename=latest_filename, metadata=metadata, hooks=self.writer_hooks,
                                 staging=staging, replicated=replicated,
                                 verify_replicas=self.verify_replicas, incremental=self._incremental)  # fmt: skip

        def committed(result: SaveResult, stats: SaveStats) -> None:
            if not remote:
                if after_commit is not None and result.leader:
                    after_commit()
            elif 0 not in result.group:  # another node's cache: its bytes follow its own leader's plan, never uploaded
                self.mirror.keep_newest_local_copy(result)
            else:
                self.mirror.submit_upload(result, remote_storage, remote_target, pointer=latest_filename,
                                           key=upload_key, after_commit=after_commit, stats=stats,
                                           on_uploaded=self._record_upload, supersedes=supersedes)  # fmt: skip

        pending = self._pipeline.run(
            prepare, asynchronous=asynchronous, committed=committed, step=_step_of(checkpoint), uploads=remote
        )
        return pending.in_store(remote_storage.url(remote_target)) if remote else pending

    def _record_upload(self, stats: SaveStats, committed_here: bool) -> None:
        """An upload finished on this rank (background thread): log its line where committed, queue its metrics."""
        if committed_here:
            log.info(stats.summary())
        self._pipeline.record("upload", stats)

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
        return self._pipeline.has_finished

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
        return self._pipeline.drain()

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
        self._pipeline.wait()

    # -- the remote mirror -----------------------------------------------------------------------
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
        self.mirror.wait()

    # -- loading ---------------------------------------------------------------------------------
    def expect_resume(self, path: str, plan: ResumePlan) -> None:
        """The next load of ``path`` follows ``plan`` (the saver's ``"last"``): its first candidate that verifies.

        Example:
            >>> import os, shutil, tempfile, torch
            >>> from lightning_ckpt.resume import Candidate, ResumePlan
            >>> io, folder = ShardedCheckpointIO(), tempfile.mkdtemp()
            >>> ba1, ba2 = (os.path.join(folder, name) for name in ("ba1", "ba2"))
            >>> for step, path in ((1, ba1), (2, ba2)):
            ...     io.save_checkpoint({"w": torch.ones(1), "global_step": step}, path)
            >>> io.expect_resume(folder, ResumePlan((Candidate(2, ba2), Candidate(1, ba1))))
            >>> shutil.rmtree(ba2)  # the newest one is gone: the load falls back to ba1, with a warning
            >>> io.load_checkpoint(folder)["global_step"], io.last_resume.skipped == (ba2,)
            (1, True)
        """
        self._expected[os.fspath(path)] = plan

    @override
    def load_checkpoint(
        self,
        path: Any,
        map_location: MapLocation = None,
        weights_only: bool | None = None,
        *,
        into: Any = None,
        **in_place: Any,
    ) -> dict[str, Any]:
        """Load a checkpoint directory, folder (newest committed), pointer, URL or legacy ``.ckpt`` file.

        Lightning calls it on every rank to resume; Fabric and scripts call it directly. With several
        ranks, a *folder* means the newest checkpoint committed in every rank's folder (node-local disks
        can differ if a job died mid-commit). :attr:`last_resume` says what was loaded.

        With ``into=(module, optimizers, strict)`` (a sharded model under FSDP or ModelParallel), the
        model and optimizer state are loaded in place, each rank reading only the chunks its shards
        need (ranged reads from an object store, no download of the whole checkpoint), and the rest of
        the checkpoint is returned (:func:`lightning_ckpt.inplace.load_in_place`, which also takes
        ``in_place``: ``module_key``, ``optimizer_keys``).

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
        exchange = Exchange.current(prefix=f"{self._namespace}/load{self._loads}", timeout_s=self.barrier_timeout_s)
        self._loads += 1

        def load(url: str) -> dict[str, Any]:
            return self._load_resolved(resolve(url, self.storage_options), map_location, weights_only, into, in_place)

        plan = self._expected.pop(os.fspath(path), None)
        if plan is not None:
            self.last_resume = load_first_verified(plan, load, exchange)
            return self.last_resume.checkpoint
        resolved = resolve(os.fspath(path), self.storage_options)
        if resolved.from_folder and exchange.world_size > 1:
            resolved = self._newest_in_every_folder(resolved, exchange)
        checkpoint = self._load_resolved(resolved, map_location, weights_only, into, in_place)
        self.last_resume = Resumed(checkpoint, resolved.url)
        return checkpoint

    def _newest_in_every_folder(self, resolved: Resolved, exchange: Exchange) -> Resolved:
        storage, folder = resolved.storage, resolved.storage.dirname(resolved.path)
        plan = plan_resume(listing(list_committed(storage, folder)), lambda name: storage.join(folder, name),
                           what=f"ckpt_path={storage.url(folder)!r}")  # fmt: skip
        first = agree(plan, exchange, where=storage.url(folder)).first
        assert first is not None
        return Resolved(storage, first.url, "dir")

    def _load_resolved(
        self,
        resolved: Resolved,
        map_location: MapLocation,
        weights_only: bool | None,
        into: Any = None,
        in_place: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        if isinstance(into, InPlaceWeights) and resolved.kind == "dir":  # a plain model's weights, in place
            if not resolved.storage.is_local:
                resolved = self.mirror.download(resolved)  # once per node, then local reads
            return load_weights_in_place(resolved.storage, resolved.path, into.module, strict=into.strict,
                                         weights_only=weights_only, verify=self.verify_checksums)  # fmt: skip
        if into is not None and resolved.kind == "dir":  # ranged reads of the chunks this rank needs, in place
            module, optimizers, strict = into
            options = {"strict": strict, "weights_only": weights_only, "verify": self.verify_checksums}
            return load_in_place(resolved.storage, resolved.path, module, optimizers, **options, **(in_place or {}))
        if resolved.kind == "dir" and not resolved.storage.is_local:
            resolved = self.mirror.download(resolved)
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
            if storage.islink(target):
                storage.remove_file(target)  # a link (save_last="link"): no data goes with it
            elif storage.exists(target):
                try:
                    check_target(storage, target, replacing=False)
                except TargetExistsError as err:  # never delete what this package did not write
                    raise TargetExistsError(
                        f"remove_checkpoint({storage.url(target)!r}): not a lightning-ckpt checkpoint or a"
                        " torch.save .ckpt file; it was not deleted"
                    ) from err
                folder, name = storage.dirname(target.rstrip("/")), storage.basename(target.rstrip("/"))
                # a base kept earlier for its incremental dependants is deleted once they are gone
                self._held[folder] = set(delete_checkpoints(storage, folder, [name], retry=self._held.get(folder, ())))

        self._pipeline.submit(remove)  # after the save in flight, in order (ModelCheckpoint removes right after)

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
        errors: list[BaseException] = []
        try:  # first: the save in flight queues its upload when it commits (Lightning tears down before on_fit_end)
            self.wait_for_save()
        except Exception as err:
            errors.append(err)
        self._pipeline.close()
        errors += self.mirror.close()
        if errors:
            raise errors[0]


def _step_of(checkpoint: Mapping[str, Any]) -> int | None:
    step = checkpoint.get("global_step")
    return int(step) if isinstance(step, int) else None
