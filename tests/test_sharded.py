"""Sharded state under real FSDP2 (``ModelParallelStrategy`` with ``fully_shard``, 2 CPU processes, gloo).

Every rank writes the chunks of the ``DTensor`` values it holds; ``ckpt_path="last"`` loads them in place.
Each resume is compared with an uninterrupted run through the final checkpoint of both, read in one
process without a process group (``read_checkpoint`` assembles every chunk into full tensors): parameters,
AdamW state (``exp_avg``, ``exp_avg_sq``, scalar ``step``), loops, everything but the saver's own records.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_ckpt import read_checkpoint

from .s3_server import S3Bucket
from .test_distributed import ROOT, WORKER, _free_port, _ok
from .test_save_plan import _flatten

STEPS = 12  # 3 epochs of 4 steps per rank, a save at the end of each (the demo's data resumes at epoch ends)


def run_fsdp2(*args: str, nproc: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    command += [f"--master_port={_free_port()}", WORKER, "--model", "fsdp2", "--devices", str(nproc)]
    command += ["--interval", "1ep", "--no-validation", *args]
    full_env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=full_env, check=False)


def assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Every leaf equal (tensors bitwise, dtype included) but the saver's own records (they name their folder)."""
    fa = {k: v for k, v in _flatten(a).items() if not k.startswith("callbacks/CheckpointSaver")}
    fb = {k: v for k, v in _flatten(b).items() if not k.startswith("callbacks/CheckpointSaver")}
    assert fa.keys() == fb.keys()
    assert any(k.endswith("exp_avg_sq") for k in fa) and any(k.startswith("state_dict/") for k in fa)
    for key in fa:
        if isinstance(fa[key], torch.Tensor):
            assert fa[key].dtype == fb[key].dtype and torch.equal(fa[key], fb[key]), key
        else:
            assert fa[key] == fb[key], key


def final(folder: Path) -> dict[str, Any]:
    return read_checkpoint(str(folder / f"ep2-ba{STEPS}"), weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp2-full") / "ckpts"
    _ok(run_fsdp2("--folder", str(folder), "--epochs", "3"))
    return folder


def test_every_rank_writes_its_own_chunks_and_one_process_reads_them_whole(uninterrupted: Path) -> None:
    ckpt = uninterrupted / f"ep2-ba{STEPS}"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["metadata"]["writer_ranks"] == [0, 1]
    tensors = {t["key"]: t for t in manifest["tensors"]}
    for key in ("state_dict/net.0.weight", "optimizer_states/0/state/net.0.weight/exp_avg"):
        chunks = tensors[key]["chunks"]
        assert tensors[key]["shape"] == [32, 16]
        assert [(c["offsets"], c["sizes"]) for c in chunks] == [([0, 0], [16, 16]), ([16, 0], [16, 16])]
        assert {c["file"] for c in chunks} == {"shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"}
        assert all(c["crc32"].startswith("crc32:") for c in chunks)
    [step] = tensors["optimizer_states/0/state/net.0.weight/step"]["chunks"]
    assert step["sizes"] == [] and step["file"] == "shard-00000-of-00002.safetensors", "a scalar, from rank 0"
    loaded = read_checkpoint(str(ckpt))  # no process group: full tensors
    assert loaded["state_dict"]["net.0.weight"].shape == (32, 16)
    assert loaded["optimizer_states"][0]["param_groups"][0]["params"][0] == "net.0.weight"


def test_kill_a_rank_then_resume_last_equals_uninterrupted(uninterrupted: Path, tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed at step 6 (epoch 0's save committed); ``ckpt_path="last"`` resumes
    on both ranks (the restore comes after ``on_fit_start`` under ModelParallelStrategy, so the saver's check of
    newer checkpoints must wait for it) and ends where an uninterrupted run ends."""
    folder = tmp_path / "ckpts"
    killed = run_fsdp2("--folder", str(folder), "--epochs", "3", "--kill-rank", "1", "--kill-at", "6")
    assert killed.returncode != 0
    assert [p.name for p in folder.iterdir() if (p / "manifest.json").exists() and not p.is_symlink()] == ["ep0-ba4"]
    _ok(run_fsdp2("--folder", str(folder), "--epochs", "3", "--resume"))
    assert_same_training_state(final(folder), final(uninterrupted))


def test_a_rank_killed_while_writing_its_chunks_commits_nothing(uninterrupted: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    out = run_fsdp2("--folder", str(folder), "--epochs", "3", env={"LIGHTNING_CKPT_KILL_AT": "shard.half@1#2"})
    assert out.returncode != 0
    committed = [p.name for p in folder.iterdir() if (p / "manifest.json").exists() and not p.is_symlink()]
    assert committed == ["ep0-ba4"], "the second save lost rank 1 halfway: never committed"
    assert (folder / "latest.symlink").read_text() == "ep0-ba4"


def test_a_flipped_byte_in_one_chunk_names_the_file_and_the_key(uninterrupted: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(uninterrupted, tmp_path / "ckpts", symlinks=True))
    ckpt = folder / f"ep2-ba{STEPS}"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    tensor = next(t for t in manifest["tensors"] if t["key"] == "state_dict/net.0.weight")
    chunk = tensor["chunks"][1]
    shard = ckpt / chunk["file"]
    data = bytearray(shard.read_bytes())
    data[chunk["byte_offset"] + 5] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = run_fsdp2("--folder", str(folder), "--epochs", "4", "--ckpt-path", str(ckpt))
    assert out.returncode != 0
    failures = [line for line in out.stderr.splitlines() if line.startswith("FAILED rank=1")]
    assert failures and chunk["file"] in failures[0] and "'state_dict/net.0.weight@16,0'" in failures[0], out.stderr[
        -2000:
    ]


def test_resume_on_one_process_from_two_ranks_chunks(uninterrupted: Path, tmp_path: Path) -> None:
    """N -> M: chunks written by 2 ranks load into the same model sharded over 1 rank, and training goes on
    exactly as the 2-rank run would have from there (same data: the worker gives each step the same batch)."""
    source = uninterrupted / "ep1-ba8"
    out = run_fsdp2("--folder", str(tmp_path / "ckpts"), "--epochs", "3", "--ckpt-path", str(source),
                    "--dump-loaded", str(tmp_path / "loaded"), nproc=1)  # fmt: skip
    _ok(out)
    loaded = torch.load(tmp_path / "loaded.rank0.pt", weights_only=False)
    saved = read_checkpoint(str(source))["state_dict"]
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_resume_from_s3_with_ranged_reads(uninterrupted: Path, tmp_path: Path, s3_bucket: S3Bucket) -> None:
    endpoint = s3_bucket.storage_options["client_kwargs"]["endpoint_url"]
    place = ["--folder", f"{s3_bucket.url}/run", "--s3-endpoint", endpoint, "--cache-dir", str(tmp_path / "cache"),
             "--local-folder", str(tmp_path / "local")]  # fmt: skip
    killed = run_fsdp2(*place, "--epochs", "3", "--kill-rank", "1", "--kill-at", "6")
    assert killed.returncode != 0
    shutil.rmtree(tmp_path / "local")  # a fresh node: the checkpoint is only in the bucket
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    _ok(run_fsdp2(*place, "--epochs", "3", "--resume"))
    fetched = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() and "downloads" in p.parts]
    assert not [name for name in fetched if name.startswith("shard-")], f"chunks are read by range: {fetched}"
    remote = read_checkpoint(f"{s3_bucket.url}/run/ep2-ba{STEPS}", storage_options=s3_bucket.storage_options,
                             weights_only=False)  # fmt: skip
    assert_same_training_state(remote, final(uninterrupted))


def _by_name(checkpoint: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Optimizer state keyed by parameter name; a rank-0 full dict keys it by index, in ``param_groups`` order."""
    state = checkpoint["optimizer_states"][0]["state"]
    return {(names[k] if isinstance(k, int) else k): v for k, v in state.items()}


def test_a_rank0_full_state_dict_saves_and_resumes_too(uninterrupted: Path, tmp_path: Path) -> None:
    """``save_distributed_checkpoint=False``: rank 0 gathers the full dict (optimizer state keyed by index);
    it is saved from rank 0 and loads back into the sharded model, matched by position."""
    folder = tmp_path / "ckpts"
    killed = run_fsdp2("--folder", str(folder), "--epochs", "3", "--full-state-dict", "--kill-rank", "1",
                       "--kill-at", "6")  # fmt: skip
    assert killed.returncode != 0
    _ok(run_fsdp2("--folder", str(folder), "--epochs", "3", "--full-state-dict", "--resume"))
    resumed, full = final(folder), final(uninterrupted)
    assert [f["rank"] for f in json.loads((folder / f"ep2-ba{STEPS}" / "manifest.json").read_text())["files"]
            if f["name"].startswith("shard-") and f["size"] > 4096] == [0]  # fmt: skip
    assert resumed["state_dict"].keys() == full["state_dict"].keys()
    assert all(torch.equal(resumed["state_dict"][k], full["state_dict"][k]) for k in full["state_dict"])
    names = full["optimizer_states"][0]["param_groups"][0]["params"]
    assert resumed["optimizer_states"][0]["param_groups"][0]["params"] == list(range(len(names))), "by index"
    a, b = _by_name(resumed, names), _by_name(full, names)
    assert a.keys() == b.keys() and all(torch.equal(a[k][f], b[k][f]) for k in b for f in b[k])


def test_incremental_fsdp2_references_each_ranks_base_chunks_and_resumes_bitwise(tmp_path: Path) -> None:
    """FSDP2 with a frozen first layer and ``incremental=True``: each rank references the chunks of the frozen
    layer in the base (ep0-ba4, both ranks' shard files); resuming from the delta ep1-ba8 ends bitwise equal."""
    frozen = ["--incremental", "--freeze-first"]
    full = tmp_path / "full"
    _ok(run_fsdp2("--folder", str(full), "--epochs", "3", *frozen))
    manifest = json.loads((full / f"ep2-ba{STEPS}" / "manifest.json").read_text())
    assert manifest["format_version"] == 3
    tensors = {t["key"]: t for t in manifest["tensors"]}
    for key in ("state_dict/net.0.weight", "state_dict/net.0.bias"):
        assert {c["file"] for c in tensors[key]["chunks"]} == {
            "../ep0-ba4/shard-00000-of-00002.safetensors", "../ep0-ba4/shard-00001-of-00002.safetensors",
        }, key  # fmt: skip
    for key in ("state_dict/net.2.weight", "optimizer_states/0/state/net.2.weight/exp_avg"):
        assert not any(c["file"].startswith("../") for c in tensors[key]["chunks"]), key

    resumed = tmp_path / "resumed"
    _ok(run_fsdp2("--folder", str(resumed), "--epochs", "2", *frozen))  # ep0-ba4 (full), ep1-ba8 (delta)
    assert json.loads((resumed / "ep1-ba8" / "manifest.json").read_text())["format_version"] == 3
    _ok(run_fsdp2("--folder", str(resumed), "--epochs", "3", "--resume", *frozen))  # in place, from the delta
    assert_same_training_state(final(resumed), final(full))
