"""One owner for each fact: "best", the last saved step, monitor/mode, and the upload settings (issue 14, item 2)."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_ckpt import CheckpointSaver, RetryPolicy, ShardedCheckpointIO, latest
from lightning_ckpt.demo import TinyRegressor, build_trainer
from lightning_ckpt.interval import SavePoint, SaveSchedule
from lightning_ckpt.reader import read_checkpoint
from lightning_ckpt.storage import Storage


class ScoredRegressor(TinyRegressor):
    """Logs ``score``: NaN in the first and the last epoch, 1 / (1 + epoch) in between."""

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        epoch = self.current_epoch
        self.log("score", math.nan if epoch in (0, 3) else 1.0 / (1 + epoch))
        return super().training_step(batch, batch_idx)


def _dirs(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.is_symlink() and (p / "manifest.json").exists()}


@pytest.mark.parametrize(("mode", "best"), [("min", "ep2-ba24"), ("max", "ep1-ba16")])
def test_a_nan_metric_is_never_best_and_best_model_path_is_what_retention_keeps(
    tmp_path: Path, mode: str, best: str
) -> None:
    keep_all = CheckpointSaver(tmp_path / "all", save_interval="1ep", monitor="score", mode=mode, run_name="r")
    best_only = CheckpointSaver(
        tmp_path / "best", save_interval="1ep", monitor="score", mode=mode, num_checkpoints_to_keep=0, run_name="r"
    )
    build_trainer(str(tmp_path), max_epochs=4, callbacks=[keep_all, best_only]).fit(ScoredRegressor())
    recorded = {
        name: json.loads((tmp_path / "all" / name / "manifest.json").read_text())["metadata"]["monitor_value"]
        for name in _dirs(tmp_path / "all")
    }
    assert sorted(name for name, value in recorded.items() if math.isnan(value)) == ["ep0-ba8", "ep3-ba32"]
    assert _dirs(tmp_path / "best") == {best, "ep3-ba32"}, "the best finite score, and the newest (kept as newest)"
    assert os.path.basename(keep_all.best_model_path) == best, "not the NaN of the first save"
    assert os.path.basename(best_only.best_model_path) == best


def test_monitor_and_mode_are_fixed_at_construction_so_retention_cannot_drift(tmp_path: Path) -> None:
    saver = CheckpointSaver(tmp_path, monitor="score", mode="max", num_checkpoints_to_keep=2, run_name="r")
    assert (saver.monitor, saver.mode) == ("score", "max")
    with pytest.raises(AttributeError, match=r"mode.*CheckpointSaver\(.*mode="):
        saver.mode = "min"
    with pytest.raises(AttributeError, match=r"monitor.*CheckpointSaver\(.*monitor="):
        saver.monitor = "val_loss"
    assert saver.mode == "max" and "mode='max'" in repr(saver.retention)


class StartStep(L.Callback):
    """Records the saver's last saved step when training starts (after a resume restored it)."""

    def __init__(self, saver: CheckpointSaver) -> None:
        self.saver = saver
        self.seen: int | None = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen = self.saver.save_interval.last_saved_batch


def test_the_last_saved_step_has_one_owner_the_schedule_across_manual_saves_and_restarts(tmp_path: Path) -> None:
    saver = CheckpointSaver(tmp_path / "c", save_interval="2ba", run_name="r")

    class SavesAtThree(TinyRegressor):
        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.global_step == 3:
                saver.save(self.trainer)

    build_trainer(str(tmp_path), max_steps=3, callbacks=[saver]).fit(SavesAtThree())
    assert saver.saved_checkpoints == ["ep0-ba2", "ep0-ba3"]
    assert saver.save_interval.last_saved_batch == 3 == saver.state_dict()["last_saved_step"]
    resumed = CheckpointSaver(tmp_path / "c", save_interval="2ba", run_name="r")
    start = StartStep(resumed)
    build_trainer(str(tmp_path), max_steps=4, callbacks=[resumed, start]).fit(TinyRegressor(), ckpt_path="last")
    assert start.seen == 3, "restored from the checkpoint into the schedule, before any save"
    assert _dirs(tmp_path / "c") == {"ep0-ba2", "ep0-ba3", "ep0-ba4"}


@dataclass(frozen=True)
class EveryThird(SaveSchedule):
    """A user's frozen schedule: told about saves all the same."""

    def is_due(self, point: SavePoint, trainer: object = None, now: float | None = None) -> bool:
        return point.batch > 0 and point.batch % 3 == 0


def test_a_frozen_user_schedule_still_records_the_last_saved_step_with_gradient_accumulation(tmp_path: Path) -> None:
    saver = CheckpointSaver(tmp_path / "c", filename="ba{batch}", save_interval=EveryThird(), run_name="r")
    build_trainer(str(tmp_path), max_steps=6, accumulate_grad_batches=2, callbacks=[saver]).fit(TinyRegressor())
    assert saver.saved_checkpoints == ["ba3", "ba6"], "each repeated global_step is saved once"
    assert saver.save_interval.last_saved_batch == 6


def test_upload_settings_changed_after_a_first_upload_take_effect(tmp_path: Path) -> None:
    remote = f"memory://single-owner-{uuid.uuid4().hex[:8]}/run"
    io = ShardedCheckpointIO(cache_dir=str(tmp_path), num_concurrent_uploads=2, upload_timeout_in_seconds=100)
    try:
        io.save_collective({"w": torch.ones(2), "global_step": 1}, f"{remote}/ba1")
        io.wait_for_uploads()
        first = io.mirror.uploader(remote)
        assert (first.num_concurrent_uploads, first.upload_timeout_s) == (2, 100.0)
        policy = RetryPolicy(attempts=3)
        io.num_concurrent_uploads, io.upload_timeout_s, io.upload_retry = 6, 50.0, policy
        io.save_collective({"w": torch.full((2,), 2.0), "global_step": 2}, f"{remote}/ba2")
        io.wait_for_uploads()
        now = io.mirror.uploader(remote)
        assert (now.num_concurrent_uploads, now.upload_timeout_s, now.policy) == (6, 50.0, policy)
        assert os.path.basename(latest(remote) or "") == "ba2"
        for step in (1, 2):
            torch.testing.assert_close(read_checkpoint(f"{remote}/ba{step}")["w"], torch.full((2,), float(step)))
    finally:
        io.teardown()


def test_a_savers_upload_settings_reach_an_uploader_the_plugin_made_before_it(tmp_path: Path) -> None:
    remote = f"memory://single-owner-{uuid.uuid4().hex[:8]}/run"
    storage, folder = Storage.open(remote)
    io = ShardedCheckpointIO(cache_dir=str(tmp_path / "cache"))
    io.save_collective({"w": torch.ones(2), "global_step": 1}, f"{remote}/manual-1")  # an uploader with defaults
    io.wait_for_uploads()
    seen: list[tuple[int, float]] = []

    class Probe(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            uploader = io.mirror.uploader(storage.url(folder))  # the folder as the saver spells it
            seen.append((uploader.num_concurrent_uploads, uploader.upload_timeout_s))

    saver = CheckpointSaver(remote, save_interval="4ba", num_concurrent_uploads=3, upload_timeout_in_seconds=77,
                            run_name="r")  # fmt: skip
    trainer = build_trainer(str(tmp_path), max_steps=8, callbacks=[saver, Probe()], plugins=[io])
    trainer.fit(TinyRegressor())
    assert seen == [(3, 77.0)]
    assert {os.path.basename(latest(remote) or "")} == {"ep0-ba8"}
