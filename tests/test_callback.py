"""CheckpointSaver through a real Trainer: schedules, names, retention, overwrite, resume, kill."""

from __future__ import annotations

import json
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_ckpt import (
    CheckpointSaver,
    ConfigError,
    FolderConflictError,
    ShardedCheckpointIO,
    latest,
    read_checkpoint,
)
from lightning_ckpt.collective import save_checkpoint_dir
from lightning_ckpt.demo import TinyRegressor, build_trainer, state_of

from .conftest import run_worker


def _fit(
    root: Path, saver: CheckpointSaver, *, max_epochs: int = 2, ckpt_path: str | None = None, **kw: Any
) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = build_trainer(str(root), max_epochs=max_epochs, callbacks=[saver], **kw)
    trainer.fit(TinyRegressor(), ckpt_path=ckpt_path)
    return trainer


def _dirs(folder: Path) -> list[str]:
    return sorted(
        n for n in os.listdir(folder) if not (folder / n).is_symlink() and (folder / n / "manifest.json").is_file()
    )


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        ("6ba", ["ep0-ba6", "ep1-ba12"]),
        ("1ep", ["ep0-ba8", "ep1-ba16"]),
        (2, ["ep1-ba16"]),
        (lambda trainer, event: event == "epoch_end" and trainer.current_epoch == 0, ["ep0-ba8"]),
    ],
)
def test_save_interval_decides_what_is_saved(tmp_path: Path, interval: object, expected: list[str]) -> None:
    _fit(tmp_path, CheckpointSaver(folder=tmp_path / "c", save_interval=interval, run_name="r"))
    assert _dirs(tmp_path / "c") == expected


def test_names_render_every_variable_and_metrics(tmp_path: Path) -> None:
    saver = CheckpointSaver(
        folder=tmp_path / "{run_name}-ws{world_size}",
        filename="r{rank}-n{node_rank}-l{local_rank}-e{epoch}-b{batch:03d}-i{batch_in_epoch}-loss{val_loss:.3f}",
        save_interval="1ep",
        run_name="exp",
    )
    _fit(tmp_path, saver, max_epochs=1)
    (name,) = _dirs(tmp_path / "exp-ws1")
    assert name.startswith("r0-n0-l0-e0-b008-i8-loss") and len(name.split("loss")[1]) == 5
    assert saver.filename.parse(name)["batch"] == 8  # type: ignore[index]


def test_latest_pointer_and_rotation_keep_the_newest(tmp_path: Path) -> None:
    saver = CheckpointSaver(folder=tmp_path / "c", save_interval="2ba", num_checkpoints_to_keep=2, run_name="r")
    _fit(tmp_path, saver)
    assert _dirs(tmp_path / "c") == ["ep1-ba14", "ep1-ba16"]
    assert os.readlink(tmp_path / "c" / "latest") == "ep1-ba16"
    assert (tmp_path / "c" / "latest.symlink").read_text() == "ep1-ba16"
    assert latest(tmp_path / "c") == str(tmp_path / "c" / "ep1-ba16")
    assert saver.saved_checkpoints == ["ep1-ba14", "ep1-ba16"]


def test_keep_every_n_steps_and_best_by_metric(tmp_path: Path) -> None:
    saver = CheckpointSaver(
        folder=tmp_path / "c",
        save_interval="1ep",
        num_checkpoints_to_keep=1,
        keep_every_n_steps=16,
        monitor="val_loss",
        mode="min",
        num_best_to_keep=1,
        run_name="r",
    )
    keep_all = CheckpointSaver(folder=tmp_path / "all", save_interval="1ep", monitor="val_loss", run_name="r")
    L.seed_everything(0, verbose=False)
    trainer = build_trainer(str(tmp_path), max_epochs=5, callbacks=[saver, keep_all])
    trainer.fit(TinyRegressor())
    losses = {name: read_checkpoint(str(tmp_path / "c" / name))["callbacks"] for name in _dirs(tmp_path / "c")}
    kept = _dirs(tmp_path / "c")
    assert "ep4-ba40" in kept  # newest
    assert {"ep1-ba16", "ep3-ba32"} <= set(kept)  # multiples of 16 are kept forever
    assert saver.best_model_path and os.path.basename(saver.best_model_path) in kept
    assert trainer.checkpoint_callback is saver and losses
    # The best by val_loss, computed independently from every checkpoint the keep-all saver recorded:
    recorded = {
        name: json.loads((tmp_path / "all" / name / "manifest.json").read_text())["metadata"]["monitor_value"]
        for name in _dirs(tmp_path / "all")
    }
    assert len(recorded) == 5
    best = min(recorded, key=lambda name: recorded[name])
    assert os.path.basename(saver.best_model_path) == best
    assert set(kept) == {"ep4-ba40", "ep1-ba16", "ep3-ba32", best}, "nothing else survives rotation"


def test_rotation_continues_after_restart_and_stays_in_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    save_checkpoint_dir({"w": torch.ones(1), "global_step": 1}, folder / "someone-elses")
    save_checkpoint_dir({"w": torch.ones(1), "global_step": 1}, tmp_path / "sibling" / "ep0-ba2")
    _fit(
        tmp_path,
        CheckpointSaver(folder=folder, save_interval="2ba", num_checkpoints_to_keep=3, run_name="r", overwrite=True),
    )
    assert _dirs(folder) == ["ep1-ba12", "ep1-ba14", "ep1-ba16", "someone-elses"]
    saver = CheckpointSaver(folder=folder, save_interval="2ba", num_checkpoints_to_keep=3, run_name="r")
    _fit(tmp_path, saver, max_epochs=3, ckpt_path="last")
    # the resumed-from checkpoint is protected for this run; the others rotated out
    assert _dirs(folder) == ["ep1-ba16", "ep2-ba20", "ep2-ba22", "ep2-ba24", "someone-elses"]
    assert _dirs(tmp_path / "sibling") == ["ep0-ba2"]


def test_overwrite_false_refuses_a_folder_with_newer_checkpoints_before_training(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    _fit(tmp_path, CheckpointSaver(folder=folder, save_interval="1ep", run_name="r"))
    before = {n: (folder / n / "manifest.json").read_bytes() for n in _dirs(folder)}
    L.seed_everything(0, verbose=False)
    model = TinyRegressor()
    initial = state_of(model)
    trainer = build_trainer(
        str(tmp_path), callbacks=[CheckpointSaver(folder=folder, save_interval="1ep", run_name="r")]
    )
    with pytest.raises(
        FolderConflictError, match=r"folder '.*c' already holds checkpoints newer than step 0.*overwrite=True"
    ):
        trainer.fit(model)
    assert trainer.global_step == 0 and _equal(state_of(model), initial), "no training step ran"
    assert {n: (folder / n / "manifest.json").read_bytes() for n in _dirs(folder)} == before


def test_overwrite_true_saves_over_them(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    _fit(tmp_path, CheckpointSaver(folder=folder, save_interval="1ep", run_name="r"))
    old = read_checkpoint(str(folder / "ep1-ba16"))["state_dict"]
    trainer = _fit(
        tmp_path,
        CheckpointSaver(folder=folder, save_interval="1ep", run_name="r", overwrite=True),
        max_epochs=2,
    )
    assert trainer.global_step == 16 and _dirs(folder) == ["ep0-ba8", "ep1-ba16"]
    assert _equal(read_checkpoint(str(folder / "ep1-ba16"))["state_dict"], old)  # same seed, same result


def test_resume_last_with_nothing_saved_starts_fresh_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r'ckpt_path="last"\) found no committed checkpoint'):
        trainer = _fit(tmp_path, CheckpointSaver(folder=tmp_path / "c", run_name="r"), max_epochs=1, ckpt_path="last")
    assert trainer.global_step == 8


def test_resume_last_equals_uninterrupted_in_process(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    full = TinyRegressor()
    build_trainer(str(tmp_path / "full"), max_epochs=3).fit(full)
    _fit(tmp_path, CheckpointSaver(folder=tmp_path / "c", save_interval="1ep", run_name="r"), max_epochs=2)
    L.seed_everything(0, verbose=False)
    resumed = TinyRegressor()
    trainer = build_trainer(
        str(tmp_path), max_epochs=3, callbacks=[CheckpointSaver(folder=tmp_path / "c", run_name="r")]
    )
    trainer.fit(resumed, ckpt_path="last")
    assert trainer.global_step == 24 and trainer.current_epoch == 3
    assert _equal(state_of(resumed), state_of(full))
    opt_full = full.trainer.optimizers[0].state_dict()["state"]
    opt_resumed = trainer.optimizers[0].state_dict()["state"]
    assert all(torch.equal(opt_full[i]["exp_avg_sq"], opt_resumed[i]["exp_avg_sq"]) for i in opt_full)


@pytest.mark.parametrize(("interval", "kill_at", "resumes_from"), [("3ba", 14, "ep1-ba12"), ("1ep", 19, "ep1-ba16")])
def test_sigkill_then_resume_equals_uninterrupted(
    tmp_path: Path, interval: str, kill_at: int, resumes_from: str
) -> None:
    folder = tmp_path / "run"
    killed = run_worker("--folder", str(folder), "--interval", interval, "--kill-at", str(kill_at), "--keep", "-1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert latest(folder) == str(folder / resumes_from)
    weights = tmp_path / "resumed.pt"
    resumed = run_worker(
        "--folder", str(folder), "--interval", interval, "--keep", "-1", "--save-weights", str(weights)
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Restoring states from the checkpoint path at {folder / resumes_from}" in resumed.stderr + resumed.stdout
    L.seed_everything(0, verbose=False)
    full = TinyRegressor()
    build_trainer(str(tmp_path / "full"), max_epochs=3).fit(full)
    assert _equal(torch.load(weights), state_of(full))


def test_ignore_keys_and_weights_only_shape_the_saved_dict(tmp_path: Path) -> None:
    _fit(
        tmp_path,
        CheckpointSaver(folder=tmp_path / "a", ignore_keys=["state_dict/net.2.*", "loops"], run_name="r"),
        max_epochs=1,
    )
    saved = read_checkpoint(str(tmp_path / "a" / "ep0-ba8"))
    assert "loops" not in saved and set(saved["state_dict"]) == {"net.0.weight", "net.0.bias"}

    def drop_hparams(ckpt: dict[str, Any]) -> None:
        ckpt.pop("hyper_parameters")

    _fit(
        tmp_path,
        CheckpointSaver(folder=tmp_path / "b", ignore_keys=drop_hparams, weights_only=True, run_name="r"),
        max_epochs=1,
    )
    saved = read_checkpoint(str(tmp_path / "b" / "ep0-ba8"))
    assert "hyper_parameters" not in saved and "optimizer_states" not in saved and "state_dict" in saved


def test_model_on_save_checkpoint_hook_runs(tmp_path: Path) -> None:
    class Hooked(TinyRegressor):
        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["extra"] = {"note": "from the hook", "t": torch.arange(3)}

    L.seed_everything(0, verbose=False)
    build_trainer(str(tmp_path), max_epochs=1, callbacks=[CheckpointSaver(folder=tmp_path / "c", run_name="r")]).fit(
        Hooked()
    )
    extra = read_checkpoint(str(tmp_path / "c" / "ep0-ba8"))["extra"]
    assert extra["note"] == "from the hook" and torch.equal(extra["t"], torch.arange(3))


def test_two_savers_keep_separate_state_and_folders(tmp_path: Path) -> None:
    every_2 = CheckpointSaver(folder=tmp_path / "a", save_interval="2ba", num_checkpoints_to_keep=1, run_name="r")
    per_epoch = CheckpointSaver(folder=tmp_path / "b", save_interval="1ep", run_name="r")
    assert every_2.state_key != per_epoch.state_key
    L.seed_everything(0, verbose=False)
    build_trainer(str(tmp_path), max_epochs=2, callbacks=[every_2, per_epoch]).fit(TinyRegressor())
    assert _dirs(tmp_path / "a") == ["ep1-ba16"] and _dirs(tmp_path / "b") == ["ep0-ba8", "ep1-ba16"]
    saved = read_checkpoint(str(tmp_path / "b" / "ep1-ba16"))["callbacks"]
    assert saved[per_epoch.state_key]["saved"][-1]["name"] == "ep1-ba16"
    assert saved[every_2.state_key]["last_saved_step"] == 16


def test_missing_ckpt_path_fails_before_training(tmp_path: Path) -> None:
    model = TinyRegressor()
    initial = state_of(model)
    trainer = build_trainer(str(tmp_path), callbacks=[CheckpointSaver(folder=tmp_path / "c", run_name="r")])
    with pytest.raises(FileNotFoundError, match=r"ckpt_path='.*nowhere' does not exist"):
        trainer.fit(model, ckpt_path=str(tmp_path / "nowhere"))
    assert trainer.global_step == 0 and _equal(state_of(model), initial)


def test_default_folder_is_stable_and_under_default_root_dir(tmp_path: Path) -> None:
    a, b = CheckpointSaver(), CheckpointSaver()
    trainer = build_trainer(str(tmp_path), callbacks=[a])
    assert a.folder_path(trainer) == b.folder_path(trainer)
    assert a.folder_path(trainer).startswith(os.path.join(str(tmp_path), "checkpoints"))


def test_callback_installs_the_sharded_io_when_the_trainer_has_the_default(tmp_path: Path) -> None:
    trainer = _fit(tmp_path, CheckpointSaver(folder=tmp_path / "c", run_name="r"), max_epochs=1)
    assert isinstance(trainer.strategy.checkpoint_io, ShardedCheckpointIO)


def test_folder_that_is_a_file_fails_before_training(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    model = TinyRegressor()
    initial = state_of(model)
    trainer = build_trainer(str(tmp_path), callbacks=[CheckpointSaver(folder=tmp_path / "file", run_name="r")])
    with pytest.raises(ConfigError, match=r"folder='.*file' is not valid\. it is an existing file"):
        trainer.fit(model)
    assert _equal(state_of(model), initial)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"folder": "/tmp/{nonexistent}"}, "folder"),
        ({"folder": "/tmp/{epoch}"}, "folder"),
        ({"folder": 3}, "folder"),
        ({"filename": "ep{epoch"}, "filename"),
        ({"filename": "sub/ep{epoch}"}, "filename"),
        ({"latest_filename": "../latest"}, "latest_filename"),
        ({"save_interval": "3parsecs"}, "save_interval"),
        ({"save_interval": "0ba"}, "save_interval"),
        ({"save_interval": timedelta(0)}, "save_interval"),
        ({"save_interval": -1}, "save_interval"),
        ({"overwrite": "yes"}, "overwrite"),
        ({"num_checkpoints_to_keep": -2}, "num_checkpoints_to_keep"),
        ({"keep_every_n_steps": 0}, "keep_every_n_steps"),
        ({"mode": "lowest", "monitor": "val_loss"}, "mode"),
        ({"num_best_to_keep": 2}, "num_best_to_keep"),
        ({"monitor": ""}, "monitor"),
        ({"weights_only": 1}, "weights_only"),
        ({"ignore_keys": "state_dict"}, "ignore_keys"),
        ({"run_name": "a/b"}, "run_name"),
    ],
)
def test_bad_arguments_name_the_argument_and_an_example(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{argument}=.* is not valid\..*Example of a valid value: ") as info:
        CheckpointSaver(**kwargs)
    assert info.value.argument == argument
