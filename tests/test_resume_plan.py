"""The resume plan without a Trainer: one ordering, fallback, and agreement across ranks (threads over a HashStore)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from torch.distributed import HashStore

from lightning_ckpt.dist import Exchange
from lightning_ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError
from lightning_ckpt.resume import Candidate, ResumePlan, agree, load_first_verified, plan_resume


def _alone() -> Exchange:
    return Exchange(None, 0, 1, prefix="t", timeout_s=0)


def _on_ranks(work: Any, world: int = 2) -> list[Any]:
    """Run ``work(exchange)`` on ``world`` threads that talk over one store, as ranks do; results by rank."""
    store = HashStore()
    results: list[Any] = [None] * world

    def run(rank: int) -> None:
        try:
            results[rank] = work(Exchange(store, rank, world, prefix="t", timeout_s=10))
        except BaseException as err:
            results[rank] = err

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_newest_means_most_recently_committed_then_step() -> None:
    # ba9 came first; a run resumed from ba4 with overwrite=True then saved ba5 and ba6 (created later)
    plan = plan_resume([("ba9", 9, 10.0), ("ba6", 6, 30.0), ("ba5", 5, 20.0), ("ba7", 7, 30.0)], lambda n: n)
    assert [c.url for c in plan.candidates] == ["ba7", "ba6", "ba5", "ba9"]  # same commit time: the higher step


def test_fallback_skips_what_does_not_verify_and_says_what_was_skipped() -> None:
    plan = ResumePlan((Candidate(3, "c"), Candidate(2, "b"), Candidate(1, "a")))
    broken = {"c": "manifest.json is missing", "b": "shard CRC32 mismatch"}

    def load(url: str) -> dict[str, Any]:
        if url in broken:
            raise CorruptCheckpointError(broken[url])
        return {"global_step": 1}

    with pytest.warns(UserWarning, match="c does not verify .*falling back to b"):
        resumed = load_first_verified(plan, load, _alone())
    assert (resumed.loaded, resumed.skipped, resumed.checkpoint) == ("a", ("c", "b"), {"global_step": 1})


def test_no_candidate_verifies_lists_every_one() -> None:
    plan = ResumePlan((Candidate(2, "b"), Candidate(1, "a")))

    def load(url: str) -> dict[str, Any]:
        raise CorruptCheckpointError(f"{url} is truncated")

    with (
        pytest.warns(UserWarning),
        pytest.raises(CorruptCheckpointError, match=r"(?s)b: b is truncated.*a: a is trunc"),
    ):
        load_first_verified(plan, load, _alone())


def test_an_error_that_is_not_a_checkpoint_problem_is_not_skipped() -> None:
    def load(url: str) -> dict[str, Any]:
        raise PermissionError("no credentials")

    with pytest.raises(PermissionError):
        load_first_verified(ResumePlan((Candidate(1, "a"), Candidate(0, "z"))), load, _alone())


def test_ranks_agree_on_steps_every_rank_committed_in_rank_zero_order() -> None:
    views = {  # rank 1's node died before committing step 8; per-rank names differ
        0: ResumePlan((Candidate(8, "r0/ba8"), Candidate(6, "r0/ba6"), Candidate(4, "r0/ba4"))),
        1: ResumePlan((Candidate(6, "r1/ba6"), Candidate(4, "r1/ba4"))),
    }
    agreed = _on_ranks(lambda ex: agree(views[ex.rank], ex))
    assert [c.url for c in agreed[0].candidates] == ["r0/ba6", "r0/ba4"]
    assert [c.url for c in agreed[1].candidates] == ["r1/ba6", "r1/ba4"]


def test_ranks_with_no_common_step_all_fail_naming_the_empty_rank() -> None:
    views = {0: ResumePlan((Candidate(8, "r0/ba8"),)), 1: ResumePlan(())}
    errors = _on_ranks(lambda ex: agree(views[ex.rank], ex, where=f"/node{ex.rank}"))
    assert all(isinstance(e, CheckpointNotFoundError) for e in errors), errors
    assert "rank(s) [1] have none" in str(errors[0]) and "/node0" in str(errors[0])


def test_ranks_fall_back_together_when_one_rank_cannot_load() -> None:
    plan = ResumePlan((Candidate(8, "ba8"), Candidate(6, "ba6")))

    def work(exchange: Exchange) -> Any:
        def load(url: str) -> dict[str, Any]:
            if exchange.rank == 1 and url == "ba8":  # only rank 1's copy of step 8 is damaged
                raise CorruptCheckpointError("shard truncated")
            return {"url": url}

        return load_first_verified(plan, load, exchange)

    with pytest.warns(UserWarning, match="rank 1: shard truncated"):
        results = _on_ranks(work)
    assert [r.loaded for r in results] == ["ba6", "ba6"]
    assert [r.skipped for r in results] == [("ba8",), ("ba8",)]
