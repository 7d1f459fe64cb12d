"""Every save reports its cost to the trainer's loggers, at the step it describes, and in one log line."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_ckpt import CheckpointSaver, ShardedCheckpointIO
from lightning_ckpt.demo import TinyRegressor, build_trainer

from .s3_server import S3Bucket

WRITE = ["checkpoint/stall_s", "checkpoint/write_s", "checkpoint/commit_s", "checkpoint/bytes", "checkpoint/write_GBps"]
UPLOAD = ["checkpoint/upload_s", "checkpoint/upload_GBps"]


def _fit(root: Path, saver: CheckpointSaver, io: ShardedCheckpointIO) -> list[dict[str, str]]:
    L.seed_everything(0, verbose=False)
    logger = CSVLogger(str(root / "logs"), name="m", version=0)
    trainer = build_trainer(str(root), max_epochs=2, callbacks=[saver], plugins=[io], logger=logger)
    trainer.fit(TinyRegressor())
    with open(root / "logs" / "m" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _by_step(rows: list[dict[str, str]], names: list[str]) -> dict[int, dict[str, float]]:
    found: dict[int, dict[str, float]] = {}
    for row in rows:
        values = {n: float(row[n]) for n in names if row.get(n)}
        if values:
            found.setdefault(int(row["step"]), {}).update(values)
    return found


def _saved_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "lightning_ckpt" and r.levelno == logging.INFO and r.getMessage().startswith("Saved checkpoint")
    ]


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_every_save_logs_its_cost_at_its_step_and_one_info_line(
    async_save: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lightning_ckpt")
    folder = tmp_path / "ckpts"
    saver = CheckpointSaver(folder=str(folder), run_name="m", save_interval="4ba", async_save=async_save)
    rows = _fit(tmp_path, saver, ShardedCheckpointIO())
    logged = _by_step(rows, WRITE)
    assert sorted(logged) == [4, 8, 12, 16], "one set of metrics per save, at the step it holds"
    for step, metrics in logged.items():
        assert set(metrics) == set(WRITE)
        manifest = json.loads((folder / f"ep{(step - 1) // 8}-ba{step}" / "manifest.json").read_text())
        shard_bytes = sum(f["size"] for f in manifest["files"] if f["name"].startswith("shard-"))
        assert metrics["checkpoint/bytes"] >= shard_bytes > 0
        # Blocking, background and commit times are separate figures; none is a dispatch time.
        assert 0 < metrics["checkpoint/write_s"] <= metrics["checkpoint/commit_s"]
        assert metrics["checkpoint/stall_s"] > 0 and metrics["checkpoint/write_GBps"] > 0
        if not async_save:  # a synchronous save blocks until committed
            assert metrics["checkpoint/stall_s"] >= metrics["checkpoint/write_s"]
    assert not _by_step(rows, UPLOAD), "no upload metrics for a local folder"
    lines = _saved_lines(caplog)
    assert len(lines) == 4 and all("training blocked" in line and "GB/s" in line for line in lines)
    assert [line.split("(step ")[1].split(")")[0] for line in lines] == ["4", "8", "12", "16"]


def test_uploads_log_their_time_and_throughput_at_the_step_of_their_checkpoint(
    s3_bucket: S3Bucket, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lightning_ckpt")
    saver = CheckpointSaver(folder=f"{s3_bucket.url}/run", storage_options=s3_bucket.storage_options,
                            local_folder=str(tmp_path / "local"), run_name="m", save_interval="8ba")  # fmt: skip
    rows = _fit(tmp_path, saver, ShardedCheckpointIO(cache_dir=str(tmp_path / "cache")))
    uploads: dict[int, Any] = _by_step(rows, UPLOAD)
    assert sorted(uploads) == [8, 16] and sorted(_by_step(rows, WRITE)) == [8, 16]
    assert all(m["checkpoint/upload_s"] > 0 and m["checkpoint/upload_GBps"] > 0 for m in uploads.values())
    lag = _by_step(rows, ["checkpoint/upload_lag_s", "checkpoint/upload_lag_steps", "checkpoint/upload_backlog"])
    assert sorted(lag) == [8, 16] and all(m["checkpoint/upload_lag_s"] > 0 for m in lag.values())
    assert all(0 <= m["checkpoint/upload_lag_steps"] <= 8 and m["checkpoint/upload_backlog"] <= 1 for m in lag.values())
    lines = _saved_lines(caplog)
    assert len(lines) == 2, lines  # one line per save, written once the upload is committed
    assert all(line.startswith(f"Saved checkpoint {s3_bucket.url}/run/") and "upload" in line for line in lines)


def test_the_plugin_alone_with_model_checkpoint_logs_a_line_per_save_and_keeps_a_bounded_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_ckpt.pipeline

    monkeypatch.setattr(lightning_ckpt.pipeline, "MAX_FINISHED_SAVES", 3)
    io = ShardedCheckpointIO()
    every_step = ModelCheckpoint(dirpath=tmp_path / "mc", every_n_train_steps=1, save_top_k=-1)
    caplog.set_level(logging.INFO, logger="lightning_ckpt")
    L.seed_everything(0, verbose=False)
    trainer = build_trainer(str(tmp_path), max_epochs=1, callbacks=[every_step], plugins=[io], logger=False)
    trainer.fit(TinyRegressor())

    steps = trainer.global_step
    assert steps > 3
    assert len(_saved_lines(caplog)) >= steps  # one INFO line per save (ModelCheckpoint also saves at epoch end)
    kept = [(kind, stats.step) for kind, stats in io.finished_saves()]
    assert kept == [("write", steps - 2), ("write", steps - 1), ("write", steps)], kept  # the newest 3 only
