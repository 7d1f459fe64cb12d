"""Manifest compatibility: fields added by a later version are ignored; a newer ``format_version`` is refused.

Each test starts from checkpoints committed by a real ``Trainer.fit`` and edits ``manifest.json`` as a
later lightning-ckpt could write it (the manifest has no checksum of its own, so an edit needs no other change).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_ckpt import CheckpointSaver, latest, layout, read_checkpoint
from lightning_ckpt.cli import main
from lightning_ckpt.demo import TinyRegressor, build_trainer
from lightning_ckpt.errors import CorruptCheckpointError, NewerFormatError
from lightning_ckpt.manifest import ChunkOf, FileEntry, Manifest, TensorEntry


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of committed checkpoints of a real fit. Do not modify."""
    root = tmp_path_factory.mktemp("compat")
    L.seed_everything(0, verbose=False)
    saver = CheckpointSaver(folder=root / "ckpts", save_interval="4ba", run_name="compat")
    build_trainer(str(root), max_epochs=1, callbacks=[saver]).fit(TinyRegressor())
    return root / "ckpts"


@pytest.fixture
def folder(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "ckpts", symlinks=True))


def newest(folder: Path) -> Path:
    found = latest(folder)
    assert found is not None
    return Path(found)


def edit_manifest(ckpt: Path, change: Any) -> None:
    path = ckpt / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1))


def add_fields(data: dict[str, Any]) -> None:
    data["storage_class"] = {"tier": "hot", "added_in": "format 1, later release"}
    for entry in data["files"]:
        entry["compression"] = None
        entry["sha256"] = "0" * 64
    for entry in data["tensors"]:
        entry["layout"] = "strided"
        for chunk in entry["chunks"]:
            chunk["compression"] = None


def assert_same_checkpoint(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for key, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    assert got["global_step"] == want["global_step"] and got["epoch"] == want["epoch"]


def test_unknown_fields_at_every_level_are_ignored(
    trained: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = newest(folder)
    edit_manifest(ckpt, add_fields)

    assert_same_checkpoint(read_checkpoint(str(ckpt)), read_checkpoint(str(trained / ckpt.name)))
    assert newest(folder) == ckpt  # ckpt_path="last" still resumes from it
    assert main(["verify", str(ckpt)]) == 0
    assert main(["inspect", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "state_dict/" in out and ckpt.name in out


def test_newer_format_version_is_refused_naming_the_upgrade(
    folder: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = newest(folder)
    committed = [p for p in folder.iterdir() if not p.is_symlink() and (p / "manifest.json").exists()]
    older = sorted(p for p in committed if p != ckpt)[-1]
    edit_manifest(ckpt, lambda data: data.update(format_version=layout.FORMAT_VERSION + 1))

    newer = layout.FORMAT_VERSION + 1
    with pytest.raises(CorruptCheckpointError, match=rf"format_version {newer} was written by a newer") as err:
        read_checkpoint(str(ckpt))
    assert "Upgrade lightning-ckpt (pip install -U lightning-ckpt)" in str(err.value)
    assert main(["inspect", str(ckpt)]) != 0
    assert "Upgrade lightning-ckpt" in capsys.readouterr().err
    assert isinstance(err.value, NewerFormatError)
    # "last" skips it with a warning that says why (not "does not verify") and resumes from the newest it can read.
    with caplog.at_level(logging.WARNING, logger="lightning_ckpt"):
        assert newest(folder) == older
    warned = [r.getMessage() for r in caplog.records if "Upgrade lightning-ckpt" in r.getMessage()]
    assert warned and all("written by a newer lightning-ckpt" in m and "does not verify" not in m for m in warned)


@pytest.mark.parametrize("version", ["1", 0, None, True])
def test_a_format_version_that_is_no_version_is_damaged(folder: Path, version: object) -> None:
    ckpt = newest(folder)
    edit_manifest(ckpt, lambda data: data.update(format_version=version))
    with pytest.raises(CorruptCheckpointError, match="is not a lightning-ckpt format version"):
        read_checkpoint(str(ckpt))


def _expected_json(manifest: Manifest) -> dict[str, Any]:
    """What format v2 holds for a checkpoint of whole tensors, built with ``dataclasses.asdict`` per field."""
    expected = {f.name: getattr(manifest, f.name) for f in dataclasses.fields(manifest)}
    expected["files"] = [dataclasses.asdict(f) for f in manifest.files]
    expected["tensors"] = [_expected_tensor(t) for t in manifest.tensors.values()]
    return json.loads(json.dumps(expected))


def _expected_tensor(t: TensorEntry) -> dict[str, Any]:
    chunk = {"byte_offset": t.offset, "crc32": t.crc32, "file": t.file, "nbytes": t.nbytes,
             "offsets": [0] * len(t.shape), "sizes": list(t.shape)}  # fmt: skip
    return {"chunks": [chunk], "device": t.device, "dtype": t.dtype, "key": t.key, "shape": list(t.shape)}


def test_manifest_json_holds_the_same_fields_and_values_as_before(trained: Path) -> None:
    """The faster ``to_json`` writes what the JSON encoder writes for the same fields and values (format v2:
    per tensor its global shape and one chunk with its own CRC32)."""
    raw = (newest(trained) / "manifest.json").read_bytes()
    manifest = Manifest.from_json(raw, source="manifest.json")
    assert json.loads(manifest.to_json()) == _expected_json(manifest)
    assert json.loads(raw) == _expected_json(manifest) and json.loads(raw)["format_version"] == 2
    assert Manifest.from_json(manifest.to_json(), source="manifest.json") == manifest
    assert all(t.crc32 is not None and t.crc32.startswith("crc32:") for t in manifest.tensors.values())
    assert raw.startswith(b'{\n "created": ') and b'\n  {"chunks": [{"byte_offset": ' in raw


@pytest.mark.parametrize("key", ["state_dict/w", 'odd "quoted" \\ key', "état/ünïcode", "tab\there"])
def test_each_tensor_line_is_what_the_json_encoder_writes(key: str) -> None:
    entry = TensorEntry(key, "bfloat16", (3, 0, 2), "shard-00000-of-00001.safetensors", 4096, 0, "cuda:1", "crc32:0")
    shard = FileEntry(entry.file, 4096, "crc32:00000000", 0)
    manifest = Manifest(name="a", epoch=0, global_step=1, world_size=1, files=[shard], tensors={key: entry},
                        created=0.0, objects_file=None)  # fmt: skip
    [line] = [line for line in manifest.to_json().decode().split("\n") if line.startswith('  {"chunks"')]
    assert line == "  " + json.dumps(_expected_tensor(entry), sort_keys=True)
    assert Manifest.from_json(manifest.to_json(), source="m").tensors[key] == entry


def test_chunks_of_a_sharded_tensor_are_one_tensor_with_its_global_shape() -> None:
    """Two chunks of one tensor (as two ranks write them) are one v2 tensor entry; reading gives the pieces back."""
    pieces = {
        f"w@{row},0": TensorEntry(f"w@{row},0", "float32", (2, 3), f"shard-0000{rank}-of-00002.safetensors", 4096, 24,
                                "cpu", f"crc32:0000000{rank}", ChunkOf("w", (4, 3), (row, 0)))
        for rank, row in ((0, 0), (1, 2))
    }  # fmt: skip
    files = [FileEntry(f"shard-0000{r}-of-00002.safetensors", 4120, "crc32:00000000", r) for r in (0, 1)]
    manifest = Manifest(name="a", epoch=0, global_step=1, world_size=2, files=files, tensors=pieces, objects_file=None)
    [tensor] = json.loads(manifest.to_json())["tensors"]
    assert tensor["key"] == "w" and tensor["shape"] == [4, 3]
    assert [(c["offsets"], c["sizes"], c["crc32"]) for c in tensor["chunks"]] == [
        ([0, 0], [2, 3], "crc32:00000000"), ([2, 0], [2, 3], "crc32:00000001")
    ]  # fmt: skip
    again = Manifest.from_json(manifest.to_json(), source="m")
    assert again.tensors == pieces and list(again.logical_tensors()) == ["w"]


@pytest.mark.parametrize(
    ("rows", "problem"),
    [([0, 1], "overlap"), ([0], "hold 6 of its 12 elements"), ([0, 3], "lies outside the shape")],
)
def test_chunks_that_do_not_cover_their_tensor_exactly_once_are_damage(rows: list[int], problem: str) -> None:
    pieces = [
        TensorEntry(f"w@{r},0", "float32", (2, 3), "s", 4096 + 24 * i, 24, chunk_of=ChunkOf("w", (4, 3), (r, 0)))
        for i, r in enumerate(rows)
    ]
    files = [FileEntry("s", 4144, "crc32:0", 0)]
    manifest = Manifest(
        name="a",
        epoch=0,
        global_step=1,
        world_size=1,
        files=files,
        tensors={p.key: p for p in pieces},
        objects_file=None,
    )
    with pytest.raises(CorruptCheckpointError, match=f"tensor 'w': .*{problem}"):
        Manifest.from_json(manifest.to_json(), source="m")
