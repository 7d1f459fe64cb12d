"""The catalog of one saver's checkpoints: names, records, retention and "best".

A :class:`Catalog` names each checkpoint from the saver's ``filename`` format, recognises the
checkpoints this saver wrote on this rank (the name parses, with this rank's dist values), keeps
the records of those this run may rotate (other runs' are *foreign*: never rotated, never
overwritten), decides what the retention policy drops, and which record is the best by
``monitor`` (:func:`~lightning_ckpt.policies.best_records`, the rule ``KeepBest`` keeps by: NaN is
never best).

Example:
    >>> from lightning_ckpt.layout import NameFormat, Progress, RankInfo
    >>> from lightning_ckpt.policies import KeepLatest
    >>> catalog = Catalog(NameFormat("ba{batch}", argument="filename"), None, KeepLatest(2), run_name="demo")
    >>> catalog.name_for(Progress(epoch=0, batch=7, batch_in_epoch=7, metrics={}), RankInfo())
    'ba7'
    >>> catalog.is_mine("ba7", RankInfo()), catalog.is_mine("latest", RankInfo())
    (True, False)
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable

from lightning_ckpt import layout
from lightning_ckpt.dist import exchange_rank
from lightning_ckpt.errors import FolderConflictError
from lightning_ckpt.layout import NameFormat, Progress, RankInfo
from lightning_ckpt.policies import AnyOf, CheckpointRecord, KeepBest, RetentionPolicy, best_records
from lightning_ckpt.rotation import rotate
from lightning_ckpt.storage import Storage

__all__ = ["Catalog"]


class Catalog:
    """Names, records, retention and best for one saver (one per ``CheckpointSaver``)."""

    def __init__(
        self,
        filename: NameFormat,
        latest_filename: NameFormat | None,
        retention: RetentionPolicy,
        *,
        run_name: str,
        monitor: str | None = None,
        unranked_mode: str = "min",
    ) -> None:
        self.filename, self.latest_filename, self.retention = filename, latest_filename, retention
        self.run_name, self.monitor, self._unranked_mode = run_name, monitor, unranked_mode
        self.records: list[CheckpointRecord] = []
        self.foreign: frozenset[str] = frozenset()  # other runs' checkpoints in this folder
        self._warned: set[tuple[str, str]] = set()  # (argument, metric) already warned about

    @property
    def mode(self) -> str:
        """``"min"`` or ``"max"``: the retention policy's when it ranks by metric, so both agree."""
        parts = self.retention.policies if isinstance(self.retention, AnyOf) else (self.retention,)
        return next((p.mode for p in parts if isinstance(p, KeepBest)), self._unranked_mode)

    def is_mine(self, name: str, rank: RankInfo) -> bool:
        """A checkpoint this saver on this rank wrote: the name parses, with this rank's dist values."""
        parsed = self.filename.parse(name)
        if parsed is None:
            return False
        own = layout.dist_values(self.run_name, rank)
        return all(parsed[key] == value for key, value in own.items() if key in parsed)

    def name_for(self, progress: Progress, rank: RankInfo) -> str:
        """The name of the checkpoint saved at ``progress``."""
        return self.filename.render(run_name=self.run_name, rank=rank, progress=progress)

    def pointer_for(self, rank: RankInfo) -> str | None:
        """The ``latest`` pointer's name on this rank (``None``: no pointer)."""
        return self.latest_filename.render(run_name=self.run_name, rank=rank) if self.latest_filename else None

    def adopt(self, named: Iterable[CheckpointRecord], run_id: str | None, damaged: Collection[str] = ()) -> None:
        """Take over the records of this run (and of unlabelled checkpoints); note other runs' as foreign.

        ``damaged`` checkpoints (``"last"`` fell back past them) are dropped: this run saves over them.
        """
        kept = [r for r in named if r.name not in damaged]
        self.records = [r for r in kept if r.run_id in (None, run_id)]
        self.foreign = frozenset(r.name for r in kept if r.run_id not in (None, run_id))

    def add(self, name: str, progress: Progress, *, overwrite: bool, url: str) -> CheckpointRecord:
        """Record the checkpoint about to be saved as ``name``; refuse a name already taken unless ``overwrite``."""
        if not overwrite and (name in self.foreign or any(r.name == name for r in self.records)):
            raise FolderConflictError(
                f"{url} already exists; pass CheckpointSaver(overwrite=True) or a filename that includes {{batch}}"
            )
        metric = progress.metrics.get(self.monitor) if self.monitor else None
        record = CheckpointRecord(name=name, epoch=progress.epoch, step=progress.batch, metric=metric)
        self.records = [r for r in self.records if r.name != name] + [record]
        return record

    def dropped(self, storage: Storage, folder: str, protected: Collection[str]) -> list[str]:
        """What the retention policy drops now (the records shrink; the caller deletes after the commit)."""
        return rotate(storage, folder, self.records, self.retention, protected=protected, delete=False)

    def best(self) -> CheckpointRecord | None:
        """The best record by ``monitor`` (``None`` without one, or before any was logged)."""
        best = best_records(self.records, self.mode, 1)
        return best[0] if best else None

    def warn_missing_metrics(self, progress: Progress, step: int) -> None:
        """Warn once per metric that ``filename`` or ``monitor`` names but that is not logged at a save.

        The name shows ``nan`` for it and the save happens: a name never costs the run or the checkpoint.
        ``ModelCheckpoint`` raises for an unlogged ``monitor``; this saver keeps training and keeps the
        checkpoint, ranked by recency only until the metric appears.
        """
        logged = sorted(progress.metrics)
        for metric in self.filename.missing_metrics(progress):
            if ("filename", metric) not in self._warned:
                self._warned.add(("filename", metric))
                _warn(
                    f"CheckpointSaver(filename={self.filename.pattern!r}): metric {metric!r} is not logged at the save"
                    f" of step {step}; its place in the name shows 'nan'. Logged metrics: {logged}. Log it before"
                    f" the save (self.log({metric!r}, ...)) or use one of the logged names."
                )
        if self.monitor and self.monitor not in progress.metrics and ("monitor", self.monitor) not in self._warned:
            self._warned.add(("monitor", self.monitor))
            _warn(
                f"CheckpointSaver(monitor={self.monitor!r}): the metric is not logged at the save of step {step},"
                f" so this checkpoint cannot be ranked as best. Logged metrics: {logged}. Log it before the save"
                f" (self.log({self.monitor!r}, ...), e.g. in validation_step) or change monitor."
            )


def _warn(message: str) -> None:
    """A warning from global rank 0 only (every rank reaches the same conclusion)."""
    if exchange_rank() == 0:
        warnings.warn(message, UserWarning, stacklevel=3)
