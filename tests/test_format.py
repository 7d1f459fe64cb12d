"""Storage format v1: bytes on disk, manifest, commit, atomic replace, corruption detection."""

from __future__ import annotations

import gc
import json
import os
import weakref
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_ckpt import CheckpointNotFoundError, CorruptCheckpointError, latest, read_checkpoint
from lightning_ckpt.collective import save_checkpoint_dir
from lightning_ckpt.discovery import resolve

SHARD = "shard-00000-of-00001.safetensors"


def _sample() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    return {
        "state_dict": {
            "f32": torch.randn(33, 7, generator=g),
            "f16": torch.randn(5, generator=g).half(),
            "bf16": torch.randn(9, 3, generator=g).bfloat16(),
            "i64": torch.arange(11),
            "u8": torch.arange(7, dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 4),
            "transposed": torch.arange(12.0).reshape(3, 4).t(),
        },
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.ones(3)}},
                "param_groups": [{"lr": 0.1}],
            }
        ],
        "epoch": 2,
        "global_step": 40,
        "hyper_parameters": {"width": 32, "name": "x"},
        "tuple": (1, "a", torch.zeros(2)),
    }


def _assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=False):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_every_dtype_bitwise(tmp_path: Path) -> None:
    ckpt = _sample()
    path = save_checkpoint_dir(ckpt, tmp_path / "ep2-ba40")
    _assert_same(ckpt, read_checkpoint(path))


def test_shard_is_a_valid_safetensors_file_with_raw_bytes(tmp_path: Path) -> None:
    ckpt = _sample()
    path = Path(save_checkpoint_dir(ckpt, tmp_path / "c"))
    tensors = load_file(path / SHARD)
    assert torch.equal(tensors["state_dict/f32"], ckpt["state_dict"]["f32"])  # type: ignore[index]
    assert torch.equal(tensors["optimizer_states/0/state/0/exp_avg"], torch.ones(3))
    raw = (path / SHARD).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert (8 + header_len) % 4096 == 0, "tensor data starts on a 4096-byte boundary"
    f32 = ckpt["state_dict"]["f32"]  # type: ignore[index]
    assert f32.numpy().tobytes() in raw, "tensor bytes are stored raw, not pickled"


def test_manifest_lists_sizes_and_checksums_of_the_bytes_on_disk(tmp_path: Path) -> None:
    path = Path(save_checkpoint_dir(_sample(), tmp_path / "c"))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["global_step"] == 40 and manifest["epoch"] == 2
    listed = {f["name"]: f for f in manifest["files"]}
    assert set(listed) == {SHARD, "objects.pt"} == set(os.listdir(path)) - {"manifest.json"}
    for name, entry in listed.items():
        data = (path / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["checksum"] == f"crc32:{zlib.crc32(data):08x}"
    assert {t["key"] for t in manifest["tensors"]} >= {"state_dict/f32", "tuple/2"}
    shard = (path / SHARD).read_bytes()
    for tensor in manifest["tensors"]:  # format v2: each tensor one chunk, with the CRC32 of its own bytes
        [chunk] = tensor["chunks"]
        assert chunk["offsets"] == [0] * len(tensor["shape"]) and chunk["sizes"] == tensor["shape"]
        data = shard[chunk["byte_offset"] : chunk["byte_offset"] + chunk["nbytes"]]
        assert chunk["file"] == SHARD and chunk["crc32"] == f"crc32:{zlib.crc32(data):08x}"
    assert "torch" in manifest["versions"]


def test_objects_file_holds_no_tensor_data_and_loads_weights_only(tmp_path: Path) -> None:
    big = {"state_dict": {"w": torch.randn(1024, 1024)}, "epoch": 0, "global_step": 1}
    path = Path(save_checkpoint_dir(big, tmp_path / "c"))
    assert (path / "objects.pt").stat().st_size < 4096
    skeleton = torch.load(path / "objects.pt", weights_only=True)
    assert skeleton["state_dict"]["w"] == {"__lightning_ckpt_tensor__": "state_dict/w"}


def test_commit_leaves_no_hidden_staging_and_points_latest(tmp_path: Path) -> None:
    save_checkpoint_dir(_sample(), tmp_path / "a", latest_filename="latest")
    save_checkpoint_dir(_sample(), tmp_path / "b", latest_filename="latest")
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "latest", "latest.symlink"]
    assert os.readlink(tmp_path / "latest") == "b"
    assert (tmp_path / "latest.symlink").read_text() == "b"
    assert resolve(tmp_path / "latest").path == str(tmp_path / "b")
    assert resolve(tmp_path / "latest.symlink").path == str(tmp_path / "b")


def test_failed_save_over_an_existing_checkpoint_keeps_the_old_one(tmp_path: Path) -> None:
    old = save_checkpoint_dir({"w": torch.ones(3), "global_step": 1}, tmp_path / "last.ckpt")
    before = {n: (Path(old) / n).read_bytes() for n in os.listdir(old)}
    unpicklable = {"w": torch.zeros(3), "global_step": 2, "bad": lambda: None}
    with pytest.raises(Exception, match=r"pickle|lambda"):
        save_checkpoint_dir(unpicklable, tmp_path / "last.ckpt")
    assert {n: (Path(old) / n).read_bytes() for n in os.listdir(old)} == before
    assert os.listdir(tmp_path) == ["last.ckpt"], "the staging directory was cleaned up"
    assert torch.equal(read_checkpoint(old)["w"], torch.ones(3))


def test_save_over_an_existing_checkpoint_replaces_it_whole(tmp_path: Path) -> None:
    save_checkpoint_dir({"w": torch.ones(3), "global_step": 1}, tmp_path / "last.ckpt")
    save_checkpoint_dir({"w": torch.zeros(5), "global_step": 2}, tmp_path / "last.ckpt")
    assert torch.equal(read_checkpoint(str(tmp_path / "last.ckpt"))["w"], torch.zeros(5))
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_memory_filesystem_round_trip() -> None:
    ckpt = _sample()
    path = save_checkpoint_dir(ckpt, "memory://format-test/ep2-ba40", latest_filename="latest")
    _assert_same(ckpt, read_checkpoint(path))
    found = latest("memory://format-test")
    assert found is not None and found.startswith("memory://") and found.endswith("/format-test/ep2-ba40")


def test_latest_skips_uncommitted_and_orders_by_commit(tmp_path: Path) -> None:
    assert latest(tmp_path) is None
    save_checkpoint_dir({"w": torch.ones(1), "global_step": 5}, tmp_path / "ba5")
    save_checkpoint_dir({"w": torch.ones(1), "global_step": 9}, tmp_path / "ba9")
    (tmp_path / "ba9" / "manifest.json").unlink()  # a checkpoint whose commit never happened
    (tmp_path / ".ba12.partial-abc").mkdir()
    assert latest(tmp_path) == str(tmp_path / "ba5")


# -- bad checkpoints: every one is detected with a message naming the file -------------------------
def _committed(tmp_path: Path) -> Path:
    return Path(save_checkpoint_dir({"w": torch.arange(1000.0), "global_step": 3}, tmp_path / "c"))


def test_truncated_shard_is_reported_with_expected_size(tmp_path: Path) -> None:
    path = _committed(tmp_path)
    size = (path / SHARD).stat().st_size
    os.truncate(path / SHARD, size - 100)
    with pytest.raises(CorruptCheckpointError, match=rf"{SHARD} has {size - 100} bytes, expected {size}"):
        read_checkpoint(str(path))


def test_missing_shard_is_reported(tmp_path: Path) -> None:
    path = _committed(tmp_path)
    (path / SHARD).unlink()
    with pytest.raises(CorruptCheckpointError, match=rf"{SHARD} is missing"):
        read_checkpoint(str(path))


def test_flipped_byte_fails_the_checksum(tmp_path: Path) -> None:
    path = _committed(tmp_path)
    data = bytearray((path / SHARD).read_bytes())
    data[-3] ^= 0x40
    (path / SHARD).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=rf"{SHARD}: checksum crc32:[0-9a-f]+, expected crc32:"):
        read_checkpoint(str(path))


@pytest.mark.parametrize(
    "bad_name", ["../escape.bin", "/etc/passwd", "sub/file", "..", "../../up/x.bin", "../a/../b/x.bin", "../../x"]
)
def test_manifest_naming_files_outside_its_directory_is_rejected(tmp_path: Path, bad_name: str) -> None:
    path = _committed(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][0]["name"] = bad_name
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match=r"manifest\.json: file name .* is neither a plain name"):
        read_checkpoint(str(path))


def test_a_version_2_manifest_may_not_name_another_checkpoints_file(tmp_path: Path) -> None:
    """Only format_version 3 (incremental checkpoints) references files of a sibling checkpoint."""
    path = _committed(tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    manifest["files"][0]["name"] = "../other/shard-00000-of-00001.safetensors"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match=r"belongs to another checkpoint, which format_version 2 cannot"):
        read_checkpoint(str(path))


def test_truncated_manifest_is_reported(tmp_path: Path) -> None:
    path = _committed(tmp_path)
    raw = (path / "manifest.json").read_bytes()
    (path / "manifest.json").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"manifest\.json: not valid JSON"):
        read_checkpoint(str(path))


def test_checkpoint_without_manifest_is_not_committed(tmp_path: Path) -> None:
    path = _committed(tmp_path)
    (path / "manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"manifest\.json is missing: .* is not a committed checkpoint"):
        resolve(path)


def test_ckpt_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"ckpt_path='.*nope' does not exist"):
        resolve(tmp_path / "nope")


def test_pointer_cannot_escape_its_folder(tmp_path: Path) -> None:
    _committed(tmp_path)
    (tmp_path / "latest.symlink").write_text("../../etc")
    with pytest.raises(CorruptCheckpointError, match=r"latest\.symlink: pointer holds '\.\./\.\./etc'"):
        resolve(tmp_path / "latest.symlink")


def test_latest_of_a_file_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"folder=.*f' is a file"):
        latest(tmp_path / "f")


def test_a_loaded_checkpoint_is_freed_as_soon_as_it_is_dropped(tmp_path: Path) -> None:
    """No reference cycle keeps the memory-mapped shards alive until the cycle collector runs."""
    path = save_checkpoint_dir({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, str(tmp_path / "c"))
    gc.disable()
    try:
        loaded = read_checkpoint(path)
        alive = weakref.ref(loaded["state_dict"]["w"])
        del loaded
        assert alive() is None
    finally:
        gc.enable()
