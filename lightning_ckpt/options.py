"""What a ``CheckpointSaver`` is told to do: its arguments, checked once and frozen in :class:`SaverOptions`.

Every check runs at construction, before any training, and raises
:class:`~lightning_ckpt.errors.ConfigError` naming the argument (as the user spelled it, including
Composer's ``remote_file_name``) and a valid example.

Example:
    >>> from lightning_ckpt import CheckpointSaver
    >>> options = CheckpointSaver("/data/{run_name}", save_interval="100ba", run_name="demo").options
    >>> options.filename.pattern, options.save_interval, options.retention
    ('ep{epoch}-ba{batch}', EveryNBatches(100), KeepAll())
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_ckpt import layout
from lightning_ckpt._checks import check_bool, check_count, check_seconds
from lightning_ckpt.errors import ConfigError
from lightning_ckpt.interval import EveryNEpochs, SaveSchedule, parse_save_interval
from lightning_ckpt.layout import NameFormat
from lightning_ckpt.locations import check_storage_options, check_url, is_url
from lightning_ckpt.policies import RetentionPolicy, build_retention_policy
from lightning_ckpt.preemption import parse_signals

__all__ = ["IgnoreKeys", "SaverOptions"]

IgnoreKeys = Sequence[str] | Callable[[dict[str, Any]], None] | None


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


@dataclass(frozen=True)
class SaverOptions:
    """A ``CheckpointSaver``'s arguments after their checks (see its docstring for each one's meaning)."""

    folder: NameFormat | None
    filename: NameFormat
    latest_filename: NameFormat | None
    save_interval: SaveSchedule
    overwrite: bool
    weights_only: bool
    async_save: bool
    lock_folder: bool
    incremental: bool
    full_every: int
    preemption_signals: tuple[Any, ...]
    ignore_keys: IgnoreKeys
    retention: RetentionPolicy
    monitor: str | None
    unranked_mode: str  # ``mode`` as given; the retention policy's own mode wins when it ranks by metric
    run_name: str
    storage_options: dict[str, Any]
    local_folder: str | None
    num_concurrent_uploads: int | None
    upload_timeout_in_seconds: float | None

    @classmethod
    def build(
        cls,
        *,
        folder: str | os.PathLike[str] | None,
        filename: str,
        latest_filename: str | None,
        save_interval: Any,
        overwrite: bool,
        num_checkpoints_to_keep: int,
        keep_every_n_steps: int | None,
        monitor: str | None,
        mode: str,
        num_best_to_keep: int | None,
        weights_only: bool,
        ignore_keys: IgnoreKeys,
        run_name: str | None,
        storage_options: Mapping[str, Any] | None,
        local_folder: str | os.PathLike[str] | None,
        num_concurrent_uploads: int | None,
        upload_timeout_in_seconds: float | None,
        remote_file_name: str | None,
        latest_remote_file_name: str | None,
        async_save: bool,
        lock_folder: bool,
        incremental: bool,
        full_every: int,
        preemption_signals: Sequence[str | int] | None,
        default_run_name: Callable[[], str],
    ) -> SaverOptions:
        """Check every argument of ``CheckpointSaver`` (whose signature owns the defaults) and return them frozen."""
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
        folder_format = (
            _check_name_format(folder_text, "folder", shown_as=remote, allow_progress=False, allow_metrics=False)
            if folder_text is not None
            else None
        )
        filename_format = _check_name_format(filename, "filename", shown_as=remote)
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
        latest_format = (
            NameFormat(latest_filename, argument="latest_filename", allow_progress=False, allow_metrics=False)
            if latest_filename is not None
            else None
        )
        if latest_format is not None:
            per_rank = (folder_format.placeholders if folder_format else frozenset()) | filename_format.placeholders
            for variable, enough in (("rank", {"rank"}), ("local_rank", {"rank", "local_rank"})):
                if variable in latest_format.placeholders and not enough & per_rank:
                    raise ConfigError(
                        "latest_filename",
                        latest_filename,
                        "'latest', or keep it and add {rank} to filename: 'ep{epoch}-ba{batch}-rank{rank}'",
                        f"It names a pointer per rank with {{{variable}}}, but neither folder nor filename"
                        f" contains {{{variable}}}: the ranks then save one shared checkpoint, whose pointer"
                        " only the committing rank writes, so the other ranks' pointers would never exist",
                    )
        schedule = parse_save_interval(save_interval)
        overwrite = check_bool("overwrite", overwrite)
        _check_names_differ(filename_format, schedule, save_interval, overwrite, shown_as=remote)
        weights_only = check_bool("weights_only", weights_only)
        async_save = check_bool("async_save", async_save)
        lock_folder = check_bool("lock_folder", lock_folder)
        incremental = check_bool("incremental", incremental)
        full_every = check_count("full_every", full_every, "10 (every 10th save writes everything)")
        signals = parse_signals(preemption_signals, "preemption_signals")
        ignore = _check_ignore_keys(ignore_keys)
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ConfigError("monitor", monitor, "'val_loss'")
        if num_best_to_keep not in (None, 0) and monitor is None:
            raise ConfigError("num_best_to_keep", num_best_to_keep, "0, or set monitor='val_loss'", "it needs monitor")
        best = (1 if monitor else 0) if num_best_to_keep is None else num_best_to_keep
        retention = build_retention_policy(
            num_checkpoints_to_keep=num_checkpoints_to_keep,
            keep_every_n_steps=keep_every_n_steps,
            num_best_to_keep=best,
            mode=mode,
        )
        if run_name is not None and (not isinstance(run_name, str) or not layout.is_plain_name(run_name)):
            raise ConfigError("run_name", run_name, "'llama-ft-7'")
        name = run_name or default_run_name()
        if latest_format is not None and filename_format.parse(latest_format.render(run_name=name)) is not None:
            raise ConfigError("latest_filename", latest_filename, "'newest' or None",
                              f"It would have the name of a checkpoint (filename={filename!r})")  # fmt: skip
        remote_folder = folder_text if folder_text is not None and is_url(folder_text) else None
        options = check_storage_options(storage_options, remote_folder)  # values never shown
        local = _check_local_folder(local_folder, local_argument, name)
        if num_concurrent_uploads is not None:
            num_concurrent_uploads = check_count("num_concurrent_uploads", num_concurrent_uploads, "4")
        if upload_timeout_in_seconds is not None:
            upload_timeout_in_seconds = check_seconds("upload_timeout_in_seconds", upload_timeout_in_seconds, "3600")
        return cls(
            folder=folder_format,
            filename=filename_format,
            latest_filename=latest_format,
            save_interval=schedule,
            overwrite=overwrite,
            weights_only=weights_only,
            async_save=async_save,
            lock_folder=lock_folder,
            incremental=incremental,
            full_every=full_every,
            preemption_signals=tuple(signals),
            ignore_keys=ignore,
            retention=retention,
            monitor=monitor,
            unranked_mode=mode,
            run_name=name,
            storage_options=options,
            local_folder=local,
            num_concurrent_uploads=num_concurrent_uploads,
            upload_timeout_in_seconds=upload_timeout_in_seconds,
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
