"""The save plan for sharded state, without a Trainer: chunks written once, balanced, and covering each tensor.

Rows are what each rank posts (``plan.sharded_row``); ``resolve`` and ``assign`` run on every rank alike,
so a refusal here is a refusal on every rank, before anything is written.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from lightning_ckpt.errors import PlanError
from lightning_ckpt.plan import Placement, assign, resolve, sharded_row
from lightning_ckpt.sharded import local_chunks


def rows_of(rank_chunks: dict[int, list[tuple[int, int]]], rows: int = 8) -> dict[int, list[list[object]]]:
    """Each rank's rows for one float32 tensor ``w`` of ``rows`` x 4, holding the given (start, length) row ranges."""
    return {
        rank: [
            sharded_row(f"w@{start},0", "w", [start, 0], [rows, 4], torch.zeros(length, 4)) for start, length in held
        ]
        for rank, held in rank_chunks.items()
    }


def test_each_chunk_is_written_by_the_rank_holding_it() -> None:
    specs = resolve(rows_of({0: [(0, 4)], 1: [(4, 4)]}), [0, 1])
    assert [(s.key, s.placement, s.holders) for s in specs] == [
        ("w@0,0", Placement.SHARDED, (0,)), ("w@4,0", Placement.SHARDED, (1,))
    ]  # fmt: skip
    assert assign(specs, 2) == [["w@0,0"], ["w@4,0"]]


def test_a_chunk_held_by_several_ranks_is_written_once_by_the_least_loaded() -> None:
    """HSDP / a Replicate mesh dimension: ranks 0-1 and 2-3 hold the same two halves."""
    specs = resolve(rows_of({0: [(0, 4)], 1: [(4, 4)], 2: [(0, 4)], 3: [(4, 4)]}), [0, 1, 2, 3])
    assert [s.holders for s in specs] == [(0, 2), (1, 3)]
    written = [key for keys in assign(specs, 4) for key in keys]
    assert sorted(written) == ["w@0,0", "w@4,0"], "each chunk once"


def test_chunks_missing_from_the_writer_group_are_refused_naming_the_way_out() -> None:
    """Node-local folders: each node's group holds only its own ranks' chunks, so no group can commit."""
    with pytest.raises(
        PlanError, match=r"sharded tensor 'w': its chunks hold 16 of its 32 elements.*a folder every rank shares"
    ):
        resolve(rows_of({0: [(0, 4)]}), [0])


def test_overlapping_chunks_are_refused() -> None:
    with pytest.raises(PlanError, match="overlap"):
        resolve(rows_of({0: [(0, 5)], 1: [(4, 4)]}), [0, 1])


def test_a_key_sharded_on_one_rank_and_plain_on_another_is_refused() -> None:
    rows = rows_of({1: [(0, 8)]})
    rows[0] = [["w", "float32", [8, 4], 128, "rank0"]]
    with pytest.raises(PlanError, match="sharded on rank 1 but a plain tensor"):
        resolve(rows, [0, 1])


def test_a_sharded_tensor_whose_dtype_differs_between_ranks_is_refused() -> None:
    rows = rows_of({0: [(0, 4)], 1: [(4, 4)]})
    rows[1][0][1] = "bfloat16"
    with pytest.raises(PlanError, match="float32 \\[8, 4\\] on rank 0 but bfloat16"):
        resolve(rows, [0, 1])


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """A real one-process gloo group, for DTensors on a 1-rank mesh."""
    path = os.path.join(tempfile.mkdtemp(), "store")
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_dtensor_chunks_and_what_cannot_be_stored_raw(one_rank_group: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    whole = distribute_tensor(torch.arange(6.0).reshape(3, 2), mesh, [Shard(0)])
    [chunk] = local_chunks("w", whole)
    assert chunk.offsets == (0, 0) and torch.equal(chunk.tensor, torch.arange(6.0).reshape(3, 2))
    pending = DTensor.from_local(torch.ones(2), mesh, [Partial()])
    with pytest.raises(PlanError, match="'g' is a DTensor with a Partial placement"):
        local_chunks("g", pending)
