"""Resuming: which committed checkpoint a run resumes from, agreed by every rank, loaded with fallback.

Three steps, each usable alone and none with side effects on the plugin or the trainer:

1. :func:`plan_resume` turns a folder listing into a frozen :class:`ResumePlan`: candidates newest
   first, in the one order this package uses everywhere (manifest ``created`` time, then global
   step, as :func:`lightning_ckpt.latest` does), so a run that resumed from an earlier checkpoint
   with ``overwrite=True`` continues from its own saves.
2. :func:`agree` (several ranks) keeps the steps every rank has committed (node-local disks can
   differ when a job died mid-commit), in rank 0's order, so ranks fall back together.
3. :func:`load_first_verified` loads the first candidate that every rank can load and returns a
   :class:`Resumed`: what was loaded and what was skipped (a warning names each one and why).

Example:
    >>> plan = ResumePlan((Candidate(step=8, url="/runs/a/ba8"), Candidate(step=4, url="/runs/a/ba4")))
    >>> def load(url):
    ...     if url.endswith("ba8"):
    ...         raise CorruptCheckpointError("shard-00000-of-00001.safetensors is truncated")
    ...     return {"global_step": 4}
    >>> resumed = load_first_verified(plan, load, Exchange(None, 0, 1, prefix="doc", timeout_s=0))
    >>> resumed.loaded, resumed.skipped, resumed.checkpoint
    ('/runs/a/ba4', ('/runs/a/ba8',), {'global_step': 4})
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lightning_ckpt.dist import Exchange
from lightning_ckpt.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from lightning_ckpt.manifest import Manifest

__all__ = ["Candidate", "ResumePlan", "Resumed", "agree", "listing", "load_first_verified", "plan_resume"]


@dataclass(frozen=True)
class Candidate:
    """One committed checkpoint a run may resume from."""

    step: int
    url: str


@dataclass(frozen=True)
class ResumePlan:
    """Committed checkpoints to try, newest first; ``what`` names the request in warnings and errors.

    Example:
        >>> ResumePlan((Candidate(2, "/runs/a/ba2"),)).first
        Candidate(step=2, url='/runs/a/ba2')
    """

    candidates: tuple[Candidate, ...]
    what: str = 'ckpt_path="last"'

    @property
    def first(self) -> Candidate | None:
        """The newest candidate, or ``None`` when there is none."""
        return self.candidates[0] if self.candidates else None

    def only_first(self) -> ResumePlan:
        """The plan without fallback: its newest candidate alone (a folder passed as ``ckpt_path``)."""
        return ResumePlan(self.candidates[:1], self.what)


@dataclass(frozen=True)
class Resumed:
    """What :func:`load_first_verified` loaded: the checkpoint dict, its URL, and the candidates skipped."""

    checkpoint: dict[str, Any] = field(repr=False)
    loaded: str
    skipped: tuple[str, ...] = ()


def plan_resume(
    committed: Iterable[tuple[str, int, float]], url_of: Callable[[str], str], *, what: str = 'ckpt_path="last"'
) -> ResumePlan:
    """The resume plan for committed checkpoints ``(name, global step, created time)`` of a folder, in any order.

    Example:
        >>> # ba9 was committed first, then a run resumed from an earlier step saved ba5 (overwrite=True)
        >>> plan_resume([("ba9", 9, 100.0), ("ba5", 5, 200.0)], lambda name: f"/runs/a/{name}").candidates
        (Candidate(step=5, url='/runs/a/ba5'), Candidate(step=9, url='/runs/a/ba9'))
    """
    newest_first = sorted(committed, key=lambda item: (item[2], item[1]), reverse=True)
    return ResumePlan(tuple(Candidate(int(step), url_of(name)) for name, step, _ in newest_first), what)


def listing(committed: Iterable[tuple[str, Manifest]]) -> list[tuple[str, int, float]]:
    """``(name, global step, created time)`` of each ``(name, manifest)`` that
    :func:`~lightning_ckpt.discovery.list_committed` returns, for :func:`plan_resume`."""
    return [(name, manifest.global_step, manifest.created) for name, manifest in committed]


def agree(plan: ResumePlan, exchange: Exchange, *, where: str = "") -> ResumePlan:
    """The candidates whose step every rank has committed, in rank 0's order (one store round).

    Each rank keeps its own newest checkpoint of each agreed step (with per-rank folders the names
    differ). Raises :class:`~lightning_ckpt.errors.CheckpointNotFoundError` on every rank when no step
    is committed everywhere; ``where`` (this rank's folder) goes into that message.

    Example:
        >>> plan = ResumePlan((Candidate(4, "/runs/a/ba4"),))
        >>> agree(plan, Exchange(None, 0, 1, prefix="doc", timeout_s=0)) == plan  # one rank: nothing to agree
        True
    """
    if exchange.world_size == 1:
        return plan
    mine: dict[int, str] = {}
    for candidate in plan.candidates:
        mine.setdefault(candidate.step, candidate.url)
    views = exchange.barrier("committed-steps", payload=list(mine))
    common = set.intersection(*(set(view) for view in views.values()))
    if not common:
        empty = sorted(rank for rank, view in views.items() if not view)
        raise CheckpointNotFoundError(
            f"{plan.what}: no step is committed on every rank (rank(s) {empty or 'none'} have none; this rank's"
            f" folder {where} has steps {sorted(mine)}); resume from an explicit checkpoint or a folder every rank"
            " can read"
        )
    order = [step for step in views[0] if step in common]
    return ResumePlan(tuple(Candidate(step, mine[step]) for step in order), plan.what)


def load_first_verified(plan: ResumePlan, load: Callable[[str], dict[str, Any]], exchange: Exchange) -> Resumed:
    """Load the first candidate that every rank loads without a :class:`~lightning_ckpt.errors.CheckpointError`.

    A candidate that does not verify (missing, truncated or corrupt files) is skipped on every rank
    with a warning naming it and the problem; ranks move on together (one store round per candidate).
    Raises :class:`~lightning_ckpt.errors.CorruptCheckpointError` listing every candidate when none loads.
    """
    failures: list[str] = []
    for index, candidate in enumerate(plan.candidates):
        loaded: dict[str, Any] | None = None
        problem = ""
        try:
            loaded = load(candidate.url)
        except CheckpointError as err:  # corrupt, truncated, missing files: never a reason to stop resuming
            problem = str(err)
        if exchange.world_size > 1:
            views = exchange.barrier(f"verified{index}", payload=problem)
            problem = problem or "; ".join(f"rank {r}: {p}" for r, p in sorted(views.items()) if p)
        if not problem:
            assert loaded is not None
            skipped = tuple(c.url for c in plan.candidates[:index])
            return Resumed(loaded, candidate.url, skipped)
        failures.append(f"{candidate.url}: {problem}")
        following = f"falling back to {plan.candidates[index + 1].url}" if index + 1 < len(plan.candidates) else None
        if exchange.rank == 0:
            message = f"{plan.what}: {candidate.url} does not verify ({problem}); {following or 'none is left'}."
            warnings.warn(message, UserWarning, stacklevel=2)
    raise CorruptCheckpointError(
        f"{plan.what}: no committed checkpoint verifies:\n  "
        + "\n  ".join(failures)
        + "\nResume from an explicit checkpoint or start without ckpt_path."
    )
