"""Export (``lightning-ckpt consolidate``): a sharded FSDP2-style checkpoint as one ``.ckpt`` or as safetensors.

The checkpoint is written by two real gloo ranks (``DTensor`` values, ``Shard(0)`` and ``Shard(1)``,
uneven, bf16, a scalar step) and exported in one process without a process group; every export is
compared bitwise with :func:`lightning_ckpt.read_checkpoint` of the same checkpoint. Run as a script
under torchrun, this file is the rank program that writes that checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_ckpt import read_checkpoint
from lightning_ckpt.cli import main
from lightning_ckpt.demo import TinyRegressor
from lightning_ckpt.errors import ConfigError, CorruptCheckpointError
from lightning_ckpt.export import consolidate

from .s3_server import S3Bucket
from .test_distributed import ROOT, _free_port, _ok
from .test_save_plan import _flatten

V1 = Path(__file__).with_name("data") / "format_v1" / "ckpts" / "ep0-ba8"


def _save_sharded(path: str) -> None:
    """Rank program: a TinyRegressor's weights and Adam-like state as DTensors over 2 ranks, saved collectively."""
    import lightning
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from lightning_ckpt import ShardedCheckpointIO

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    model = TinyRegressor()
    torch.manual_seed(1)
    weights = {
        name: distribute_tensor(value.detach(), mesh, [Shard(1) if name == "net.2.weight" else Shard(0)])
        for name, value in model.state_dict().items()
    }
    state = {
        "exp_avg": distribute_tensor(torch.randn(32, 16), mesh, [Shard(0)]),
        "uneven": distribute_tensor(torch.randn(5, 3), mesh, [Shard(0)]),  # 3 rows on rank 0, 2 on rank 1
        "bf16": distribute_tensor(torch.randn(6, 4).to(torch.bfloat16), mesh, [Shard(0)]),
        "step": torch.tensor(3.0),
    }
    checkpoint = {
        "state_dict": weights,
        "optimizer_states": [{"state": {"net.0.weight": state}, "param_groups": [{"lr": 0.01, "params": ["w"]}]}],
        "epoch": 0,
        "global_step": 3,
        "pytorch-lightning_version": lightning.__version__,
        "hyper_parameters": dict(model.hparams),
        "loops": {"fit_loop": {"epoch_progress": {"total": 1}}},
    }
    ShardedCheckpointIO().save_collective(checkpoint, path).wait()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose tensors are chunks written by two gloo ranks. Do not modify."""
    path = tmp_path_factory.mktemp("sharded") / "ep0-ba3"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    command += ["-m", "tests.test_consolidate", str(path)]  # a module: its relative imports work
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    _ok(subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, check=False))
    return path


@pytest.fixture(scope="module")
def expected(sharded: Path) -> dict[str, Any]:
    return read_checkpoint(str(sharded), weights_only=False)


def assert_bitwise(a: dict[str, Any], b: dict[str, Any]) -> None:
    fa, fb = _flatten(a), _flatten(b)
    assert fa.keys() == fb.keys()
    for key, value in fa.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == fb[key].dtype and value.shape == fb[key].shape, key
            assert torch.equal(value.view(-1).view(torch.uint8), fb[key].view(-1).view(torch.uint8)), key
        else:
            assert value == fb[key], key


def test_the_fixture_is_sharded(sharded: Path) -> None:
    manifest = json.loads((sharded / "manifest.json").read_text())
    tensors = {t["key"]: t for t in manifest["tensors"]}
    assert [c["offsets"] for c in tensors["state_dict/net.2.weight"]["chunks"]] == [[0, 0], [0, 16]]  # Shard(1)
    assert [c["sizes"] for c in tensors["optimizer_states/0/state/net.0.weight/uneven"]["chunks"]] == [[3, 3], [2, 3]]


def test_ckpt_is_the_checkpoint_bitwise_and_loads_in_torch_and_lightning(
    sharded: Path, expected: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "model.ckpt"
    assert consolidate(sharded, out) == [str(out)]
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt"], "no temporary file left"
    assert_bitwise(torch.load(out, weights_only=True), expected)
    assert_bitwise(torch.load(out, weights_only=True, mmap=True), expected)  # records aligned like torch.save's
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None, "every record's CRC32 is right"
        records = [info for info in archive.infolist() if "/data/" in info.filename]
    assert len(records) == len([k for k in _flatten(expected) if isinstance(_flatten(expected)[k], torch.Tensor)])
    with open(out, "rb") as f:
        for info in records:  # as torch.save: each tensor's bytes start at a multiple of 64 (mmap, zero-copy)
            f.seek(info.header_offset + 26)
            name_length, extra_length = struct.unpack("<HH", f.read(4))
            assert (info.header_offset + 30 + name_length + extra_length) % 64 == 0, info.filename
    model = TinyRegressor.load_from_checkpoint(str(out))
    assert all(torch.equal(v, expected["state_dict"][k]) for k, v in model.state_dict().items())


def test_ckpt_weights_only_keeps_what_load_from_checkpoint_needs(sharded: Path, tmp_path: Path) -> None:
    [out] = consolidate(sharded, tmp_path / "weights.ckpt", weights_only=True, dtype="bf16")
    loaded = torch.load(out, weights_only=True)
    assert sorted(loaded) == ["epoch", "global_step", "hyper_parameters", "pytorch-lightning_version", "state_dict"]
    assert {v.dtype for v in loaded["state_dict"].values()} == {torch.bfloat16}
    model = TinyRegressor.load_from_checkpoint(out)
    assert model.net[0].weight.dtype == torch.float32 and model.hparams["width"] == 32


def test_dtype_casts_the_weights_and_keeps_optimizer_state_exact(
    sharded: Path, expected: dict[str, Any], tmp_path: Path
) -> None:
    [out] = consolidate(sharded, tmp_path / "bf16.ckpt", dtype="bf16")
    loaded = torch.load(out, weights_only=True)
    for name, value in expected["state_dict"].items():
        assert loaded["state_dict"][name].dtype == torch.bfloat16
        assert torch.equal(loaded["state_dict"][name], value.to(torch.bfloat16)), name
    assert_bitwise(loaded["optimizer_states"][0], expected["optimizer_states"][0])


def test_safetensors_one_file_holds_the_weights_bitwise(
    sharded: Path, expected: dict[str, Any], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    files = consolidate(sharded, tmp_path / "hf", format="safetensors")
    assert files == [str(tmp_path / "hf" / "model.safetensors")]
    assert_bitwise(load_file(files[0]), expected["state_dict"])
    [half] = consolidate(sharded, tmp_path / "half.safetensors", dtype="fp16")
    loaded = load_file(half)
    assert all(torch.equal(loaded[k], v.to(torch.float16)) for k, v in expected["state_dict"].items())


def test_safetensors_over_max_shard_bytes_are_numbered_files_with_an_index(
    sharded: Path, expected: dict[str, Any], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    files = consolidate(sharded, tmp_path / "hf", format="safetensors", max_shard_bytes=256)
    names = [os.path.basename(f) for f in files]
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"]
    index = json.loads(Path(files[-1]).read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in expected["state_dict"].values())
    assert set(index["weight_map"]) == set(expected["state_dict"])
    merged: dict[str, torch.Tensor] = {}
    for file in files[:-1]:
        part = load_file(file)
        assert all(index["weight_map"][k] == os.path.basename(file) for k in part)
        merged.update(part)
    assert_bitwise(merged, expected["state_dict"])
    with pytest.raises(FileExistsError, match="--force"):
        consolidate(sharded, tmp_path / "hf", format="safetensors")  # would leave the index of the earlier export
    files = consolidate(sharded, tmp_path / "hf", format="safetensors", force=True)
    assert sorted(os.listdir(tmp_path / "hf")) == ["model.safetensors"], "the earlier parts and index are gone"


_PEAK_CHILD = """
import os, sys
from lightning_ckpt.export import consolidate
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS: the imports' peak is not the export's
before = status("VmRSS")
consolidate(sys.argv[1], sys.argv[2] + ".ckpt")
consolidate(sys.argv[1], sys.argv[2] + ".safetensors")
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset the peak RSS")
def test_the_export_holds_a_few_tensors_not_the_checkpoint(tmp_path: Path) -> None:
    from lightning_ckpt.collective import save_checkpoint_dir

    weights = {f"layer{i}.weight": torch.full((1024, 1024), float(i)) for i in range(32)}  # 32 x 4 MiB
    src = save_checkpoint_dir({"state_dict": weights}, str(tmp_path / "ep0-ba1"))
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", _PEAK_CHILD, src, str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    print("peak extra RSS (MiB):", int(done.stdout.split()[-1]) / 2**20)
    assert int(done.stdout.split()[-1]) < 48 * 2**20, "peak extra RSS of two exports of 128 MiB"


def test_a_flipped_byte_in_one_chunk_names_the_file_and_the_key_and_writes_nothing(
    sharded: Path, tmp_path: Path
) -> None:
    import shutil

    copy = Path(shutil.copytree(sharded, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    [chunk, _] = next(t for t in manifest["tensors"] if t["key"] == "state_dict/net.0.weight")["chunks"]
    with open(copy / chunk["file"], "r+b") as f:
        f.seek(chunk["byte_offset"] + 7)
        byte = f.read(1)
        f.seek(chunk["byte_offset"] + 7)
        f.write(bytes([byte[0] ^ 0xFF]))
    for out in (tmp_path / "out" / "model.ckpt", tmp_path / "out" / "model.safetensors"):
        with pytest.raises(
            CorruptCheckpointError, match=re.escape(f"{chunk['file']}: tensor 'state_dict/net.0.weight@0,0'")
        ):
            consolidate(copy, out)
    assert os.listdir(tmp_path / "out") == [], "no output, no temporary file"


def test_a_format_v1_checkpoint_exports_like_read_checkpoint(tmp_path: Path) -> None:
    [out] = consolidate(V1, tmp_path / "v1.ckpt")
    assert_bitwise(torch.load(out, weights_only=True), read_checkpoint(str(V1)))


def test_a_checkpoint_on_s3_exports_the_same(
    sharded: Path, expected: dict[str, Any], tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    from lightning_ckpt.cli.cp import copy_checkpoint

    remote = f"{s3_bucket.url}/run/ep0-ba3"
    copy_checkpoint(str(sharded), remote, s3_bucket.storage_options)
    [out] = consolidate(remote, tmp_path / "remote.ckpt", storage_options=s3_bucket.storage_options)
    assert_bitwise(torch.load(out, weights_only=True), expected)


def test_bad_arguments_name_the_argument_and_a_valid_value(sharded: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"format='onnx' is not valid.*'ckpt' or 'safetensors'"):
        consolidate(sharded, tmp_path / "x", format="onnx")
    with pytest.raises(ConfigError, match=r"dtype='int4' is not valid.*'bf16', 'fp16' or 'fp32'"):
        consolidate(sharded, tmp_path / "x", dtype="int4")
    with pytest.raises(ConfigError, match="max_shard_bytes=0 is not valid"):
        consolidate(sharded, tmp_path / "x", format="safetensors", max_shard_bytes=0)
    with pytest.raises(ConfigError, match=re.escape("out='s3://b/m.ckpt' is not valid")):
        consolidate(sharded, "s3://b/m.ckpt")
    (tmp_path / "old.ckpt").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=re.escape("old.ckpt already exists; pass --force")):
        consolidate(sharded, tmp_path / "old.ckpt")
    assert (tmp_path / "old.ckpt").read_bytes() == b"keep me"
    assert consolidate(sharded, tmp_path / "old.ckpt", force=True) == [str(tmp_path / "old.ckpt")]
    assert torch.load(tmp_path / "old.ckpt", weights_only=True)["global_step"] == 3


def test_the_command_line_exports_and_explains_bad_arguments(
    sharded: Path, expected: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    argv = [
        "consolidate",
        str(sharded),
        str(out),
        "--format",
        "safetensors",
        "--dtype",
        "bf16",
        "--max-shard-size",
        "256B",
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].startswith(f"wrote {out / 'model-00001-of-00002.safetensors'} (")  # bf16: half
    assert load_file(out / "model-00002-of-00002.safetensors")["net.2.bias"].dtype == torch.bfloat16
    assert main(argv) == 1 and "already exists; pass --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    assert main(["consolidate", str(sharded), str(tmp_path / "w.ckpt"), "--weights-only"]) == 0
    assert "optimizer_states" not in torch.load(tmp_path / "w.ckpt", weights_only=True)
    for flag, value in (("--format", "onnx"), ("--dtype", "int4"), ("--max-shard-size", "5 parsecs")):
        assert main(["consolidate", str(sharded), str(tmp_path / "y"), flag, value]) == 2
        err = capsys.readouterr().err
        assert flag in err and value in err and ("choose from" in err or "5GB" in err), err


if __name__ == "__main__":
    _save_sharded(sys.argv[1])
