"""``CheckpointSaver``: when to save, what to name it, what to keep (policy only).

The mechanics (bytes, commit, pointers) live in :mod:`lightning_ckpt.checkpoint`; the Lightning
internals in :mod:`lightning_ckpt._lightning`; names in :mod:`lightning_ckpt.layout`; schedules
in :mod:`lightning_ckpt.interval`; retention in :mod:`lightning_ckpt.policies`.

Example:
    >>> import lightning as L
    >>> saver = CheckpointSaver(folder="/tmp/ckpts/{run_name}", run_name="demo", save_interval="100ba",
    ...                         num_checkpoints_to_keep=3)
    >>> trainer = L.Trainer(callbacks=[saver], logger=False, enable_progress_bar=False)
    >>> saver.filename.pattern, saver.save_interval
    ('ep{epoch}-ba{batch}', EveryNBatches(100))
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from typing_extensions import override

from lightning_ckpt import _lightning, layout
from lightning_ckpt.commit import remove_stale_partials
from lightning_ckpt.discovery import list_committed
from lightning_ckpt.dist import Exchange
from lightning_ckpt.errors import CheckpointNotFoundError, ConfigError, FolderConflictError
from lightning_ckpt.interval import AgreementCadence, Event, SavePoint, SaveSchedule, parse_save_interval
from lightning_ckpt.layout import NameFormat
from lightning_ckpt.plugin import ShardedCheckpointIO
from lightning_ckpt.policies import CheckpointRecord, build_retention_policy
from lightning_ckpt.rotation import METRIC_KEY, check_writable, delete_checkpoints, rotate, scan_records
from lightning_ckpt.storage import Storage
from lightning_ckpt.tree import drop_paths
from lightning_ckpt.upload import UploadJob

__all__ = ["CheckpointSaver"]

log = logging.getLogger("lightning_ckpt")

IgnoreKeys = Sequence[str] | Callable[[dict[str, Any]], None] | None


def _check_bool(argument: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(argument, value, "True or False")
    return value


def _check_ignore_keys(value: object) -> IgnoreKeys:
    if value is None or callable(value):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ConfigError(
        "ignore_keys",
        value,
        "['state_dict/head.*', 'optimizer_states'] or a callable that edits the checkpoint dict",
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
    ) -> None:
        if remote_file_name is not None or latest_remote_file_name is not None:
            folder, filename, latest_filename, local_folder = _composer_remote_names(
                folder, filename, latest_filename, local_folder, remote_file_name, latest_remote_file_name
            )
        if folder is not None and not isinstance(folder, (str, os.PathLike)):
            raise ConfigError("folder", folder, "'/data/runs/{run_name}/checkpoints'")
        folder_text = os.fspath(folder) if folder is not None else None
        self.folder = (
            NameFormat(folder_text, argument="folder", allow_progress=False, allow_metrics=False)
            if folder_text is not None
            else None
        )
        self.filename = NameFormat(filename, argument="filename")
        if "/" in filename or "\\" in filename:
            raise ConfigError(
                "filename", filename, "'ep{epoch}-ba{batch}'", "one checkpoint is one directory in folder"
            )
        if latest_filename is not None and (not isinstance(latest_filename, str) or "/" in latest_filename):
            raise ConfigError("latest_filename", latest_filename, "'latest', 'latest-rank{rank}' or None")
        self.latest_filename = (
            NameFormat(latest_filename, argument="latest_filename", allow_progress=False, allow_metrics=False)
            if latest_filename is not None
            else None
        )
        self.save_interval: SaveSchedule = parse_save_interval(save_interval)
        self.overwrite = _check_bool("overwrite", overwrite)
        self.weights_only = _check_bool("weights_only", weights_only)
        self.async_save = _check_bool("async_save", async_save)
        self.ignore_keys = _check_ignore_keys(ignore_keys)
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ConfigError("monitor", monitor, "'val_loss'")
        if num_best_to_keep not in (None, 0) and monitor is None:
            raise ConfigError("num_best_to_keep", num_best_to_keep, "0, or set monitor='val_loss'", "it needs monitor")
        best = (1 if monitor else 0) if num_best_to_keep is None else num_best_to_keep
        self.retention = build_retention_policy(
            num_checkpoints_to_keep=num_checkpoints_to_keep,
            keep_every_n_steps=keep_every_n_steps,
            num_best_to_keep=best,
            mode=mode,
        )
        self.monitor = monitor
        self.mode = mode
        self._best_k = best
        if run_name is not None and (not isinstance(run_name, str) or not layout.is_plain_name(run_name)):
            raise ConfigError("run_name", run_name, "'llama-ft-7'")
        self.run_name = run_name or _lightning.default_run_name()
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise ConfigError("storage_options", "<hidden>", "{'key': ..., 'secret': ..., 'client_kwargs': {...}}",
                              f"It must be a dict of fsspec options, not {type(storage_options).__name__}")  # fmt: skip
        self.storage_options = dict(storage_options or {})
        self.local_folder = os.fspath(local_folder) if local_folder is not None else None
        for argument, value in (("num_concurrent_uploads", num_concurrent_uploads),
                                ("upload_timeout_in_seconds", upload_timeout_in_seconds)):  # fmt: skip
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ConfigError(argument, value, "4" if argument.startswith("num") else "3600")
        self.num_concurrent_uploads = num_concurrent_uploads
        self.upload_timeout_in_seconds = upload_timeout_in_seconds
        self._records: list[CheckpointRecord] = []
        self._last_saved_step: int | None = None
        self._resumed_from: str | None = None
        self._io: ShardedCheckpointIO | None = None
        _lightning.install_last_resolver()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled in a ``ddp_spawn`` worker: a fresh interpreter needs the ``"last"`` hook too."""
        self.__dict__.update(state)
        _lightning.install_last_resolver()

    @property
    @override
    def state_key(self) -> str:
        """Distinct per folder and filename, so several savers in one trainer keep separate state."""
        folder = self.folder.pattern if self.folder else None
        return self._generate_state_key(folder=folder, filename=self.filename.pattern)

    # -- where -----------------------------------------------------------------------------------
    def folder_path(self, trainer: Trainer) -> str:
        """This rank's checkpoint folder, with every variable filled in."""
        if self.folder is None:
            return os.path.join(trainer.default_root_dir, "checkpoints", self.run_name)
        return self.folder.render(run_name=self.run_name, rank=_lightning.rank_info(trainer))

    def _storage(self, trainer: Trainer) -> tuple[Storage, str]:
        return Storage.open(self.folder_path(trainer), self.storage_options)

    def newest_committed(self, trainer: Trainer) -> tuple[str, float] | None:
        """``(path, commit time)`` of the newest committed checkpoint of this saver, or ``None``."""
        storage, folder = self._storage(trainer)
        if storage.isfile(folder):
            raise ConfigError("folder", self.folder_path(trainer), "a directory path", "it is an existing file")
        self._upload_leftovers(trainer, storage, folder)
        mine = [(n, m) for n, m in list_committed(storage, folder) if self._is_mine(n, trainer)]
        if not mine:
            return None
        name, manifest = mine[-1]
        if trainer.world_size > 1:  # the process group is not up yet: ranks agree in setup()
            self._agree_in_setup = True
            return storage.url(folder), manifest.created
        return storage.url(storage.join(folder, name)), manifest.created

    def _agree_on_last(self, trainer: Trainer, io: ShardedCheckpointIO) -> None:
        """Every rank resumes from the newest step that *every* rank has committed (node-local disks
        can differ if a job died mid-commit); each rank loads its own checkpoint of that step."""
        storage, folder = self._storage(trainer)
        mine = {m.global_step: n for n, m in list_committed(storage, folder) if self._is_mine(n, trainer)}
        exchange = Exchange.current(prefix=f"saver-{self.state_key}/last", timeout_s=io.barrier_timeout_s)
        views = exchange.barrier("committed-steps", payload=sorted(mine))
        common = set.intersection(*(set(view) for view in views.values()))
        if not common:
            raise CheckpointNotFoundError(
                f'ckpt_path="last": no step is committed on every rank (this rank\'s folder {storage.url(folder)}'
                f" has steps {sorted(mine)}); resume from an explicit checkpoint or a folder every rank can read"
            )
        io.redirect(storage.url(folder), storage.url(storage.join(folder, mine[max(common)])))

    def _is_mine(self, name: str, trainer: Trainer) -> bool:
        """A checkpoint this saver on this rank wrote: the name parses, with this rank's dist values."""
        parsed = self.filename.parse(name)
        if parsed is None:
            return False
        own = layout.dist_values(self.run_name, _lightning.rank_info(trainer))
        return all(parsed[key] == value for key, value in own.items() if key in parsed)

    @property
    def best_model_path(self) -> str:
        """Path of the best checkpoint by ``monitor`` (``""`` without one), for ``ckpt_path="best"``."""
        scored = [r for r in self._records if r.metric is not None]
        if not scored or self._folder is None:
            return self._best_from_workers
        pick = min if self.mode == "min" else max
        return os.path.join(self._folder, pick(scored, key=lambda r: r.metric or 0.0).name)

    @best_model_path.setter
    def best_model_path(self, path: str) -> None:
        """Lightning's ``ddp_spawn`` launcher hands the workers' answer back to the main process."""
        self._best_from_workers = path

    _folder: str | None = None
    _cadence = AgreementCadence(None)
    _agree_in_setup: bool = False
    _leftovers_done: bool = False
    _io_trainer: int = 0
    _best_from_workers: str = ""

    # -- Lightning hooks -------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        storage, folder = self._storage(trainer)
        if storage.isfile(folder):
            raise ConfigError("folder", self.folder_path(trainer), "a directory path", "it is an existing file")
        self._folder = folder
        self._io = self._plugin(trainer)
        if not storage.is_local:
            check_writable(storage, folder)
            self._upload_leftovers(trainer, storage, folder)
        if self._agree_in_setup:
            self._agree_in_setup = False
            self._agree_on_last(trainer, self._io)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        storage, folder = self._storage(trainer)
        if trainer.local_rank == 0:  # before any save of this run: what is staged now was left by a killed run
            for name in remove_stale_partials(storage, folder):
                log.info("Removed %s, left by an interrupted save", storage.url(storage.join(folder, name)))
        self._records = [r for r in scan_records(storage, folder, self.filename) if self._is_mine(r.name, trainer)]
        loaded = self._io.loaded_path if self._io is not None and trainer.ckpt_path else None
        resumed = loaded or (str(trainer.ckpt_path) if trainer.ckpt_path else None)
        self._resumed_from = os.path.basename(os.path.normpath(resumed)) if resumed else None
        start = _lightning.resume_step(trainer)
        newer = [r.name for r in self._records if r.step > start]
        if newer and not self.overwrite:
            raise FolderConflictError(
                f"folder {storage.url(folder)!r} already holds checkpoints newer than step {start}"
                f" ({', '.join(newer[:5])}). Resume with trainer.fit(..., ckpt_path='last'), pass"
                " CheckpointSaver(overwrite=True) to save over them, or choose another folder."
            )
        self.save_interval.start(time.monotonic())
        self._cadence = AgreementCadence(self.save_interval.agreement_granularity_s)
        self._cadence.start(trainer.global_step, time.monotonic())

    def _plugin(self, trainer: Trainer) -> ShardedCheckpointIO:
        """The plugin this saver writes through for ``trainer``, with this saver's remote settings (made once)."""
        if self._io is None or self._io_trainer != id(trainer):
            io = _lightning.use_checkpoint_io(trainer, ShardedCheckpointIO, ShardedCheckpointIO)
            if not self._storage(trainer)[0].is_local:
                io.storage_options = {**io.storage_options, **self.storage_options}
                if self.num_concurrent_uploads is not None:
                    io.num_concurrent_uploads = int(self.num_concurrent_uploads)
                if self.upload_timeout_in_seconds is not None:
                    io.upload_timeout_s = float(self.upload_timeout_in_seconds)
            self._io, self._io_trainer = io, id(trainer)
        return self._io

    def _upload_leftovers(self, trainer: Trainer, storage: Storage, folder: str) -> None:
        """Upload (and wait for) checkpoints an earlier run committed locally but did not get into the store.

        Runs once, on global rank 0, before ``"last"`` is resolved, so a restart resumes from them.
        """
        if self._leftovers_done or storage.is_local or not trainer.is_global_zero:
            return
        self._leftovers_done = True
        io = self._plugin(trainer)
        local_root = self.local_folder or io.cache_for(storage.url(folder), "uploads")
        in_store = {name for name, _ in list_committed(storage, folder)}
        local_storage, root = Storage.open(local_root)
        uploader = io.uploader(storage.url(folder))
        for name, manifest in list_committed(local_storage, root):
            if name in in_store or self.filename.parse(name) is None:
                continue
            log.info("Uploading %s, committed locally by an earlier run but not in %s", name, storage.url(folder))
            job = UploadJob(local_dir=os.path.join(root, name), name=name, files=[f.name for f in manifest.files],
                            commit=True)  # fmt: skip
            uploader.submit(job)
        uploader.wait()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        self._maybe_save(trainer, Event.BATCH_END)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_save(trainer, Event.EPOCH_END)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._io is not None:
            self._io.wait_for_save()
            self._io.wait_for_uploads()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "saved": [r.__dict__.copy() for r in self._records],
            "last_saved_step": self._last_saved_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._records = [CheckpointRecord(**r) for r in state_dict.get("saved", [])]
        self._last_saved_step = state_dict.get("last_saved_step")

    # -- saving ----------------------------------------------------------------------------------
    def _maybe_save(self, trainer: Trainer, event: Event) -> None:
        step = trainer.global_step
        if step == self._last_saved_step or trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        schedule = self.save_interval
        if schedule.needs_agreement and trainer.world_size > 1:
            at_batch = event is Event.BATCH_END
            if at_batch and not self._cadence.is_check_step(step):  # between agreements: no collective, no clock
                return
            point = SavePoint(event=event, epoch=trainer.current_epoch, batch=step)
            now = time.monotonic()

            def decide() -> tuple[bool, int | None]:
                return schedule.is_due(point, trainer, now), self._cadence.next_check(step, now) if at_batch else None

            due, next_check = _lightning.decide_on_rank_zero(trainer, decide)
            if next_check is not None:
                self._cadence.adopt(next_check)
        else:
            point = SavePoint(event=event, epoch=trainer.current_epoch, batch=step)
            now = time.monotonic()
            due = schedule.is_due(point, trainer, now)
        if due:
            self.save(trainer)
            self.save_interval.mark_saved(point, now)

    def save(self, trainer: Trainer) -> str:
        """Save a checkpoint now, move ``latest``, and rotate; returns the committed path."""
        storage, folder = self._storage(trainer)
        progress = _lightning.progress(trainer)
        name = self.filename.render(run_name=self.run_name, rank=_lightning.rank_info(trainer), progress=progress)
        if not self.overwrite and any(r.name == name for r in self._records):
            raise FolderConflictError(
                f"{storage.url(storage.join(folder, name))} already exists; pass CheckpointSaver(overwrite=True)"
                " or a filename that includes {batch}"
            )
        metric = progress.metrics.get(self.monitor) if self.monitor else None
        record = CheckpointRecord(name=name, epoch=progress.epoch, step=progress.batch, metric=metric)
        self._records = [r for r in self._records if r.name != name] + [record]
        self._last_saved_step = progress.batch
        checkpoint = _lightning.dump_checkpoint(trainer, self.weights_only)
        if callable(self.ignore_keys):
            self.ignore_keys(checkpoint)
        elif self.ignore_keys:
            drop_paths(checkpoint, self.ignore_keys)
        assert self._io is not None, "CheckpointSaver.save() runs inside trainer.fit()"
        rank = _lightning.rank_info(trainer)
        latest = self.latest_filename.render(run_name=self.run_name, rank=rank) if self.latest_filename else None
        protected = {self._resumed_from} if self._resumed_from else set()
        doomed = rotate(storage, folder, self._records, self.retention, protected=protected, delete=False)
        result = self._io.save_collective(
            checkpoint,
            storage.url(storage.join(folder, name)),
            latest_filename=latest,
            metadata={METRIC_KEY: metric} if metric is not None else {},
            local_folder=self.local_folder,
            after_commit=functools.partial(delete_checkpoints, storage, folder, doomed),  # where it is kept
            async_save=self.async_save,
        )
        return result.path

    @property
    def saved_checkpoints(self) -> list[str]:
        """Names of the checkpoints this saver currently keeps, oldest first."""
        return [r.name for r in self._records]

    def __repr__(self) -> str:
        folder = self.folder.pattern if self.folder else "<default_root_dir>/checkpoints/{run_name}"
        return (
            f"CheckpointSaver(folder={folder!r}, filename={self.filename.pattern!r},"
            f" save_interval={self.save_interval!r})"
        )


def _composer_remote_names(
    folder: str | os.PathLike[str] | None,
    filename: str,
    latest_filename: str | None,
    local_folder: str | os.PathLike[str] | None,
    remote_file_name: str | None,
    latest_remote_file_name: str | None,
) -> tuple[str, str, str | None, str | os.PathLike[str] | None]:
    """Translate Composer's ``remote_file_name`` / ``latest_remote_file_name`` into folder, names, local folder."""
    example = "'s3://bucket/{run_name}/ep{epoch}-ba{batch}'"
    if remote_file_name is None:
        raise ConfigError("latest_remote_file_name", latest_remote_file_name, "None", "it needs remote_file_name")
    if not isinstance(remote_file_name, str) or "://" not in remote_file_name or remote_file_name.endswith("/"):
        raise ConfigError("remote_file_name", remote_file_name, example, "It must be the URL of one checkpoint")
    remote_folder, _, name = remote_file_name.rpartition("/")
    if filename not in (layout.DEFAULT_FILENAME, name):
        raise ConfigError(
            "filename", filename, repr(name), "With remote_file_name, one name serves locally and remotely"
        )
    latest = latest_filename
    if latest_remote_file_name is not None:
        latest_folder, _, latest = latest_remote_file_name.rpartition("/")
        if latest_folder != remote_folder:
            raise ConfigError(
                "latest_remote_file_name",
                latest_remote_file_name,
                repr(f"{remote_folder}/latest"),
                "The pointer must sit in the same remote directory as the checkpoints",
            )
        latest = latest.removesuffix(layout.POINTER_SUFFIX)
    if local_folder is not None:
        raise ConfigError("local_folder", local_folder, "None", "with remote_file_name, folder is the local folder")
    return remote_folder, name, latest, folder
