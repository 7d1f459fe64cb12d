"""The SIGKILL hook of the fault-injection tests, planned by an environment variable.

A test starts real training processes with ``LIGHTNING_CKPT_KILL_AT`` set to ``"<point>"``
(every rank), ``"<point>@<rank>"`` (one rank) or ``"<point>@<rank>#<n>"`` (the n-th time that
rank passes the point; default the first); the points are :data:`lightning_ckpt._faults.POINTS`.
The process then kills itself with ``SIGKILL`` right there: no ``finally`` block, no ``atexit``
hook, no flush runs, as when a node dies. At ``shard.half`` it first writes half of the shard's
bytes and makes them durable.

The package never reads the variable: a test worker calls :func:`install_from_env` first. Run a
worker script under the hook with ``python tests/faults.py SCRIPT ARGS...`` (also as torchrun's
script); ``tests/kill_worker.py`` installs it itself.

Example:
    >>> parse_plan("shard.half@1#2")
    ('shard.half', 1, 2)
    >>> parse_plan("commit.before_pointer")
    ('commit.before_pointer', None, 1)
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
from collections.abc import Mapping, Sequence

from lightning_ckpt import _faults

__all__ = ["ENV_VAR", "RUNNER", "KillAt", "install_from_env", "parse_plan"]

ENV_VAR = "LIGHTNING_CKPT_KILL_AT"
RUNNER = os.path.abspath(__file__)

Plan = tuple[str, int | None, int]


def parse_plan(text: str) -> Plan:
    """``"<point>[@<rank>][#<n>]"`` as ``(point, rank or None, n)``; raises ``ValueError`` on anything else."""
    rest, _, nth = text.partition("#")
    point, _, rank = rest.partition("@")
    if point not in _faults.POINTS:
        raise ValueError(f"{ENV_VAR}={text!r}: unknown point {point!r}; one of {', '.join(_faults.POINTS)}")
    return point, int(rank) if rank else None, int(nth) if nth else 1


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _write_half_then_die(writing: _faults.Writing) -> None:
    """Write the first half of the file's bytes, make them durable, and die."""
    remaining = writing.size // 2
    with open(writing.path, "wb") as f:
        for chunk in writing.chunks:
            part = chunk[:remaining]
            f.write(part)
            remaining -= len(part)
            if remaining <= 0:
                break
        f.flush()
        os.fsync(f.fileno())
    _die()


class KillAt:
    """The hook: SIGKILL this process the ``n``-th time ``rank`` (or any rank) passes ``point``.

    Example:
        >>> hook = KillAt(("shard.before", 1, 1))
        >>> hook("shard.before", 0, None)  # another rank: nothing happens
    """

    def __init__(self, plan: Plan) -> None:
        self.point, self.rank, self.nth = plan
        self._passes = 0
        self._lock = threading.Lock()

    def __call__(self, point: str, rank: int, writing: _faults.Writing | None) -> None:
        if point != self.point or self.rank not in (None, rank):
            return
        with self._lock:
            self._passes += 1
            if self._passes != self.nth:
                return
        if writing is not None:
            _write_half_then_die(writing)
        _die()


def install_from_env(environ: Mapping[str, str] = os.environ) -> KillAt | None:
    """Install the hook that ``LIGHTNING_CKPT_KILL_AT`` plans, if set; a hook already installed is kept.

    Example:
        >>> install_from_env({}) is None
        True
    """
    text = environ.get(ENV_VAR)
    current = _faults.install(None)
    hook = KillAt(parse_plan(text)) if text and current is None else None
    _faults.install(hook or current)
    return hook


def main(argv: Sequence[str]) -> None:
    """``python tests/faults.py SCRIPT ARGS...``: run ``SCRIPT`` as ``__main__`` with the hook installed."""
    install_from_env()
    script, *args = argv
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
