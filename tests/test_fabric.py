"""``Fabric(plugins=[ShardedCheckpointIO()])`` with ``fabric.save`` / ``fabric.load``: one process, and two
real processes (torchrun, Fabric DDP, gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.fabric import Fabric

from lightning_ckpt import ShardedCheckpointIO, read_checkpoint

from .fabric_worker import build, equal, optimizer_tensors, train
from .test_distributed import ROOT, _free_port

WORKER = str(Path(__file__).with_name("fabric_worker.py"))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_fabric_save_load_single_process(tmp_path: Path, async_save: bool) -> None:
    io = ShardedCheckpointIO(async_save=async_save)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[io])
    assert fabric.strategy.checkpoint_io is io
    model, optimizer = build(fabric, seed=0)
    train(fabric, model, optimizer, steps=3)
    path = tmp_path / "step-3.ckpt"  # Fabric users often give a file-like name: it becomes the directory's name

    fabric.save(path, {"model": model, "optimizer": optimizer, "progress": {"step": 5}, "epoch": 2})
    io.wait_for_save()

    assert path.is_dir() and (path / "manifest.json").is_file()
    on_disk = read_checkpoint(str(path))
    assert set(on_disk) == {"model", "optimizer", "progress", "epoch"}
    assert on_disk["progress"] == {"step": 5} and on_disk["epoch"] == 2
    assert equal(on_disk["model"], model.state_dict())

    fresh_model, fresh_optimizer = build(fabric, seed=1)
    assert not equal(fresh_model.state_dict(), model.state_dict())
    state: dict[str, Any] = {"model": fresh_model, "optimizer": fresh_optimizer, "progress": {}, "epoch": 0}
    remainder = fabric.load(path, state)

    assert remainder == {}
    assert equal(fresh_model.state_dict(), model.state_dict())
    assert equal(optimizer_tensors(fresh_optimizer), optimizer_tensors(optimizer))
    assert fresh_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert state["progress"] == {"step": 5} and state["epoch"] == 2
    # Training goes on from the restored state exactly as it would have from the original.
    train(fabric, model, optimizer, steps=1)
    train(fabric, fresh_model, fresh_optimizer, steps=1)
    assert equal(fresh_model.state_dict(), model.state_dict())


def test_fabric_load_partial_state_and_full_checkpoint(tmp_path: Path) -> None:
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[ShardedCheckpointIO()])
    model, optimizer = build(fabric, seed=0)
    train(fabric, model, optimizer, steps=2)
    path = tmp_path / "ckpt"
    fabric.save(path, {"model": model, "optimizer": optimizer, "progress": {"step": 5}})

    fresh_model, _ = build(fabric, seed=1)
    remainder = fabric.load(path, {"model": fresh_model}, strict=False)  # what was not asked for comes back
    assert equal(fresh_model.state_dict(), model.state_dict())
    assert set(remainder) == {"optimizer", "progress"} and remainder["progress"] == {"step": 5}

    everything = fabric.load(path)  # no state: the whole checkpoint as saved
    assert set(everything) == {"model", "optimizer", "progress"}
    assert isinstance(everything["model"]["0.weight"], torch.Tensor)


def test_fabric_ddp_two_processes(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    command += [WORKER, "--path", str(path), "--devices", "2", "--results", str(tmp_path / "result")]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]

    lines = [json.loads((tmp_path / f"result.rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in lines) == [0, 1]
    for r in lines:
        assert r["world_size"] == 2 and r["io_is_ours"]
        assert r["weights_equal"] and r["optimizer_equal"], r
        assert r["progress"] == {"step": 5} and r["epoch"] == 2 and r["remainder"] == []
    # Fabric's DDP strategy saves on rank 0 only: one committed, one-shard checkpoint directory.
    assert sorted(n for n in os.listdir(tmp_path) if not n.startswith("result.")) == ["ckpt"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest, "the manifest is the commit"
    assert sorted(p.name for p in path.iterdir() if p.suffix == ".safetensors") == ["shard-00000-of-00001.safetensors"]
    assert read_checkpoint(str(path))["progress"] == {"step": 5}


def test_fabric_ddp_async_save_then_load_on_every_rank_without_waiting(tmp_path: Path) -> None:
    """Fabric saves on rank 0 only and meets the other ranks at a barrier. With ``async_save=True`` and a
    slow disk (each write starts 2 s late), rank 1 asks for the checkpoint before rank 0 has written it:
    the plugin makes it wait for the commit instead of failing to find it."""
    path = tmp_path / "ckpt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    command += [WORKER, "--path", str(path), "--devices", "2", "--results", str(tmp_path / "result")]
    command += ["--async-save", "--slow-write-s", "2"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]

    lines = [json.loads((tmp_path / f"result.rank{r}.json").read_text()) for r in (0, 1)]
    for r in lines:
        assert r["weights_equal"] and r["optimizer_equal"], r
        assert r["progress"] == {"step": 5} and r["epoch"] == 2
        assert r["load_waited_s"] >= 1.5, r  # the load really waited for the slow write
    assert read_checkpoint(str(path))["progress"] == {"step": 5}
