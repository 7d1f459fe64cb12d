"""One fit's hold on a saver's folder: checks, the lock, leftovers, lineage, and the conflict refusal.

A :class:`FolderSession` is opened in ``setup`` for the folder of one saver on one rank. Before
any training it checks that the folder is a writable directory, takes the folder lock (global rank
0; every rank learns the outcome), uploads what an earlier run committed only locally, removes
what interrupted saves left behind, decides the run id this fit saves under (a restart continues
its run), and refuses a folder holding newer checkpoints of this saver unless ``overwrite``.
:meth:`FolderSession.committed` is a query without side effects: ``ckpt_path="last"`` asks it.

Example:
    >>> import tempfile
    >>> session = FolderSession(*Storage.open(tempfile.mkdtemp()), local_root=None, is_mine=lambda name: True)
    >>> session.committed()  # an empty folder
    []
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from lightning_ckpt.commit import remove_leftovers
from lightning_ckpt.discovery import list_committed
from lightning_ckpt.dist import Exchange, decide_on_rank_zero
from lightning_ckpt.errors import FolderConflictError, FolderInUseError
from lightning_ckpt.layout import cache_path
from lightning_ckpt.lock import FolderLock
from lightning_ckpt.manifest import Manifest
from lightning_ckpt.mirror import default_cache_dir
from lightning_ckpt.policies import CheckpointRecord
from lightning_ckpt.reader import read_manifest
from lightning_ckpt.resume import ResumePlan, agree, listing, plan_resume
from lightning_ckpt.rotation import RUN_ID_KEY, check_writable, scan_records
from lightning_ckpt.storage import Storage
from lightning_ckpt.transfer import RetryPolicy
from lightning_ckpt.upload import Uploader, UploadJob

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from lightning_ckpt.layout import NameFormat

__all__ = ["FolderSession"]

log = logging.getLogger("lightning_ckpt")


class FolderSession:
    """A saver's folder on this rank for one fit (``local_root``: where a remote folder's saves commit first)."""

    def __init__(
        self, storage: Storage, folder: str, *, local_root: str | None, is_mine: Callable[[str], bool]
    ) -> None:
        self.storage, self.folder, self.local_root, self.is_mine = storage, folder, local_root, is_mine
        self.lock: FolderLock | None = None

    @classmethod
    def open(
        cls,
        url: str,
        storage_options: Mapping[str, Any],
        *,
        local_folder: str | None,
        cache_dir: str | None,
        is_mine: Callable[[str], bool],
    ) -> FolderSession:
        """The session of folder ``url``; a remote folder's saves commit in ``local_folder``, else in its cache."""
        storage, folder = Storage.open(url, storage_options)
        local_root = None
        if not storage.is_local:
            local_root = local_folder or cache_path(cache_dir or default_cache_dir(), storage.url(folder), "uploads")
        return cls(storage, folder, local_root=local_root, is_mine=is_mine)

    @property
    def url(self) -> str:
        """The folder as the user would write it."""
        return self.storage.url(self.folder)

    @property
    def remote(self) -> bool:
        """Whether the folder is in an object store (saves commit in ``local_root`` first, then upload)."""
        return not self.storage.is_local

    def committed(self) -> list[tuple[str, Manifest]]:
        """This saver's committed checkpoints on this rank, oldest first; for a remote folder also those an
        earlier run committed only in ``local_root`` (they are uploaded in ``setup``, before any load)."""
        mine = [(n, m) for n, m in list_committed(self.storage, self.folder) if self.is_mine(n)]
        if self.remote and self.local_root is not None and os.path.isdir(self.local_root):
            stored = {name for name, _ in mine}
            local = [(n, m) for n, m in list_committed(*Storage.open(self.local_root)) if self.is_mine(n)]
            mine += [(n, m) for n, m in local if n not in stored]
            mine.sort(key=lambda item: (item[1].created, item[1].global_step))
        return mine

    def check(self, argument_value: str, *, fit: bool) -> None:
        """A file, or a read-only folder, fails here, before training (``argument_value``: the folder as given)."""
        from lightning_ckpt.errors import ConfigError

        if self.storage.isfile(self.folder):
            raise ConfigError("folder", argument_value, "a directory path", "it is an existing file")
        if self.remote or fit:
            check_writable(self.storage, self.folder)

    def claim(self, trainer: Trainer, *, run_name: str, policy: RetryPolicy) -> None:
        """Global rank 0 takes the folder's lock; every rank learns the outcome, so all fail together."""
        if self.lock is not None:
            return
        refusal = None
        if trainer.is_global_zero:
            try:
                self.lock = FolderLock.acquire(self.storage, self.folder, run_name=run_name, policy=policy)
            except FolderInUseError as err:
                refusal = str(err)
        if trainer.world_size > 1:
            refusal = decide_on_rank_zero(trainer, lambda: refusal)
        if refusal is not None:
            raise FolderInUseError(refusal)

    def refuse_siblings(self, others: Mapping[str, FolderSession], filename: str) -> None:
        """Two savers of one trainer in one folder (``others``: the other savers' filename -> session): the
        lock would blame "another run" (it is this process), and each would rotate the other's checkpoints."""
        for other_filename, other in others.items():
            if other.lock is not None and other.url == self.url:
                raise FolderInUseError(
                    f"two CheckpointSaver callbacks of this trainer save into folder {self.url!r} (filename="
                    f"{other_filename!r} and {filename!r}); each would rotate the other's checkpoints. Give each"
                    " its own folder, or pass lock_folder=False to both (each then rotates only the checkpoints"
                    " its own filename matches)."
                )

    def resume_plan(self, exchange: Exchange) -> ResumePlan:
        """What ``ckpt_path="last"`` loads: this saver's committed checkpoints, newest first, agreed by every rank."""
        storage, folder = self.storage, self.folder
        plan = plan_resume(listing(self.committed()), lambda name: storage.url(storage.join(folder, name)))
        return agree(plan, exchange, where=self.url)

    def release(self) -> None:
        """Give up the folder lock (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def upload_leftovers(self, uploader: Uploader, filename: NameFormat, pointer: str | None) -> None:
        """Upload (and wait for) checkpoints an earlier run committed locally but did not get into the store.

        Global rank 0 runs it once, before ``"last"`` is loaded, so a restart resumes from them. Oldest
        first, so an incremental checkpoint's base is in the store before it; only each one's own files
        go up (a base's are uploaded with the base).
        """
        if not self.remote or self.local_root is None:
            return
        stored = list_committed(self.storage, self.folder)
        in_store = {name for name, _ in stored}
        newest_stored = max((m.global_step for _, m in stored), default=-1)
        local_storage, root = Storage.open(self.local_root)
        missing = [(n, m) for n, m in list_committed(local_storage, root)
                   if n not in in_store and filename.parse(n) is not None]  # fmt: skip
        for index, (name, manifest) in enumerate(missing):
            log.info("Uploading %s, committed locally by an earlier run but not in %s", name, self.url)
            newest = index == len(missing) - 1 and manifest.global_step >= newest_stored  # it moves the pointer
            job = UploadJob(local_dir=os.path.join(root, name), name=name, files=[f.name for f in manifest.own_files],
                            commit=True, pointer=pointer if newest else None)  # fmt: skip
            uploader.submit(job)
        uploader.wait()

    def remove_leftovers(self, trainer: Trainer) -> None:
        """Before this run's first save: delete what killed saves, uploads and rotations left behind."""
        places = []
        if not self.remote and trainer.local_rank == 0:
            places.append((self.storage, self.folder))
        if self.remote:
            if trainer.is_global_zero:
                places.append((self.storage, self.folder))
            if trainer.local_rank == 0 and self.local_root is not None:
                places.append(Storage.open(self.local_root))
        for where, root in places:
            for name in remove_leftovers(where, root, self.is_mine):
                log.info("Removed %s, left by an interrupted save", where.url(where.join(root, name)))

    def lineage(
        self, trainer: Trainer, loaded: str | None, known: str | None, storage_options: Mapping[str, Any]
    ) -> str:
        """The run id this fit saves under: ``known``, else the resumed checkpoint's, else a new one (rank 0's)."""
        run_id = known
        if run_id is None and loaded is not None:
            try:
                storage, path = Storage.open(loaded, storage_options)
                run_id = read_manifest(storage, path).metadata.get(RUN_ID_KEY)
            except Exception:  # a legacy .ckpt file or another library's checkpoint: a new run
                run_id = None
        proposal = str(run_id) if run_id is not None else uuid.uuid4().hex[:16]
        return decide_on_rank_zero(trainer, lambda: proposal)  # every rank, always: one broadcast

    def records(self, filename: NameFormat) -> list[CheckpointRecord]:
        """Records of this saver's committed checkpoints in the folder, oldest first."""
        return [r for r in scan_records(self.storage, self.folder, filename) if self.is_mine(r.name)]

    def refuse_newer(self, named: Collection[CheckpointRecord], start: int) -> None:
        """Refuse to train when the folder holds checkpoints of this saver newer than step ``start``."""
        newer = [r.name for r in named if r.step > start]
        if newer:
            raise FolderConflictError(
                f"folder {self.url!r} already holds checkpoints newer than step {start}"
                f" ({', '.join(newer[:5])}). Resume with trainer.fit(..., ckpt_path='last'), pass"
                " CheckpointSaver(overwrite=True) to save over them, or choose another folder."
            )
