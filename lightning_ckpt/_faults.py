"""Named points of the save pipeline where the fault-injection tests SIGKILL the process.

The kill tests start real training processes with ``LIGHTNING_CKPT_KILL_AT`` set to
``"<point>"`` (every rank), ``"<point>@<rank>"`` (one rank) or ``"<point>@<rank>#<n>"`` (the
n-th time that rank passes the point; default the first). The process then kills itself with
``SIGKILL`` right there: no ``finally`` block, no ``atexit`` hook, no flush runs, as when a node
dies. Without the variable (every real run), :func:`reached` costs one ``is None`` test.

=========================  ===============================================================
point                      where
=========================  ===============================================================
``shard.before``           a rank has created the staging directory, before its shard
``shard.half``             half of a rank's shard bytes are on disk (local writes)
``commit.before_manifest`` after the barrier, before the committing rank writes the manifest
``commit.before_pointer``  the checkpoint is committed, the ``latest`` pointer not yet moved
``upload.during``          a rank has uploaded its first file of a checkpoint, not the rest
``rotation.during``        an old checkpoint's manifest is deleted, its other files are not
=========================  ===============================================================

Example:
    >>> parse_plan("shard.half@1#2")
    ('shard.half', 1, 2)
    >>> parse_plan("commit.before_pointer")
    ('commit.before_pointer', None, 1)
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable

__all__ = ["ENV_VAR", "POINTS", "armed", "parse_plan", "reached", "write_part_then_die"]

ENV_VAR = "LIGHTNING_CKPT_KILL_AT"
POINTS = (
    "shard.before",
    "shard.half",
    "commit.before_manifest",
    "commit.before_pointer",
    "upload.during",
    "rotation.during",
)

Plan = tuple[str, int | None, int]


def parse_plan(text: str) -> Plan:
    """``"<point>[@<rank>][#<n>]"`` as ``(point, rank or None, n)``; raises ``ValueError`` on anything else."""
    rest, _, nth = text.partition("#")
    point, _, rank = rest.partition("@")
    if point not in POINTS:
        raise ValueError(f"{ENV_VAR}={text!r}: unknown point {point!r}; one of {', '.join(POINTS)}")
    return point, int(rank) if rank else None, int(nth) if nth else 1


_PLAN: Plan | None = parse_plan(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None
_passes: dict[str, int] = {}
_lock = threading.Lock()


def armed(point: str, rank: int) -> bool:
    """Whether passing ``point`` now on ``rank`` is the planned kill (counts the pass)."""
    if _PLAN is None or _PLAN[0] != point or _PLAN[1] not in (None, rank):
        return False
    with _lock:
        _passes[point] = _passes.get(point, 0) + 1
        return _passes[point] == _PLAN[2]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def reached(point: str, rank: int) -> None:
    """Kill this process if the plan says so (no-op in real runs)."""
    if _PLAN is not None and armed(point, rank):
        _die()


def write_part_then_die(path: str, chunks: Iterable[memoryview], size: int) -> None:
    """Write the first half of a file's bytes to ``path``, make them durable, and die (``shard.half``)."""
    remaining = size // 2
    with open(path, "wb") as f:
        for chunk in chunks:
            part = chunk[:remaining]
            f.write(part)
            remaining -= len(part)
            if remaining <= 0:
                break
        f.flush()
        os.fsync(f.fileno())
    _die()
