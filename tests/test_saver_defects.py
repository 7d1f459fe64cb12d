"""Defects a new user of ``CheckpointSaver`` hit (issue 13 §3): each test fails on the code before its fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ckpt import CheckpointSaver, ConfigError, FolderInUseError
from lightning_ckpt.demo import TinyRegressor, build_trainer


class StepAtStart(L.Callback):
    """Records the global step training starts from (what was resumed)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.step = trainer.global_step


def test_last_resumes_from_the_newest_of_checkpoint_saver_and_model_checkpoint(tmp_path: Path) -> None:
    """The saver saves every 2 epochs, ``ModelCheckpoint(save_last=True)`` every epoch: after 3 epochs
    ``ModelCheckpoint``'s last (step 24) is newer than the saver's (step 16); "last" resumes from it and warns."""

    def callbacks() -> list[L.Callback]:
        saver = CheckpointSaver(str(tmp_path / "saver"), save_interval="2ep", run_name="r")
        return [saver, ModelCheckpoint(dirpath=str(tmp_path / "mc"), save_last=True, save_top_k=0)]

    build_trainer(str(tmp_path), max_epochs=3, callbacks=callbacks()).fit(TinyRegressor())
    start = StepAtStart()
    trainer = build_trainer(str(tmp_path), max_epochs=4, callbacks=[*callbacks(), start])
    with pytest.warns(UserWarning, match=r"both CheckpointSaver .* and ModelCheckpoint .*resuming from the newer"):
        trainer.fit(TinyRegressor(), ckpt_path="last")
    assert start.step == 24


@pytest.mark.parametrize(
    "filename, interval", [("ep{epoch}", "2ba"), ("model", "1ep"), ("ep{epoch}-{val_loss:.2f}", "30s")]
)
def test_a_filename_that_repeats_between_saves_is_refused_at_construction(filename: str, interval: str) -> None:
    with pytest.raises(ConfigError, match=r"filename=.*two saves of one (epoch|run) would get the same name") as err:
        CheckpointSaver("/tmp/never-created", filename=filename, save_interval=interval)
    assert err.value.argument == "filename" and "{batch}" in str(err.value) and "overwrite=True" in str(err.value)
    CheckpointSaver("/tmp/never-created", filename=filename, save_interval=interval, overwrite=True)  # replaces


@pytest.mark.parametrize("filename", ["ep{epoch}", "ep{epoch}-{batch_in_epoch}", "ba{batch}"])
def test_filenames_that_differ_between_saves_are_accepted(filename: str) -> None:
    CheckpointSaver("/tmp/never-created", filename=filename, save_interval="1ep" if filename == "ep{epoch}" else "3ba")


def test_an_unlogged_metric_in_the_filename_shows_nan_warns_once_and_training_goes_on(tmp_path: Path) -> None:
    saver = CheckpointSaver(str(tmp_path / "c"), filename="ba{batch}-{nope:.2f}", save_interval="4ba", run_name="r")
    with pytest.warns(UserWarning) as record:
        build_trainer(str(tmp_path), max_epochs=2, callbacks=[saver]).fit(TinyRegressor())
    about = [str(w.message) for w in record if "'nope'" in str(w.message)]
    assert len(about) == 1 and "'nan'" in about[0] and "'train_loss'" in about[0], about
    assert [Path(p).name for p in saver.saved_checkpoints] == ["ba4-nan", "ba8-nan", "ba12-nan", "ba16-nan"]
    start = StepAtStart()
    resumed = CheckpointSaver(str(tmp_path / "c"), filename="ba{batch}-{nope:.2f}", save_interval="4ba", run_name="r")
    build_trainer(str(tmp_path), max_epochs=3, callbacks=[resumed, start]).fit(TinyRegressor(), ckpt_path="last")
    assert start.step == 16


def test_an_unlogged_monitor_warns_naming_the_saver_and_best_then_names_it_too(tmp_path: Path) -> None:
    saver = CheckpointSaver(str(tmp_path / "c"), monitor="never_logged", run_name="r")
    trainer = build_trainer(str(tmp_path), max_epochs=2, callbacks=[saver])
    with pytest.warns(UserWarning) as record:
        trainer.fit(TinyRegressor())
    about = [str(w.message) for w in record if "never_logged" in str(w.message)]
    assert len(about) == 1 and about[0].startswith("CheckpointSaver(monitor='never_logged')"), about
    assert "'val_loss'" in about[0] and saver.best_model_path == ""
    with pytest.raises(ValueError, match=r"CheckpointSaver keeps no best checkpoint: no save .*'never_logged'"):
        trainer.validate(ckpt_path="best")


def test_two_savers_of_one_trainer_in_one_folder_are_told_apart_from_another_run(tmp_path: Path) -> None:
    first = CheckpointSaver(str(tmp_path / "c"), filename="a{batch}", run_name="r")
    second = CheckpointSaver(str(tmp_path / "c"), filename="b{batch}", run_name="r")
    with pytest.raises(FolderInUseError, match=r"two CheckpointSaver callbacks of this trainer") as err:
        build_trainer(str(tmp_path), max_epochs=1, callbacks=[first, second]).fit(TinyRegressor())
    assert "'a{batch}' and 'b{batch}'" in str(err.value) and "lock_folder=False" in str(err.value)
    assert "in use by run" not in str(err.value)
