"""Bad arguments, one table: every public constructor argument and public function argument.

Each row calls the public API the way a user would, with one wrong type or value, and checks
what the user reads: the exception type, the argument's name, the bad value (never the value
of ``storage_options``: it may hold credentials) and an example of a good value. Rows that need
a ``Trainer`` fit a tiny model and also record how many training batches ran before the error.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_ckpt import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointSaver,
    ConfigError,
    RetryPolicy,
    ShardedCheckpointIO,
    WriterHook,
    latest,
    read_checkpoint,
)
from lightning_ckpt.collective import save_checkpoint_dir
from lightning_ckpt.demo import TinyRegressor, build_trainer

from .servers import free_port

SECRET = "SECRET-do-not-show-7731"
EXAMPLE = "Example of a valid value: "


@dataclass
class Env:
    """What a row's call gets: a scratch directory, and the training batches that ran (trainer rows)."""

    tmp: Path
    batches: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    """One row: ``call`` raises ``error``; the message names ``argument``, shows ``shown``, has ``example``.

    ``batches`` is how many training batches may run before the error (trainer rows only).
    """

    call: Callable[[Env], object]
    error: type[BaseException]
    argument: str
    shown: str | None
    example: str = EXAMPLE
    batches: int | None = None


def _row(
    case_id: str,
    call: Callable[[Env], object],
    argument: str,
    shown: str | None,
    *,
    error: type[BaseException] = ConfigError,
    example: str = EXAMPLE,
    batches: int | None = None,
    xfail: str | None = None,
) -> Any:
    marks = [pytest.mark.xfail(reason=xfail, strict=True)] if xfail else []
    return pytest.param(Case(call, error, argument, shown, example, batches), id=case_id, marks=marks)


SAVER_ROWS: list[tuple[str, str, object, dict[str, Any]]] = []  # (case id, argument, bad value, other kwargs)


def saver(case_id: str, argument: str, value: object, *, shown: str | None = None, **kwargs: Any) -> Any:
    """A row for ``CheckpointSaver(argument=value, ...)``; the message must show ``repr(value)``."""
    other = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("error", "example", "batches", "xfail")}
    SAVER_ROWS.append((case_id, argument, value, other))
    return _row(
        f"CheckpointSaver-{case_id}",
        lambda env: CheckpointSaver(**{argument: value}, **other),
        argument,
        repr(value) if shown is None else shown,
        **kwargs,
    )


def io(case_id: str, argument: str, value: object, *, shown: str | None = None, **kwargs: Any) -> Any:
    """A row for ``ShardedCheckpointIO(argument=value)``."""
    return _row(
        f"ShardedCheckpointIO-{case_id}",
        lambda env: ShardedCheckpointIO(**{argument: value}),
        argument,
        repr(value) if shown is None else shown,
        **kwargs,
    )


def retry(case_id: str, argument: str, value: object) -> Any:
    """A row for ``RetryPolicy(argument=value)``."""
    return _row(f"RetryPolicy-{case_id}", lambda env: RetryPolicy(**{argument: value}), argument, repr(value))


def _unreachable_s3_options() -> dict[str, Any]:
    """Credentials and an endpoint on a closed port of 127.0.0.1, one attempt per request (so it fails fast)."""
    return {
        "key": SECRET,
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}", "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 2},
    }


class _CountBatches(L.Callback):
    def __init__(self, batches: list[int]) -> None:
        self.batches = batches

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.batches.append(idx)


def _fit(env: Env, saver: CheckpointSaver) -> None:
    """Fit the tiny model for at most 2 steps with ``saver``, counting the batches that start."""
    L.seed_everything(0, verbose=False)
    trainer = build_trainer(str(env.tmp), max_steps=2, callbacks=[saver, _CountBatches(env.batches)],
                            plugins=[ShardedCheckpointIO(cache_dir=str(env.tmp / "cache"))])  # fmt: skip
    trainer.fit(TinyRegressor())


def _unreachable_bucket(env: Env) -> None:
    _fit(env, CheckpointSaver(folder="s3://bucket/run", storage_options=_unreachable_s3_options(), run_name="u",
                              save_interval="1ba"))  # fmt: skip


def _committed(env: Env) -> str:
    return save_checkpoint_dir({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, env.tmp / "ep0-ba1")


class _Hook(WriterHook):
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """Nothing to do."""

    def post_commit(self, path: str, **kwargs: Any) -> None:
        """Nothing to do."""


def _io_with_unknown_option(env: Env) -> object:
    return ShardedCheckpointIO(storage_options={"nope": SECRET}).load_checkpoint("s3://bucket/run/ep0-ba1")


def _save_as_dotdot(env: Env) -> None:
    ShardedCheckpointIO().save_checkpoint({"w": torch.ones(1)}, env.tmp / "..")


def _save_with_options_str(env: Env) -> None:
    ShardedCheckpointIO().save_checkpoint({"w": torch.ones(1)}, env.tmp / "c", SECRET)


def _load(**kwargs: Any) -> Callable[[Env], object]:
    return lambda env: ShardedCheckpointIO().load_checkpoint(_committed(env), **kwargs)


def _read(path: object = None, **kwargs: Any) -> Callable[[Env], object]:
    return lambda env: read_checkpoint(_committed(env) if path is None else path, **kwargs)  # type: ignore[arg-type]


def _latest(folder: object = None, storage_options: object = None) -> Callable[[Env], object]:
    return lambda env: latest(env.tmp if folder is None else folder, storage_options)  # type: ignore[arg-type]


S3 = "s3://bucket/{run_name}"
SECRET_OPTIONS = {"key": SECRET, "secret": SECRET}
REMOTE = "s3://bucket/run/ep{epoch}-ba{batch}"
HIDDEN = "'<hidden>'"

# fmt: off
CASES = [
    # -- CheckpointSaver ------------------------------------------------------------------------
    saver("folder-type", "folder", 3),
    saver("folder-empty", "folder", ""),
    saver("folder-unknown-placeholder", "folder", "/runs/{nope}"),
    saver("folder-progress-placeholder", "folder", "/runs/{epoch}"),
    saver("folder-unknown-protocol", "folder", "s4://bucket/run"),
    _row("CheckpointSaver-folder-unreachable-s3-endpoint", _unreachable_bucket, "folder", "'s3://bucket/run'",
         error=CheckpointError, example="storage_options", batches=0),
    saver("filename-type", "filename", 7),
    saver("filename-braces", "filename", "ep{epoch"),
    saver("filename-misspelt-variable", "filename", "ep{epcoh}-ba{batch}"),
    saver("filename-format-spec", "filename", "ba{batch:.2q}"),
    saver("filename-subdirectory", "filename", "../ep{epoch}"),
    saver("filename-hidden", "filename", ".ep{epoch}"),
    # An unlogged metric in filename no longer fails the save: tests/test_saver_defects.py (shows 'nan', warns once).
    saver("latest_filename-type", "latest_filename", 3),
    saver("latest_filename-unknown-placeholder", "latest_filename", "latest-{nope}"),
    saver("latest_filename-progress-placeholder", "latest_filename", "latest-{epoch}"),
    saver("latest_filename-escapes", "latest_filename", "../latest"),
    saver("latest_filename-dotdot", "latest_filename", ".."),
    saver("latest_filename-rank-without-rank-in-filename", "latest_filename", "latest-rank{rank}"),
    saver("latest_filename-local_rank-without-rank", "latest_filename", "latest-{local_rank}", folder="/c/{node_rank}"),
    saver("latest_filename-is-a-checkpoint-name", "latest_filename", "latest", filename="latest", overwrite=True),
    saver("filename-same-name-every-save", "filename", "ep{epoch}", save_interval="2ba"),
    saver("save_interval-unknown-unit", "save_interval", "3parsecs"),
    saver("save_interval-zero-batches", "save_interval", "0ba"),
    saver("save_interval-negative-count", "save_interval", "-2ep"),
    saver("save_interval-negative-epochs", "save_interval", -1),
    saver("save_interval-zero-duration", "save_interval", timedelta(0)),
    saver("save_interval-fractional-epochs", "save_interval", "1.5ep"),
    saver("save_interval-float", "save_interval", 1.5),
    saver("save_interval-bool", "save_interval", True),
    saver("save_interval-callable-arity", "save_interval", lambda trainer: True, shown="<function <lambda>"),
    saver("overwrite-str", "overwrite", "yes"),
    saver("num_checkpoints_to_keep-negative", "num_checkpoints_to_keep", -2),
    saver("num_checkpoints_to_keep-str", "num_checkpoints_to_keep", "3"),
    saver("num_checkpoints_to_keep-float", "num_checkpoints_to_keep", 2.0),
    saver("keep_every_n_steps-zero", "keep_every_n_steps", 0),
    saver("keep_every_n_steps-negative", "keep_every_n_steps", -100),
    saver("monitor-empty", "monitor", ""),
    saver("monitor-type", "monitor", 3),
    saver("mode-unknown", "mode", "lowest", monitor="val_loss"),
    saver("num_best_to_keep-without-monitor", "num_best_to_keep", 2),
    saver("num_best_to_keep-negative", "num_best_to_keep", -1, monitor="val_loss"),
    saver("weights_only-int", "weights_only", 1),
    saver("ignore_keys-str", "ignore_keys", "state_dict"),
    saver("ignore_keys-empty-key", "ignore_keys", ["optimizer_states", ""]),
    saver("run_name-path", "run_name", "a/b"),
    saver("run_name-empty", "run_name", ""),
    saver("storage_options-str", "storage_options", f"key={SECRET}", shown=HIDDEN, error=TypeError),
    saver("storage_options-key-type", "storage_options", {1: SECRET}, shown=HIDDEN, folder=S3),
    saver("storage_options-unknown-s3-option", "storage_options", {**SECRET_OPTIONS, "secret_key": SECRET},
          shown="'secret_key'", folder=S3),
    saver("local_folder-type", "local_folder", 3, folder=S3),
    saver("local_folder-url", "local_folder", "s3://other/run", folder=S3),
    saver("local_folder-rank-placeholder", "local_folder", "/local/{rank}", folder=S3),
    saver("num_concurrent_uploads-zero", "num_concurrent_uploads", 0),
    saver("num_concurrent_uploads-float", "num_concurrent_uploads", 2.5),
    saver("upload_timeout_in_seconds-negative", "upload_timeout_in_seconds", -1),
    saver("upload_timeout_in_seconds-nan", "upload_timeout_in_seconds", math.nan),
    saver("remote_file_name-not-a-url", "remote_file_name", "ep{epoch}"),
    saver("remote_file_name-unknown-placeholder", "remote_file_name", "s3://bucket/{nope}/ep{epoch}"),
    saver("remote_file_name-hidden-name", "remote_file_name", "s3://bucket/run/.ep{epoch}"),
    saver("remote_file_name-unknown-protocol", "remote_file_name", "s4://bucket/run/ep{epoch}"),
    saver("latest_remote_file_name-alone", "latest_remote_file_name", "s3://bucket/run/latest"),
    saver("latest_remote_file_name-elsewhere", "latest_remote_file_name", "s3://bucket/other/latest",
          remote_file_name=REMOTE),
    saver("latest_remote_file_name-directory", "latest_remote_file_name", "s3://bucket/run/", remote_file_name=REMOTE),
    saver("async_save-str", "async_save", "no"),
    saver("lock_folder-str", "lock_folder", "no"),
    saver("preemption_signals-unknown", "preemption_signals", ["SIGNOPE"]),
    saver("preemption_signals-uncatchable", "preemption_signals", ["SIGKILL"]),
    # -- ShardedCheckpointIO --------------------------------------------------------------------
    io("storage_options-str", "storage_options", f"key={SECRET}", shown=HIDDEN, error=TypeError),
    _row("ShardedCheckpointIO-storage_options-unknown-s3-option", _io_with_unknown_option, "storage_options", "'nope'"),
    io("verify_checksums-str", "verify_checksums", "yes"),
    io("barrier_timeout_s-zero", "barrier_timeout_s", 0),
    io("barrier_timeout_s-nan", "barrier_timeout_s", math.nan),
    io("barrier_timeout_s-str", "barrier_timeout_s", "600"),
    io("writer_hooks-not-hooks", "writer_hooks", [print], shown="[<built-in function print>]"),
    io("writer_hooks-one-hook-not-a-list", "writer_hooks", _Hook(), shown="<tests.test_bad_arguments._Hook"),
    io("writer_hooks-int", "writer_hooks", 3),
    io("num_concurrent_uploads-zero", "num_concurrent_uploads", 0),
    io("num_concurrent_uploads-float", "num_concurrent_uploads", 2.5),
    io("upload_timeout_in_seconds-negative", "upload_timeout_in_seconds", -5),
    io("upload_timeout_in_seconds-inf", "upload_timeout_in_seconds", math.inf),
    io("cache_dir-type", "cache_dir", 3),
    io("upload_retry-str", "upload_retry", "fast"),
    io("async_save-int", "async_save", 1),
    io("direct_io-str", "direct_io", "no"),
    _row("ShardedCheckpointIO.save_checkpoint-path-dotdot", _save_as_dotdot, "path", "..'", error=ValueError,
         example="e.g. '/data/ckpts/ep0-ba100'"),
    _row("ShardedCheckpointIO.save_checkpoint-storage_options-str", _save_with_options_str, "storage_options", HIDDEN,
         error=TypeError),
    _row("ShardedCheckpointIO.load_checkpoint-weights_only-str", _load(weights_only="no"), "weights_only", "'no'"),
    _row("ShardedCheckpointIO.load_checkpoint-map_location-device", _load(map_location="gpu9"), "map_location",
         "'gpu9'"),
    # -- RetryPolicy ----------------------------------------------------------------------------
    retry("attempts-zero", "attempts", 0),
    retry("attempts-str", "attempts", "3"),
    retry("initial_backoff_s-negative", "initial_backoff_s", -1),
    retry("max_backoff_s-below-initial", "max_backoff_s", 0.1),
    retry("deadline_s-nan", "deadline_s", math.nan),
    # -- read_checkpoint, latest ----------------------------------------------------------------
    _row("read_checkpoint-path-type", _read(3), "path", "3", error=TypeError),
    _row("read_checkpoint-path-missing", _read("/nonexistent/ep0-ba1"), "path", "'/nonexistent/ep0-ba1'",
         error=CheckpointNotFoundError, example="e.g. '/data/runs/a/ep3-ba1500'"),
    _row("read_checkpoint-path-unknown-protocol", _read("s4://bucket/run/ep0-ba1"), "path", "'s4://bucket/run/ep0-ba1'"),
    _row("read_checkpoint-weights_only-str", _read(weights_only="yes"), "weights_only", "'yes'"),
    _row("read_checkpoint-map_location-int", _read(map_location=3), "map_location", "3", error=TypeError),
    _row("read_checkpoint-map_location-dict-values", _read(map_location={"cpu": 0}), "map_location", "{'cpu': 0}"),
    _row("read_checkpoint-storage_options-str", _read(storage_options=SECRET), "storage_options", HIDDEN,
         error=TypeError),
    _row("latest-folder-type", _latest(3), "folder", "3", error=TypeError),
    _row("latest-storage_options-list", _latest(storage_options=[SECRET]), "storage_options", HIDDEN, error=TypeError),
    _row("latest-storage_options-unknown-s3-option",
         _latest("s3://bucket/run", {**SECRET_OPTIONS, "endpoint": SECRET}), "storage_options", "'endpoint'"),
]
# fmt: on


@pytest.mark.parametrize("case", CASES)
def test_bad_argument_names_itself_its_value_and_a_good_value(case: Case, tmp_path: Path) -> None:
    env = Env(tmp_path)
    with pytest.raises(case.error) as info:
        case.call(env)
    message = str(info.value)
    assert f"{case.argument}=" in message, f"the message names the argument: {message}"
    if case.shown is not None:
        assert case.shown in message, f"the message shows the bad value: {message}"
    assert case.example in message, f"the message has an example of a good value: {message}"
    if isinstance(info.value, ConfigError):
        assert info.value.argument == case.argument
    told = " ".join([message, repr(info.value.args), repr(getattr(info.value, "value", "")),
                     *getattr(info.value, "__notes__", [])])  # fmt: skip
    assert SECRET not in told, "storage_options values never appear in errors"
    if case.batches is not None:
        assert len(env.batches) == case.batches, f"training batches before the error: {env.batches}"
        assert not list(tmp_path.rglob("manifest.json")), "nothing was committed"


def _literals(example: str) -> list[object]:
    """The Python literals an error's example offers (``"'latest', 'latest-rank{rank}' or None"`` gives three)."""
    found = []
    for part in re.split(r",\s+|\s+or\s+", example):
        try:
            found.append(ast.literal_eval(part.strip()))
        except (ValueError, SyntaxError):
            continue
    return found


@pytest.mark.parametrize("row", SAVER_ROWS, ids=[row[0] for row in SAVER_ROWS])
def test_every_example_a_saver_error_offers_is_itself_accepted(row: tuple[str, str, object, dict[str, Any]]) -> None:
    case_id, argument, value, other = row
    try:
        CheckpointSaver(**{argument: value}, **other)
    except ConfigError as err:
        examples = _literals(err.example)
    else:
        pytest.fail(f"{case_id}: no ConfigError at construction")
    for example in examples:
        try:
            CheckpointSaver(**{argument: example}, **other)
        except ConfigError as err:
            assert err.argument != argument, f"{case_id}: the example {example!r} is itself refused: {err}"
