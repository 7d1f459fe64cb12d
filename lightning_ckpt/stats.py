"""What one save cost: time training was blocked, background write time, time to durable commit, upload.

Example:
    >>> stats = SaveStats(path="/ckpts/ba8", nbytes=2_000_000_000, blocking_s=0.09, step=8)
    >>> stats.durable_s is None  # still writing in the background
    True
    >>> stats.finished(write_s=0.8, durable_s=0.9)
    >>> round(stats.write_gbps, 2)
    2.5
    >>> sorted(stats.metrics())
    ['checkpoint/bytes', 'checkpoint/commit_s', 'checkpoint/stall_s', 'checkpoint/write_GBps', 'checkpoint/write_s']
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
        step: the global step the checkpoint holds (``None`` if the checkpoint dict has none).
        upload_s: uploading this rank's files of a remote checkpoint; ``None`` until uploaded.
        upload_bytes: bytes this rank uploaded.
        upload_lag_s: from the local commit to the remote commit (committing rank; ``None`` until then):
            how far the store is behind the local disk.
        upload_lag_steps: steps between the newest checkpoint committed locally and this one, when this one
            was committed remotely.
        upload_backlog: checkpoints submitted for upload after this one and not yet done at its remote commit.
    """

    path: str
    nbytes: int
    blocking_s: float = 0.0
    waited_s: float = 0.0
    write_s: float | None = None
    durable_s: float | None = None
    asynchronous: bool = False
    step: int | None = None
    upload_s: float | None = None
    upload_bytes: int = 0
    upload_lag_s: float | None = None
    upload_lag_steps: int | None = None
    upload_backlog: int = 0

    def finished(self, *, write_s: float, durable_s: float) -> None:
        """Record the end of the write and commit."""
        self.write_s, self.durable_s = write_s, durable_s

    @property
    def write_gbps(self) -> float:
        """Write throughput in GB/s (10^9 bytes per second; 0 until finished)."""
        return self.nbytes / self.write_s / 1e9 if self.write_s else 0.0

    @property
    def upload_gbps(self) -> float:
        """Upload throughput in GB/s (0 until uploaded)."""
        return self.upload_bytes / self.upload_s / 1e9 if self.upload_s else 0.0

    def metrics(self, *, upload: bool = False) -> dict[str, float]:
        """The logger metrics of the write (``upload=False``) or of the upload, by their logged names.

        ``stall_s`` is the time the training loop was blocked; ``write_s`` the background write,
        barrier and commit; ``commit_s`` the time from the save call to the durable commit.
        """
        if upload:
            metrics = {"checkpoint/upload_s": self.upload_s or 0.0, "checkpoint/upload_GBps": self.upload_gbps}
            if self.upload_lag_s is not None:  # the committing rank's: how far the store is behind
                metrics["checkpoint/upload_lag_s"] = self.upload_lag_s
                metrics["checkpoint/upload_lag_steps"] = float(self.upload_lag_steps or 0)
                metrics["checkpoint/upload_backlog"] = float(self.upload_backlog)
            return metrics
        return {
            "checkpoint/stall_s": self.blocking_s,
            "checkpoint/write_s": self.write_s or 0.0,
            "checkpoint/commit_s": self.durable_s or 0.0,
            "checkpoint/bytes": float(self.nbytes),
            "checkpoint/write_GBps": self.write_gbps,
        }

    def summary(self) -> str:
        """One line for the log: what was saved and what it cost."""
        line = (
            f"Saved checkpoint {self.path} (step {self.step}): {self.nbytes / 1e9:.2f} GB;"
            f" training blocked {self.blocking_s:.3f} s, write {self.write_s or 0.0:.2f} s"
            f" ({self.write_gbps:.2f} GB/s), committed {self.durable_s or 0.0:.2f} s after the call"
        )
        if self.upload_s is not None:
            line += f"; upload {self.upload_s:.2f} s ({self.upload_gbps:.2f} GB/s)"
        if self.upload_lag_s is not None:
            line += f", in the store {self.upload_lag_s:.2f} s after the local commit ({self.upload_backlog} queued)"
        return line
