"""``CheckpointSaver``: the Lightning callback, a thin adapter over the saver's named parts.

Lightning's hooks call into :mod:`lightning_ckpt.options` (arguments, checked once),
:mod:`lightning_ckpt.trigger` (when to save), :mod:`lightning_ckpt.catalog` (names, records,
retention, best), :mod:`lightning_ckpt.session` (the folder during one fit), :mod:`lightning_ckpt.resume`
(``ckpt_path="last"``) and the plugin (:class:`~lightning_ckpt.ShardedCheckpointIO`, the bytes).
Every Lightning internal it needs is in :mod:`lightning_ckpt._lightning`.

Example:
    >>> import lightning as L
    >>> saver = CheckpointSaver(folder="/tmp/ckpts/{run_name}", run_name="demo", save_interval="100ba",
    ...                         num_checkpoints_to_keep=3)
    >>> trainer = L.Trainer(callbacks=[saver], logger=False, enable_progress_bar=False)
    >>> saver.filename.pattern, saver.save_interval
    ('ep{epoch}-ba{batch}', EveryNBatches(100))
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from typing_extensions import override

from lightning_ckpt import _lightning, layout
from lightning_ckpt.catalog import Catalog
from lightning_ckpt.dist import Exchange
from lightning_ckpt.interval import Event
from lightning_ckpt.options import IgnoreKeys, SaverOptions
from lightning_ckpt.plugin import ShardedCheckpointIO
from lightning_ckpt.policies import CheckpointRecord
from lightning_ckpt.preemption import DEFAULT_SIGNALS
from lightning_ckpt.rotation import METRIC_KEY, RUN_ID_KEY, delete_checkpoints
from lightning_ckpt.session import FolderSession
from lightning_ckpt.storage import Storage
from lightning_ckpt.tree import drop_paths
from lightning_ckpt.trigger import SaveTrigger

__all__ = ["CheckpointSaver"]

log = logging.getLogger("lightning_ckpt")

_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(SaverOptions)) - {"monitor", "unranked_mode"}
_FIXED = (
    "CheckpointSaver.{name} is fixed at construction (the retention policy ranks by it): pass"
    " CheckpointSaver(..., {name}={value!r}) instead of setting it afterwards"
)


class CheckpointSaver(Checkpoint):
    """Save checkpoints on a schedule, name them from format strings, keep the ones that matter.

    Args:
        folder: where checkpoints go: a local path or any fsspec URL (``s3://``, ``gs://``). May use the
            dist variables and ``{run_name}`` (see :mod:`lightning_ckpt.layout`). Default:
            ``<default_root_dir>/checkpoints/{run_name}``, which is the same on every restart of
            the same command, so ``ckpt_path="last"`` finds it.
        filename: the name of one checkpoint directory, e.g. ``"ep{epoch}-ba{batch}"`` or
            ``"step{batch:06d}-loss{val_loss:.3f}"``.
        latest_filename: name of the ``latest`` symlink (and ``<name>.symlink`` pointer file);
            may use the dist variables (``"latest-rank{rank}"``); ``None`` disables both.
        save_interval: ``"1ep"``, ``"500ba"``, ``"30min"``, an int (epochs), a ``timedelta``, or a
            callable ``(trainer, event) -> bool``.
        overwrite: allow a folder that already has checkpoints newer than the point training
            starts (or resumes) from. With ``False`` such a run is refused before training.
        num_checkpoints_to_keep: keep this many newest checkpoints (``-1``: all).
        keep_every_n_steps: additionally keep forever every checkpoint whose step is a multiple.
        monitor: a logged metric; with ``num_best_to_keep`` keeps the best checkpoints by it.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        num_best_to_keep: keep this many best checkpoints by ``monitor`` (default 1 if ``monitor`` is set).
        weights_only: save only the model weights and loop state (no optimizer, no callbacks).
        ignore_keys: glob paths (``/``-joined) to drop from the checkpoint dict, or a callable
            that edits the dict in place.
        run_name: fills ``{run_name}``; default: derived from the command line and directory.
        storage_options: fsspec options for a remote ``folder`` (credentials, endpoint); never logged.
        local_folder: where checkpoints of a remote ``folder`` are written and committed before they
            are uploaded in the background; default: a cache directory for that folder.
        num_concurrent_uploads: files each rank uploads at once (default: the plugin's, 4).
        upload_timeout_in_seconds: bound on waiting for uploads (default: the plugin's, 3600).
        remote_file_name: Composer's spelling: the URL of one remote checkpoint directory, e.g.
            ``"s3://bucket/{run_name}/ep{epoch}-ba{batch}"``. Its directory becomes the remote folder,
            its last part the checkpoint name, and ``folder`` the local folder checkpoints are
            committed in before upload.
        latest_remote_file_name: Composer's spelling of the remote ``latest`` pointer, in the same
            remote directory, e.g. ``"s3://bucket/{run_name}/latest"`` (written as ``latest.symlink``).
        async_save: block training only while tensors are copied into reused staging buffers; write,
            commit, upload and rotate in the background, one save in flight (the next save waits for
            it, and says so in the log). The checkpoint is the state at the save call, even though
            training changes the parameters right after. ``False`` returns only once committed.
        lock_folder: hold a lock on ``folder`` for the whole fit, so a second run pointed at the same
            folder is refused before training (:class:`~lightning_ckpt.errors.FolderInUseError`). With
            ``False`` runs may share a folder; each still rotates only its own checkpoints.
        incremental: write only the tensors whose bytes changed since the last full checkpoint (the
            base) and reference the rest from it: for fine-tuning with frozen weights, adapters or
            embeddings that barely move (see :mod:`lightning_ckpt.incremental`). Retention keeps a base
            while a kept checkpoint references it. Off by default: every byte is hashed at each save,
            which only pays when most of them do not change.
        full_every: with ``incremental``, every this many saves writes everything and becomes the new base.
        preemption_signals: signals that announce preemption (default ``SIGTERM`` and ``SIGUSR1``,
            what Kubernetes and SLURM send); ``None`` leaves signals to Lightning. On one, the saver
            saves at the next step boundary, waits for the commit and uploads, and ends the process
            cleanly (see :mod:`lightning_ckpt.preemption`).

    Every argument, checked once (:class:`~lightning_ckpt.options.SaverOptions`), is readable as an
    attribute (``saver.filename``, ``saver.save_interval``, ...). The work is done by named parts:
    :class:`~lightning_ckpt.trigger.SaveTrigger` (when), :class:`~lightning_ckpt.catalog.Catalog`
    (names, records, retention, best), :class:`~lightning_ckpt.session.FolderSession` (the folder
    during one fit), :mod:`lightning_ckpt.resume` (``ckpt_path="last"``) and the plugin
    :class:`~lightning_ckpt.ShardedCheckpointIO` (the bytes).

    Example:
        >>> import tempfile, lightning as L
        >>> from lightning_ckpt import CheckpointSaver
        >>> saver = CheckpointSaver(tempfile.mkdtemp(), save_interval="2ba", num_checkpoints_to_keep=2, run_name="demo")
        >>> trainer = L.Trainer(max_steps=6, callbacks=[saver], logger=False, enable_progress_bar=False)
        >>> saver.save_interval, saver.retention  # trainer.fit(model) saves ep0-ba2, ep0-ba4, ep0-ba6; keeps two
        (EveryNBatches(2), KeepLatest(n=2))
    """

    def __init__(
        self,
        folder: str | os.PathLike[str] | None = None,
        filename: str = layout.DEFAULT_FILENAME,
        latest_filename: str | None = layout.DEFAULT_LATEST_FILENAME,
        save_interval: Any = "1ep",
        *,
        overwrite: bool = False,
        num_checkpoints_to_keep: int = -1,
        keep_every_n_steps: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        num_best_to_keep: int | None = None,
        weights_only: bool = False,
        ignore_keys: IgnoreKeys = None,
        run_name: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        local_folder: str | os.PathLike[str] | None = None,
        num_concurrent_uploads: int | None = None,
        upload_timeout_in_seconds: float | None = None,
        remote_file_name: str | None = None,
        latest_remote_file_name: str | None = None,
        async_save: bool = True,
        lock_folder: bool = True,
        incremental: bool = False,
        full_every: int = 10,
        preemption_signals: Sequence[str | int] | None = DEFAULT_SIGNALS,
    ) -> None:
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.options = SaverOptions.build(**arguments, default_run_name=_lightning.default_run_name)
        o = self.options
        self.catalog = Catalog(o.filename, o.latest_filename, o.retention, run_name=o.run_name, monitor=o.monitor,
                               unranked_mode=o.unranked_mode)  # fmt: skip
        self.trigger = SaveTrigger(o.save_interval, o.preemption_signals)
        self._io: ShardedCheckpointIO | None = None
        self._io_trainer: weakref.ref[Trainer] | None = None  # the trainer ``_io`` belongs to (ids get reused)
        self._session: FolderSession | None = None
        self._run_id: str | None = None
        self._resumed_from: str | None = None
        self._last_path: str | None = None  # what ckpt_path="last" resolved to, until setup plans the load
        self._best_from_workers = ""
        self._leftovers_done = False  # uploaded once per saver, before the first "last" is loaded
        self._adopted = True  # False from on_fit_start until the resumed run is adopted (after the restore)
        self._held: set[str] = set()  # dropped by retention, kept while incremental checkpoints reference them
        _lightning.install_last_resolver()

    def __getattr__(self, name: str) -> Any:
        """The checked arguments (``saver.filename``, ``saver.save_interval``, ...) live in ``saver.options``."""
        if name in _OPTION_NAMES and "options" in self.__dict__:
            return getattr(self.__dict__["options"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for a ``ddp_spawn`` worker: the weak reference to the trainer stays behind."""
        state = self.__dict__.copy()
        state["_io_trainer"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in a ``ddp_spawn`` worker: a fresh interpreter needs the ``"last"`` hook too."""
        self.__dict__.update(state)
        _lightning.install_last_resolver()

    @property
    @override
    def state_key(self) -> str:
        """Distinct per folder and filename, so several savers in one trainer keep separate state.

        Example:
            >>> from lightning_ckpt import CheckpointSaver
            >>> CheckpointSaver("/data/runs/a", filename="step{batch}", run_name="demo").state_key
            "CheckpointSaver{'folder': '/data/runs/a', 'filename': 'step{batch}'}"
        """
        folder = self.options.folder.pattern if self.options.folder else None
        return self._generate_state_key(folder=folder, filename=self.options.filename.pattern)

    @property
    def monitor(self) -> str | None:
        """The logged metric checkpoints are ranked by (``None``: none), as given; read-only.

        Example:
            >>> from lightning_ckpt import CheckpointSaver
            >>> CheckpointSaver("/data/runs/a", monitor="val_loss", run_name="demo").monitor
            'val_loss'
        """
        return self.catalog.monitor

    @monitor.setter
    def monitor(self, value: object) -> None:
        raise AttributeError(_FIXED.format(name="monitor", value=value))

    @property
    def mode(self) -> str:
        """``"min"`` or ``"max"``, read from the retention policy, so retention and :attr:`best_model_path` agree.

        Example:
            >>> from lightning_ckpt import CheckpointSaver
            >>> saver = CheckpointSaver("/data/runs/a", monitor="acc", mode="max", num_checkpoints_to_keep=0,
            ...                         run_name="demo")
            >>> saver.mode, saver.retention
            ('max', KeepBest(k=1, mode='max'))
        """
        return self.catalog.mode

    @mode.setter
    def mode(self, value: object) -> None:
        raise AttributeError(_FIXED.format(name="mode", value=value))

    # -- where -----------------------------------------------------------------------------------
    def folder_path(self, trainer: Trainer) -> str:
        """This rank's checkpoint folder, with every variable filled in.

        Example:
            >>> import lightning as L
            >>> from lightning_ckpt import CheckpointSaver
            >>> trainer = L.Trainer(default_root_dir="/data/exp", logger=False, enable_progress_bar=False)
            >>> CheckpointSaver("/data/{run_name}/rank{rank}", run_name="demo").folder_path(trainer)
            '/data/demo/rank0'
            >>> CheckpointSaver(run_name="demo").folder_path(trainer)  # the default folder
            '/data/exp/checkpoints/demo'
        """
        if self.options.folder is None:
            return os.path.join(trainer.default_root_dir, "checkpoints", self.options.run_name)
        return self.options.folder.render(run_name=self.options.run_name, rank=_lightning.rank_info(trainer))

    def _folder_session(self, trainer: Trainer) -> FolderSession:
        """A session of this saver's folder for ``trainer`` (no I/O; ``setup`` keeps the one of the fit)."""
        current = trainer.strategy.checkpoint_io
        rank = _lightning.rank_info(trainer)
        return FolderSession.open(
            self.folder_path(trainer), self.options.storage_options, local_folder=self.options.local_folder,
            cache_dir=current.cache_dir if isinstance(current, ShardedCheckpointIO) else None,
            is_mine=lambda name: self.catalog.is_mine(name, rank),
        )  # fmt: skip

    def newest_committed(self, trainer: Trainer) -> tuple[str, float] | None:
        """``(path, commit time)`` of the newest committed checkpoint of this saver, or ``None``; a pure query.

        This is what ``ckpt_path="last"`` resumes from (checkpoints that do not verify are skipped then);
        with several ranks it is the folder (ranks agree on the step in ``setup``).

        Example:
            >>> import tempfile, lightning as L
            >>> from lightning_ckpt import CheckpointSaver
            >>> saver = CheckpointSaver(tempfile.mkdtemp(), run_name="demo")
            >>> saver.newest_committed(L.Trainer(logger=False, enable_progress_bar=False)) is None  # nothing saved
            True
        """
        session = self._folder_session(trainer)
        session.check(self.folder_path(trainer), fit=False)
        mine = session.committed()
        if not mine:
            return None
        created = mine[-1][1].created
        if trainer.world_size > 1:
            return session.url, created
        return session.storage.url(session.storage.join(session.folder, mine[-1][0])), created

    def resume_last(self, trainer: Trainer, path: str) -> None:
        """Lightning resolved ``ckpt_path="last"`` to this saver's ``path``: plan that load in ``setup``.

        Example:
            >>> from lightning_ckpt import CheckpointSaver
            >>> CheckpointSaver("/data/runs/a", run_name="demo").resume_last(None, "/data/runs/a/ep0-ba8")
        """
        self._last_path = path

    @property
    def best_model_path(self) -> str:
        """Path of the best checkpoint by ``monitor`` (``""`` without one), for ``ckpt_path="best"``.

        Example:
            >>> from lightning_ckpt import CheckpointSaver
            >>> CheckpointSaver("/data/runs/a", monitor="val_loss", run_name="demo").best_model_path  # none saved
            ''
        """
        best = self.catalog.best()
        if best is None or self._session is None:
            return self._best_from_workers
        return os.path.join(self._session.folder, best.name)

    @best_model_path.setter
    def best_model_path(self, path: str) -> None:
        """Lightning's ``ddp_spawn`` launcher hands the workers' answer back to the main process."""
        self._best_from_workers = path

    # -- Lightning hooks -------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the folder (a file, or a read-only folder, fails here, before training), choose the plugin,
        take the folder lock for a fit, upload checkpoints an earlier run committed only locally, and plan
        ``ckpt_path="last"`` (with several ranks, on the newest step every rank has committed)."""
        if self._io is None or self._io_trainer is None or self._io_trainer() is not trainer:  # made once per trainer
            self._io = _plugin_for(trainer, self.options, self.folder_path(trainer))
            self._io_trainer = weakref.ref(trainer)
        _lightning.install_sharded_loader(trainer, self._io)  # FSDP/ModelParallel load without a CheckpointIO
        session = self._folder_session(trainer)
        if self._session is not None and self._session.lock is not None and self._session.url == session.url:
            session.lock, self._session.lock = self._session.lock, None  # still held: no teardown since
        self._session = session
        session.check(self.folder_path(trainer), fit=stage == "fit")
        if stage == "fit" and self.options.lock_folder:  # only a fit saves: evaluating a live run is never refused
            siblings = [cb for cb in trainer.callbacks if isinstance(cb, CheckpointSaver) and cb is not self]  # type: ignore[attr-defined]
            session.refuse_siblings({s.options.filename.pattern: s._session for s in siblings if s._session},
                                    self.options.filename.pattern)  # fmt: skip
            session.claim(trainer, run_name=self.options.run_name, policy=self._io.upload_retry)
        if session.remote and trainer.is_global_zero and not self._leftovers_done:
            self._leftovers_done = True
            uploader = self._io.mirror.uploader(session.url)
            session.upload_leftovers(
                uploader, self.options.filename, self.catalog.pointer_for(_lightning.rank_info(trainer))
            )
        if self._last_path is not None:  # ckpt_path="last" is ours: the load follows the plan every rank agreed on
            path, self._last_path = self._last_path, None
            exchange = Exchange.current(prefix=f"saver-{self.state_key}/last", timeout_s=self._io.barrier_timeout_s)
            self._io.expect_resume(path, session.resume_plan(exchange))

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove what interrupted saves left; once the checkpoint is restored (here, or at ``on_train_start``
        under strategies that restore after ``on_fit_start``), adopt the resumed run."""
        assert self._session is not None and self._io is not None, "setup() ran first"
        if self.options.lock_folder:  # this run owns the folder: nothing else is saving there
            self._session.remove_leftovers(trainer)
        self._adopted = False
        if not _lightning.restores_after_fit_start(trainer):
            self._adopt_resumed(trainer)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Adopt the resumed run if the restore came after ``on_fit_start``; install the preemption handlers."""
        if not self._adopted:
            self._adopt_resumed(trainer)
        self.trigger.preemption.install()  # after Lightning registered its own handlers, which these replace

    def _adopt_resumed(self, trainer: Trainer) -> None:
        """Adopt the resumed run's id and checkpoints (for rotation), refuse a folder with newer checkpoints
        unless ``overwrite``, and start the schedule's clock. Needs the restored step: runs after the restore."""
        assert self._session is not None and self._io is not None, "setup() ran first"
        self._adopted = True
        session = self._session
        resumed = self._io.last_resume if trainer.ckpt_path else None
        loaded = resumed.loaded if resumed is not None else None
        given = loaded or (str(trainer.ckpt_path) if trainer.ckpt_path else None)
        self._resumed_from = os.path.basename(os.path.normpath(given)) if given else None
        self._run_id = session.lineage(trainer, loaded, self._run_id, self.options.storage_options)
        named = session.records(self.options.filename)
        damaged = {session.storage.basename(u.rstrip("/")) for u in (resumed.skipped if resumed else ())}
        if damaged:  # "last" fell back past them: this run saves over them instead of refusing to start
            log.warning("Checkpoints that do not verify will be replaced as this run saves: %s", sorted(damaged))
        self.catalog.adopt(named, self._run_id, damaged)
        if not self.options.overwrite:
            session.refuse_newer([r for r in named if r.name not in damaged], _lightning.resume_step(trainer))
        self.trigger.start(trainer.global_step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Restore the signal handlers; wait for the save in flight and the uploads, and log their metrics."""
        self.trigger.preemption.uninstall()
        if self._io is not None:  # before Lightning finalizes the loggers: the last saves' metrics get in
            self._io.wait_for_uploads()
            self._log_finished_saves(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Restore the signal handlers and release the folder lock."""
        self._end()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Restore the signal handlers and release the folder lock."""
        self._end()

    def _end(self) -> None:
        self.trigger.preemption.uninstall()
        if self._session is not None:
            self._session.release()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        """Save if the schedule says a checkpoint is due (or a preemption signal came); log finished saves."""
        self._maybe_save(trainer, Event.BATCH_END)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save if the schedule says a checkpoint is due at the end of this epoch."""
        self._maybe_save(trainer, Event.EPOCH_END)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Wait for the save in flight and the uploads, log their metrics and flush the loggers."""
        if self._io is not None:
            self._io.wait_for_uploads()
            if self._log_finished_saves(trainer):
                for logger in trainer.loggers:
                    logger.save()

    def _log_finished_saves(self, trainer: Trainer) -> bool:
        """Log the metrics of saves and uploads finished since the last call (training thread)."""
        return _lightning.log_save_metrics(trainer, self._io.finished_saves() if self._io is not None else [])

    @override
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the checkpoints this saver keeps (to rotate), the last saved step, the run id."""
        return {
            "saved": [r.__dict__.copy() for r in self.catalog.records],
            "last_saved_step": self.options.save_interval.last_saved_batch,
            "run_id": self._run_id,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, from the checkpoint a run resumes from."""
        self.catalog.records = [CheckpointRecord(**r) for r in state_dict.get("saved", [])]
        self.options.save_interval.note_saved(state_dict.get("last_saved_step"))
        self._run_id = state_dict.get("run_id")

    # -- saving ----------------------------------------------------------------------------------
    def _maybe_save(self, trainer: Trainer, event: Event) -> None:
        if self._io is not None and self._io.has_finished_saves:  # a save or upload finished since the last step
            self._log_finished_saves(trainer)
        decision = self.trigger.decide(trainer, event)
        if decision.action == "save_and_exit":
            self._save_and_exit(trainer)
        elif decision.action == "save":
            self.save(trainer)
            self.trigger.saved(decision)

    def _save_and_exit(self, trainer: Trainer) -> None:
        """Save now (unless this step is saved), wait until committed and uploaded, end the process cleanly."""
        watch = self.trigger.preemption
        signalled = watch.received or "a signal on another rank"
        log.warning("Preemption (%s): saving a checkpoint at step %d, then stopping", signalled, trainer.global_step)
        if trainer.global_step != self.options.save_interval.last_saved_batch:
            self.save(trainer)
        assert self._io is not None
        self._io.wait_for_uploads()
        waited = time.monotonic() - (watch.received_at or time.monotonic())
        log.warning("Preemption: checkpoint at step %d committed %.1f s after the signal; exiting",
                    trainer.global_step, waited)  # fmt: skip
        watch.uninstall()
        raise _lightning.preemption_exit()

    def save(self, trainer: Trainer) -> str:
        """Save a checkpoint now, move ``latest``, and rotate; returns the checkpoint's path.

        The schedule calls it; call it yourself (on every rank, during ``fit``) for an extra checkpoint.
        With ``async_save=True`` it returns once the state is staged; the checkpoint is committed in the
        background (``trainer.strategy.checkpoint_io.wait_for_save()`` waits for it).

        Example:
            >>> import lightning as L
            >>> from lightning.pytorch.demos.boring_classes import BoringModel
            >>> from lightning_ckpt import CheckpointSaver
            >>> class SaveAtStep2(BoringModel):
            ...     def on_train_batch_end(self, outputs, batch, batch_idx):
            ...         if self.global_step == 2:
            ...             self.trainer.checkpoint_callback.save(self.trainer)  # an extra checkpoint: ep0-ba2
        """
        assert self._io is not None and self._session is not None, "CheckpointSaver.save() runs inside trainer.fit()"
        session, options = self._session, self.options
        storage, folder = session.storage, session.folder
        progress = _lightning.progress(trainer)
        self.catalog.warn_missing_metrics(progress, trainer.global_step)
        rank = _lightning.rank_info(trainer)
        name = self.catalog.name_for(progress, rank)
        url = storage.url(storage.join(folder, name))
        record = self.catalog.add(name, progress, overwrite=options.overwrite, url=url)
        options.save_interval.note_saved(progress.batch)  # the schedule holds the last saved step; the saver asks it
        checkpoint = _lightning.dump_checkpoint(trainer, options.weights_only)
        if callable(options.ignore_keys):
            options.ignore_keys(checkpoint)
        elif options.ignore_keys:
            drop_paths(checkpoint, options.ignore_keys)
        doomed = self.catalog.dropped(storage, folder, protected={self._resumed_from} if self._resumed_from else set())
        metric = {METRIC_KEY: record.metric} if record.metric is not None else {}
        pending = self._io.save_collective(
            checkpoint,
            url,
            latest_filename=self.catalog.pointer_for(rank),
            metadata={RUN_ID_KEY: self._run_id, **metric},
            local_folder=options.local_folder,
            after_commit=functools.partial(self._rotate, storage, folder, doomed),  # where it is kept
            async_save=options.async_save,
            replicated=_lightning.replicated_test(trainer),  # the rest is written from rank 0's copy
            supersedes=doomed,  # queued uploads of what this save's retention drops are not made
        )
        return pending.path

    def _rotate(self, storage: Storage, folder: str, doomed: list[str]) -> None:
        """Delete what retention dropped (on the committing rank, after the commit), except bases that
        incremental checkpoints still read: those are kept and tried again after each later save."""
        self._held = set(delete_checkpoints(storage, folder, doomed, retry=self._held))

    @property
    def saved_checkpoints(self) -> list[str]:
        """Names of the checkpoints this saver currently keeps, oldest first.

        Example:
            >>> from lightning_ckpt import CheckpointSaver
            >>> CheckpointSaver("/data/runs/a", run_name="demo").saved_checkpoints  # before any fit
            []
        """
        return [r.name for r in self.catalog.records]

    def __repr__(self) -> str:
        folder = self.options.folder.pattern if self.options.folder else "<default_root_dir>/checkpoints/{run_name}"
        return (
            f"CheckpointSaver(folder={folder!r}, filename={self.options.filename.pattern!r},"
            f" save_interval={self.options.save_interval!r})"
        )


def _plugin_for(trainer: Trainer, options: SaverOptions, folder: str) -> ShardedCheckpointIO:
    """The trainer's ``ShardedCheckpointIO`` (installed if it still has the stock IO), with a remote ``folder``'s
    settings from the saver: the plugin owns them, so its uploaders see the saver's values."""
    io = _lightning.use_checkpoint_io(trainer, ShardedCheckpointIO, ShardedCheckpointIO)
    if options.incremental:  # the saver turns it on; False leaves a plugin the user configured as it is
        io.start_incremental(options.full_every)
    if not Storage.open(folder, options.storage_options)[0].is_local:
        io.storage_options = {**io.storage_options, **options.storage_options}
        if options.num_concurrent_uploads is not None:
            io.num_concurrent_uploads = int(options.num_concurrent_uploads)
        if options.upload_timeout_in_seconds is not None:
            io.upload_timeout_s = float(options.upload_timeout_in_seconds)
    return io
