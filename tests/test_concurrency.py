"""Two runs, one folder: the second is refused before training; rotation never deletes another run's work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fsspec
import lightning as L
import pytest

from lightning_ckpt import CheckpointSaver, FolderConflictError, FolderInUseError, ShardedCheckpointIO
from lightning_ckpt.demo import TinyRegressor, build_trainer

from .s3_server import S3Bucket
from .test_distributed import ROOT, WORKER


class CountBatches(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self.batches += 1


def _fit(
    root: Path, saver: CheckpointSaver, epochs: int = 1, ckpt_path: str | None = None, **kwargs: Any
) -> tuple[L.Trainer, CountBatches]:
    L.seed_everything(0, verbose=False)
    counter = CountBatches()
    io = ShardedCheckpointIO(cache_dir=str(root / "cache"))
    trainer = build_trainer(str(root), max_epochs=epochs, callbacks=[saver, counter], plugins=[io], **kwargs)
    trainer.fit(TinyRegressor(), ckpt_path=ckpt_path)
    return trainer, counter


def _start_run(folder: str, marks: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, WORKER, "--devices", "1", "--folder", folder, "--epochs", "50", "--interval", "1ep"]
    cmd += ["--mark-steps", str(marks), "--step-sleep", "0.2", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_until_training(marks: Path, proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if Path(f"{marks}.rank0.step").exists():
            return int(Path(f"{marks}.rank0.pid").read_text())
        time.sleep(0.05)
    raise AssertionError("the first run did not start training")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_run_on_the_same_folder_is_refused_before_training_until_the_first_is_gone(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    extra: list[str] = []
    options: dict[str, Any] = {}
    if where == "s3":
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        folder = f"{bucket.url}/run"
        options = bucket.storage_options
        endpoint = options["client_kwargs"]["endpoint_url"]
        extra = ["--s3-endpoint", endpoint, "--cache-dir", str(tmp_path / "cache1")]
    else:
        folder = str(tmp_path / "ckpts")
    first = _start_run(folder, tmp_path / "marks", *extra)
    try:
        pid = _wait_until_training(tmp_path / "marks", first)
        second = CheckpointSaver(folder=folder, storage_options=options, run_name="ddp", overwrite=True)
        with pytest.raises(FolderInUseError, match=rf"is in use by run 'ddp' \(host .*, pid {pid}, since") as info:
            _fit(tmp_path / "second", second)
        assert "CheckpointSaver(lock_folder=False)" in str(info.value) and repr(folder) in str(info.value)
        assert isinstance(info.value, FolderConflictError)
        # Evaluating with the same callbacks only reads: never refused.
        evaluating = CheckpointSaver(folder=folder, storage_options=options, run_name="ddp")
        io = ShardedCheckpointIO(cache_dir=str(tmp_path / "eval-cache"))
        build_trainer(str(tmp_path / "eval"), callbacks=[evaluating], plugins=[io]).validate(TinyRegressor())
    finally:
        os.kill(first.pid, signal.SIGKILL)  # a dead run holds nothing: no stale lock blocks the restart
        first.communicate()
    third = CheckpointSaver(folder=folder, storage_options=options, run_name="ddp", save_interval="1ep")
    trainer, counter = _fit(tmp_path / "third", third, ckpt_path="last")
    assert counter.batches > 0 and trainer.global_step > 0


def test_lock_folder_false_lets_runs_share_a_folder_and_each_rotates_only_its_own(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    first = CheckpointSaver(folder=str(folder), run_name="same", save_interval="1ep", lock_folder=False)
    _fit(tmp_path / "a", first, epochs=2)  # ep0-ba8, ep1-ba16
    theirs = {n: (folder / n / "manifest.json").read_bytes() for n in ("ep0-ba8", "ep1-ba16")}
    # Same command started again with fewer batches per epoch: its names differ; it keeps only its newest.
    second = CheckpointSaver(
        folder=str(folder), run_name="same", save_interval="1ep", num_checkpoints_to_keep=1, overwrite=True,
        lock_folder=False,
    )  # fmt: skip
    _fit(tmp_path / "b", second, epochs=3, limit_train_batches=3)  # ep0-ba3, ep1-ba6, ep2-ba9
    committed = sorted(
        n for n in os.listdir(folder) if not (folder / n).is_symlink() and (folder / n / "manifest.json").is_file()
    )
    assert committed == ["ep0-ba8", "ep1-ba16", "ep2-ba9"], "the other run's checkpoints survive its rotation"
    assert {n: (folder / n / "manifest.json").read_bytes() for n in theirs} == theirs
    run_ids = {n: json.loads((folder / n / "manifest.json").read_text())["metadata"]["run_id"] for n in committed}
    assert run_ids["ep0-ba8"] == run_ids["ep1-ba16"] != run_ids["ep2-ba9"]


def test_a_restart_continues_its_run_and_rotates_the_checkpoints_from_before_it(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    first = CheckpointSaver(folder=str(folder), run_name="r", save_interval="1ep", num_checkpoints_to_keep=2)
    _fit(tmp_path, first, epochs=2)
    restarted = CheckpointSaver(folder=str(folder), run_name="r", save_interval="1ep", num_checkpoints_to_keep=2)
    _fit(tmp_path, restarted, epochs=4, ckpt_path="last")
    committed = sorted(
        n for n in os.listdir(folder) if not (folder / n).is_symlink() and (folder / n / "manifest.json").is_file()
    )
    # ep0-ba8, saved before the restart, is rotated away; ep1-ba16 stays as the one resumed from.
    assert committed == ["ep1-ba16", "ep2-ba24", "ep3-ba32"], "the restart took over the run's rotation"


def test_a_remote_lease_names_its_holder_and_is_released_at_the_end(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    folder = f"{s3_bucket.url}/leased"
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options)
    seen: list[dict[str, Any]] = []

    class PeekLease(L.Callback):
        def on_train_start(self, *args: Any) -> None:
            seen.append(json.loads(fs.cat_file(f"{folder}/.lightning_ckpt.lock")))

    saver = CheckpointSaver(folder=folder, storage_options=s3_bucket.storage_options, run_name="lease")
    L.seed_everything(0, verbose=False)
    io = ShardedCheckpointIO(cache_dir=str(tmp_path / "cache"))
    trainer = build_trainer(str(tmp_path), max_epochs=1, callbacks=[saver, PeekLease()], plugins=[io])
    trainer.fit(TinyRegressor())
    assert seen and seen[0]["run_name"] == "lease" and seen[0]["pid"] == os.getpid()
    assert not fs.exists(f"{folder}/.lightning_ckpt.lock"), "released when the fit ended"
