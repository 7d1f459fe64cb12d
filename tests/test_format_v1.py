"""Format v1 checkpoints stay readable: ``tests/data/format_v1`` was committed by lightning-ckpt 0.1 (format 1).

The folder is a real fit's checkpoint (``TinyRegressor``, 8 steps, Adam) written by the code before format
v2; ``expected.pt`` is what that code's ``read_checkpoint`` returned for it. Each test works on a copy.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_ckpt import CheckpointSaver, latest, read_checkpoint
from lightning_ckpt.cli import main
from lightning_ckpt.demo import TinyRegressor, build_trainer

from .test_save_plan import assert_bitwise_equal

DATA = Path(__file__).with_name("data") / "format_v1"


@pytest.fixture
def v1_folder(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DATA / "ckpts", tmp_path / "ckpts", symlinks=True))


def expected() -> dict[str, Any]:
    return torch.load(DATA / "expected.pt", weights_only=False)


def test_the_fixture_is_format_1() -> None:
    assert json.loads((DATA / "ckpts" / "ep0-ba8" / "manifest.json").read_text())["format_version"] == 1


def test_a_v1_checkpoint_reads_every_value_as_it_was_written(v1_folder: Path) -> None:
    assert_bitwise_equal(read_checkpoint(str(v1_folder / "ep0-ba8")), expected())
    assert latest(v1_folder) == str(v1_folder / "ep0-ba8")


def test_a_v1_checkpoint_verifies_inspects_and_copies(v1_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = v1_folder / "ep0-ba8"
    assert main(["verify", str(ckpt)]) == 0
    assert main(["inspect", str(ckpt)]) == 0
    assert "state_dict/" in capsys.readouterr().out
    copy = v1_folder.parent / "copy"
    assert main(["cp", str(ckpt), str(copy)]) == 0
    assert main(["verify", str(copy)]) == 0
    assert_bitwise_equal(read_checkpoint(str(copy)), expected())


class _StateAtStart(L.Callback):
    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.state = copy.deepcopy(trainer._checkpoint_connector.dump_checkpoint(weights_only=False))  # not live


def test_fit_resumes_from_a_v1_checkpoint_and_goes_on_saving(v1_folder: Path, tmp_path: Path) -> None:
    """The resumed model, optimizer and loops are the v1 checkpoint's; the new saves are readable too."""
    L.seed_everything(0, verbose=False)
    probe = _StateAtStart()
    saver = CheckpointSaver(folder=tmp_path / "new", save_interval="4ba", run_name="after-v1")
    trainer = build_trainer(str(tmp_path), max_epochs=2, callbacks=[saver, probe])
    trainer.fit(TinyRegressor(), ckpt_path=str(v1_folder / "ep0-ba8"))
    old = expected()
    assert probe.state["global_step"] == old["global_step"] == 8
    for key in ("state_dict", "optimizer_states"):
        assert_bitwise_equal({key: probe.state[key]}, {key: old[key]})
    newest = latest(tmp_path / "new")
    assert newest is not None and read_checkpoint(newest)["global_step"] == 16
