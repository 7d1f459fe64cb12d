"""The store rounds of :class:`~lightning_ckpt.dist.Exchange` that uploads and async saves use, and the error tree.

Ranks are threads of one process over one ``torch.distributed.HashStore`` (the store API a
``TCPStore`` has), so no Trainer and no process group are needed.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest
import torch
from torch.distributed import HashStore

import lightning_ckpt
from lightning_ckpt import dist, upload
from lightning_ckpt.collective import save_checkpoint_dir
from lightning_ckpt.dist import Exchange
from lightning_ckpt.errors import CheckpointError, CollectiveError, UploadError
from lightning_ckpt.storage import Storage
from lightning_ckpt.upload import Uploader, UploadJob


def ranks(store: HashStore, world_size: int, prefix: str = "save1", timeout_s: float = 10) -> list[Exchange]:
    return [Exchange(store, r, world_size, prefix, timeout_s) for r in range(world_size)]


def test_await_reports_returns_every_rank_status_once_each_has_reported() -> None:
    rank0, rank1, rank2 = ranks(HashStore(), 3)
    rank0.report("uploaded", "ok")
    rank2.report("uploaded", "OSError: quota exceeded")
    threading.Timer(0.2, rank1.report, args=("uploaded", "ok")).start()  # a late rank is awaited
    assert rank0.await_reports("uploaded", [0, 1, 2]) == {0: "ok", 1: "ok", 2: "OSError: quota exceeded"}
    assert rank1.await_reports("uploaded", [2]) == {2: "OSError: quota exceeded"}  # any rank may read any subset


def test_await_reports_names_the_ranks_that_did_not_report_and_rounds_do_not_mix() -> None:
    store = HashStore()
    rank0, rank1, _ = ranks(store, 3, timeout_s=0.2)
    rank0.report("uploaded", "ok")
    rank1.report("written", "ok")  # another phase of the same exchange
    ranks(store, 3, prefix="save2")[2].report("uploaded", "ok")  # the same phase of another exchange
    with pytest.raises(CollectiveError) as info:
        rank0.await_reports("uploaded", [0, 1, 2])
    assert info.value.missing == [1, 2] and info.value.ranks == [1, 2]
    assert "rank(s) 1, 2 did not arrive within 0.2 s" in str(info.value)
    assert isinstance(info.value, CheckpointError)


def test_announce_is_read_by_every_rank_and_wait_announced_waits_for_the_change() -> None:
    writer, reader = ranks(HashStore(), 2, prefix="inflight", timeout_s=10)
    writer.announce(["/runs/a/ep0-ba8", "/runs/a/"], "pending")
    assert reader.announced(["/runs/a/ep0-ba4", "/runs/a/"]) == "pending"  # the first name announced counts
    assert reader.announced(["/runs/b/ep0-ba8", "/runs/b/"]) is None
    threading.Timer(0.2, writer.announce, args=(["/runs/a/ep0-ba8", "/runs/a/"], "done")).start()
    assert reader.wait_announced(["/runs/a/ep0-ba8"]) is True
    assert reader.announced(["/runs/a/ep0-ba8"]) == "done"


def test_wait_announced_gives_up_after_the_timeout_while_still_pending() -> None:
    store = HashStore()
    Exchange(store, 0, 2, "inflight", 10).announce(["/runs/stuck/ep0-ba8"], "pending")
    assert Exchange(store, 1, 2, "inflight", 0.2).wait_announced(["/runs/stuck/ep0-ba8"]) is False
    assert Exchange(store, 1, 2, "inflight", 0.2).wait_announced(["/runs/other/ep0-ba8"]) is True


def test_a_single_process_has_nothing_to_report_announce_or_wait_for() -> None:
    alone = Exchange.current(prefix="single", timeout_s=0)
    assert alone.store is None
    alone.report("uploaded", "ok")
    alone.announce(["/runs/a/ep0-ba8"], "pending")
    assert alone.await_reports("uploaded", [0, 1]) == {}
    assert alone.announced(["/runs/a/ep0-ba8"]) is None
    assert alone.wait_announced(["/runs/a/ep0-ba8"]) is True


def test_current_uses_a_given_store_without_a_process_group() -> None:
    store = HashStore()
    Exchange.current(prefix="inflight", timeout_s=1, store=store).announce(["/runs/a/"], "pending")
    assert Exchange(store, 0, 1, "inflight", 1).announced(["/runs/a/"]) == "pending"


def test_collective_and_upload_errors_are_checkpoint_errors_importable_from_where_they_were() -> None:
    assert lightning_ckpt.CollectiveError is dist.CollectiveError is CollectiveError
    assert upload.UploadError is UploadError
    assert issubclass(CollectiveError, CheckpointError)
    assert issubclass(UploadError, CheckpointError) and issubclass(UploadError, RuntimeError)
    err = CollectiveError("written", {1: "OSError: disk full"}, missing=[3], timeout_s=600)
    assert (err.phase, err.failed, err.missing, err.ranks) == ("written", {1: "OSError: disk full"}, [3], [1, 3])


def _local_checkpoint(tmp_path: Path) -> tuple[str, list[str]]:
    local = save_checkpoint_dir({"w": torch.ones(2), "global_step": 1}, str(tmp_path / "rank0" / "ba1"))
    return local, sorted(n for n in os.listdir(local) if n != "manifest.json")


def _job(local: str, files: list[str], rank: int, store: HashStore) -> UploadJob:
    """Rank ``rank``'s part of checkpoint ``ba1`` of a 2-rank writer group; rank 0 commits it remotely."""
    exchange = Exchange(store, rank, 2, prefix="test/upload0", timeout_s=30)
    return UploadJob(local_dir=local, name="ba1", files=files, commit=rank == 0, members=(0, 1), exchange=exchange,
                     pointer="latest")  # fmt: skip


@pytest.fixture
def remote() -> tuple[Storage, str]:
    return Storage.open(f"memory://exchange-{uuid.uuid4().hex}/run")


def test_the_committing_rank_commits_once_every_member_reported_its_upload(
    tmp_path: Path, remote: tuple[Storage, str]
) -> None:
    storage, folder = remote
    local, files = _local_checkpoint(tmp_path)
    store = HashStore()
    up0, up1 = Uploader(storage, folder, upload_timeout_s=30), Uploader(storage, folder, upload_timeout_s=30)
    up0.submit(_job(local, files, rank=0, store=store))
    up1.submit(_job(str(tmp_path / "rank1"), [], rank=1, store=store))
    up1.close()
    up0.close()
    assert storage.read_bytes(storage.join(folder, "latest.symlink")) == b"ba1"
    assert storage.exists(storage.join(folder, "ba1", "manifest.json"))


def test_a_member_upload_failure_stops_the_remote_commit_with_an_upload_error(
    tmp_path: Path, remote: tuple[Storage, str]
) -> None:
    storage, folder = remote
    local, files = _local_checkpoint(tmp_path)
    store = HashStore()
    up0, up1 = Uploader(storage, folder, upload_timeout_s=30), Uploader(storage, folder, upload_timeout_s=30)
    up0.submit(_job(local, files, rank=0, store=store))
    missing = ["shard-00001-of-00002.safetensors"]  # not on rank 1's disk
    up1.submit(_job(str(tmp_path / "rank1"), missing, rank=1, store=store))
    with pytest.raises(FileNotFoundError):
        up1.close()  # the failing rank raises its own error
    with pytest.raises(CheckpointError, match=r"checkpoint ba1: upload failed on rank\(s\) \[1\]: .*FileNotFoundError"):
        up0.close()
    assert not storage.exists(storage.join(folder, "ba1", "manifest.json")), "never committed remotely"
    assert not storage.exists(storage.join(folder, "latest.symlink"))


def test_a_member_that_never_reports_times_out_naming_its_rank(tmp_path: Path, remote: tuple[Storage, str]) -> None:
    storage, folder = remote
    local, files = _local_checkpoint(tmp_path)
    store = HashStore()
    up0 = Uploader(storage, folder, upload_timeout_s=0.3)
    up0.submit(_job(local, files, rank=0, store=store))  # rank 1 never uploads
    with pytest.raises(UploadError, match=r"rank\(s\) \[1\] did not finish uploading within 0.3 s") as info:
        up0.wait(timeout_s=30)  # longer than the members' wait, so that it ends first
    up0.close()
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, RuntimeError)
    assert not storage.exists(storage.join(folder, "ba1", "manifest.json"))


def test_a_thread_waiting_for_reports_does_not_hold_back_another_threads_barrier() -> None:
    """A real ``TCPStore`` client serves one request at a time. The uploader thread waiting for other ranks'
    reports must not keep the training thread's save barrier from posting (that deadlocked two FSDP2 ranks
    when the next save began before the previous upload was reported)."""
    import socket
    from datetime import timedelta

    from torch.distributed import TCPStore

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = TCPStore("127.0.0.1", port, 2, True, timedelta(seconds=30), wait_for_workers=False)
    client = TCPStore("127.0.0.1", port, 2, False, timedelta(seconds=30))
    uploader = Exchange(client, 0, 2, "upload", timeout_s=3)
    outcome: list[str] = []

    def await_rank1() -> None:
        try:
            uploader.await_reports("up", [1])
        except CollectiveError as err:
            outcome.append(f"missing {err.missing}")

    waiting = threading.Thread(target=await_rank1)
    waiting.start()
    try:
        training = Exchange(client, 0, 2, "save", timeout_s=20)
        other = Exchange(server, 1, 2, "save", timeout_s=20)
        answer = threading.Thread(target=other.barrier, args=("plan",), kwargs={"payload": "rank1"})
        answer.start()
        assert training.barrier("plan", payload="rank0") == {0: "rank0", 1: "rank1"}
        assert waiting.is_alive(), "the barrier completed while the other thread was still waiting for its reports"
        answer.join()
    finally:
        uploader.report("up", "ok")  # not rank 1's key: the waiting thread runs out at its timeout
        waiting.join()
    assert outcome == ["missing [1]"]
