"""Asynchronous saves: point-in-time snapshots, one save in flight, errors surfaced once, fast writes."""

from __future__ import annotations

import logging
import os
import signal
import threading
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from lightning_ckpt import CheckpointSaver, ShardedCheckpointIO, WriterHook, latest, read_checkpoint
from lightning_ckpt.demo import TinyRegressor, build_trainer, state_of
from lightning_ckpt.staging import StagingBuffer
from lightning_ckpt.writer import DIRECT_CHUNK_BYTES, plan_shard, write_shard_local

from .conftest import run_worker


def _state(seed: int = 0, big: int = 3_000_000) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "state_dict": {
            "w": torch.randn(big, generator=g),
            "b": torch.randn(1001, generator=g),
            "h": torch.randn(17, generator=g).half(),
        },
        "global_step": 5,
        "loops": {"note": ["a", "b"]},
    }


def _hold_background(io: ShardedCheckpointIO) -> threading.Event:
    """Keep the plugin's single background thread busy until the returned event is set, so the next
    save's write certainly starts only after the test has changed the tensors."""
    gate = threading.Event()
    io._pipeline.background().submit(gate.wait, 30)
    return gate


def test_async_save_is_the_state_at_the_call_even_when_training_changes_it(tmp_path: Path) -> None:
    io = ShardedCheckpointIO(async_save=True)
    state = _state()
    expected = {k: v.clone() for k, v in state["state_dict"].items()}
    gate = _hold_background(io)
    io.save_checkpoint(state, tmp_path / "ba5")
    assert not (tmp_path / "ba5").exists(), "the write must not have started yet"
    for tensor in state["state_dict"].values():  # the optimizer step right after the save call
        tensor.add_(1)
    state["loops"]["note"].append("changed")
    gate.set()
    io.wait_for_save()
    loaded = read_checkpoint(str(tmp_path / "ba5"))
    assert all(torch.equal(loaded["state_dict"][k], expected[k]) for k in expected)
    assert loaded["loops"]["note"] == ["a", "b"]
    assert io.last_save is not None and io.last_save.asynchronous and io.last_save.durable_s is not None
    assert io.last_save.durable_s >= io.last_save.blocking_s
    io.teardown()


def test_one_save_in_flight_the_next_waits_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    io = ShardedCheckpointIO(async_save=True)
    gate = _hold_background(io)
    io.save_checkpoint(_state(1), tmp_path / "ba1")
    threading.Timer(0.3, gate.set).start()
    with caplog.at_level(logging.INFO, logger="lightning_ckpt"):
        io.save_checkpoint(_state(2), tmp_path / "ba2")  # must wait for ba1, not pile up a second snapshot
    assert "Waiting for the previous checkpoint save to finish" in caplog.text
    assert (tmp_path / "ba1" / "manifest.json").exists()
    assert io.last_save is not None and io.last_save.waited_s >= 0.2
    io.wait_for_save()
    assert torch.equal(read_checkpoint(str(tmp_path / "ba2"))["state_dict"]["w"], _state(2)["state_dict"]["w"])
    io.teardown()


class FailOnce(WriterHook):
    def __init__(self, name: str) -> None:
        self.name = name

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if os.path.basename(path) == self.name:
            raise PermissionError(f"quota exceeded while saving {self.name}")

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def test_background_error_is_raised_once_with_its_type_and_nothing_is_committed(tmp_path: Path) -> None:
    io = ShardedCheckpointIO(async_save=True, writer_hooks=[FailOnce("ba2")])
    io.save_collective(_state(1), tmp_path / "ba1", latest_filename="latest")
    io.save_collective(_state(2), tmp_path / "ba2", latest_filename="latest")  # fails in the background
    with pytest.raises(PermissionError, match="quota exceeded while saving ba2"):
        io.save_collective(_state(3), tmp_path / "ba3", latest_filename="latest")  # reported here
    io.wait_for_save()  # reported once only
    assert latest(tmp_path) == str(tmp_path / "ba1")
    assert sorted(os.listdir(tmp_path)) == ["ba1", "latest", "latest.symlink"]
    io.save_collective(_state(3), tmp_path / "ba3", latest_filename="latest")
    io.teardown()
    assert latest(tmp_path) == str(tmp_path / "ba3")


def test_teardown_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    io = ShardedCheckpointIO(async_save=True)
    gate = _hold_background(io)
    io.save_checkpoint(_state(), tmp_path / "ba5")
    threading.Timer(0.2, gate.set).start()
    io.teardown()
    assert (tmp_path / "ba5" / "manifest.json").exists()


def test_load_right_after_an_async_save_sees_it(tmp_path: Path) -> None:
    io = ShardedCheckpointIO(async_save=True)
    io.save_checkpoint(_state(4), tmp_path / "ba5")
    assert torch.equal(io.load_checkpoint(tmp_path / "ba5")["state_dict"]["w"], _state(4)["state_dict"]["w"])
    io.teardown()


def test_trainer_async_checkpoints_hold_the_weights_of_their_step(tmp_path: Path) -> None:
    """Every checkpoint of an async run equals the model as it was when that save was called."""
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            seen[trainer.global_step] = {k: v.clone() for k, v in state_of(pl_module).items()}

    L.seed_everything(0, verbose=False)
    saver = CheckpointSaver(folder=tmp_path / "c", save_interval="2ba", run_name="r", async_save=True)
    trainer = build_trainer(str(tmp_path), max_epochs=2, callbacks=[saver, Record()])
    trainer.fit(TinyRegressor())
    names = sorted(os.listdir(tmp_path / "c"))
    steps = sorted(int(n.split("-ba")[1]) for n in names if "-ba" in n)
    assert steps == list(range(2, 17, 2))
    for step in steps:
        name = next(n for n in names if n.endswith(f"-ba{step}"))
        loaded = read_checkpoint(str(tmp_path / "c" / name))["state_dict"]
        assert all(torch.equal(loaded[k], seen[step][k]) for k in seen[step]), f"step {step}"


def test_async_resume_equals_uninterrupted(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    full = TinyRegressor()
    build_trainer(str(tmp_path / "full"), max_epochs=3).fit(full)
    L.seed_everything(0, verbose=False)
    saver = CheckpointSaver(folder=tmp_path / "c", save_interval="1ep", run_name="r", async_save=True)
    build_trainer(str(tmp_path), max_epochs=2, callbacks=[saver]).fit(TinyRegressor())
    L.seed_everything(0, verbose=False)
    resumed = TinyRegressor()
    saver = CheckpointSaver(folder=tmp_path / "c", run_name="r", async_save=True)
    build_trainer(str(tmp_path), max_epochs=3, callbacks=[saver]).fit(resumed, ckpt_path="last")
    assert all(torch.equal(a, b) for a, b in zip(state_of(resumed).values(), state_of(full).values(), strict=True))


def test_staging_buffer_is_reused_across_saves_and_grows_only_when_needed() -> None:
    buffer = StagingBuffer()
    small = plan_shard({"w": torch.randn(1000)}, file="s")
    first = buffer.stage(small)
    again = buffer.stage(small)
    assert first.image.data_ptr() == again.image.data_ptr() and first.image.data_ptr() % 4096 == 0
    bigger = buffer.stage(plan_shard({"w": torch.randn(3_000_000)}, file="s"))
    assert buffer.capacity >= bigger.plan.total_size
    assert torch.equal(bigger.plan.tensors[0], bigger.plan.tensors[0].clone())


@pytest.mark.parametrize("staged", [False, True], ids=["from-tensors", "from-staging"])
@pytest.mark.parametrize("folder", ["disk", "tmpfs"])
def test_direct_and_buffered_writes_give_the_same_bytes(tmp_path: Path, staged: bool, folder: str) -> None:
    """O_DIRECT writes (several ring blocks, a padded tail cut back) equal plain buffered writes; on tmpfs,
    which refuses O_DIRECT, the writer falls back to buffered I/O."""
    if folder == "tmpfs":
        if not os.path.isdir("/dev/shm"):
            pytest.fail("this test needs /dev/shm (tmpfs)")
        tmp_path = Path(os.path.realpath("/dev/shm")) / f"lightning-ckpt-{os.getpid()}-{staged}"
        tmp_path.mkdir()
    tensors = {
        "big": torch.randn((3 * DIRECT_CHUNK_BYTES + 12345) // 4 + 1),  # wraps the 3-block ring
        "odd": torch.randn(7).to(torch.float16),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),  # a zero-length segment between the others
    }
    try:
        files = {}
        for direct in (True, False):
            plan = plan_shard(tensors, file="x")
            image = None
            if staged:
                staged_shard = StagingBuffer().stage(plan)
                plan, image = staged_shard.plan, staged_shard.padded
            path = tmp_path / f"direct{direct}.safetensors"
            written = write_shard_local(str(path), plan, rank=0, image=image, direct_io=direct)
            entry = written.file
            data = path.read_bytes()
            assert len(data) == entry.size == plan.total_size
            assert entry.checksum == f"crc32:{zlib.crc32(data):08x}"
            for piece in written.entries:  # each tensor's own CRC32, computed while written (format v2)
                assert piece.crc32 == f"crc32:{zlib.crc32(data[piece.offset : piece.offset + piece.nbytes]):08x}"
            files[direct] = data
            loaded = load_file(str(path))
            assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
        assert files[True] == files[False]
    finally:
        if folder == "tmpfs":
            for p in tmp_path.iterdir():
                p.unlink()
            tmp_path.rmdir()


def test_a_write_the_kernel_refuses_for_o_direct_falls_back_to_buffered_io(tmp_path: Path) -> None:
    """ext4 refuses unaligned O_DIRECT writes with EINVAL; the file switches to buffered I/O and the bytes land."""
    from lightning_ckpt.writer import _DirectFile

    file = _DirectFile(str(tmp_path / "f"), direct=True)
    assert file.direct, "this disk should accept O_DIRECT opens"
    file.pwrite(memoryview(b"not aligned at all"), 0)
    file.finish(18)
    assert not file.direct and (tmp_path / "f").read_bytes() == b"not aligned at all"


def test_model_checkpoint_with_an_async_plugin_keeps_its_top_k_and_every_kept_one_loads(tmp_path: Path) -> None:
    """Stock ModelCheckpoint removes old checkpoints right after saving: the removal is queued behind the save."""
    io = ShardedCheckpointIO(async_save=True)
    stock = ModelCheckpoint(dirpath=tmp_path / "mc", every_n_train_steps=2, save_top_k=2, monitor="step",
                            mode="max", save_last=True)  # fmt: skip
    L.seed_everything(0, verbose=False)
    model = TinyRegressor()
    build_trainer(str(tmp_path), max_epochs=2, callbacks=[stock], plugins=[io]).fit(model)
    kept = sorted(os.listdir(tmp_path / "mc"))
    assert kept == ["epoch=1-step=14.ckpt", "epoch=1-step=16.ckpt", "last.ckpt"], kept
    last = read_checkpoint(str(tmp_path / "mc" / "last.ckpt"))
    assert last["global_step"] == 16
    assert all(torch.equal(last["state_dict"][k], v) for k, v in model.state_dict().items())


def test_sigkill_while_an_async_save_is_writing_resumes_from_a_committed_one(tmp_path: Path) -> None:
    """SIGKILL one step after an async save was called (Lightning runs checkpoint callbacks last, so
    the kill at step 10 comes while the save of step 9 is likely still writing): readers never see
    the half-written save, and the resumed run still ends bitwise equal to an uninterrupted one."""
    folder = tmp_path / "run"
    args = ("--folder", str(folder), "--interval", "3ba", "--keep", "-1")
    killed = run_worker(*args, "--kill-at", "10", "--no-settle")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    newest = latest(folder)
    assert newest in (str(folder / "ep0-ba6"), str(folder / "ep1-ba9")), newest
    committed = sorted(n for n in os.listdir(folder) if n.startswith("ep") and (folder / n / "manifest.json").exists())
    assert committed[-1] == os.path.basename(newest)
    weights = tmp_path / "resumed.pt"
    resumed = run_worker(*args, "--save-weights", str(weights))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not [n for n in os.listdir(folder) if ".partial-" in n], "the next run of the folder cleans up"
    L.seed_everything(0, verbose=False)
    full = TinyRegressor()
    build_trainer(str(tmp_path / "full"), max_epochs=3).fit(full)
    got = torch.load(weights, weights_only=True)
    assert all(torch.equal(got[k], v) for k, v in state_of(full).items())
