"""Lightning's and Fabric's own callers under FSDP2 (2 CPU processes, gloo) with this package's strategies.

``ModelCheckpoint``, ``trainer.save_checkpoint`` and ``fit(ckpt_path=...)`` through
``lightning_ckpt.strategies.ShardedModelParallelStrategy``; ``fabric.save``/``fabric.load`` through
``lightning_ckpt.fabric_strategies.ShardedModelParallelStrategy``; a DCP checkpoint written by Lightning's
stock strategy still loads, so a run can switch mid-way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_ckpt import read_checkpoint

from .test_distributed import ROOT, _free_port, _ok
from .test_save_plan import _flatten

CALLERS = str(Path(__file__).with_name("callers_worker.py"))
FABRIC = str(Path(__file__).with_name("fabric_sharded_worker.py"))


def torchrun(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, script, *args], capture_output=True, text=True, timeout=240, env=env, check=False)


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Every leaf equal, bitwise for tensors, but ModelCheckpoint's own records (they name their folder)."""
    fa = {k: v for k, v in _flatten(a).items() if "ModelCheckpoint" not in k}
    fb = {k: v for k, v in _flatten(b).items() if "ModelCheckpoint" not in k}
    assert fa.keys() == fb.keys() and any(k.endswith("exp_avg_sq") for k in fa)
    for key in fa:
        same = torch.equal(fa[key], fb[key]) if isinstance(fa[key], torch.Tensor) else fa[key] == fb[key]
        assert same, key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("callers")
    _ok(torchrun(CALLERS, "--folder", str(root / "ckpts"), "--epochs", "3", "--final", str(root / "end.ckpt")))
    return root


def test_model_checkpoint_and_save_checkpoint_write_this_format_and_rotate(uninterrupted: Path) -> None:
    folder = uninterrupted / "ckpts"
    assert sorted(os.listdir(folder)) == ["epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt", "last.ckpt"]
    for path in (*folder.iterdir(), uninterrupted / "end.ckpt"):  # directories of ours, every rank's chunks
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["format_version"] == 2 and manifest["metadata"]["writer_ranks"] == [0, 1]
        weight = next(t for t in manifest["tensors"] if t["key"] == "state_dict/net.0.weight")
        assert [c["offsets"] for c in weight["chunks"]] == [[0, 0], [16, 0]]


def test_fit_resumes_from_a_model_checkpoint_dir_and_ends_as_uninterrupted(uninterrupted: Path, tmp_path: Path) -> None:
    source = uninterrupted / "ckpts" / "epoch=1-step=8.ckpt"
    args = ["--folder", str(tmp_path / "ckpts"), "--epochs", "3", "--final", str(tmp_path / "end.ckpt")]
    _ok(torchrun(CALLERS, *args, "--ckpt-path", str(source)))
    end = read_checkpoint(str(tmp_path / "end.ckpt"), weights_only=False)
    assert_same_state(end, read_checkpoint(str(uninterrupted / "end.ckpt"), weights_only=False))


def test_a_stock_dcp_checkpoint_still_loads_so_a_run_can_switch(uninterrupted: Path, tmp_path: Path) -> None:
    stock = tmp_path / "stock"
    _ok(torchrun(CALLERS, "--strategy", "stock", "--folder", str(stock), "--epochs", "1"))
    source = stock / "epoch=0-step=4.ckpt"
    assert (source / "meta.pt").exists() and not (source / "manifest.json").exists(), "Lightning's own format"
    args = ["--folder", str(tmp_path / "ours"), "--epochs", "3", "--final", str(tmp_path / "end.ckpt")]
    _ok(torchrun(CALLERS, *args, "--ckpt-path", str(source)))
    assert (tmp_path / "ours" / "last.ckpt" / "manifest.json").exists(), "and goes on in this format"
    end = read_checkpoint(str(tmp_path / "end.ckpt"), weights_only=False)
    assert_same_state(end, read_checkpoint(str(uninterrupted / "end.ckpt"), weights_only=False))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_fabric_save_and_load_in_place_equal_the_state_at_the_save(tmp_path: Path, mode: str) -> None:
    """Asynchronously, every parameter and optimizer value is changed right after ``fabric.save`` returns:
    the checkpoint still holds the values at the save (a point-in-time snapshot)."""
    extra = ["--async-save"] if mode == "async" else []
    _ok(torchrun(FABRIC, "--path", str(tmp_path / "ckpt"), "--results", str(tmp_path / "out"), *extra))
    for rank in (0, 1):
        outcome = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        assert outcome["keys_equal"] and outcome["tensors"] == 16 and outcome["different"] == [], outcome
        assert outcome["step"] == 3 and outcome["rest"] == {"note": "hello"}
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    bias = next(t for t in manifest["tensors"] if t["key"] == "model/0.bias")
    assert bias["shape"] == [33] and [c["sizes"] for c in bias["chunks"]] == [[17], [16]], "uneven shards"
