"""When to save: small schedule objects and :func:`parse_save_interval` for the ``save_interval`` argument.

A schedule is asked :meth:`SaveSchedule.is_due` at every :class:`SavePoint` (the end of a training
batch or epoch). Clock readings (``now``) are plain floats from :func:`time.monotonic` passed in by
the caller, so schedules are deterministic and tests never sleep.

Schedules whose answer could differ between ranks (wall-clock and user callables) set
``needs_agreement = True``: the caller decides on rank 0 and broadcasts the answer.

Example:
    >>> schedule = parse_save_interval("500ba")
    >>> schedule
    EveryNBatches(500)
    >>> schedule.is_due(SavePoint(Event.BATCH_END, epoch=0, batch=1000))
    True
"""

from __future__ import annotations

import abc
import datetime
import enum
import inspect
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from lightning_ckpt.errors import ConfigError

__all__ = [
    "AgreementCadence",
    "CallableSchedule",
    "Event",
    "EveryDuration",
    "EveryNBatches",
    "EveryNEpochs",
    "SavePoint",
    "SaveSchedule",
    "parse_save_interval",
]

_EXAMPLE = "'500ba', '1ep', '30min', 2 (epochs), timedelta(minutes=30) or a callable (trainer, event) -> bool"
_STRING_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]+)")
_COUNT_UNITS = {
    **dict.fromkeys(("ep", "epoch", "epochs"), "ep"),
    **dict.fromkeys(("ba", "batch", "batches"), "ba"),
}
_SECONDS_PER_UNIT = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
}


class Event(str, enum.Enum):
    """The training hook a save point comes from.

    Example:
        >>> Event("batch_end") is Event.BATCH_END
        True
    """

    BATCH_END = "batch_end"
    EPOCH_END = "epoch_end"


@dataclass(frozen=True)
class SavePoint:
    """A moment at which a checkpoint could be saved.

    Attributes:
        event: the hook.
        epoch: ``trainer.current_epoch`` (0-based).
        batch: ``trainer.global_step`` (optimizer steps so far).

    Example:
        >>> SavePoint(Event.EPOCH_END, epoch=0, batch=100).batch
        100
    """

    event: Event
    epoch: int
    batch: int


class SaveSchedule(abc.ABC):
    """Decides whether a checkpoint is due at a save point.

    Example:
        >>> class Never(SaveSchedule):
        ...     def is_due(self, point, trainer=None, now=None):
        ...         return False
        >>> Never().is_due(SavePoint(Event.BATCH_END, 0, 1))
        False
    """

    needs_agreement: ClassVar[bool] = False
    """True when ranks could disagree; the caller then decides on rank 0 and broadcasts."""

    agreement_granularity_s: float | None = None
    """For schedules that need agreement: how late a save may come, in seconds, so ranks need to agree
    only about that often (see :class:`AgreementCadence`); ``None``: agree at every save point."""

    last_saved_batch: int | None = None
    """The step of the newest checkpoint saved (``None`` before the first): the one place this fact lives.
    :meth:`mark_saved` sets it, and so does :meth:`note_saved`; :class:`EveryNBatches` is not due at it again,
    and :class:`~lightning_ckpt.CheckpointSaver` never saves that step twice (it keeps it across restarts)."""

    def note_saved(self, batch: int | None) -> None:
        """Record ``batch`` as the step of the newest checkpoint, without the :meth:`mark_saved` hook.

        For saves the schedule did not ask for (an explicit save, a preemption, a restored state): they must
        not restart a clock.

        Example:
            >>> schedule = parse_save_interval("30min")
            >>> schedule.note_saved(200)
            >>> schedule.last_saved_batch
            200
        """
        object.__setattr__(self, "last_saved_batch", batch)  # a frozen dataclass schedule is told too

    def start(self, now: float) -> None:  # noqa: B027 (optional hook)
        """Called once at fit start with the current :func:`time.monotonic` reading.

        Example:
            >>> schedule = parse_save_interval("30min")
            >>> schedule.start(now=100.0)  # the clock starts at fit start, not at construction
            >>> schedule.is_due(SavePoint(Event.BATCH_END, epoch=0, batch=50), now=100.0 + 1800)
            True
        """

    @abc.abstractmethod
    def is_due(self, point: SavePoint, trainer: object = None, now: float | None = None) -> bool:
        """Whether a checkpoint should be saved at ``point``.

        ``trainer`` is the running trainer (used by callables); ``now`` a :func:`time.monotonic` reading.

        Example:
            >>> schedule = parse_save_interval("2ep")
            >>> [schedule.is_due(SavePoint(Event.EPOCH_END, epoch=e, batch=10 * (e + 1))) for e in range(4)]
            [False, True, False, True]
        """

    def mark_saved(self, point: SavePoint, now: float) -> None:
        """Called after a checkpoint was saved at ``point``: records its step (overrides call ``super().mark_saved``).

        Example:
            >>> schedule, point = parse_save_interval("5ba"), SavePoint(Event.BATCH_END, epoch=0, batch=10)
            >>> schedule.is_due(point)
            True
            >>> schedule.mark_saved(point, now=0.0)  # with gradient accumulation, step 10 comes again
            >>> schedule.is_due(point)
            False
        """
        self.note_saved(point.batch)


def _positive_int(argument: str, value: object, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(argument, value, example, "It must be a positive int")
    return value


class EveryNEpochs(SaveSchedule):
    """Due at the end of every ``n``-th epoch, i.e. when ``(epoch + 1) % n == 0``.

    Example:
        >>> EveryNEpochs(2).is_due(SavePoint(Event.EPOCH_END, epoch=1, batch=50))
        True
    """

    def __init__(self, n: int) -> None:
        self.n = _positive_int("n", n, "2")

    def is_due(self, point: SavePoint, trainer: object = None, now: float | None = None) -> bool:
        """See :meth:`SaveSchedule.is_due`."""
        return point.event is Event.EPOCH_END and (point.epoch + 1) % self.n == 0

    def __repr__(self) -> str:
        return f"EveryNEpochs({self.n})"


class EveryNBatches(SaveSchedule):
    """Due at the end of a batch when ``batch > 0`` and ``batch % n == 0``.

    With gradient accumulation ``global_step`` repeats over several batches; a step already saved
    (:attr:`~SaveSchedule.last_saved_batch`) is not due again.

    Example:
        >>> EveryNBatches(500).is_due(SavePoint(Event.BATCH_END, epoch=0, batch=1000))
        True
    """

    def __init__(self, n: int) -> None:
        self.n = _positive_int("n", n, "500")

    def is_due(self, point: SavePoint, trainer: object = None, now: float | None = None) -> bool:
        """See :meth:`SaveSchedule.is_due`."""
        if point.event is not Event.BATCH_END or point.batch <= 0 or point.batch == self.last_saved_batch:
            return False
        return point.batch % self.n == 0

    def __repr__(self) -> str:
        return f"EveryNBatches({self.n})"


class EveryDuration(SaveSchedule):
    """Due at a batch or epoch end once ``seconds`` have passed since fit start or the last save.

    Example:
        >>> schedule = EveryDuration(60.0)
        >>> schedule.start(now=0.0)
        >>> point = SavePoint(Event.BATCH_END, epoch=0, batch=10)
        >>> schedule.is_due(point, now=59.0), schedule.is_due(point, now=60.0)
        (False, True)
    """

    needs_agreement: ClassVar[bool] = True

    def __init__(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
            raise ConfigError("seconds", seconds, "1800.0", "It must be a positive number of seconds")
        self.seconds = float(seconds)
        self._last: float | None = None
        self.agreement_granularity_s = min(self.seconds / 20, 60.0)

    def start(self, now: float) -> None:
        """Start the clock."""
        self._last = now

    def is_due(self, point: SavePoint, trainer: object = None, now: float | None = None) -> bool:
        """See :meth:`SaveSchedule.is_due`; ``now`` defaults to :func:`time.monotonic`."""
        now = time.monotonic() if now is None else now
        if self._last is None:
            self._last = now
        return now - self._last >= self.seconds

    def mark_saved(self, point: SavePoint, now: float) -> None:
        """Record the step and restart the clock."""
        super().mark_saved(point, now)
        self._last = now

    def __repr__(self) -> str:
        return f"EveryDuration(seconds={self.seconds:g})"


class CallableSchedule(SaveSchedule):
    """Due when ``fn(trainer, event)`` returns a truthy value.

    Example:
        >>> schedule = CallableSchedule(lambda trainer, event: event == Event.EPOCH_END)
        >>> schedule.is_due(SavePoint(Event.EPOCH_END, epoch=0, batch=10))
        True
    """

    needs_agreement: ClassVar[bool] = True

    def __init__(self, fn: Callable[[object, Event], bool]) -> None:
        if not callable(fn) or isinstance(fn, type):
            raise ConfigError("fn", fn, "a function (trainer, event) -> bool")
        self.fn = fn

    def is_due(self, point: SavePoint, trainer: object = None, now: float | None = None) -> bool:
        """See :meth:`SaveSchedule.is_due`."""
        return bool(self.fn(trainer, point.event))

    def __repr__(self) -> str:
        return f"CallableSchedule({getattr(self.fn, '__qualname__', repr(self.fn))})"


class AgreementCadence:
    """At which steps ranks agree on a schedule that needs agreement, so other steps cost nothing.

    Agreeing is a broadcast from rank 0: doing it at every step would put a collective in every
    training step. Instead rank 0, when it answers, also names the next step at which to ask
    again: as many steps as fit in the schedule's granularity at the step rate it measured. Every
    rank receives the same number, so between agreements the check is one integer comparison and
    all ranks still ask at the same steps.

    Example:
        >>> cadence = AgreementCadence(granularity_s=1.0)
        >>> cadence.is_check_step(0)
        True
        >>> cadence.start(step=0, now=0.0)
        >>> cadence.next_check(step=10, now=0.5)  # rank 0: 20 steps/s, so ask again in 20 steps
        30
        >>> cadence.adopt(30); cadence.is_check_step(29), cadence.is_check_step(30)
        (False, True)
    """

    def __init__(self, granularity_s: float | None) -> None:
        self.granularity_s = granularity_s
        self._next = 0
        self._since: tuple[int, float] | None = None

    def start(self, step: int, now: float) -> None:
        """Start measuring the step rate (rank 0; harmless elsewhere)."""
        self._since = (step, now)
        self._next = step

    def is_check_step(self, step: int) -> bool:
        """Whether ranks agree at ``step`` (the only per-step work: one comparison)."""
        return step >= self._next

    def next_check(self, step: int, now: float) -> int:
        """Rank 0: the step at which to agree next, from the step rate since the last check."""
        if self.granularity_s is None or self._since is None:
            self._since = (step, now)
            return step + 1
        last_step, last_time = self._since
        self._since = (step, now)
        elapsed = now - last_time
        if step <= last_step or elapsed <= 0:
            return step + 1
        stride = int(self.granularity_s * (step - last_step) / elapsed)
        return step + max(1, min(stride, 1_000_000))

    def adopt(self, next_step: int) -> None:
        """Every rank: remember the step rank 0 named."""
        self._next = next_step


def _parse_string(value: str, argument: str) -> SaveSchedule:
    match = _STRING_RE.fullmatch(value.strip().lower())
    if match is None:
        raise ConfigError(argument, value, _EXAMPLE, "Expected a number followed by a unit")
    number, unit = match.groups()
    if unit in _COUNT_UNITS:
        if not number.isdigit():
            raise ConfigError(argument, value, _EXAMPLE, "Epoch and batch counts must be whole numbers")
        if int(number) < 1:
            raise ConfigError(argument, value, _EXAMPLE, "The count must be positive")
        return EveryNEpochs(int(number)) if _COUNT_UNITS[unit] == "ep" else EveryNBatches(int(number))
    if unit not in _SECONDS_PER_UNIT:
        units = "ep, ba, s, sec, min, h, d"
        raise ConfigError(argument, value, _EXAMPLE, f"Unknown unit {unit!r}; the units are {units}")
    seconds = float(number) * _SECONDS_PER_UNIT[unit]
    if seconds <= 0:
        raise ConfigError(argument, value, _EXAMPLE, "The duration must be positive")
    return EveryDuration(seconds)


def _check_call_signature(fn: Callable[..., object], argument: str) -> None:
    """Reject a callable that cannot be called as ``fn(trainer, event)`` now, not at the first save point."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        return
    try:
        signature.bind(None, None)
    except TypeError as err:
        raise ConfigError(
            argument, fn, _EXAMPLE, f"It is called as fn(trainer, event), but its signature is {signature} ({err})"
        ) from None


def parse_save_interval(value: object, *, argument: str = "save_interval") -> SaveSchedule:
    """Turn a user's ``save_interval`` into a :class:`SaveSchedule`.

    Args:
        value: a :class:`SaveSchedule`; ``"Nep"``/``"Nba"`` (also ``"N epochs"``/``"N batches"``);
            a duration string (``"30s"``, ``"30sec"``, ``"30min"``, ``"2h"``, ``"1.5h"``, ``"1d"``);
            a :class:`datetime.timedelta`; a positive ``int`` (epochs); or a callable
            ``(trainer, event) -> bool``.
        argument: the argument name used in errors.

    Raises:
        ConfigError: for anything else, zero or negative amounts, and fractional epoch/batch counts.

    Example:
        >>> parse_save_interval("1.5h"), parse_save_interval(2)
        (EveryDuration(seconds=5400), EveryNEpochs(2))
    """
    if isinstance(value, SaveSchedule):
        return value
    if isinstance(value, bool):
        raise ConfigError(argument, value, _EXAMPLE, "A bool is not an interval")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(argument, value, _EXAMPLE, "The number of epochs must be positive")
        return EveryNEpochs(value)
    if isinstance(value, str):
        return _parse_string(value, argument)
    if isinstance(value, datetime.timedelta):
        if value.total_seconds() <= 0:
            raise ConfigError(argument, value, _EXAMPLE, "The duration must be positive")
        return EveryDuration(value.total_seconds())
    if callable(value) and not isinstance(value, type):
        _check_call_signature(value, argument)
        return CallableSchedule(value)
    if isinstance(value, type):
        raise ConfigError(argument, value, _EXAMPLE, f"Pass an instance, not the class {value.__name__}")
    raise ConfigError(argument, value, _EXAMPLE, f"Values of type {type(value).__name__} are not accepted")
