"""Another rank's pending background save: loads wait for it, give up with a clear error, or go on."""

from __future__ import annotations

import threading
import time

import pytest
from torch.distributed import HashStore

from lightning_ckpt.errors import CheckpointError
from lightning_ckpt.inflight import announce, state, wait_until_written


def test_a_load_waits_until_the_announced_save_is_written() -> None:
    store = HashStore()
    finished = announce("/runs/a/ep0-ba8", store)
    threading.Timer(0.3, finished, args=(True,)).start()
    began = time.monotonic()
    wait_until_written("/runs/a/ep0-ba8", timeout_s=10, store=store)
    assert 0.25 < time.monotonic() - began < 5
    assert state("/runs/a/ep0-ba8", store) == "done"


def test_the_folder_of_a_pending_save_is_pending_too_and_others_are_not() -> None:
    store = HashStore()
    announce("/runs/a/ep0-ba8", store)
    assert state("/runs/a", store) == state("/runs/a/", store) == "pending"
    assert state("/runs/a/ep0-ba4", store) is None and state("/runs/b", store) is None
    wait_until_written("/runs/b", timeout_s=0.1, store=store)  # nothing announced there: returns at once


def test_a_failed_save_ends_the_wait_and_a_stuck_one_times_out_naming_the_path() -> None:
    store = HashStore()
    announce("s3://bucket/run/ep0-ba8", store)(False)
    assert state("s3://bucket/run/ep0-ba8", store) == "failed"
    wait_until_written("s3://bucket/run/ep0-ba8", timeout_s=0.1, store=store)  # the load then reports what is missing

    announce("/runs/stuck/ep0-ba8", store)
    with pytest.raises(CheckpointError, match=r"/runs/stuck/ep0-ba8: another rank was still writing .* after 0.2 s"):
        wait_until_written("/runs/stuck/ep0-ba8", timeout_s=0.2, store=store)


def test_without_a_process_group_nothing_is_stored_or_awaited() -> None:
    announce("/runs/a/ep0-ba8")(True)
    assert state("/runs/a/ep0-ba8") is None
    wait_until_written("/runs/a/ep0-ba8", timeout_s=0.0)
