"""What one save cost: time training was blocked, background write time, time to durable commit.

Example:
    >>> stats = SaveStats(path="/ckpts/ba8", nbytes=2_000_000_000, blocking_s=0.09)
    >>> stats.durable_s is None  # still writing in the background
    True
    >>> stats.finished(write_s=0.8, durable_s=0.9)
    >>> round(stats.write_gbps, 2)
    2.5
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SaveStats"]


@dataclass
class SaveStats:
    """Timings of one save on this rank (seconds; ``time.perf_counter`` differences).

    Attributes:
        path: the checkpoint (path or URL).
        nbytes: bytes this rank wrote.
        blocking_s: how long the save call blocked the training loop, including any wait for the
            previous save (``waited_s``) and, when asynchronous, the copy into staging buffers.
        waited_s: part of ``blocking_s`` spent waiting for the previous save to finish.
        write_s: writing this rank's files, the barrier and the commit (on the background thread
            when asynchronous); ``None`` until finished.
        durable_s: from the start of the save call until the checkpoint was committed durably;
            ``None`` until finished.
        asynchronous: whether the write ran in the background.
    """

    path: str
    nbytes: int
    blocking_s: float = 0.0
    waited_s: float = 0.0
    write_s: float | None = None
    durable_s: float | None = None
    asynchronous: bool = False

    def finished(self, *, write_s: float, durable_s: float) -> None:
        """Record the end of the write and commit."""
        self.write_s, self.durable_s = write_s, durable_s

    @property
    def write_gbps(self) -> float:
        """Write throughput in GB/s (10^9 bytes per second; 0 until finished)."""
        return self.nbytes / self.write_s / 1e9 if self.write_s else 0.0
