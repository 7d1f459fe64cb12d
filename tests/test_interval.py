from __future__ import annotations

import datetime
from typing import Any

import pytest

from lightning_ckpt.errors import ConfigError
from lightning_ckpt.interval import (
    AgreementCadence,
    CallableSchedule,
    Event,
    EveryDuration,
    EveryNBatches,
    EveryNEpochs,
    SavePoint,
    SaveSchedule,
    parse_save_interval,
)

EXAMPLE = "'500ba', '1ep', '30min', 2 (epochs), timedelta(minutes=30) or a callable (trainer, event) -> bool"


def batch_end(batch: int, epoch: int = 0) -> SavePoint:
    return SavePoint(Event.BATCH_END, epoch=epoch, batch=batch)


def epoch_end(epoch: int, batch: int = 0) -> SavePoint:
    return SavePoint(Event.EPOCH_END, epoch=epoch, batch=batch)


def always(trainer: object, event: Event) -> bool:
    return True


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("500ba", "EveryNBatches(500)"),
        ("1ep", "EveryNEpochs(1)"),
        (" 2 EP ", "EveryNEpochs(2)"),
        ("10 batches", "EveryNBatches(10)"),
        ("3 epochs", "EveryNEpochs(3)"),
        ("1 batch", "EveryNBatches(1)"),
        ("30s", "EveryDuration(seconds=30)"),
        ("30sec", "EveryDuration(seconds=30)"),
        ("30min", "EveryDuration(seconds=1800)"),
        ("30 MIN", "EveryDuration(seconds=1800)"),
        ("2h", "EveryDuration(seconds=7200)"),
        ("1.5h", "EveryDuration(seconds=5400)"),
        ("1d", "EveryDuration(seconds=86400)"),
        (".5s", "EveryDuration(seconds=0.5)"),
        (datetime.timedelta(minutes=30), "EveryDuration(seconds=1800)"),
        (2, "EveryNEpochs(2)"),
        (always, "CallableSchedule(always)"),
    ],
)
def test_parse_save_interval(value: object, expected: str) -> None:
    assert repr(parse_save_interval(value)) == expected


def test_existing_schedule_is_returned_as_is() -> None:
    schedule = EveryNBatches(3)
    assert parse_save_interval(schedule) is schedule


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0ba", "The count must be positive."),
        ("0ep", "The count must be positive."),
        ("-1ep", "Expected a number followed by a unit."),
        ("0s", "The duration must be positive."),
        ("0.0h", "The duration must be positive."),
        ("3parsecs", "Unknown unit 'parsecs'; the units are ep, ba, s, sec, min, h, d."),
        ("1.5ep", "Epoch and batch counts must be whole numbers."),
        ("2.0ba", "Epoch and batch counts must be whole numbers."),
        ("ba", "Expected a number followed by a unit."),
        ("500", "Expected a number followed by a unit."),
        ("", "Expected a number followed by a unit."),
        (0, "The number of epochs must be positive."),
        (-3, "The number of epochs must be positive."),
        (True, "A bool is not an interval."),
        (False, "A bool is not an interval."),
        (None, "Values of type NoneType are not accepted."),
        (1.5, "Values of type float are not accepted."),
        ([1], "Values of type list are not accepted."),
        (EveryNEpochs, "Pass an instance, not the class EveryNEpochs."),
        (datetime.timedelta(0), "The duration must be positive."),
        (datetime.timedelta(seconds=-5), "The duration must be positive."),
    ],
)
def test_parse_save_interval_rejects(value: object, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_save_interval(value)
    assert str(info.value) == f"save_interval={value!r} is not valid. {reason} Example of a valid value: {EXAMPLE}."


def test_parse_save_interval_names_the_argument() -> None:
    with pytest.raises(ConfigError, match=r"^train_interval='3parsecs' is not valid\."):
        parse_save_interval("3parsecs", argument="train_interval")


@pytest.mark.parametrize(
    ("n", "point", "due"),
    [
        (1, epoch_end(0), True),
        (2, epoch_end(0), False),
        (2, epoch_end(1), True),
        (2, epoch_end(3), True),
        (3, epoch_end(2), True),
        (3, epoch_end(3), False),
        (1, batch_end(100), False),
    ],
)
def test_every_n_epochs(n: int, point: SavePoint, due: bool) -> None:
    assert EveryNEpochs(n).is_due(point) is due


@pytest.mark.parametrize(
    ("n", "point", "due"),
    [
        (2, batch_end(0), False),
        (2, batch_end(1), False),
        (2, batch_end(2), True),
        (2, batch_end(4), True),
        (500, batch_end(1500, epoch=3), True),
        (500, batch_end(1499), False),
        (2, epoch_end(0, batch=2), False),
    ],
)
def test_every_n_batches(n: int, point: SavePoint, due: bool) -> None:
    assert EveryNBatches(n).is_due(point) is due


def test_every_n_batches_does_not_repeat_a_saved_step() -> None:
    schedule = EveryNBatches(2)
    assert schedule.is_due(batch_end(2))
    schedule.mark_saved(batch_end(2), now=0.0)
    assert not schedule.is_due(batch_end(2))  # gradient accumulation: global_step did not move
    assert schedule.is_due(batch_end(4))


def test_every_duration_uses_start_and_last_save() -> None:
    schedule = EveryDuration(60)
    schedule.start(now=100.0)
    assert [schedule.is_due(batch_end(1), now=t) for t in (100.0, 159.9, 160.0)] == [False, False, True]
    assert schedule.is_due(epoch_end(0), now=200.0)
    schedule.mark_saved(batch_end(1), now=200.0)
    assert not schedule.is_due(batch_end(2), now=259.0)
    assert schedule.is_due(epoch_end(0), now=260.0)


def test_every_duration_without_start_counts_from_first_call() -> None:
    schedule = EveryDuration(10)
    assert not schedule.is_due(batch_end(1), now=5.0)
    assert schedule.is_due(batch_end(2), now=15.0)


def test_callable_schedule_passes_trainer_and_event() -> None:
    calls: list[tuple[object, Event]] = []

    def fn(trainer: object, event: Event) -> bool:
        calls.append((trainer, event))
        return event is Event.EPOCH_END

    schedule = CallableSchedule(fn)
    trainer = object()
    assert schedule.is_due(batch_end(1), trainer) is False
    assert schedule.is_due(epoch_end(0), trainer) is True
    assert calls == [(trainer, Event.BATCH_END), (trainer, Event.EPOCH_END)]


def test_callable_result_is_coerced_to_bool() -> None:
    def truthy(trainer: object, event: Event) -> Any:
        return 1

    schedule = CallableSchedule(truthy)
    assert schedule.is_due(batch_end(1)) is True


@pytest.mark.parametrize(
    ("schedule", "needs_agreement"),
    [
        (EveryNEpochs(1), False),
        (EveryNBatches(1), False),
        (EveryDuration(1.0), True),
        (CallableSchedule(always), True),
    ],
)
def test_needs_agreement(schedule: SaveSchedule, needs_agreement: bool) -> None:
    assert schedule.needs_agreement is needs_agreement


def test_default_hooks_are_no_ops() -> None:
    schedule = EveryNEpochs(1)
    schedule.start(now=0.0)
    schedule.mark_saved(epoch_end(0), now=1.0)
    assert schedule.is_due(epoch_end(1))


@pytest.mark.parametrize(
    ("make", "value", "message"),
    [
        (EveryNEpochs, 0, "n=0 is not valid. It must be a positive int. Example of a valid value: 2."),
        (
            EveryNBatches,
            True,
            "n=True is not valid. It must be a positive int. Example of a valid value: 500.",
        ),
        (
            EveryDuration,
            -1.0,
            "seconds=-1.0 is not valid. It must be a positive number of seconds. Example of a valid value: 1800.0.",
        ),
        (
            CallableSchedule,
            3,
            "fn=3 is not valid. Example of a valid value: a function (trainer, event) -> bool.",
        ),
    ],
)
def test_constructors_reject(make: Any, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(value)
    assert str(info.value) == message


def test_event_is_a_string() -> None:
    assert Event.BATCH_END == "batch_end"
    assert Event("epoch_end") is Event.EPOCH_END


def test_agreement_cadence_asks_every_step_without_granularity() -> None:
    cadence = AgreementCadence(None)
    cadence.start(step=0, now=0.0)
    assert [cadence.next_check(step, now=step * 10.0) for step in (1, 2, 3)] == [2, 3, 4]


def test_agreement_cadence_spaces_checks_by_the_measured_step_rate() -> None:
    cadence = AgreementCadence(granularity_s=60.0)
    cadence.start(step=100, now=1000.0)
    assert cadence.next_check(step=200, now=1010.0) == 200 + 600  # 10 steps/s: ask again in a minute
    cadence.adopt(800)
    assert not cadence.is_check_step(799) and cadence.is_check_step(800)
    assert cadence.next_check(step=800, now=1010.0 + 600.0) == 800 + 60  # slowed to 1 step/s
    assert cadence.next_check(step=801, now=1e9) == 802  # very slow steps: never less than one


def test_duration_granularity_is_a_twentieth_capped_at_a_minute() -> None:
    assert EveryDuration(10).agreement_granularity_s == 0.5
    assert EveryDuration(3600).agreement_granularity_s == 60.0
    assert EveryNBatches(5).agreement_granularity_s is None
