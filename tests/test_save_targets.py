"""What a save may replace, staging left by killed saves, and what every load entry point accepts.

Issue 13 §3 items 1, 6, 7, 8, 17 and 18: a save never deletes what this package did not write; a
stock ``last.ckpt`` file is replaced by the directory; a SIGKILLed save's staging does not pile
up; ``Model.load_from_checkpoint``, ``ckpt_path=`` and ``read_checkpoint`` take the same paths.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ckpt import CheckpointSaver, ShardedCheckpointIO, TargetExistsError, read_checkpoint
from lightning_ckpt.demo import TinyRegressor, build_trainer, state_of
from lightning_ckpt.errors import ConfigError, CorruptCheckpointError
from lightning_ckpt.stale import STALE_AFTER_S

ROOT = Path(__file__).resolve().parents[1]


def _state(step: int = 1) -> dict[str, object]:
    return {"state_dict": {"w": torch.full((4,), float(step))}, "global_step": step, "epoch": 0}


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (symlinks as their target) with its bytes: what a user would lose."""
    found: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                found[rel] = os.readlink(path).encode()
            elif os.path.isfile(path):
                found[rel] = Path(path).read_bytes()
    return found


def _hidden(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(".") and ".partial-" in n)


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- §3.1: never replace what this package did not write ---------------------------------------------


@pytest.mark.parametrize("collective", [False, True], ids=["save_checkpoint", "save_collective"])
def test_saving_onto_a_folder_of_checkpoints_is_refused_and_deletes_nothing(tmp_path: Path, collective: bool) -> None:
    folder = tmp_path / "run"
    io = ShardedCheckpointIO()
    for step in (1, 2):
        io.save_collective(_state(step), str(folder / f"ba{step}"), latest_filename="latest")
    before = _tree(folder)
    save = io.save_collective if collective else io.save_checkpoint
    with pytest.raises(TargetExistsError) as raised:
        save(_state(3), str(folder))
    message = str(raised.value)
    assert repr(str(folder)) in message and "not a lightning-ckpt checkpoint" in message
    assert "'ba1', 'ba2', 'latest'" in message and "Save under a new name" in message
    assert isinstance(raised.value, FileExistsError)
    assert _tree(folder) == before  # every checkpoint, pointer and symlink is still there, byte for byte
    assert not _hidden(tmp_path)  # nothing was staged next to it either


@pytest.mark.parametrize("kind", ["user-dir", "text-file", "symlink"])
def test_saving_onto_a_users_file_or_directory_is_refused(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "data"
    if kind == "user-dir":
        target.mkdir()
        (target / "notes.txt").write_text("my notes")
        (target / "shard-00000-of-00001.safetensors").write_bytes(b"not ours either")
    elif kind == "text-file":
        target.write_text("my notes")
    else:
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    before = _tree(tmp_path)
    with pytest.raises(TargetExistsError, match="never deletes what it did not write"):
        ShardedCheckpointIO().save_checkpoint(_state(), str(target))
    assert _tree(tmp_path) == before


def test_trainer_save_checkpoint_onto_the_savers_folder_keeps_every_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    saver = CheckpointSaver(folder, save_interval="1ep", async_save=False)
    trainer = build_trainer(str(tmp_path), max_epochs=2, callbacks=[saver], plugins=[ShardedCheckpointIO()])
    trainer.fit(TinyRegressor())
    before = _tree(folder)
    assert {"ep0-ba8", "ep1-ba16"} <= {p.split(os.sep)[0] for p in before}
    with pytest.raises(TargetExistsError, match="ep0-ba8"):
        trainer.save_checkpoint(str(folder))
    assert _tree(folder) == before
    assert read_checkpoint(str(folder))["global_step"] == 16


def test_a_committed_checkpoint_and_a_killed_deletion_may_still_be_replaced(tmp_path: Path) -> None:
    io = ShardedCheckpointIO()
    path = tmp_path / "ba1"
    io.save_checkpoint(_state(1), str(path))
    io.save_checkpoint(_state(2), str(path))  # a committed checkpoint of this format: replaced atomically
    assert read_checkpoint(str(path))["global_step"] == 2
    (path / "manifest.json").unlink()  # a deletion killed after the manifest went: only our files are left
    io.save_checkpoint(_state(3), str(path))
    assert read_checkpoint(str(path))["global_step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["ba1"]


def test_remove_checkpoint_deletes_only_what_a_checkpoint_is(tmp_path: Path) -> None:
    io = ShardedCheckpointIO()
    user = tmp_path / "data"
    user.mkdir()
    (user / "notes.txt").write_text("my notes")
    with pytest.raises(TargetExistsError, match="it was not deleted"):
        io.remove_checkpoint(str(user))
    assert (user / "notes.txt").read_text() == "my notes"
    legacy = tmp_path / "epoch=0.ckpt"
    torch.save(_state(), legacy)
    io.save_checkpoint(_state(), str(tmp_path / "ba1"))
    io.remove_checkpoint(str(legacy))
    io.remove_checkpoint(str(tmp_path / "ba1"))
    assert os.listdir(tmp_path) == ["data"]


# -- §3.17: switching a stock run to the plugin -------------------------------------------------------


def test_a_stock_last_ckpt_file_is_replaced_by_the_plugins_directory(tmp_path: Path) -> None:
    dirpath = tmp_path / "mc"
    L.seed_everything(0, verbose=False)
    stock = ModelCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0)
    build_trainer(str(tmp_path / "a"), max_epochs=1, callbacks=[stock]).fit(TinyRegressor())
    legacy = dirpath / "last.ckpt"
    assert legacy.is_file() and legacy.read_bytes()[:2] == b"PK"  # torch.save's zip

    L.seed_everything(0, verbose=False)
    model = TinyRegressor()
    switched = ModelCheckpoint(dirpath=dirpath, save_last=True, save_top_k=0)
    trainer = build_trainer(str(tmp_path / "b"), max_epochs=2, callbacks=[switched], plugins=[ShardedCheckpointIO()])
    trainer.fit(model, ckpt_path=str(legacy))

    assert (legacy / "manifest.json").is_file()  # the file became the committed directory
    assert os.listdir(dirpath) == ["last.ckpt"]  # no hidden staging copy, no trash left behind
    saved = read_checkpoint(str(legacy))
    assert saved["global_step"] == 16
    assert _equal_states(saved["state_dict"], state_of(model))


def test_a_zip_that_is_not_a_torch_checkpoint_is_not_replaced(tmp_path: Path) -> None:
    import zipfile

    target = tmp_path / "last.ckpt"
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("photos/cat.jpg", b"meow")
    before = target.read_bytes()
    with pytest.raises(TargetExistsError, match=r"a file that torch\.save did not write"):
        ShardedCheckpointIO().save_checkpoint(_state(), str(target))
    assert target.read_bytes() == before


def test_in_an_object_store_a_legacy_file_is_replaced_and_a_users_folder_refused() -> None:
    import io

    import fsspec

    fs = fsspec.filesystem("memory")
    buffer = io.BytesIO()
    torch.save(_state(1), buffer)
    fs.pipe_file("/save-targets/run/last.ckpt", buffer.getvalue())
    fs.pipe_file("/save-targets/data/notes.txt", b"my notes")
    plugin = ShardedCheckpointIO()
    plugin.save_checkpoint(_state(2), "memory://save-targets/run/last.ckpt")
    assert read_checkpoint("memory://save-targets/run/last.ckpt")["global_step"] == 2
    with pytest.raises(TargetExistsError, match=r"'notes\.txt'"):
        plugin.save_checkpoint(_state(3), "memory://save-targets/data")
    assert fs.ls("/save-targets/data", detail=False) == ["/save-targets/data/notes.txt"]
    assert fs.cat_file("/save-targets/data/notes.txt") == b"my notes"


# -- §3.18: staging directories of killed saves --------------------------------------------------------

_KILLED_FIT = """
import sys
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_ckpt import ShardedCheckpointIO
from lightning_ckpt.demo import TinyRegressor, build_trainer
from tests.faults import install_from_env
install_from_env()
root = sys.argv[1]
mc = ModelCheckpoint(dirpath=root + "/mc", save_last=True, save_top_k=0)
build_trainer(root, max_epochs=1, callbacks=[mc], plugins=[ShardedCheckpointIO()]).fit(TinyRegressor())
"""

_HOLDS_STAGING = """
import sys
from lightning_ckpt.commit import stage_dir
from lightning_ckpt.storage import Storage
storage, folder = Storage.open(sys.argv[1])
print(stage_dir(storage, folder, "last.ckpt", token="live"), flush=True)
sys.stdin.read()  # writing for as long as the test keeps stdin open
"""


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_staging_left_by_a_sigkilled_save_is_removed_by_the_next_save(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LIGHTNING_CKPT_KILL_AT": "shard.half"}
    done = subprocess.run([sys.executable, "-c", _KILLED_FIT, str(tmp_path)], env=env, timeout=240, check=False,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    mc = tmp_path / "mc"
    leftovers = _hidden(mc)
    assert len(leftovers) == 1 and os.listdir(mc / leftovers[0]), "the killed save left a half-written staging dir"

    io = ShardedCheckpointIO()
    io.save_checkpoint(_state(1), str(mc / "last.ckpt"))  # seconds later: it may still be a live writer's
    assert _hidden(mc) == leftovers
    _age(mc / leftovers[0], STALE_AFTER_S + 5)  # a minute later, nobody holds it
    io.save_checkpoint(_state(2), str(mc / "last.ckpt"))
    assert _hidden(mc) == [] and sorted(os.listdir(mc)) == ["last.ckpt"]
    assert read_checkpoint(str(mc / "last.ckpt"))["global_step"] == 2


def test_another_live_processs_staging_is_never_removed(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", _HOLDS_STAGING, str(tmp_path)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert writer.stdout is not None
        staged = Path(writer.stdout.readline().strip())
        (staged / "shard-00000-of-00001.safetensors").write_bytes(b"x" * 100)
        _age(staged, 3600)  # an hour-long write: old, but its owner is alive and holds the lock
        ShardedCheckpointIO().save_checkpoint(_state(1), str(tmp_path / "other"))
        assert staged.is_dir() and (staged / "shard-00000-of-00001.safetensors").stat().st_size == 100
    finally:
        writer.kill()  # SIGKILL: no cleanup runs in the writer
        writer.wait(timeout=30)
    ShardedCheckpointIO().save_checkpoint(_state(2), str(tmp_path / "other"))  # its owner is gone now
    assert not staged.exists() and sorted(os.listdir(tmp_path)) == ["other"]


# -- §3.6: Model.load_from_checkpoint ------------------------------------------------------------------


def test_trainer_save_checkpoint_then_model_load_from_checkpoint(tmp_path: Path) -> None:
    model = TinyRegressor(width=8, lr=0.05)
    trainer = build_trainer(str(tmp_path), max_epochs=1, plugins=[ShardedCheckpointIO()])
    trainer.fit(model)
    path = str(tmp_path / "x.ckpt")
    trainer.save_checkpoint(path)
    assert os.path.isdir(path)
    loaded = TinyRegressor.load_from_checkpoint(path)
    assert loaded.hparams["width"] == 8 and loaded.hparams["lr"] == 0.05
    assert _equal_states(state_of(loaded), state_of(model))
    legacy = str(tmp_path / "stock.ckpt")  # Lightning's own files still load through Lightning's loader
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": L.__version__}, legacy)  # fmt: skip
    assert _equal_states(state_of(TinyRegressor.load_from_checkpoint(legacy)), state_of(model))


# -- §3.7: ckpt_path naming a file inside a checkpoint -------------------------------------------------


@pytest.mark.parametrize("inside", ["manifest.json", "objects.pt", "shard-00000-of-00001.safetensors"])
def test_a_file_inside_a_checkpoint_loads_that_checkpoint(tmp_path: Path, inside: str) -> None:
    path = tmp_path / "ba1"
    io = ShardedCheckpointIO()
    io.save_checkpoint(_state(7), str(path))
    loaded = io.load_checkpoint(str(path / inside))
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["w"], torch.full((4,), 7.0))
    assert read_checkpoint(str(path / inside))["global_step"] == 7


def test_a_file_inside_an_uncommitted_checkpoint_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "ba1"
    ShardedCheckpointIO().save_checkpoint(_state(7), str(path))
    (path / "manifest.json").write_text("{ truncated")
    with pytest.raises(CorruptCheckpointError, match="is one file of a lightning-ckpt checkpoint") as raised:
        ShardedCheckpointIO().load_checkpoint(str(path / "objects.pt"))
    assert "not valid JSON" in str(raised.value)


def test_trainer_fit_resumes_from_a_manifest_path(tmp_path: Path) -> None:
    mc = ModelCheckpoint(dirpath=tmp_path / "mc", save_last=True, save_top_k=0)
    build_trainer(str(tmp_path), max_epochs=1, callbacks=[mc], plugins=[ShardedCheckpointIO()]).fit(TinyRegressor())
    trainer = build_trainer(str(tmp_path), max_epochs=2, plugins=[ShardedCheckpointIO()])
    trainer.fit(TinyRegressor(), ckpt_path=str(tmp_path / "mc" / "last.ckpt" / "manifest.json"))
    assert trainer.global_step == 16  # resumed at step 8, trained one more epoch


# -- §3.8: read_checkpoint takes what ckpt_path= takes -------------------------------------------------


def test_read_checkpoint_takes_a_legacy_file_a_pointer_and_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    io = ShardedCheckpointIO()
    for step in (1, 2):
        io.save_collective(_state(step), str(folder / f"ba{step}"), latest_filename="latest")
    legacy = tmp_path / "epoch=0.ckpt"
    torch.save(_state(5), legacy)
    assert read_checkpoint(str(folder))["global_step"] == 2
    assert read_checkpoint(str(folder / "latest.symlink"))["global_step"] == 2
    assert read_checkpoint(str(folder / "latest"))["global_step"] == 2
    assert read_checkpoint(str(legacy))["global_step"] == 5
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"path='.*empty': the folder holds no committed checkpoint"):
        read_checkpoint(str(empty))


@pytest.mark.parametrize("key, value", [("global_step", "forty"), ("epoch", 1.5), ("global_step", torch.tensor(0.5))])
def test_a_non_int_step_or_epoch_is_named_and_nothing_is_written(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"checkpoint\['{key}'\].*an int") as raised:
        ShardedCheckpointIO().save_checkpoint({key: value, "w": torch.ones(2)}, str(tmp_path / "ba1"))
    assert raised.value.argument == f"checkpoint[{key!r}]"
    assert os.listdir(tmp_path) == []


def test_int_like_steps_are_accepted(tmp_path: Path) -> None:
    io = ShardedCheckpointIO()
    io.save_checkpoint({"global_step": torch.tensor(7), "epoch": np.int64(1), "w": torch.ones(2)}, str(tmp_path / "a"))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert (manifest["global_step"], manifest["epoch"]) == (7, 1)
