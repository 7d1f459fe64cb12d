"""``lightning_ckpt.load_into``: a checkpoint read in place into tensors that already exist."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_ckpt import (
    CheckpointNotFoundError,
    CheckpointSaver,
    CorruptCheckpointError,
    latest,
    load_into,
    read_checkpoint,
)
from lightning_ckpt.collective import save_checkpoint_dir
from lightning_ckpt.demo import TinyRegressor, build_trainer
from lightning_ckpt.manifest import Manifest
from lightning_ckpt.tree import join_key

from .s3_server import S3Bucket


def _tensors(tree: Any, path: tuple[Any, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of a nested dict/list by its checkpoint key."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    found: dict[str, torch.Tensor] = {}
    for name, value in items:
        if isinstance(value, torch.Tensor):
            found[join_key(*path, name)] = value
        else:
            found.update(_tensors(value, (*path, name)))
    return found


def _zeroed_like(tree: Any) -> Any:
    """The same structure with fresh zeroed tensors and non-tensor values replaced by ``None``."""
    if isinstance(tree, dict):
        return {k: _zeroed_like(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_zeroed_like(v) for v in tree]
    return torch.zeros_like(tree) if isinstance(tree, torch.Tensor) else None


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The newest checkpoint of a real Trainer fit (model, Adam state, loops, callbacks)."""
    root = tmp_path_factory.mktemp("fit")
    saver = CheckpointSaver(folder=str(root / "ckpts"), save_interval="1ep")
    build_trainer(str(root), max_epochs=2, callbacks=[saver]).fit(TinyRegressor())
    return latest(str(root / "ckpts"))


def test_every_tensor_of_a_trainer_checkpoint_is_read_into_the_existing_memory(fitted: str) -> None:
    saved = read_checkpoint(fitted)
    state = {
        "state_dict": _zeroed_like(saved["state_dict"]),
        "optimizer_states": _zeroed_like(saved["optimizer_states"]),
        "global_step": None,
        "epoch": None,
    }
    memory = {key: t.data_ptr() for key, t in _tensors(state).items()}

    assert load_into(fitted, state) is state

    expected = _tensors({k: saved[k] for k in ("state_dict", "optimizer_states")})
    got = _tensors(state)
    assert got.keys() == expected.keys() and len(got) > 10
    for key, tensor in got.items():
        assert tensor.data_ptr() == memory[key], key  # filled in place, not replaced
        assert tensor.dtype == expected[key].dtype and torch.equal(tensor, expected[key]), key
    assert state["global_step"] == saved["global_step"] > 0 and state["epoch"] == saved["epoch"]
    assert (
        state["optimizer_states"][0]["param_groups"][0]["lr"] == saved["optimizer_states"][0]["param_groups"][0]["lr"]
    )


def test_a_model_loads_its_weights_in_place(fitted: str) -> None:
    model = TinyRegressor()
    weights = model.state_dict()
    load_into(fitted, {"state_dict": weights})
    saved = read_checkpoint(fitted, weights_only=True)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_a_missing_key_is_named_unless_strict_is_off(tmp_path: Path) -> None:
    path = save_checkpoint_dir({"w": torch.arange(4.0)}, str(tmp_path / "c"))
    state = {"w": torch.zeros(4), "extra": torch.full((2,), 5.0), "note": "kept"}
    with pytest.raises(CorruptCheckpointError, match=r"does not hold 'extra', 'note'.*strict=False"):
        load_into(path, state)
    assert torch.equal(state["w"], torch.zeros(4))  # refused before anything is read

    load_into(path, state, strict=False)
    assert torch.equal(state["w"], torch.arange(4.0))
    assert torch.equal(state["extra"], torch.full((2,), 5.0)) and state["note"] == "kept"


def test_another_shape_or_dtype_is_refused_with_the_key(tmp_path: Path) -> None:
    path = save_checkpoint_dir({"w": torch.arange(4.0)}, str(tmp_path / "c"))
    with pytest.raises(CorruptCheckpointError, match=r"'w' is float32 \[4\] in the checkpoint but float32 \[5\]"):
        load_into(path, {"w": torch.zeros(5)})
    with pytest.raises(CorruptCheckpointError, match=r"'w' is float32 \[4\] in the checkpoint but float64 \[4\]"):
        load_into(path, {"w": torch.zeros(4, dtype=torch.float64)})


def test_a_flipped_byte_fails_the_checksum(tmp_path: Path) -> None:
    path = save_checkpoint_dir({"w": torch.arange(1024.0)}, str(tmp_path / "c"))
    manifest = Manifest.from_json(Path(path, "manifest.json").read_bytes(), source=path)
    entry = manifest.tensors["w"]
    with open(os.path.join(path, entry.file), "r+b") as f:
        f.seek(entry.offset + 100)
        byte = f.read(1)
        f.seek(entry.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'w' .* has checksum"):
        load_into(path, {"w": torch.zeros(1024)})


def test_bad_arguments_are_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state must be a dict or list"):
        load_into(str(tmp_path), torch.zeros(3))  # type: ignore[arg-type]
    with pytest.raises(CheckpointNotFoundError, match=r"nothing-here' does not exist"):
        load_into(str(tmp_path / "nothing-here"), {"w": torch.zeros(1)})


def test_from_s3_a_subset_of_the_tensors_loads_in_place(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    local = save_checkpoint_dir(
        {"a": torch.arange(256.0), "b": torch.arange(1 << 18, dtype=torch.float64)}, str(tmp_path / "c")
    )
    url = f"{s3_bucket.url}/run/c"
    from lightning_ckpt.storage import Storage

    storage, root = Storage.open(url, s3_bucket.storage_options)
    storage.makedirs(root)
    for name in sorted(os.listdir(local), key=lambda n: n == "manifest.json"):  # the manifest last
        with storage.open_write(storage.join(root, name)) as f:
            f.write(Path(local, name).read_bytes())
    state = {"a": torch.zeros(256)}
    memory = state["a"].data_ptr()
    load_into(url, state, storage_options=s3_bucket.storage_options)
    assert torch.equal(state["a"], torch.arange(256.0)) and state["a"].data_ptr() == memory


class _NoLoadHook(TinyRegressor):
    """TinyRegressor without its ``on_load_checkpoint``: nothing can change the checkpoint before the weights load."""

    on_load_checkpoint = L.LightningModule.on_load_checkpoint


class _DropsABias(TinyRegressor):
    """Drops ``net.2.bias`` from the checkpoint to keep its own value (with ``strict_loading=False``)."""

    def __init__(self) -> None:
        super().__init__()
        self.strict_loading = False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        del checkpoint["state_dict"]["net.2.bias"]


def _everything(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """Weights, buffers and optimizer state of a fitted trainer, by checkpoint key."""
    optimizer = trainer.optimizers[0].state_dict()
    return {**_tensors({"state_dict": trainer.lightning_module.state_dict()}), **_tensors({"optimizer": optimizer})}


def test_a_trainer_resume_reads_the_weights_into_the_model_and_equals_an_uninterrupted_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    L.seed_everything(0, verbose=False)
    full = build_trainer(str(tmp_path / "full"), max_epochs=3)
    full.fit(_NoLoadHook())

    folder = str(tmp_path / "ckpts")
    L.seed_everything(0, verbose=False)
    build_trainer(str(tmp_path / "a"), max_epochs=2, callbacks=[CheckpointSaver(folder, save_interval="1ep")]).fit(
        _NoLoadHook()
    )
    caplog.set_level(logging.DEBUG, logger="lightning_ckpt")
    L.seed_everything(0, verbose=False)
    model = _NoLoadHook()
    weights = {name: p.data_ptr() for name, p in model.state_dict().items()}
    resumed = build_trainer(str(tmp_path / "b"), max_epochs=3, callbacks=[CheckpointSaver(folder, save_interval="1ep")])
    resumed.fit(model, ckpt_path="last")

    assert any("into the model in place" in r.getMessage() for r in caplog.records)
    assert {name: p.data_ptr() for name, p in model.state_dict().items()} == weights
    assert (resumed.global_step, resumed.current_epoch) == (full.global_step, full.current_epoch) == (24, 3)
    expected, got = _everything(full), _everything(resumed)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_a_model_that_edits_the_checkpoint_in_on_load_checkpoint_gets_the_whole_dict_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = str(tmp_path / "ckpts")
    L.seed_everything(0, verbose=False)
    build_trainer(str(tmp_path / "a"), max_epochs=1, callbacks=[CheckpointSaver(folder, save_interval="1ep")]).fit(
        TinyRegressor()
    )
    saved = read_checkpoint(folder)["state_dict"]
    caplog.set_level(logging.DEBUG, logger="lightning_ckpt")
    model = _DropsABias()
    own_bias = model.net[2].bias.detach().clone()
    trainer = build_trainer(str(tmp_path / "b"), max_epochs=1, callbacks=[CheckpointSaver(folder, save_interval="1ep")])
    trainer.validate(model, ckpt_path="last", verbose=False)

    assert not any("into the model in place" in r.getMessage() for r in caplog.records)
    assert torch.equal(model.net[2].bias, own_bias) and not torch.equal(own_bias, saved["net.2.bias"])
    assert torch.equal(model.net[0].weight, saved["net.0.weight"])


def test_importing_the_module_does_not_hide_the_function() -> None:
    import importlib

    import lightning_ckpt

    importlib.import_module("lightning_ckpt.into")  # as doctest collection does
    assert lightning_ckpt.load_into is load_into and callable(lightning_ckpt.load_into)
