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
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_ckpt import _lightning, layout
from lightning_ckpt.commit import remove_leftovers
from lightning_ckpt.discovery import list_committed
from lightning_ckpt.dist import Exchange
from lightning_ckpt.errors import CheckpointNotFoundError, ConfigError, FolderConflictError, FolderInUseError
from lightning_ckpt.interval import (
    AgreementCadence,
    Event,
    EveryNEpochs,
    SavePoint,
    SaveSchedule,
    parse_save_interval,
)
from lightning_ckpt.layout import NameFormat
from lightning_ckpt.lock import FolderLock
from lightning_ckpt.plugin import ShardedCheckpointIO
from lightning_ckpt.policies import AnyOf, CheckpointRecord, KeepBest, best_records, build_retention_policy
from lightning_ckpt.preemption import DEFAULT_SIGNALS, PREEMPTION_CHECK_S, PreemptionWatch, parse_signals
from lightning_ckpt.reader import read_manifest
from lightning_ckpt.rotation import METRIC_KEY, RUN_ID_KEY, check_writable, delete_checkpoints, rotate, scan_records
from lightning_ckpt.storage import Storage, check_storage_options, check_url, is_url
from lightning_ckpt.transfer import DEFAULT_POLICY
from lightning_ckpt.tree import drop_paths
from lightning_ckpt.upload import UploadJob

__all__ = ["CheckpointSaver"]

log = logging.getLogger("lightning_ckpt")

IgnoreKeys = Sequence[str] | Callable[[dict[str, Any]], None] | None

_FIXED = (
    "CheckpointSaver.{name} is fixed at construction (the retention policy ranks by it): pass"
    " CheckpointSaver(..., {name}={value!r}) instead of setting it afterwards"
)


def _check_bool(argument: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(argument, value, "True or False")
    return value


def _check_names_differ(
    filename: NameFormat,
    schedule: SaveSchedule,
    given: object,
    overwrite: bool,
    shown_as: tuple[str, object, str] | None,
) -> None:
    """Refuse a ``filename`` that gives two saves of this schedule the same name (unless ``overwrite``), before
    training: otherwise the second save fails with ``FolderConflictError`` after a whole interval of training."""
    names = filename.placeholders
    if overwrite or "batch" in names or {"epoch", "batch_in_epoch"} <= names:
        return
    if "epoch" in names and isinstance(schedule, EveryNEpochs):
        return
    per = "epoch" if "epoch" in names else "run"
    raise ConfigError(
        *(shown_as or ("filename", filename.pattern, "'ep{epoch}-ba{batch}'")),
        f"With save_interval={given!r} two saves of one {per} would get the same name and the second would"
        " fail with FolderConflictError; include {batch} (the global step) in the name, or pass overwrite=True"
        " to replace the checkpoint of that name at every save",
    )


def _check_name_format(
    pattern: object, argument: str, *, shown_as: tuple[str, object, str] | None = None, **kwargs: bool
) -> NameFormat:
    """``NameFormat(pattern)``; with ``shown_as=(argument, value, example)`` its errors name what the user typed
    (Composer's ``remote_file_name`` is split into a folder and a name before they are parsed)."""
    try:
        return NameFormat(pattern, argument=argument, **kwargs)  # type: ignore[arg-type]
    except ConfigError as err:
        if shown_as is None:
            raise
        raise ConfigError(shown_as[0], shown_as[1], shown_as[2], err.reason) from None


def _check_count(argument: str, value: object, example: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(argument, value, example, "It must be an int >= 1")


def _check_seconds(argument: str, value: object, example: str) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf")
    ):
        raise ConfigError(argument, value, example, "It must be a positive, finite number of seconds")


def _check_local_folder(value: object, argument: str, run_name: str) -> str | None:
    """The local folder with ``{run_name}`` filled in; the ranks of a node share it, so no rank variables."""
    if value is None:
        return None
    example = "'/local/nvme/{run_name}/checkpoints'"
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ConfigError(argument, value, example, "It must be a local directory path")
    text = os.fspath(value)
    if is_url(text):
        raise ConfigError(argument, text, example, "It must be a local directory path, not a URL")
    pattern = _check_name_format(text, argument, allow_progress=False, allow_metrics=False)
    if pattern.placeholders - {"run_name"}:
        others = sorted(pattern.placeholders - {"run_name"})
        raise ConfigError(argument, text, example, f"Only {{run_name}} can be used here, not {{{others[0]}}}")
    return pattern.render(run_name=run_name)


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
        lock_folder: hold a lock on ``folder`` for the whole fit, so a second run pointed at the same
            folder is refused before training (:class:`~lightning_ckpt.errors.FolderInUseError`). With
            ``False`` runs may share a folder; each still rotates only its own checkpoints.
        preemption_signals: signals that announce preemption (default ``SIGTERM`` and ``SIGUSR1``,
            what Kubernetes and SLURM send); ``None`` leaves signals to Lightning. On one, the saver
            saves at the next step boundary, waits for the commit and uploads, and ends the process
            cleanly (see :mod:`lightning_ckpt.preemption`).

    Example:
        >>> import tempfile, lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_ckpt import CheckpointSaver
        >>> saver = CheckpointSaver(tempfile.mkdtemp(), save_interval="2ba", num_checkpoints_to_keep=2, run_name="demo")
        >>> L.Trainer(max_steps=6, callbacks=[saver], logger=False, enable_progress_bar=False).fit(BoringModel())
        >>> saver.saved_checkpoints  # ep0-ba2 was rotated away
        ['ep0-ba4', 'ep0-ba6']
        >>> restarted = L.Trainer(max_steps=8, callbacks=[saver], logger=False, enable_progress_bar=False)
        >>> restarted.fit(BoringModel(), ckpt_path="last")  # continues from ep0-ba6
        >>> saver.saved_checkpoints
        ['ep0-ba6', 'ep0-ba8']
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
        preemption_signals: Sequence[str | int] | None = DEFAULT_SIGNALS,
    ) -> None:
        remote: tuple[str, object, str] | None = None  # Composer's remote_file_name: errors name it
        local_argument = "local_folder"
        if remote_file_name is not None or latest_remote_file_name is not None:
            remote = ("remote_file_name", remote_file_name, "'s3://bucket/{run_name}/ep{epoch}-ba{batch}'")
            if latest_remote_file_name is not None and (
                not isinstance(latest_remote_file_name, str)
                or "://" not in latest_remote_file_name
                or latest_remote_file_name.endswith("/")
            ):
                where = remote_file_name.rpartition("/")[0] if isinstance(remote_file_name, str) else ""
                example = (
                    f"{where + '/latest'!r} or None" if "://" in where else "'s3://bucket/{run_name}/latest' or None"
                )
                reason = "It must be the URL of the pointer file"
                raise ConfigError("latest_remote_file_name", latest_remote_file_name, example, reason)
            folder, filename, latest_filename, local_folder = _composer_remote_names(
                folder, filename, latest_filename, local_folder, remote_file_name, latest_remote_file_name
            )
            local_argument = "folder"  # with remote_file_name, folder is the local folder
        folder_example = "'/data/runs/{run_name}/checkpoints' or 's3://bucket/{run_name}/checkpoints'"
        if folder is not None and (not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder)):
            raise ConfigError("folder", folder, folder_example)
        folder_text = os.fspath(folder) if folder is not None else None
        if remote is not None:
            check_url(str(remote[1]), remote[0], remote[2])
        elif folder_text is not None:
            check_url(folder_text, "folder", folder_example)
        self.folder = (
            _check_name_format(folder_text, "folder", shown_as=remote, allow_progress=False, allow_metrics=False)
            if folder_text is not None
            else None
        )
        self.filename = _check_name_format(filename, "filename", shown_as=remote)
        if not layout.is_plain_name(filename) or filename.startswith(".") or filename.endswith(layout.POINTER_SUFFIX):
            reason = (
                "One checkpoint is one directory in folder, and names starting with '.' or ending with"
                f" {layout.POINTER_SUFFIX!r} are skipped by readers (they could never be resumed from)"
            )
            raise ConfigError(*(remote or ("filename", filename, "'ep{epoch}-ba{batch}'")), reason)
        if latest_filename is not None and (
            not isinstance(latest_filename, str) or not layout.is_plain_name(latest_filename)
        ):
            example = "'latest' or None (one pointer per rank: 'latest-rank{rank}', with {rank} in filename too)"
            raise ConfigError("latest_filename", latest_filename, example)
        self.latest_filename = (
            NameFormat(latest_filename, argument="latest_filename", allow_progress=False, allow_metrics=False)
            if latest_filename is not None
            else None
        )
        if self.latest_filename is not None:
            per_rank = (self.folder.placeholders if self.folder else frozenset()) | self.filename.placeholders
            for variable, enough in (("rank", {"rank"}), ("local_rank", {"rank", "local_rank"})):
                if variable in self.latest_filename.placeholders and not enough & per_rank:
                    raise ConfigError(
                        "latest_filename",
                        latest_filename,
                        "'latest', or keep it and add {rank} to filename: 'ep{epoch}-ba{batch}-rank{rank}'",
                        f"It names a pointer per rank with {{{variable}}}, but neither folder nor filename"
                        f" contains {{{variable}}}: the ranks then save one shared checkpoint, whose pointer"
                        " only the committing rank writes, so the other ranks' pointers would never exist",
                    )
        self.save_interval: SaveSchedule = parse_save_interval(save_interval)
        self.overwrite = _check_bool("overwrite", overwrite)
        _check_names_differ(self.filename, self.save_interval, save_interval, self.overwrite, shown_as=remote)
        self.weights_only = _check_bool("weights_only", weights_only)
        self.async_save = _check_bool("async_save", async_save)
        self.lock_folder = _check_bool("lock_folder", lock_folder)
        self.preemption_signals = parse_signals(preemption_signals, "preemption_signals")
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
        self._monitor = monitor
        self._unranked_mode = mode  # ``mode`` when the policy keeps none by metric
        if run_name is not None and (not isinstance(run_name, str) or not layout.is_plain_name(run_name)):
            raise ConfigError("run_name", run_name, "'llama-ft-7'")
        self.run_name = run_name or _lightning.default_run_name()
        if (
            self.latest_filename is not None
            and self.filename.parse(self.latest_filename.render(run_name=self.run_name)) is not None
        ):
            raise ConfigError("latest_filename", latest_filename, "'newest' or None",
                              f"It would have the name of a checkpoint (filename={filename!r})")  # fmt: skip
        remote_folder = folder_text if folder_text is not None and is_url(folder_text) else None
        self.storage_options = check_storage_options(storage_options, remote_folder)  # values never shown
        self.local_folder = _check_local_folder(local_folder, local_argument, self.run_name)
        _check_count("num_concurrent_uploads", num_concurrent_uploads, "4")
        _check_seconds("upload_timeout_in_seconds", upload_timeout_in_seconds, "3600")
        self.num_concurrent_uploads = num_concurrent_uploads
        self.upload_timeout_in_seconds = upload_timeout_in_seconds
        self._records: list[CheckpointRecord] = []
        self._warned: set[tuple[str, str]] = set()  # (argument, metric) already warned about
        self._resumed_from: str | None = None
        self._io: ShardedCheckpointIO | None = None
        self._run_id: str | None = None
        self._lock: FolderLock | None = None
        self._preemption = PreemptionWatch(self.preemption_signals)
        _lightning.install_last_resolver()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for a ``ddp_spawn`` worker: the weak reference to the trainer stays behind."""
        state = self.__dict__.copy()
        state.pop("_io_trainer", None)
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
        folder = self.folder.pattern if self.folder else None
        return self._generate_state_key(folder=folder, filename=self.filename.pattern)

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
        if self.folder is None:
            return os.path.join(trainer.default_root_dir, "checkpoints", self.run_name)
        return self.folder.render(run_name=self.run_name, rank=_lightning.rank_info(trainer))

    def _storage(self, trainer: Trainer) -> tuple[Storage, str]:
        return Storage.open(self.folder_path(trainer), self.storage_options)

    def newest_committed(self, trainer: Trainer) -> tuple[str, float] | None:
        """``(path, commit time)`` of the newest committed checkpoint of this saver, or ``None``.

        This is what ``ckpt_path="last"`` resumes from (checkpoints that do not verify are skipped then).

        Example:
            >>> import os, tempfile, lightning as L
            >>> from lightning.pytorch.demos.boring_classes import BoringModel
            >>> from lightning_ckpt import CheckpointSaver
            >>> saver = CheckpointSaver(tempfile.mkdtemp(), save_interval="1ba", run_name="demo")
            >>> trainer = L.Trainer(max_steps=2, callbacks=[saver], logger=False, enable_progress_bar=False)
            >>> trainer.fit(BoringModel())
            >>> path, committed_at = saver.newest_committed(trainer)
            >>> os.path.basename(path)
            'ep0-ba2'
        """
        storage, folder = self._storage(trainer)
        if storage.isfile(folder):
            raise ConfigError("folder", self.folder_path(trainer), "a directory path", "it is an existing file")
        self._plugin(trainer)
        self._upload_leftovers(trainer, storage, folder)
        mine = [(n, m) for n, m in list_committed(storage, folder) if self._is_mine(n, trainer)]
        if not mine and not storage.is_local and trainer.world_size > 1:
            # Global rank 0 may be uploading checkpoints a killed run committed only on this node's
            # disk: count them, so every rank of the node asks for "last" and ranks agree in setup().
            local, root = Storage.open(self._local_root(storage, folder))
            mine = [(n, m) for n, m in list_committed(local, root) if self._is_mine(n, trainer)]
        if not mine:
            return None
        newest = mine[-1][1]
        if trainer.world_size > 1:  # the process group is not up yet: ranks agree in setup()
            self._agree_in_setup = True
            return storage.url(folder), newest.created
        # Newest first: the plugin falls back to the next one if a checkpoint does not verify.
        candidates = [storage.url(storage.join(folder, n)) for n, _ in reversed(mine)]
        self._plugin(trainer).redirect(candidates[0], candidates)
        return candidates[0], newest.created

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
        steps = sorted(common, reverse=True)  # the same list on every rank: ranks fall back together
        io.redirect(storage.url(folder), [storage.url(storage.join(folder, mine[step])) for step in steps])

    def _is_mine(self, name: str, trainer: Trainer) -> bool:
        """A checkpoint this saver on this rank wrote: the name parses, with this rank's dist values."""
        parsed = self.filename.parse(name)
        if parsed is None:
            return False
        own = layout.dist_values(self.run_name, _lightning.rank_info(trainer))
        return all(parsed[key] == value for key, value in own.items() if key in parsed)

    @property
    def monitor(self) -> str | None:
        """The logged metric checkpoints are ranked by (``None``: none), as given; read-only.

        Example:
            >>> from lightning_ckpt import CheckpointSaver
            >>> CheckpointSaver("/data/runs/a", monitor="val_loss", run_name="demo").monitor
            'val_loss'
        """
        return self._monitor

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
        parts = self.retention.policies if isinstance(self.retention, AnyOf) else (self.retention,)
        return next((p.mode for p in parts if isinstance(p, KeepBest)), self._unranked_mode)

    @mode.setter
    def mode(self, value: object) -> None:
        raise AttributeError(_FIXED.format(name="mode", value=value))

    @property
    def best_model_path(self) -> str:
        """Path of the best checkpoint by ``monitor`` (``""`` without one), for ``ckpt_path="best"``.

        Example:
            >>> import os, tempfile
            >>> from lightning_ckpt import CheckpointSaver
            >>> from lightning_ckpt.demo import TinyRegressor, build_trainer  # it logs "train_loss"
            >>> saver = CheckpointSaver(tempfile.mkdtemp(), save_interval="1ba", monitor="train_loss", run_name="demo")
            >>> trainer = build_trainer(tempfile.mkdtemp(), max_steps=3, callbacks=[saver])
            >>> trainer.fit(TinyRegressor())
            >>> os.path.basename(saver.best_model_path) in saver.saved_checkpoints
            True
        """
        best = best_records(self._records, self.mode, 1)  # the rule KeepBest keeps by: NaN is never best
        if not best or self._folder is None:
            return self._best_from_workers
        return os.path.join(self._folder, best[0].name)

    @best_model_path.setter
    def best_model_path(self, path: str) -> None:
        """Lightning's ``ddp_spawn`` launcher hands the workers' answer back to the main process."""
        self._best_from_workers = path

    _folder: str | None = None
    _cadence = AgreementCadence(None)
    _agree_in_setup: bool = False
    _leftovers_done: bool = False
    _io_trainer: weakref.ref[Trainer] | None = None  # the trainer ``_io`` belongs to (ids get reused)
    _best_from_workers: str = ""
    _foreign: frozenset[str] | set[str] = frozenset()
    _preemption_cadence = AgreementCadence(PREEMPTION_CHECK_S)

    # -- Lightning hooks -------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the folder (a file, or a read-only folder, fails here, before training), choose the plugin,
        take the folder lock for a fit, upload checkpoints an earlier run committed only locally, and let the
        ranks agree on ``ckpt_path="last"``."""
        storage, folder = self._storage(trainer)
        if storage.isfile(folder):
            raise ConfigError("folder", self.folder_path(trainer), "a directory path", "it is an existing file")
        self._folder = folder
        self._io = self._plugin(trainer)
        if not storage.is_local or stage == "fit":  # a read-only folder fails here, before training (once a fit)
            check_writable(storage, folder)
        if stage == "fit":  # only a fit saves: evaluating a live run's checkpoints is never refused
            self._claim_folder(trainer, storage, folder)
        if not storage.is_local:
            self._upload_leftovers(trainer, storage, folder)
        if self._agree_in_setup:
            self._agree_in_setup = False
            self._agree_on_last(trainer, self._io)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove what interrupted saves left, adopt the resumed run's id and checkpoints (for rotation),
        refuse a folder with newer checkpoints unless ``overwrite``, and start the schedule's clock."""
        _lightning.check_strategy_savable(trainer)  # a strategy whose saves would be refused: before any training
        storage, folder = self._storage(trainer)
        if self.lock_folder:  # this run owns the folder: nothing else is saving there
            self._remove_leftovers(trainer, storage, folder)
        loaded = self._io.loaded_path if self._io is not None and trainer.ckpt_path else None
        resumed = loaded or (str(trainer.ckpt_path) if trainer.ckpt_path else None)
        self._resumed_from = os.path.basename(os.path.normpath(resumed)) if resumed else None
        self._run_id = self._lineage(trainer, loaded)
        named = [r for r in scan_records(storage, folder, self.filename) if self._is_mine(r.name, trainer)]
        damaged = {storage.basename(u.rstrip("/")) for u in (self._io.skipped if self._io is not None else [])}
        if damaged:  # "last" fell back past them: this run saves over them instead of refusing to start
            log.warning("Checkpoints that do not verify will be replaced as this run saves: %s", sorted(damaged))
            named = [r for r in named if r.name not in damaged]
        self._records = [r for r in named if r.run_id in (None, self._run_id)]  # other runs' are never rotated
        self._foreign = {r.name for r in named if r.run_id not in (None, self._run_id)}
        start = _lightning.resume_step(trainer)
        newer = [r.name for r in named if r.step > start]
        if newer and not self.overwrite:
            raise FolderConflictError(
                f"folder {storage.url(folder)!r} already holds checkpoints newer than step {start}"
                f" ({', '.join(newer[:5])}). Resume with trainer.fit(..., ckpt_path='last'), pass"
                " CheckpointSaver(overwrite=True) to save over them, or choose another folder."
            )
        self.save_interval.start(time.monotonic())
        self._cadence = AgreementCadence(self.save_interval.agreement_granularity_s)
        self._cadence.start(trainer.global_step, time.monotonic())
        self._preemption_cadence = AgreementCadence(PREEMPTION_CHECK_S)
        self._preemption_cadence.start(trainer.global_step, time.monotonic())

    def _warn_missing_metrics(self, progress: layout.Progress, step: int) -> None:
        """Warn once per metric that ``filename`` or ``monitor`` names but that is not logged at a save.

        The name shows ``nan`` for it and the save happens: a name never costs the run or the checkpoint.
        ``ModelCheckpoint`` raises for an unlogged ``monitor``; this saver keeps training and keeps the
        checkpoint, ranked by recency only until the metric appears.
        """
        logged = sorted(progress.metrics)
        for metric in self.filename.missing_metrics(progress):
            if ("filename", metric) not in self._warned:
                self._warned.add(("filename", metric))
                rank_zero_warn(
                    f"CheckpointSaver(filename={self.filename.pattern!r}): metric {metric!r} is not logged at the save"
                    f" of step {step}; its place in the name shows 'nan'. Logged metrics: {logged}. Log it before"
                    f" the save (self.log({metric!r}, ...)) or use one of the logged names."
                )
        if self.monitor and self.monitor not in progress.metrics and ("monitor", self.monitor) not in self._warned:
            self._warned.add(("monitor", self.monitor))
            rank_zero_warn(
                f"CheckpointSaver(monitor={self.monitor!r}): the metric is not logged at the save of step {step},"
                f" so this checkpoint cannot be ranked as best. Logged metrics: {logged}. Log it before the save"
                f" (self.log({self.monitor!r}, ...), e.g. in validation_step) or change monitor."
            )

    def _remove_leftovers(self, trainer: Trainer, storage: Storage, folder: str) -> None:
        """Before this run's first save: delete what killed saves, uploads and rotations left behind."""
        places = []
        if storage.is_local and trainer.local_rank == 0:
            places.append((storage, folder))
        if not storage.is_local:
            if trainer.is_global_zero:
                places.append((storage, folder))
            if trainer.local_rank == 0:
                places.append(Storage.open(self._local_root(storage, folder)))
        for where, root in places:
            for name in remove_leftovers(where, root, lambda n: self._is_mine(n, trainer)):
                log.info("Removed %s, left by an interrupted save", where.url(where.join(root, name)))

    def _local_root(self, storage: Storage, folder: str) -> str:
        """Where checkpoints of a remote ``folder`` are committed locally before upload."""
        assert self._io is not None, "the plugin is chosen before checkpoints are looked up"
        return self.local_folder or self._io.cache_for(storage.url(folder), "uploads")

    def _claim_folder(self, trainer: Trainer, storage: Storage, folder: str) -> None:
        """Global rank 0 takes the folder's lock; every rank learns the outcome, so all fail together."""
        if not self.lock_folder or self._lock is not None:
            return
        self._refuse_a_sibling_in_my_folder(trainer, storage.url(folder))
        refusal = None
        if trainer.is_global_zero:
            try:
                policy = self._io.upload_retry if self._io is not None else DEFAULT_POLICY
                self._lock = FolderLock.acquire(storage, folder, run_name=self.run_name, policy=policy)
            except FolderInUseError as err:
                refusal = str(err)
        if trainer.world_size > 1:
            refusal = _lightning.decide_on_rank_zero(trainer, lambda: refusal)
        if refusal is not None:
            raise FolderInUseError(refusal)

    def _refuse_a_sibling_in_my_folder(self, trainer: Trainer, url: str) -> None:
        """Two savers of this trainer in one folder: the lock would blame "another run" (it is this process)."""
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self or not isinstance(other, CheckpointSaver) or other._lock is None:
                continue
            other_storage, other_folder = other._storage(trainer)
            if other_storage.url(other_folder) == url:
                raise FolderInUseError(
                    f"two CheckpointSaver callbacks of this trainer save into folder {url!r} (filename="
                    f"{other.filename.pattern!r} and {self.filename.pattern!r}); each would rotate the other's"
                    " checkpoints. Give each its own folder, or pass lock_folder=False to both (each then rotates"
                    " only the checkpoints its own filename matches)."
                )

    def _release_folder(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _lineage(self, trainer: Trainer, loaded: str | None) -> str:
        """The run id this fit saves under: the resumed checkpoint's (a restart continues its run), else new."""
        run_id = self._run_id
        if run_id is None and loaded is not None:
            try:
                storage, path = Storage.open(loaded, self.storage_options)
                run_id = read_manifest(storage, path).metadata.get(RUN_ID_KEY)
            except Exception:  # a legacy .ckpt file or another library's checkpoint: a new run
                run_id = None
        proposal = str(run_id) if run_id is not None else uuid.uuid4().hex[:16]
        return _lightning.decide_on_rank_zero(trainer, lambda: proposal)  # every rank, always: one broadcast

    def _plugin(self, trainer: Trainer) -> ShardedCheckpointIO:
        """The plugin this saver writes through for ``trainer``, with this saver's remote settings (made once)."""
        if self._io is None or self._io_trainer is None or self._io_trainer() is not trainer:
            io = _lightning.use_checkpoint_io(trainer, ShardedCheckpointIO, ShardedCheckpointIO)
            if not self._storage(trainer)[0].is_local:
                io.storage_options = {**io.storage_options, **self.storage_options}
                if self.num_concurrent_uploads is not None:
                    io.num_concurrent_uploads = int(self.num_concurrent_uploads)
                if self.upload_timeout_in_seconds is not None:
                    io.upload_timeout_s = float(self.upload_timeout_in_seconds)
            self._io, self._io_trainer = io, weakref.ref(trainer)
        return self._io

    def _upload_leftovers(self, trainer: Trainer, storage: Storage, folder: str) -> None:
        """Upload (and wait for) checkpoints an earlier run committed locally but did not get into the store.

        Runs once, on global rank 0, before ``"last"`` is resolved, so a restart resumes from them.
        """
        if self._leftovers_done or storage.is_local or not trainer.is_global_zero:
            return
        self._leftovers_done = True
        io = self._plugin(trainer)
        local_root = self._local_root(storage, folder)
        stored = list_committed(storage, folder)
        in_store = {name for name, _ in stored}
        newest_stored = max((m.global_step for _, m in stored), default=-1)
        local_storage, root = Storage.open(local_root)
        uploader = io.uploader(storage.url(folder))
        missing = [(n, m) for n, m in list_committed(local_storage, root)
                   if n not in in_store and self.filename.parse(n) is not None]  # fmt: skip
        rank = _lightning.rank_info(trainer)
        pointer = self.latest_filename.render(run_name=self.run_name, rank=rank) if self.latest_filename else None
        for index, (name, manifest) in enumerate(missing):
            log.info("Uploading %s, committed locally by an earlier run but not in %s", name, storage.url(folder))
            newest = index == len(missing) - 1 and manifest.global_step >= newest_stored  # it moves the pointer
            job = UploadJob(local_dir=os.path.join(root, name), name=name, files=[f.name for f in manifest.files],
                            commit=True, pointer=pointer if newest else None)  # fmt: skip
            uploader.submit(job)
        uploader.wait()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Install the preemption signal handlers (replacing Lightning's until the fit ends)."""
        self._preemption.install()  # after Lightning registered its own handlers, which these replace until fit ends

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Restore the signal handlers; wait for the save in flight and the uploads, and log their metrics."""
        self._preemption.uninstall()
        if self._io is not None:  # before Lightning finalizes the loggers: the last saves' metrics get in
            self._io.wait_for_save()
            self._io.wait_for_uploads()
            self._log_finished_saves(trainer)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Restore the signal handlers and release the folder lock."""
        self._preemption.uninstall()
        self._release_folder()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Restore the signal handlers and release the folder lock."""
        self._preemption.uninstall()
        self._release_folder()

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
            self._io.wait_for_save()
            self._io.wait_for_uploads()
            if self._log_finished_saves(trainer):
                for logger in trainer.loggers:
                    logger.save()

    def _log_finished_saves(self, trainer: Trainer) -> bool:
        """Send the metrics of saves and uploads finished since the last call to the trainer's loggers,
        each at the step its checkpoint holds. Runs on the training thread; returns whether any was logged."""
        events = self._io.finished_saves() if self._io is not None else []
        for kind, stats in events:
            if stats.step is None:
                continue
            metrics = stats.metrics(upload=kind == "upload")
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=stats.step)
        return bool(events)

    @override
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the checkpoints this saver keeps (to rotate), the last saved step, the run id."""
        return {
            "saved": [r.__dict__.copy() for r in self._records],
            "last_saved_step": self.save_interval.last_saved_batch,
            "run_id": self._run_id,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, from the checkpoint a run resumes from."""
        self._records = [CheckpointRecord(**r) for r in state_dict.get("saved", [])]
        self.save_interval.note_saved(state_dict.get("last_saved_step"))
        self._run_id = state_dict.get("run_id")

    # -- saving ----------------------------------------------------------------------------------
    def _maybe_save(self, trainer: Trainer, event: Event) -> None:
        step = trainer.global_step
        if self._io is not None and self._io.has_finished_saves:  # a save or upload finished since the last step
            self._log_finished_saves(trainer)
        if self._preemption.signals and self._preempted(trainer, event):
            self._save_and_exit(trainer)
        schedule = self.save_interval
        if step == schedule.last_saved_batch or trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
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

    def _preempted(self, trainer: Trainer, event: Event) -> bool:
        """Whether any rank received a preemption signal (ranks combine flags at steps rank 0 names)."""
        if trainer.world_size == 1:
            return self._preemption.received is not None
        step = trainer.global_step
        if event is Event.BATCH_END and not self._preemption_cadence.is_check_step(step):
            return False
        now = time.monotonic()
        proposal = self._preemption_cadence.next_check(step, now) if trainer.is_global_zero else 0
        flag, next_check = _lightning.max_across_ranks(trainer, [int(self._preemption.received is not None), proposal])
        if event is Event.BATCH_END:
            self._preemption_cadence.adopt(next_check)
        return bool(flag)

    def _save_and_exit(self, trainer: Trainer) -> None:
        """Save now (unless this step is saved), wait until committed and uploaded, end the process cleanly."""
        signalled = self._preemption.received or "a signal on another rank"
        log.warning("Preemption (%s): saving a checkpoint at step %d, then stopping", signalled, trainer.global_step)
        if trainer.global_step != self.save_interval.last_saved_batch:
            self.save(trainer)
        assert self._io is not None
        self._io.wait_for_save()
        self._io.wait_for_uploads()
        waited = time.monotonic() - (self._preemption.received_at or time.monotonic())
        log.warning("Preemption: checkpoint at step %d committed %.1f s after the signal; exiting",
                    trainer.global_step, waited)  # fmt: skip
        self._preemption.uninstall()
        raise _lightning.preemption_exit()

    def save(self, trainer: Trainer) -> str:
        """Save a checkpoint now, move ``latest``, and rotate; returns the committed path.

        The schedule calls it; call it yourself (on every rank, during ``fit``) for an extra checkpoint.

        Example:
            >>> import os, tempfile, lightning as L
            >>> from lightning.pytorch.demos.boring_classes import BoringModel
            >>> from lightning_ckpt import CheckpointSaver
            >>> saver = CheckpointSaver(tempfile.mkdtemp(), save_interval="1ep", run_name="demo")
            >>> class Model(BoringModel):
            ...     def on_train_batch_end(self, outputs, batch, batch_idx):
            ...         if self.global_step == 2:
            ...             print("saved", os.path.basename(saver.save(self.trainer)))
            >>> L.Trainer(max_steps=3, callbacks=[saver], logger=False, enable_progress_bar=False).fit(Model())
            saved ep0-ba2
        """
        storage, folder = self._storage(trainer)
        progress = _lightning.progress(trainer)
        self._warn_missing_metrics(progress, trainer.global_step)
        name = self.filename.render(run_name=self.run_name, rank=_lightning.rank_info(trainer), progress=progress)
        if not self.overwrite and (name in self._foreign or any(r.name == name for r in self._records)):
            raise FolderConflictError(
                f"{storage.url(storage.join(folder, name))} already exists; pass CheckpointSaver(overwrite=True)"
                " or a filename that includes {batch}"
            )
        metric = progress.metrics.get(self.monitor) if self.monitor else None
        record = CheckpointRecord(name=name, epoch=progress.epoch, step=progress.batch, metric=metric)
        self._records = [r for r in self._records if r.name != name] + [record]
        self.save_interval.note_saved(progress.batch)  # the schedule holds the last saved step; the saver asks it
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
            metadata={RUN_ID_KEY: self._run_id, **({METRIC_KEY: metric} if metric is not None else {})},
            local_folder=self.local_folder,
            after_commit=functools.partial(delete_checkpoints, storage, folder, doomed),  # where it is kept
            async_save=self.async_save,
            replicated=_lightning.replicated_test(trainer),  # the rest is written from rank 0's copy
        )
        return result.path

    @property
    def saved_checkpoints(self) -> list[str]:
        """Names of the checkpoints this saver currently keeps, oldest first.

        Example:
            >>> import tempfile, lightning as L
            >>> from lightning.pytorch.demos.boring_classes import BoringModel
            >>> from lightning_ckpt import CheckpointSaver
            >>> saver = CheckpointSaver(tempfile.mkdtemp(), save_interval="1ba", num_checkpoints_to_keep=2,
            ...                         keep_every_n_steps=2, run_name="demo")
            >>> L.Trainer(max_steps=5, callbacks=[saver], logger=False, enable_progress_bar=False).fit(BoringModel())
            >>> saver.saved_checkpoints  # the newest two, and every 2nd step
            ['ep0-ba2', 'ep0-ba4', 'ep0-ba5']
        """
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
