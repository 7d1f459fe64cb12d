"""Corruption on storage: detected with a message naming the file; ``"last"`` falls back with a warning."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_ckpt import CheckpointSaver, CorruptCheckpointError, ShardedCheckpointIO, read_checkpoint
from lightning_ckpt.demo import TinyRegressor, build_trainer, state_of

from .test_distributed import run_two_nodes

SHARD = "shard-00000-of-00001.safetensors"


def _fit(root: Path, epochs: int, ckpt_path: str | None = None) -> tuple[L.Trainer, ShardedCheckpointIO]:
    L.seed_everything(0, verbose=False)
    io = ShardedCheckpointIO()
    saver = CheckpointSaver(folder=str(root / "ckpts"), run_name="c", save_interval="1ep", async_save=False)
    trainer = build_trainer(str(root), max_epochs=epochs, callbacks=[saver], plugins=[io])
    trainer.fit(TinyRegressor(), ckpt_path=ckpt_path)
    return trainer, io


def _flip(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


Corruption = Callable[[Path], None]
CASES: dict[str, tuple[Corruption, str]] = {
    "flipped-byte-in-shard": (lambda d: _flip(d / SHARD), rf"{SHARD}: checksum crc32:\w+, expected crc32:\w+"),
    "truncated-shard": (lambda d: _truncate(d / SHARD), rf"{SHARD} has \d+ bytes, expected \d+"),
    "flipped-byte-in-objects": (lambda d: _flip(d / "objects.pt", 40), r"objects.pt: checksum"),
    "truncated-manifest": (lambda d: _truncate(d / "manifest.json"), r"manifest.json"),
    "manifest-missing": (lambda d: (d / "manifest.json").unlink(), ""),  # not committed: skipped silently
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_last_falls_back_to_the_newest_checkpoint_that_verifies_and_says_so(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt, message = CASES[case]
    _fit(tmp_path, epochs=2)  # ep0-ba8, ep1-ba16
    folder = tmp_path / "ckpts"
    kept = read_checkpoint(str(folder / "ep0-ba8"))["state_dict"]
    corrupt(folder / "ep1-ba16")
    if message:  # every reader names the file and what was expected
        with pytest.raises(CorruptCheckpointError, match=message):
            read_checkpoint(str(folder / "ep1-ba16"))

    class Loaded(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.weights = state_of(pl_module)

    loaded = Loaded()
    L.seed_everything(0, verbose=False)
    io = ShardedCheckpointIO()
    saver = CheckpointSaver(folder=str(folder), run_name="c", save_interval="1ep")  # no overwrite=True needed
    trainer = build_trainer(str(tmp_path), max_epochs=2, callbacks=[saver, loaded], plugins=[io])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyRegressor(), ckpt_path="last")
    assert io.loaded_path == str(folder / "ep0-ba8")
    assert all(torch.equal(loaded.weights[k], kept[k]) for k in kept)
    assert read_checkpoint(str(folder / "ep1-ba16"))["global_step"] == 16, "the damaged one was saved over"
    said = [str(w.message) for w in caught if "does not verify" in str(w.message)]
    logged = [r.getMessage() for r in caplog.records if "does not verify" in r.getMessage()]
    if case.startswith("flipped-byte"):
        # Found by the checksum while loading: the warning names the checkpoint, the problem and the fallback.
        assert len(said) == 1 and str(folder / "ep1-ba16") in said[0] and re.search(message, said[0])
        assert f"falling back to {folder / 'ep0-ba8'}" in said[0]
    elif case.startswith("truncated"):  # found by the size check while listing: never offered as "last"
        assert not said and logged and all(re.search(message, line) for line in logged)
    else:  # no manifest: not a committed checkpoint at all, nothing to warn about
        assert not said and not logged


def test_last_with_no_checkpoint_that_verifies_fails_with_every_problem_listed(tmp_path: Path) -> None:
    _fit(tmp_path, epochs=2)
    folder = tmp_path / "ckpts"
    for name in ("ep0-ba8", "ep1-ba16"):
        _flip(folder / name / SHARD)
    with pytest.raises(CorruptCheckpointError, match=r"no committed checkpoint verifies") as info:
        _fit(tmp_path, epochs=3, ckpt_path="last")
    assert str(folder / "ep0-ba8" / SHARD) in str(info.value) and str(folder / "ep1-ba16" / SHARD) in str(info.value)


def test_a_pointer_naming_a_deleted_checkpoint_is_reported(tmp_path: Path) -> None:
    _fit(tmp_path, epochs=1)
    folder = tmp_path / "ckpts"
    (folder / "latest.symlink").write_text("ep9-ba99")
    with pytest.raises(CorruptCheckpointError, match=r"latest.symlink names checkpoint 'ep9-ba99', but .* is not"):
        ShardedCheckpointIO().load_checkpoint(str(folder / "latest.symlink"))
    manifest = json.loads((folder / "ep0-ba8" / "manifest.json").read_text())
    assert manifest["global_step"] == 8 and os.path.islink(folder / "latest")


def test_ranks_fall_back_together_when_only_one_node_sees_corruption(tmp_path: Path) -> None:
    """Two nodes with separate disks: node 1's newest copy is damaged, node 0's is fine. Both ranks
    must resume from the same (older) step: a rank resuming alone from a newer one would diverge."""
    folder = str(tmp_path / "node{node_rank}" / "ckpts")
    for result in run_two_nodes("--folder", folder, "--epochs", "2"):
        assert result.returncode == 0, result.stderr[-3000:]
    damaged = tmp_path / "node1" / "ckpts" / "ep1-ba8"
    (shard,) = damaged.glob("shard-*")
    _flip(shard)
    resumed = run_two_nodes("--folder", folder, "--epochs", "3", "--resume", "--dump-loaded", str(tmp_path / "loaded"))
    for result in resumed:
        assert result.returncode == 0, result.stderr[-3000:]
    text = "".join(r.stderr for r in resumed)
    assert "ep1-ba8 does not verify" in text and f"rank 1: {shard}: checksum" in text
    loaded = [torch.load(tmp_path / f"loaded.rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank, weights in enumerate(loaded):
        expected = read_checkpoint(str(tmp_path / f"node{rank}" / "ckpts" / "ep0-ba4"))["state_dict"]
        assert all(torch.equal(weights[k], expected[k]) for k in expected), f"rank {rank} resumed from ep0-ba4"
