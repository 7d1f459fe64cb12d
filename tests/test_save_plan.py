"""The save plan under real DDP (torchrun, gloo on CPU): buffers that differ between ranks are saved from rank 0.

A model with BatchNorm and a buffer its forward updates trains on 2 ranks, each on its own half of
the data, so their buffers differ at every save while parameters and Adam state do not. Stock
Lightning saves rank 0's copy; so must a collective save, or the resumed model is not the trained one.
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
from lightning_ckpt.storage import Storage

from .s3_server import S3Bucket
from .test_distributed import ROOT, _free_port, _ok, run_ddp, run_two_nodes

PLAN_WORKER = str(Path(__file__).with_name("plan_worker.py"))

BUFFERS = ("net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked", "input_sum")


def run_ddp_script(script: str, nproc: int, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    command += [f"--master_port={_free_port()}", script, *args]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, check=False)


def _bn_run(root: Path, *extra: str) -> Any:
    return run_ddp(
        2, "--model", "batchnorm", "--epochs", "3", "--dump-state", str(root / "state"), "--no-validation", *extra
    )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}/{key}" if prefix else str(key)))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}/{index}"))
        return out
    return {prefix: value}


def assert_bitwise_equal(resumed: dict[str, Any], uninterrupted: dict[str, Any]) -> None:
    """Every leaf of two whole checkpoint dicts is equal: tensors bitwise (dtype included), others by ==.

    The saver's own state (its records and run id name this run's folder) is left out.
    """
    a = {k: v for k, v in _flatten(resumed).items() if not k.startswith("callbacks/CheckpointSaver")}
    b = {k: v for k, v in _flatten(uninterrupted).items() if not k.startswith("callbacks/CheckpointSaver")}
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bn-full")
    _ok(_bn_run(root, "--folder", str(root / "ckpts")))
    return root


def test_two_rank_checkpoint_holds_rank0_buffers_and_balances_the_replicated_bytes(uninterrupted: Path) -> None:
    ckpt = uninterrupted / "ckpts" / "ep1-ba8"
    rank0 = torch.load(uninterrupted / "state.rank0.step8.pt")
    rank1 = torch.load(uninterrupted / "state.rank1.step8.pt")
    assert any(not torch.equal(rank0[k], rank1[k]) for k in BUFFERS), "the ranks' buffers must differ to test this"
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0 if k not in BUFFERS), "parameters are replicated"

    loaded = read_checkpoint(str(ckpt))  # one process, no process group: what trainer.validate(ckpt_path=) sees
    for key, value in rank0.items():
        assert torch.equal(loaded["state_dict"][key], value), key

    manifest = json.loads((ckpt / "manifest.json").read_text())
    file_of = {t["key"]: t["chunks"][0]["file"] for t in manifest["tensors"]}
    assert {file_of[f"state_dict/{k}"] for k in BUFFERS} == {"shard-00000-of-00002.safetensors"}
    written = {f["name"]: 0 for f in manifest["files"] if f["name"].startswith("shard-")}
    largest = 0
    for tensor in manifest["tensors"]:
        [chunk] = tensor["chunks"]  # DDP: every tensor whole
        written[chunk["file"]] += chunk["nbytes"]
        if not any(tensor["key"] == f"state_dict/{k}" for k in BUFFERS):
            largest = max(largest, chunk["nbytes"])
    assert len(written) == 2 and max(written.values()) - min(written.values()) <= largest


@pytest.mark.parametrize("where", ["local", "s3"])
def test_kill_then_resume_last_equals_uninterrupted_in_every_tensor(
    where: str, uninterrupted: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if where == "s3":
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        endpoint = bucket.storage_options["client_kwargs"]["endpoint_url"]
        place = ["--folder", f"{bucket.url}/run", "--s3-endpoint", endpoint, "--cache-dir", str(tmp_path / "cache")]
        place += ["--local-folder", str(tmp_path / "local")]
    else:
        place = ["--folder", str(tmp_path / "ckpts")]
    for run in ("killed", "resumed"):
        (tmp_path / run).mkdir()
    killed = _bn_run(tmp_path / "killed", *place, "--kill-rank", "1", "--kill-at", "10")
    assert killed.returncode != 0 and not list((tmp_path / "killed").glob("*.final.pt"))
    _ok(_bn_run(tmp_path / "resumed", *place, "--resume"))
    for rank in (0, 1):
        resumed = torch.load(tmp_path / "resumed" / f"state.rank{rank}.final.pt", weights_only=False)
        full = torch.load(uninterrupted / f"state.rank{rank}.final.pt", weights_only=False)
        assert resumed["global_step"] == full["global_step"] == 12
        assert_bitwise_equal(resumed, full)


def test_two_nodes_with_own_caches_upload_rank0s_copy_only(
    uninterrupted: Path, tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    """Two nodes (one rank each), separate local caches, one S3 folder: each node commits its own complete
    copy (node 1's holds rank 1's buffers), and only rank 0's is uploaded, so every object of a remote
    checkpoint comes from one plan. Rank 1 is killed if it ever uploads a file."""
    endpoint = s3_bucket.storage_options["client_kwargs"]["endpoint_url"]
    folder = f"{s3_bucket.url}/run"
    local = str(tmp_path / "node{node}")
    results = run_two_nodes(
        "--model", "batchnorm", "--epochs", "3", "--no-validation", "--dump-state", str(tmp_path / "state"),
        "--s3-endpoint", endpoint, "--folder", folder, "--local-folder", f"{local}/ckpts", "--cache-dir",
        f"{local}/cache", env={"LIGHTNING_CKPT_KILL_AT": "upload.during@1"},
    )  # fmt: skip
    for result in results:
        _ok(result)
    for step in (4, 8, 12):
        url = f"{folder}/ep{step // 4 - 1}-ba{step}"
        remote = read_checkpoint(url, storage_options=s3_bucket.storage_options)
        storage, path = Storage.open(f"{url}/manifest.json", s3_bucket.storage_options)
        assert json.loads(storage.read_bytes(path))["metadata"]["writer_ranks"] == [0]
        rank0 = torch.load(tmp_path / f"state.rank0.step{step}.pt")
        for key, value in rank0.items():
            assert torch.equal(remote["state_dict"][key], value), (step, key)
    node1 = tmp_path / "node1" / "ckpts"
    kept = [p.name for p in node1.iterdir() if not p.is_symlink() and (p / "manifest.json").exists()]
    assert kept == ["ep2-ba12"], "node 1 keeps its newest local copy only"
    node1_copy = read_checkpoint(str(node1 / "ep2-ba12"))["state_dict"]
    rank1 = torch.load(tmp_path / "state.rank1.step12.pt")
    assert all(torch.equal(node1_copy[k], rank1[k]) for k in rank1), "node 1's cache holds its own rank's view"
    final = torch.load(tmp_path / "state.rank0.final.pt", weights_only=False)
    assert_bitwise_equal(final, torch.load(uninterrupted / "state.rank0.final.pt", weights_only=False))


def test_plugin_alone_refuses_rank_dependent_keys_and_differing_replicas_on_every_rank(tmp_path: Path) -> None:
    """``save_collective`` from Fabric on 2 ranks: a key only rank 1 holds, and (with ``verify_replicas=True``)
    a tensor declared replicated whose values differ, each fail with ``PlanError`` on both ranks naming
    the key; nothing is committed. Equal replicas save and read back."""
    out = run_ddp_script(PLAN_WORKER, 2, "--folder", str(tmp_path / "ck"), "--results", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads((tmp_path / f"r.rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, outcome in enumerate(results):
        assert outcome["extra_key"].startswith("PlanError: tensor 'only_rank1' is held by rank 1 but not by rank 0")
        assert outcome["differs"].startswith("PlanError") and "'b'" in outcome["differs"], outcome["differs"]
        assert "rank 1" in outcome["differs"]
        assert (outcome["equal"], outcome.get("equal_loads")) == ("ok", "True"), (rank, outcome)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if not p.name.startswith(".")) == ["c"]
