"""When to save: the schedule, the agreement cadence, and preemption, as one decision per hook.

At each step or epoch end :meth:`SaveTrigger.decide` answers ``"save"``, ``"save_and_exit"``
(a preemption signal reached any rank) or ``"nothing"``. Every rank gets the same answer: a
schedule that depends on clocks or user code is evaluated on rank 0 and broadcast, and only at
the steps rank 0 named in advance (:class:`~lightning_ckpt.interval.AgreementCadence`), so the
steps in between cost one comparison; preemption flags are combined the same way.

Example:
    >>> from lightning_ckpt.interval import EveryNBatches
    >>> trigger = SaveTrigger(EveryNBatches(2), signals=())
    >>> trigger.schedule, trigger.preemption.signals
    (EveryNBatches(2), ())
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from lightning_ckpt.dist import decide_on_rank_zero, max_across_ranks
from lightning_ckpt.interval import AgreementCadence, Event, SavePoint, SaveSchedule
from lightning_ckpt.preemption import PREEMPTION_CHECK_S, PreemptionWatch

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["Decision", "SaveTrigger"]


@dataclass(frozen=True)
class Decision:
    """What to do at a save point, the same on every rank."""

    action: Literal["save", "save_and_exit", "nothing"]
    point: SavePoint | None = None
    now: float = 0.0


_NOTHING = Decision("nothing")


class SaveTrigger:
    """The schedule and the preemption watch of one saver, and when ranks agree on them."""

    def __init__(self, schedule: SaveSchedule, signals: Sequence[Any]) -> None:
        self.schedule = schedule
        self.preemption = PreemptionWatch(signals)
        self._cadence = AgreementCadence(None)
        self._preemption_cadence = AgreementCadence(PREEMPTION_CHECK_S)

    def start(self, step: int) -> None:
        """Start the schedule's clock and both cadences (at fit start, from the step training starts at)."""
        now = time.monotonic()
        self.schedule.start(now)
        self._cadence = AgreementCadence(self.schedule.agreement_granularity_s)
        self._cadence.start(step, now)
        self._preemption_cadence = AgreementCadence(PREEMPTION_CHECK_S)
        self._preemption_cadence.start(step, now)

    def decide(self, trainer: Trainer, event: Event) -> Decision:
        """Save, save and exit, or nothing, at this hook (every rank calls it; all get the same answer)."""
        if self.preemption.signals and self._preempted(trainer, event):
            return Decision("save_and_exit")
        step = trainer.global_step
        if step == self.schedule.last_saved_batch or trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return _NOTHING
        point = SavePoint(event=event, epoch=trainer.current_epoch, batch=step)
        if not (self.schedule.needs_agreement and trainer.world_size > 1):
            now = time.monotonic()
            return Decision("save", point, now) if self.schedule.is_due(point, trainer, now) else _NOTHING
        at_batch = event is Event.BATCH_END
        if at_batch and not self._cadence.is_check_step(step):  # between agreements: no collective, no clock
            return _NOTHING
        now = time.monotonic()

        def decide() -> tuple[bool, int | None]:
            return self.schedule.is_due(point, trainer, now), self._cadence.next_check(step, now) if at_batch else None

        due, next_check = decide_on_rank_zero(trainer, decide)
        if next_check is not None:
            self._cadence.adopt(next_check)
        return Decision("save", point, now) if due else _NOTHING

    def saved(self, decision: Decision) -> None:
        """Tell the schedule that the save ``decision`` asked for happened."""
        if decision.point is not None:
            self.schedule.mark_saved(decision.point, decision.now)

    def _preempted(self, trainer: Trainer, event: Event) -> bool:
        """Whether any rank received a preemption signal (ranks combine flags at steps rank 0 names)."""
        if trainer.world_size == 1:
            return self.preemption.received is not None
        step = trainer.global_step
        if event is Event.BATCH_END and not self._preemption_cadence.is_check_step(step):
            return False
        now = time.monotonic()
        proposal = self._preemption_cadence.next_check(step, now) if trainer.is_global_zero else 0
        flag, next_check = max_across_ranks(trainer, [int(self.preemption.received is not None), proposal])
        if event is Event.BATCH_END:
            self._preemption_cadence.adopt(next_check)
        return bool(flag)
