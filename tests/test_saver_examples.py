"""The Trainer-fitting examples that used to be doctests of ``CheckpointSaver`` (moved here to keep doctests fast).

Each test asserts what the docstring showed: the names kept after rotation, a restart from ``"last"``,
an extra checkpoint saved from a hook, keep-every-N, and ``best_model_path``.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_ckpt import CheckpointSaver
from lightning_ckpt.demo import TinyRegressor, build_trainer


def _trainer(max_steps: int, saver: CheckpointSaver) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, callbacks=[saver], logger=False, enable_progress_bar=False)


def test_rotation_keeps_the_newest_two_and_a_restart_continues_from_last(tmp_path: Path) -> None:
    saver = CheckpointSaver(str(tmp_path), save_interval="2ba", num_checkpoints_to_keep=2, run_name="demo")
    _trainer(6, saver).fit(BoringModel())
    assert saver.saved_checkpoints == ["ep0-ba4", "ep0-ba6"]  # ep0-ba2 was rotated away
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".")) == [
        "ep0-ba4",
        "ep0-ba6",
        "latest",
        "latest.symlink",
    ]
    restarted = _trainer(8, saver)
    restarted.fit(BoringModel(), ckpt_path="last")  # continues from ep0-ba6
    assert saver.saved_checkpoints == ["ep0-ba6", "ep0-ba8"]
    assert restarted.strategy.checkpoint_io.loaded_path == str(tmp_path / "ep0-ba6")


def test_newest_committed_names_the_last_save(tmp_path: Path) -> None:
    saver = CheckpointSaver(str(tmp_path), save_interval="1ba", run_name="demo")
    trainer = _trainer(2, saver)
    trainer.fit(BoringModel())
    path, committed_at = saver.newest_committed(trainer)
    assert os.path.basename(path) == "ep0-ba2" and committed_at > 0


def test_save_called_from_a_hook_saves_an_extra_checkpoint(tmp_path: Path) -> None:
    saver = CheckpointSaver(str(tmp_path), save_interval="1ep", run_name="demo")
    saved: list[str] = []

    class Model(BoringModel):
        def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
            if self.global_step == 2:
                saved.append(os.path.basename(saver.save(self.trainer)))

    _trainer(3, saver).fit(Model())
    assert saved == ["ep0-ba2"]
    assert "ep0-ba2" in saver.saved_checkpoints


def test_keep_every_n_steps_keeps_multiples_beside_the_newest(tmp_path: Path) -> None:
    saver = CheckpointSaver(str(tmp_path), save_interval="1ba", num_checkpoints_to_keep=2, keep_every_n_steps=2,
                            run_name="demo")  # fmt: skip
    _trainer(5, saver).fit(BoringModel())
    assert saver.saved_checkpoints == ["ep0-ba2", "ep0-ba4", "ep0-ba5"]  # the newest two, and every 2nd step


def test_best_model_path_is_a_kept_checkpoint(tmp_path: Path) -> None:
    saver = CheckpointSaver(str(tmp_path / "ckpt"), save_interval="1ba", monitor="train_loss", run_name="demo")
    build_trainer(str(tmp_path), max_steps=3, callbacks=[saver]).fit(TinyRegressor())
    assert os.path.basename(saver.best_model_path) in saver.saved_checkpoints
