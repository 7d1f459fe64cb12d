"""Object storage end to end: saves on every backend of tests/test_storage_contract.py; uploads, resume, faults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
import lightning as L
import pytest
import torch

from lightning_ckpt import CheckpointError, CheckpointSaver, RetryPolicy, ShardedCheckpointIO, latest, read_checkpoint
from lightning_ckpt.collective import save_checkpoint_dir
from lightning_ckpt.demo import TinyRegressor, build_trainer, state_of
from lightning_ckpt.plugin import ShardedCheckpointIO as _IO

from . import test_storage_contract as contract
from .s3_server import FaultProxy, S3Bucket

backend = contract.backend  # the contract suite's backends: local, memory://, S3, GCS

FAST_RETRY = RetryPolicy(attempts=4, initial_backoff_s=0.05, max_backoff_s=0.2)


def _ckpt(step: int) -> dict[str, Any]:
    return {
        "state_dict": {"w": torch.arange(1000.0) * step, "b": torch.ones(3, dtype=torch.bfloat16)},
        "global_step": step,
    }


def test_contract_save_read_latest_remove(backend: tuple[str, dict[str, Any]]) -> None:
    folder, options = backend
    assert latest(folder, options) is None
    io = ShardedCheckpointIO(storage_options=options)
    for step in (1, 2):
        io.save_checkpoint(_ckpt(step), f"{folder}/ba{step}")
    newest = latest(folder, options)
    assert newest is not None and newest.endswith("/ba2")
    loaded = io.load_checkpoint(f"{folder}/ba2")
    assert torch.equal(loaded["state_dict"]["w"], _ckpt(2)["state_dict"]["w"])
    assert loaded["state_dict"]["b"].dtype == torch.bfloat16
    io.remove_checkpoint(f"{folder}/ba2")
    newest = latest(folder, options)
    assert newest is not None and newest.endswith("/ba1")


def test_contract_a_checkpoint_without_manifest_is_not_committed(backend: tuple[str, dict[str, Any]]) -> None:
    folder, options = backend
    path = save_checkpoint_dir(_ckpt(3), f"{folder}/ba3", storage_options=options)
    fs, root = fsspec.core.url_to_fs(path, **options)
    fs.rm_file(f"{root}/manifest.json")
    assert latest(folder, options) is None


def _saver(bucket: S3Bucket, tmp: Path, **kwargs: Any) -> CheckpointSaver:
    options: dict[str, Any] = {"save_interval": "4ba", "run_name": "s3", **kwargs}
    return CheckpointSaver(
        folder=f"{bucket.url}/run", storage_options=bucket.storage_options, local_folder=str(tmp / "local"), **options
    )


def _fit(root: Path, saver: CheckpointSaver, epochs: int, io: ShardedCheckpointIO, ckpt_path: str | None = None) -> Any:
    L.seed_everything(0, verbose=False)
    model = TinyRegressor()
    trainer = build_trainer(str(root), max_epochs=epochs, callbacks=[saver], plugins=[io])
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


def test_s3_folder_uploads_rotates_and_resumes_on_an_empty_disk(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    full = TinyRegressor()
    build_trainer(str(tmp_path / "full"), max_epochs=3).fit(full)

    first = tmp_path / "machine1"
    io = ShardedCheckpointIO(cache_dir=str(first / "cache"))
    _fit(first, _saver(s3_bucket, first, num_checkpoints_to_keep=2), 2, io)
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options)
    remote = sorted(os.path.basename(p) for p in fs.ls(f"{s3_bucket.url}/run", refresh=True))
    assert remote == ["ep1-ba12", "ep1-ba16", "latest.symlink"], "rotated in the store after each commit"
    assert fs.cat_file(f"{s3_bucket.url}/run/latest.symlink") == b"ep1-ba16"
    assert sorted(os.listdir(first / "local")) == ["ep1-ba16", "latest", "latest.symlink"], "local cache pruned"

    second = tmp_path / "machine2"  # a fresh machine: nothing local, only the bucket
    io2 = ShardedCheckpointIO(cache_dir=str(second / "cache"))
    resumed, trainer = _fit(second, _saver(s3_bucket, second, num_checkpoints_to_keep=2), 3, io2, ckpt_path="last")
    assert trainer.global_step == 24
    assert io2.loaded_path == f"{s3_bucket.url}/run/ep1-ba16"
    assert all(torch.equal(a, b) for a, b in zip(state_of(resumed).values(), state_of(full).values(), strict=True))
    downloaded = next((second / "cache" / "downloads").iterdir()) / "ep1-ba16"
    assert (downloaded / "manifest.json").is_file(), "downloaded into the local cache, committed by its manifest"


def test_uploads_retry_through_503s_dropped_connections_and_slow_responses(
    s3_bucket_via_proxy: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    def is_put(method: str, path: str) -> bool:
        return method == "PUT" and ".probe-" not in path

    fault_proxy.fail_next(3, status=503, match=is_put)
    fault_proxy.drop_next(1, match=is_put)
    fault_proxy.delay_next(1, 0.3, match=is_put)
    io = ShardedCheckpointIO(cache_dir=str(tmp_path / "cache"), upload_retry=FAST_RETRY)
    _fit(tmp_path, _saver(s3_bucket_via_proxy, tmp_path), 1, io)
    assert fault_proxy.count(status=503) >= 3
    newest = latest(f"{s3_bucket_via_proxy.url}/run", s3_bucket_via_proxy.storage_options)
    assert newest is not None and newest.endswith("/ep0-ba8")
    assert read_checkpoint(newest, storage_options=s3_bucket_via_proxy.storage_options)["global_step"] == 8


def test_persistent_outage_gives_one_clear_error_and_loses_nothing(
    s3_bucket_via_proxy: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    io = ShardedCheckpointIO(cache_dir=str(tmp_path / "cache"), upload_retry=FAST_RETRY)
    saver = _saver(s3_bucket_via_proxy, tmp_path, save_interval="8ba")
    _fit(tmp_path / "a", saver, 1, io)  # ep0-ba8 committed in the store
    fault_proxy.outage(True)
    io2 = ShardedCheckpointIO(cache_dir=str(tmp_path / "cache2"), upload_retry=FAST_RETRY)
    saver2 = _saver(s3_bucket_via_proxy, tmp_path / "b", save_interval="8ba", overwrite=True)
    fault_proxy.outage(False)  # the fail-fast check passes; then the store goes down
    L.seed_everything(0, verbose=False)
    trainer = build_trainer(str(tmp_path / "b"), max_epochs=2, callbacks=[saver2], plugins=[io2])

    class Outage(L.Callback):
        def on_train_start(self, *args: Any) -> None:
            fault_proxy.outage(True)

    trainer.callbacks.append(Outage())
    with pytest.raises(Exception) as info:  # the client's own error type (boto3's or s3fs's), not a wrapper
        trainer.fit(TinyRegressor())
    assert "Please reduce your request rate" in str(info.value)  # the server's 503 SlowDown
    assert any("while uploading checkpoint ep0-ba8 to s3://" in note for note in info.value.__notes__)
    fault_proxy.outage(False)
    assert (tmp_path / "b" / "local" / "ep0-ba8" / "manifest.json").is_file(), "the local committed copy is kept"
    newest = latest(f"{s3_bucket_via_proxy.url}/run", s3_bucket_via_proxy.storage_options)
    assert newest is not None and newest.endswith("/ep0-ba8"), "the earlier checkpoint in the store is intact"
    # The store is back: a restart uploads what was committed locally only, then resumes from the newest.
    io3 = ShardedCheckpointIO(cache_dir=str(tmp_path / "cache3"), upload_retry=FAST_RETRY)
    saver3 = _saver(s3_bucket_via_proxy, tmp_path / "b", save_interval="8ba")
    _, trainer3 = _fit(tmp_path / "c", saver3, 3, io3, ckpt_path="last")
    assert io3.loaded_path == f"{s3_bucket_via_proxy.url}/run/ep1-ba16", "resumed from the uploaded leftover"
    assert trainer3.global_step == 24


def test_unwritable_bucket_fails_before_training(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    saver = CheckpointSaver(folder="s3://no-such-bucket/run", storage_options=s3_bucket.storage_options, run_name="x")
    model = TinyRegressor()
    before = state_of(model)
    trainer = build_trainer(str(tmp_path), callbacks=[saver], plugins=[_IO(cache_dir=str(tmp_path / "c"))])
    with pytest.raises(CheckpointError, match=r"folder='s3://no-such-bucket/run' is not writable .*storage_options"):
        trainer.fit(model)
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(state_of(model).values(), before.values(), strict=True))


def test_composer_remote_file_name_arguments(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    saver = CheckpointSaver(
        folder=str(tmp_path / "local"),
        remote_file_name=f"{s3_bucket.url}/{{run_name}}/ep{{epoch}}-ba{{batch}}",
        latest_remote_file_name=f"{s3_bucket.url}/{{run_name}}/latest-remote",
        storage_options=s3_bucket.storage_options,
        save_interval="1ep",
        run_name="composer",
    )
    io = ShardedCheckpointIO(cache_dir=str(tmp_path / "cache"))
    _fit(tmp_path, saver, 2, io)
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options)
    names = sorted(os.path.basename(p) for p in fs.ls(f"{s3_bucket.url}/composer", refresh=True))
    assert names == ["ep0-ba8", "ep1-ba16", "latest-remote.symlink"]
    assert fs.cat_file(f"{s3_bucket.url}/composer/latest-remote.symlink") == b"ep1-ba16"
    assert (tmp_path / "local" / "ep1-ba16" / "manifest.json").is_file(), "committed locally in folder first"


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"remote_file_name": "ep{epoch}"}, "remote_file_name"),
        ({"latest_remote_file_name": "s3://b/latest"}, "latest_remote_file_name"),
        ({"remote_file_name": "s3://b/run/ep{epoch}", "latest_remote_file_name": "s3://b/other/latest"},
         "latest_remote_file_name"),
        ({"remote_file_name": "s3://b/run/ep{epoch}", "filename": "other{batch}"}, "filename"),
        ({"storage_options": "key=TOPSECRET-9f2c"}, "storage_options"),
        ({"num_concurrent_uploads": 0}, "num_concurrent_uploads"),
        ({"upload_timeout_in_seconds": -1}, "upload_timeout_in_seconds"),
    ],
)  # fmt: skip
def test_bad_remote_arguments_name_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    from lightning_ckpt import ConfigError

    with pytest.raises(ConfigError, match=rf"^{argument}=") as info:
        CheckpointSaver(**kwargs)
    assert "TOPSECRET-9f2c" not in str(info.value), "storage_options never appear in messages"
