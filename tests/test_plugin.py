"""ShardedCheckpointIO through a real Trainer: stock ModelCheckpoint, legacy files, every ckpt_path form."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ckpt import CheckpointSaver, ShardedCheckpointIO, read_checkpoint
from lightning_ckpt.demo import TinyRegressor, build_trainer, state_of


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fit(root: Path, *, max_epochs: int, ckpt_path: str | None = None, **kwargs: object) -> TinyRegressor:
    L.seed_everything(0, verbose=False)
    model = TinyRegressor()
    trainer = build_trainer(str(root), max_epochs=max_epochs, **kwargs)  # type: ignore[arg-type]
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


def test_stock_model_checkpoint_top_k_and_last(tmp_path: Path) -> None:
    mc = ModelCheckpoint(dirpath=tmp_path / "mc", monitor="val_loss", save_top_k=2, save_last=True)
    trainer = build_trainer(str(tmp_path), max_epochs=4, callbacks=[mc], plugins=[ShardedCheckpointIO()])
    model = TinyRegressor()
    trainer.fit(model)
    assert trainer.global_step == 32
    names = sorted(os.listdir(tmp_path / "mc"))
    assert len(names) == 3 and "last.ckpt" in names, names
    assert set(names) == {"last.ckpt", *(os.path.basename(p) for p in mc.best_k_models)}
    for name in names:  # every one is a committed checkpoint directory
        assert (tmp_path / "mc" / name / "manifest.json").is_file()
    last = read_checkpoint(str(tmp_path / "mc" / "last.ckpt"))
    newest = max((read_checkpoint(p) for p in mc.best_k_models), key=lambda c: c["global_step"])
    assert last["global_step"] == newest["global_step"] > 8  # the epoch-0 checkpoint was rotated out
    assert _equal_states(last["state_dict"], newest["state_dict"])
    assert not (tmp_path / "mc" / "epoch=0-step=8.ckpt").exists()
    assert read_checkpoint(mc.best_model_path)["callbacks"], "callback state is saved"


def test_resume_through_model_checkpoint_last_equals_uninterrupted(tmp_path: Path) -> None:
    full = _fit(tmp_path / "full", max_epochs=4)
    mc = ModelCheckpoint(dirpath=tmp_path / "mc", save_last=True, save_top_k=0)
    _fit(tmp_path / "a", max_epochs=2, callbacks=[mc], plugins=[ShardedCheckpointIO()])
    mc2 = ModelCheckpoint(dirpath=tmp_path / "mc", save_last=True, save_top_k=0)
    resumed = _fit(tmp_path / "a", max_epochs=4, callbacks=[mc2], plugins=[ShardedCheckpointIO()], ckpt_path="last")
    assert _equal_states(state_of(resumed), state_of(full))


def test_resume_from_a_legacy_torch_save_ckpt(tmp_path: Path) -> None:
    full = _fit(tmp_path / "full", max_epochs=4)
    mc = ModelCheckpoint(dirpath=tmp_path / "old", save_last=True, save_top_k=0)
    _fit(tmp_path / "a", max_epochs=2, callbacks=[mc])  # Lightning's default TorchCheckpointIO: one .ckpt file
    legacy = tmp_path / "old" / "last.ckpt"
    assert legacy.is_file()
    resumed = _fit(tmp_path / "b", max_epochs=4, plugins=[ShardedCheckpointIO()], ckpt_path=str(legacy))
    assert _equal_states(state_of(resumed), state_of(full))


@pytest.mark.parametrize("form", ["dir", "folder", "latest", "pointer"])
@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_every_ckpt_path_form_loads_for_evaluation(tmp_path: Path, form: str, stage: str) -> None:
    saver = CheckpointSaver(folder=tmp_path / "ckpts", save_interval="1ep", run_name="r")
    trained = _fit(tmp_path, max_epochs=2, callbacks=[saver])
    folder = tmp_path / "ckpts"
    ckpt_path = {
        "dir": folder / "ep1-ba16",
        "folder": folder,
        "latest": folder / "latest",
        "pointer": folder / "latest.symlink",
    }[form]
    fresh = TinyRegressor(width=32)
    torch.nn.init.zeros_(fresh.net[0].weight)
    trainer = build_trainer(str(tmp_path / "eval"), plugins=[ShardedCheckpointIO()])
    getattr(trainer, stage)(fresh, ckpt_path=str(ckpt_path))
    assert _equal_states(state_of(fresh), state_of(trained))


def test_map_location_and_weights_only_are_honoured(tmp_path: Path) -> None:
    io = ShardedCheckpointIO()
    path = tmp_path / "c"
    io.save_checkpoint(
        {"state_dict": {"w": torch.ones(2)}, "global_step": 1, "obj": pickle.loads(pickle.dumps(Path("x")))},
        path,
    )
    with pytest.raises(
        pickle.UnpicklingError,
        match=r"objects\.pt holds objects that weights_only=True refuses.*weights_only=False",
    ):
        io.load_checkpoint(path)
    loaded = io.load_checkpoint(path, map_location="meta", weights_only=False)
    assert loaded["state_dict"]["w"].device.type == "meta"
    assert loaded["obj"] == Path("x")
    assert (
        io.load_checkpoint(path, map_location=lambda s, loc: s, weights_only=False)["state_dict"]["w"].device.type
        == "cpu"
    )


def test_remove_checkpoint_deletes_the_directory_and_tolerates_missing(tmp_path: Path) -> None:
    io = ShardedCheckpointIO()
    io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "c")
    io.remove_checkpoint(tmp_path / "c")
    io.remove_checkpoint(tmp_path / "c")
    assert os.listdir(tmp_path) == []


def test_storage_options_must_be_a_dict() -> None:
    with pytest.raises(TypeError, match=r"storage_options must be a dict of fsspec options, got str"):
        ShardedCheckpointIO(storage_options="key=secret")  # type: ignore[arg-type]
