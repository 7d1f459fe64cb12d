from __future__ import annotations

from typing import Any

import pytest

from lightning_ckpt.errors import ConfigError
from lightning_ckpt.policies import (
    AnyOf,
    CheckpointRecord,
    KeepAll,
    KeepBest,
    KeepEveryNSteps,
    KeepLatest,
    RetentionPolicy,
    build_retention_policy,
    plan_deletions,
)


def records(*steps_and_metrics: tuple[int, float | None]) -> list[CheckpointRecord]:
    return [CheckpointRecord(f"ba{step}", epoch=step // 1000, step=step, metric=m) for step, m in steps_and_metrics]


# steps 100..600; metric: lower is better at ba300 (0.1), ba500 and ba200 tie at 0.3, ba600 has none.
NOT_A_POLICY: Any = "x"
RECORDS = records((100, 0.9), (200, 0.3), (300, 0.1), (400, 0.7), (500, 0.3), (600, None))


@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        (KeepAll(), {"ba100", "ba200", "ba300", "ba400", "ba500", "ba600"}),
        (KeepLatest(0), set()),
        (KeepLatest(1), {"ba600"}),
        (KeepLatest(3), {"ba400", "ba500", "ba600"}),
        (KeepLatest(10), {"ba100", "ba200", "ba300", "ba400", "ba500", "ba600"}),
        (KeepEveryNSteps(200), {"ba200", "ba400", "ba600"}),
        (KeepEveryNSteps(300), {"ba300", "ba600"}),
        (KeepEveryNSteps(1000), set()),
        (KeepBest(0), set()),
        (KeepBest(1), {"ba300"}),
        (KeepBest(2), {"ba300", "ba500"}),  # tie at 0.3: the newer step wins
        (KeepBest(3), {"ba300", "ba500", "ba200"}),
        (KeepBest(1, mode="max"), {"ba100"}),
        (KeepBest(2, mode="max"), {"ba100", "ba400"}),
        (KeepBest(10), {"ba100", "ba200", "ba300", "ba400", "ba500"}),  # None is never best
        (KeepLatest(1) | KeepBest(1), {"ba600", "ba300"}),
        (KeepLatest(2) | KeepEveryNSteps(200), {"ba200", "ba400", "ba500", "ba600"}),
        (KeepLatest(0) | KeepEveryNSteps(500) | KeepBest(1, "max"), {"ba500", "ba100"}),
        (AnyOf(()), set()),
    ],
)
def test_keep(policy: RetentionPolicy, kept: set[str]) -> None:
    assert policy.keep(RECORDS) == kept


def test_keep_latest_sorts_by_step_not_input_order() -> None:
    shuffled = records((300, None), (100, None), (200, None))
    assert KeepLatest(2).keep(shuffled) == {"ba200", "ba300"}


def test_keep_best_ignores_nan() -> None:
    assert KeepBest(1).keep(records((1, float("nan")), (2, 5.0))) == {"ba2"}
    assert KeepBest(1, "max").keep(records((1, float("nan")), (2, 5.0))) == {"ba2"}


def test_policies_on_no_records() -> None:
    for policy in (KeepAll(), KeepLatest(3), KeepEveryNSteps(2), KeepBest(2), KeepLatest(1) | KeepBest(1)):
        assert policy.keep([]) == set()


def test_or_flattens_and_reprs() -> None:
    policy = KeepLatest(2) | KeepEveryNSteps(100) | KeepBest(1, "max")
    assert policy == AnyOf((KeepLatest(2), KeepEveryNSteps(100), KeepBest(1, "max")))
    assert repr(policy) == ("AnyOf(policies=(KeepLatest(n=2), KeepEveryNSteps(n=100), KeepBest(k=1, mode='max')))")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: KeepLatest(-1), "n=-1 is not valid. It must be an int >= 0. Example of a valid value: 3."),
        (
            lambda: KeepLatest(True),
            "n=True is not valid. It must be an int >= 0. Example of a valid value: 3.",
        ),
        (
            lambda: KeepEveryNSteps(0),
            "n=0 is not valid. It must be an int >= 1. Example of a valid value: 1000.",
        ),
        (lambda: KeepBest(-1), "k=-1 is not valid. It must be an int >= 0. Example of a valid value: 1."),
        (lambda: KeepBest(1, "best"), "mode='best' is not valid. Example of a valid value: 'min' or 'max'."),
        (
            lambda: AnyOf((KeepAll(), NOT_A_POLICY)),
            "policies=(KeepAll(), 'x') is not valid. Example of a valid value: (KeepLatest(3), KeepBest(1)).",
        ),
    ],
)
def test_policy_constructors_reject(make: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, KeepAll()),
        ({"num_checkpoints_to_keep": -1, "num_best_to_keep": 2}, KeepAll()),
        ({"num_checkpoints_to_keep": 0}, KeepLatest(0)),
        ({"num_checkpoints_to_keep": 3}, KeepLatest(3)),
        ({"num_checkpoints_to_keep": 0, "keep_every_n_steps": 1000}, KeepEveryNSteps(1000)),
        ({"num_checkpoints_to_keep": 0, "num_best_to_keep": 2, "mode": "max"}, KeepBest(2, "max")),
        (
            {"num_checkpoints_to_keep": 2, "keep_every_n_steps": 100},
            AnyOf((KeepLatest(2), KeepEveryNSteps(100))),
        ),
        (
            {"num_checkpoints_to_keep": 1, "keep_every_n_steps": 5, "num_best_to_keep": 1},
            AnyOf((KeepLatest(1), KeepEveryNSteps(5), KeepBest(1, "min"))),
        ),
    ],
)
def test_build_retention_policy(kwargs: dict[str, Any], expected: RetentionPolicy) -> None:
    assert build_retention_policy(**kwargs) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"num_checkpoints_to_keep": -2},
            "num_checkpoints_to_keep=-2 is not valid. It must be an int >= -1. "
            "Example of a valid value: 3 (or -1 to keep all).",
        ),
        (
            {"num_checkpoints_to_keep": True},
            "num_checkpoints_to_keep=True is not valid. It must be an int >= -1. "
            "Example of a valid value: 3 (or -1 to keep all).",
        ),
        (
            {"num_checkpoints_to_keep": "3"},
            "num_checkpoints_to_keep='3' is not valid. It must be an int >= -1. "
            "Example of a valid value: 3 (or -1 to keep all).",
        ),
        (
            {"keep_every_n_steps": 0},
            "keep_every_n_steps=0 is not valid. It must be an int >= 1. Example of a valid value: 1000 (or None).",
        ),
        (
            {"keep_every_n_steps": 2.5},
            "keep_every_n_steps=2.5 is not valid. It must be an int >= 1. Example of a valid value: 1000 (or None).",
        ),
        (
            {"num_best_to_keep": -1},
            "num_best_to_keep=-1 is not valid. It must be an int >= 0. Example of a valid value: 1 (or 0).",
        ),
        (
            {"num_best_to_keep": False},
            "num_best_to_keep=False is not valid. It must be an int >= 0. Example of a valid value: 1 (or 0).",
        ),
        ({"mode": "MIN"}, "mode='MIN' is not valid. Example of a valid value: 'min' or 'max'."),
    ],
)
def test_build_retention_policy_rejects(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_retention_policy(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("policy", "protected", "deleted"),
    [
        (KeepAll(), (), []),
        (KeepLatest(2), (), ["ba100", "ba200", "ba300", "ba400"]),
        (KeepLatest(2), {"ba200"}, ["ba100", "ba300", "ba400"]),
        (KeepLatest(0), {"ba600"}, ["ba100", "ba200", "ba300", "ba400", "ba500"]),
        (KeepLatest(0), (), ["ba100", "ba200", "ba300", "ba400", "ba500", "ba600"]),
        (KeepLatest(1) | KeepBest(1), ["ba100"], ["ba200", "ba400", "ba500"]),
        (KeepEveryNSteps(200) | KeepBest(1, "max"), (), ["ba300", "ba500"]),
        (KeepLatest(0), {"ba100", "ba200", "ba300", "ba400", "ba500", "ba600", "gone"}, []),
    ],
)
def test_plan_deletions(policy: RetentionPolicy, protected: Any, deleted: list[str]) -> None:
    assert plan_deletions(RECORDS, policy, protected=protected) == deleted


def test_plan_deletions_orders_oldest_first_and_deduplicates() -> None:
    shuffled = records((400, None), (100, None), (300, None), (100, None))
    assert plan_deletions(shuffled, KeepLatest(1)) == ["ba100", "ba300"]
