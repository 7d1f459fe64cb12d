"""The save plan under real DDP (torchrun, gloo on CPU): buffers that differ between ranks are saved from rank 0.

A model with BatchNorm and a buffer its forward updates trains on 2 ranks, each on its own half of
the data, so their buffers differ at every save while parameters and Adam state do not. Stock
Lightning saves rank 0's copy; so must a collective save, or the resumed model is not the trained one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_ckpt import read_checkpoint

from .s3_server import S3Bucket
from .test_distributed import _ok, run_ddp

BUFFERS = ("net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked", "input_sum")


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
    file_of = {t["key"]: t["file"] for t in manifest["tensors"]}
    assert {file_of[f"state_dict/{k}"] for k in BUFFERS} == {"shard-00000-of-00002.safetensors"}
    written = {f["name"]: 0 for f in manifest["files"] if f["name"].startswith("shard-")}
    largest = 0
    for tensor in manifest["tensors"]:
        written[tensor["file"]] += tensor["nbytes"]
        if not any(tensor["key"] == f"state_dict/{k}" for k in BUFFERS):
            largest = max(largest, tensor["nbytes"])
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
