"""Uploads that never fall behind: newer checkpoints replace queued uploads, the backlog is bounded, lag is measured.

Uploads go to a real S3 server (moto on 127.0.0.1) and are slowed by the fault hook at ``upload.during``
(a sleep after each uploaded file), so that saves outpace them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.distributed import HashStore

from lightning_ckpt import CheckpointSaver, ConfigError, ShardedCheckpointIO, _faults, read_checkpoint
from lightning_ckpt.collective import save_checkpoint_dir
from lightning_ckpt.demo import TinyRegressor, build_trainer
from lightning_ckpt.dist import Exchange
from lightning_ckpt.stats import SaveStats
from lightning_ckpt.storage import Storage
from lightning_ckpt.upload import Uploader, UploadJob

from .s3_server import S3Bucket


@pytest.fixture
def slow_uploads() -> Iterator[dict[int, float]]:
    """Seconds each rank sleeps after each file it uploads (set per test); the hook is removed afterwards."""
    delays: dict[int, float] = {}

    def hook(point: str, rank: int, writing: object) -> None:
        if point == "upload.during" and delays.get(rank):
            time.sleep(delays[rank])

    previous = _faults.install(hook)
    try:
        yield delays
    finally:
        _faults.install(previous)


def _remote_names(storage: Storage, folder: str) -> dict[str, list[str]]:
    return {name: sorted(storage.listdir(storage.join(folder, name))) for name in storage.listdir(folder)
            if storage.isdir(storage.join(folder, name))}  # fmt: skip


def test_queued_uploads_of_checkpoints_a_newer_save_drops_are_not_made(
    s3_bucket: S3Bucket, tmp_path: Path, slow_uploads: dict[int, float], caplog: pytest.LogCaptureFixture
) -> None:
    slow_uploads[0] = 0.4
    caplog.set_level(logging.INFO, logger="lightning_ckpt")
    folder = f"{s3_bucket.url}/run"
    saver = CheckpointSaver(folder=folder, storage_options=s3_bucket.storage_options, run_name="b",
                            local_folder=str(tmp_path / "local"), save_interval="1ba", num_checkpoints_to_keep=2,
                            keep_every_n_steps=4)  # fmt: skip
    io = ShardedCheckpointIO(cache_dir=str(tmp_path / "cache"), storage_options=s3_bucket.storage_options)
    L.seed_everything(0, verbose=False)
    model = TinyRegressor()
    build_trainer(str(tmp_path), max_epochs=1, callbacks=[saver], plugins=[io], logger=False).fit(model)

    skipped = [r.getMessage().split()[1] for r in caplog.records if "retention drops it" in r.getMessage()]
    assert skipped, "uploads 0.4 s per file behind a save per step: some queued upload must have been dropped"
    kept = {"ep0-ba4", "ep0-ba7", "ep0-ba8"}  # the newest 2, and every 4th step for good
    assert not kept & set(skipped)
    storage, root = Storage.open(folder, s3_bucket.storage_options)
    remote = _remote_names(storage, root)
    assert remote.keys() == kept and saver.saved_checkpoints == sorted(kept)  # the store holds what the policy keeps
    assert all("manifest.json" in files for files in remote.values()), remote  # nothing half-uploaded is left
    assert storage.read_bytes(storage.join(root, "latest.symlink")) == b"ep0-ba8"
    assert [n for n in os.listdir(tmp_path / "local") if n.startswith("ep")] == ["ep0-ba8"]  # skipped ones pruned
    newest = read_checkpoint(f"{folder}/ep0-ba8", storage_options=s3_bucket.storage_options)
    for name, value in model.state_dict().items():
        assert torch.equal(newest["state_dict"][name], value), name


def _checkpoint(tmp_path: Path, name: str, step: int) -> tuple[str, list[str]]:
    local = save_checkpoint_dir({"w": torch.full((4096,), float(step)), "global_step": step}, str(tmp_path / name))
    return local, sorted(n for n in os.listdir(local) if n != "manifest.json")


def test_a_member_stops_when_the_committing_rank_replaces_the_checkpoint(
    s3_bucket: S3Bucket, tmp_path: Path, slow_uploads: dict[int, float]
) -> None:
    """Two ranks' uploaders on one real key-value store: only the committing rank decides; what the other
    already uploaded of the replaced checkpoint is removed, and its rotation runs after the newer commit."""
    storage, root = Storage.open(f"{s3_bucket.url}/run", s3_bucket.storage_options)
    store = HashStore()
    uploaders = [Uploader(storage, root, upload_timeout_s=60) for _ in range(2)]
    done: list[str] = []
    gate = threading.Event()
    first, first_files = _checkpoint(tmp_path, "ba1", 1)  # rank 1 uploads the files, rank 0 commits
    second, second_files = _checkpoint(tmp_path, "ba2", 2)
    slow_uploads[1] = 0.5

    def job(rank: int, local: str, files: list[str], name: str) -> UploadJob:
        exchange = Exchange(store, rank, 2, prefix=f"upload-{name}", timeout_s=60)
        return UploadJob(local_dir=local, name=name, files=files if rank == 1 else [], commit=rank == 0,
                         members=(0, 1), exchange=exchange, pointer="latest.symlink",
                         after_commit=lambda: done.append(name))  # fmt: skip

    blocker = uploaders[0]._jobs.submit(gate.wait)  # the committing rank is busy until both are queued
    uploaders[1].submit(job(1, first, first_files, "ba1"))
    uploaders[0].submit(job(0, first, [], "ba1"))
    uploaders[0].supersede(["ba1"])  # ba2, committed locally, drops ba1 (num_checkpoints_to_keep=1)
    uploaders[0].submit(job(0, second, [], "ba2"))
    uploaders[1].submit(job(1, second, second_files, "ba2"))
    gate.set()
    blocker.result()
    for uploader in uploaders:
        uploader.wait()
        uploader.close()

    assert uploaders[0].skipped == ["ba1"] and uploaders[0].committed == ["ba2"]
    assert done == ["ba2", "ba1"]  # ba1's rotation ran only once ba2 was committed in the store
    assert not storage.exists(storage.join(root, "ba1")) or storage.listdir(storage.join(root, "ba1")) == []
    assert read_checkpoint(f"{s3_bucket.url}/run/ba2", storage_options=s3_bucket.storage_options)["global_step"] == 2


def test_a_dropped_incremental_upload_removes_its_own_files_never_its_bases(
    s3_bucket: S3Bucket, tmp_path: Path, slow_uploads: dict[int, float]
) -> None:
    """A delta whose upload a newer checkpoint drops lists its base's files too; removing what was uploaded
    of it must leave the base (committed in the store, read by other deltas) whole."""
    storage, root = Storage.open(f"{s3_bucket.url}/run", s3_bucket.storage_options)
    io = ShardedCheckpointIO(incremental=True)
    frozen = torch.randn(4096)
    for step in (1, 2):  # ba1 the base, ba2 a delta reading ba1's shard
        io.save_collective(
            {"frozen": frozen, "t": torch.full((4,), step), "global_step": step}, str(tmp_path / f"ba{step}")
        )
    assert any(f.startswith("../ba1/") for f in read_manifest_names(tmp_path / "ba2"))
    uploader = Uploader(storage, root, upload_timeout_s=60)
    slow_uploads[0] = 0.3
    for name in ("ba1", "ba2"):
        own = sorted(n for n in os.listdir(tmp_path / name) if n != "manifest.json")
        uploader.submit(UploadJob(local_dir=str(tmp_path / name), name=name, files=own, commit=True))
    uploader.supersede(["ba2"])  # while ba1 uploads: a newer checkpoint's retention drops ba2
    uploader.wait()
    uploader.close()
    assert uploader.committed == ["ba1"] and uploader.skipped == ["ba2"]
    base = read_checkpoint(f"{s3_bucket.url}/run/ba1", storage_options=s3_bucket.storage_options)
    assert torch.equal(base["frozen"], frozen), "the base's shard is still in the store"


def read_manifest_names(ckpt: Path) -> list[str]:
    return [f["name"] for f in json.loads((ckpt / "manifest.json").read_text())["files"]]


def test_the_backlog_is_bounded_and_the_wait_is_logged(
    s3_bucket: S3Bucket, tmp_path: Path, slow_uploads: dict[int, float], caplog: pytest.LogCaptureFixture
) -> None:
    storage, root = Storage.open(f"{s3_bucket.url}/run", s3_bucket.storage_options)
    uploader = Uploader(storage, root, upload_timeout_s=60, max_backlog=1)
    slow_uploads[0] = 0.3
    stats = []
    for step in (1, 2, 3):
        local, files = _checkpoint(tmp_path, f"ba{step}", step)
        stats.append(SaveStats(path=local, nbytes=1, step=step))
        uploader.submit(UploadJob(local_dir=local, name=f"ba{step}", files=files, commit=True, stats=stats[-1]))
        assert uploader.backlog <= 1  # each submit waited for the one before
    uploader.wait()
    uploader.close()
    assert uploader.committed == ["ba1", "ba2", "ba3"] and uploader.skipped == []  # none superseded: all uploaded
    assert any("max_upload_backlog=1" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert all(s.upload_lag_s is not None and s.upload_lag_s > 0 for s in stats)
    metrics = stats[0].metrics(upload=True)
    assert metrics["checkpoint/upload_lag_steps"] == 0 and metrics["checkpoint/upload_backlog"] == 0


def test_max_upload_backlog_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"max_upload_backlog=0 .* int >= 1"):
        ShardedCheckpointIO(max_upload_backlog=0)
