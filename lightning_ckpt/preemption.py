"""Preemption: a signal asks for a checkpoint at the next step boundary, then a clean exit.

Clusters announce preemption with a signal and a grace period: Kubernetes and most schedulers
send ``SIGTERM``; SLURM sends ``SIGUSR1`` (or another signal) ahead of time with
``--signal=USR1@<seconds>``. :class:`PreemptionWatch` installs a handler that *only sets a flag*:
nothing else is safe inside a signal handler (the interrupted code may hold locks or be inside a
collective). :class:`CheckpointSaver` looks at the flag at every step boundary and, when ranks
agree that any of them was signalled, saves, waits for the commit and the uploads, and ends the
process with Lightning's ``SIGTERMException`` (a ``SystemExit``: exit status 0, teardown runs).

With several ranks the flag is combined at steps that rank 0 names about once a second of
training (:class:`~lightning_ckpt.interval.AgreementCadence`), in one small all-reduce, so the
steps in between cost one integer comparison.

Example:
    >>> import os, signal
    >>> watch = PreemptionWatch(parse_signals(["SIGUSR1"], "preemption_signals"))
    >>> watch.install()
    >>> os.kill(os.getpid(), signal.SIGUSR1)
    >>> watch.received
    'SIGUSR1'
    >>> watch.uninstall()
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from lightning_ckpt.errors import ConfigError

__all__ = ["DEFAULT_SIGNALS", "PREEMPTION_CHECK_S", "PreemptionWatch", "parse_signals"]

log = logging.getLogger("lightning_ckpt")

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")
PREEMPTION_CHECK_S = 1.0  # with several ranks: ranks combine their flags about once per second of training

_EXAMPLE = "('SIGTERM', 'SIGUSR1'), ['SIGUSR2'] or None"


def parse_signals(value: object, argument: str) -> tuple[signal.Signals, ...]:
    """Signals from names (``"SIGTERM"``, ``"TERM"``), numbers or ``signal.Signals``; ``None`` means none.

    Example:
        >>> parse_signals(("TERM", 10), "preemption_signals")
        (<Signals.SIGTERM: 15>, <Signals.SIGUSR1: 10>)
    """
    if value is None:
        return ()
    if isinstance(value, (str, int)):
        value = [value]
    if not isinstance(value, Sequence):
        raise ConfigError(argument, value, _EXAMPLE, "It must be a list of signal names")
    parsed: list[signal.Signals] = []
    for item in value:
        try:
            if isinstance(item, str) and not isinstance(item, signal.Signals):
                name = item.upper() if item.upper().startswith("SIG") else f"SIG{item.upper()}"
                sig = signal.Signals[name]
            elif isinstance(item, int) and not isinstance(item, bool):
                sig = signal.Signals(item)
            else:
                raise ValueError(item)
        except (KeyError, ValueError):
            raise ConfigError(argument, value, _EXAMPLE, f"{item!r} is not a signal of this platform") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(argument, value, _EXAMPLE, f"{sig.name} cannot be caught")
        if sig not in parsed:
            parsed.append(sig)
    return tuple(parsed)


class PreemptionWatch:
    """Signal handlers that record that preemption was announced, and nothing else.

    Args:
        signals: the signals that announce preemption.
    """

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self.signals = tuple(signals)
        self.received: str | None = None
        self.received_at: float | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        """Take the signals over (main thread only; elsewhere Python forbids it and this does nothing)."""
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return
        self.received = self.received_at = None
        for sig in self.signals:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def uninstall(self) -> None:
        """Give the signals back to the handlers they had before :meth:`install`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self.received_at = signal.Signals(signum).name, time.monotonic()

    def __repr__(self) -> str:
        return f"PreemptionWatch(signals={[s.name for s in self.signals]})"
