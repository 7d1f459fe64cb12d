"""What to keep: small composable retention policies over plain checkpoint records.

A policy maps the committed checkpoints (:class:`CheckpointRecord`, oldest to newest by step) to
the set of names it keeps. Policies combine with ``|`` (keep what either keeps), and
:func:`plan_deletions` turns a policy into the list of names to delete.

Example:
    >>> records = [CheckpointRecord(f"ba{s}", epoch=0, step=s) for s in (100, 200, 300, 400)]
    >>> plan_deletions(records, KeepLatest(1) | KeepEveryNSteps(200))
    ['ba100', 'ba300']
"""

from __future__ import annotations

import abc
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from lightning_ckpt.errors import ConfigError

__all__ = [
    "AnyOf",
    "CheckpointRecord",
    "KeepAll",
    "KeepBest",
    "KeepEveryNSteps",
    "KeepLatest",
    "RetentionPolicy",
    "best_records",
    "build_retention_policy",
    "plan_deletions",
]

_MODES = ("min", "max")


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint, as the retention policies see it.

    Attributes:
        name: the checkpoint's name in its folder.
        epoch: ``trainer.current_epoch`` when it was saved.
        step: ``trainer.global_step`` when it was saved.
        metric: the monitored metric's value, or ``None`` when it was not logged.
        run_id: the run that saved it (``None`` for checkpoints saved before run ids existed).

    Example:
        >>> CheckpointRecord("ep0-ba100", epoch=0, step=100, metric=0.25).metric
        0.25
    """

    name: str
    epoch: int
    step: int
    metric: float | None = None
    run_id: str | None = None


def _int_at_least(argument: str, value: object, low: int, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(argument, value, example, f"It must be an int >= {low}")
    return value


def _by_step(records: Sequence[CheckpointRecord]) -> list[CheckpointRecord]:
    return sorted(records, key=lambda record: record.step)


def best_records(records: Sequence[CheckpointRecord], mode: str, k: int) -> list[CheckpointRecord]:
    """The ``k`` records with the best metric, best first: the one rule for "best" in this package.

    A lower metric is better with ``mode="min"``, a higher one with ``"max"``; ties go to the newer
    step. Records whose metric is ``None`` or NaN are never among the best.

    Example:
        >>> records = [CheckpointRecord("a", 0, 1, 0.5), CheckpointRecord("b", 0, 2, float("nan")),
        ...            CheckpointRecord("c", 0, 3, 0.5), CheckpointRecord("d", 0, 4, 0.9)]
        >>> [r.name for r in best_records(records, "min", 2)], [r.name for r in best_records(records, "max", 1)]
        (['c', 'a'], ['d'])
    """
    if mode not in _MODES:
        raise ConfigError("mode", mode, "'min' or 'max'")
    sign = 1.0 if mode == "min" else -1.0
    scored = [(sign * r.metric, -r.step, r) for r in records if r.metric is not None and not math.isnan(r.metric)]
    return [record for *_, record in sorted(scored, key=lambda item: item[:2])[:k]]


class RetentionPolicy(abc.ABC):
    """Chooses which checkpoints to keep.

    Example:
        >>> class KeepNone(RetentionPolicy):
        ...     def keep(self, records):
        ...         return set()
        >>> (KeepNone() | KeepLatest(1)).keep([CheckpointRecord("a", 0, 1), CheckpointRecord("b", 0, 2)])
        {'b'}
    """

    @abc.abstractmethod
    def keep(self, records: Sequence[CheckpointRecord]) -> set[str]:
        """Names of the checkpoints to keep; ``records`` are ordered oldest to newest by step."""

    def __or__(self, other: RetentionPolicy) -> RetentionPolicy:
        if not isinstance(other, RetentionPolicy):
            return NotImplemented
        return AnyOf((self, other))


@dataclass(frozen=True)
class KeepAll(RetentionPolicy):
    """Keeps every checkpoint.

    Example:
        >>> sorted(KeepAll().keep([CheckpointRecord("a", 0, 1), CheckpointRecord("b", 0, 2)]))
        ['a', 'b']
    """

    def keep(self, records: Sequence[CheckpointRecord]) -> set[str]:
        """See :meth:`RetentionPolicy.keep`."""
        return {record.name for record in records}


@dataclass(frozen=True)
class KeepLatest(RetentionPolicy):
    """Keeps the newest ``n`` checkpoints by step (``n >= 0``).

    Example:
        >>> sorted(KeepLatest(2).keep([CheckpointRecord(n, 0, s) for n, s in [("a", 1), ("b", 2), ("c", 3)]]))
        ['b', 'c']
    """

    n: int

    def __post_init__(self) -> None:
        _int_at_least("n", self.n, 0, "3")

    def keep(self, records: Sequence[CheckpointRecord]) -> set[str]:
        """See :meth:`RetentionPolicy.keep`."""
        ordered = _by_step(records)
        return {record.name for record in ordered[max(len(ordered) - self.n, 0) :]} if self.n else set()


@dataclass(frozen=True)
class KeepEveryNSteps(RetentionPolicy):
    """Keeps forever every checkpoint whose step is a multiple of ``n`` (``n >= 1``).

    Example:
        >>> KeepEveryNSteps(1000).keep([CheckpointRecord("a", 0, 500), CheckpointRecord("b", 0, 1000)])
        {'b'}
    """

    n: int

    def __post_init__(self) -> None:
        _int_at_least("n", self.n, 1, "1000")

    def keep(self, records: Sequence[CheckpointRecord]) -> set[str]:
        """See :meth:`RetentionPolicy.keep`."""
        return {record.name for record in records if record.step % self.n == 0}


@dataclass(frozen=True)
class KeepBest(RetentionPolicy):
    """Keeps the ``k`` checkpoints with the best metric; ties go to the newer step.

    Records whose metric is ``None`` or NaN are never among the best (see :func:`best_records`).

    Example:
        >>> records = [CheckpointRecord("a", 0, 1, 0.5), CheckpointRecord("b", 0, 2, 0.9)]
        >>> KeepBest(1, mode="max").keep(records)
        {'b'}
    """

    k: int
    mode: str = "min"

    def __post_init__(self) -> None:
        _int_at_least("k", self.k, 0, "1")
        if self.mode not in _MODES:
            raise ConfigError("mode", self.mode, "'min' or 'max'")

    def keep(self, records: Sequence[CheckpointRecord]) -> set[str]:
        """See :meth:`RetentionPolicy.keep`."""
        return {record.name for record in best_records(records, self.mode, self.k)}


@dataclass(frozen=True)
class AnyOf(RetentionPolicy):
    """Keeps what any of ``policies`` keeps (what ``a | b`` builds).

    Example:
        >>> AnyOf((KeepLatest(1), KeepEveryNSteps(2)))
        AnyOf(policies=(KeepLatest(n=1), KeepEveryNSteps(n=2)))
    """

    policies: tuple[RetentionPolicy, ...]

    def __post_init__(self) -> None:
        flat: list[RetentionPolicy] = []
        for policy in tuple(self.policies):
            if not isinstance(policy, RetentionPolicy):
                raise ConfigError("policies", self.policies, "(KeepLatest(3), KeepBest(1))")
            flat.extend(policy.policies if isinstance(policy, AnyOf) else (policy,))
        object.__setattr__(self, "policies", tuple(flat))

    def keep(self, records: Sequence[CheckpointRecord]) -> set[str]:
        """See :meth:`RetentionPolicy.keep`."""
        kept: set[str] = set()
        for policy in self.policies:
            kept |= policy.keep(records)
        return kept


def build_retention_policy(
    *,
    num_checkpoints_to_keep: int = -1,
    keep_every_n_steps: int | None = None,
    num_best_to_keep: int = 0,
    mode: str = "min",
) -> RetentionPolicy:
    """Build the policy for the public retention arguments.

    Args:
        num_checkpoints_to_keep: ``-1`` keeps all; ``0`` keeps none by recency; ``N`` keeps the ``N`` newest.
        keep_every_n_steps: also keep forever every checkpoint whose step is a multiple of this.
        num_best_to_keep: also keep this many checkpoints with the best monitored metric.
        mode: ``"min"`` or ``"max"``: whether a lower or higher metric is better.

    Raises:
        ConfigError: for out-of-range values or wrong types (a bool is not a count).

    Example:
        >>> build_retention_policy(num_checkpoints_to_keep=2, num_best_to_keep=1, mode="max")
        AnyOf(policies=(KeepLatest(n=2), KeepBest(k=1, mode='max')))
    """
    _int_at_least("num_checkpoints_to_keep", num_checkpoints_to_keep, -1, "3 (or -1 to keep all)")
    if keep_every_n_steps is not None:
        _int_at_least("keep_every_n_steps", keep_every_n_steps, 1, "1000 (or None)")
    _int_at_least("num_best_to_keep", num_best_to_keep, 0, "1 (or 0)")
    if mode not in _MODES:
        raise ConfigError("mode", mode, "'min' or 'max'")
    if num_checkpoints_to_keep == -1:
        return KeepAll()
    parts: list[RetentionPolicy] = [KeepLatest(num_checkpoints_to_keep)] if num_checkpoints_to_keep else []
    if keep_every_n_steps is not None:
        parts.append(KeepEveryNSteps(keep_every_n_steps))
    if num_best_to_keep:
        parts.append(KeepBest(num_best_to_keep, mode))
    if not parts:
        return KeepLatest(0)
    return parts[0] if len(parts) == 1 else AnyOf(tuple(parts))


def plan_deletions(
    records: Sequence[CheckpointRecord], policy: RetentionPolicy, *, protected: Collection[str] = ()
) -> list[str]:
    """Names to delete, oldest first: every checkpoint neither kept by ``policy`` nor ``protected``.

    Args:
        records: the committed checkpoints.
        policy: the retention policy.
        protected: names never deleted (e.g. the checkpoint resumed from, or the newest one).

    Example:
        >>> records = [CheckpointRecord(n, 0, s) for n, s in [("a", 1), ("b", 2), ("c", 3)]]
        >>> plan_deletions(records, KeepLatest(1), protected={"a"})
        ['b']
    """
    kept = policy.keep(records)
    doomed: list[str] = []
    for record in _by_step(records):
        if record.name not in kept and record.name not in protected and record.name not in doomed:
            doomed.append(record.name)
    return doomed
