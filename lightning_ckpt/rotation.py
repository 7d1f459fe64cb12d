"""Which checkpoints a saver owns on storage, and deleting the ones its retention policy drops.

Only committed checkpoints directly inside the saver's folder *whose names match its filename
format* are ever considered, so another saver (or another run) sharing the folder is never
touched. The newest checkpoint and the one training resumed from are always protected.

Example:
    >>> import tempfile, os, torch
    >>> from lightning_ckpt.collective import save_checkpoint_dir
    >>> from lightning_ckpt.layout import NameFormat
    >>> from lightning_ckpt.policies import KeepLatest
    >>> from lightning_ckpt.storage import Storage
    >>> storage, folder = Storage.open(tempfile.mkdtemp())
    >>> for step in (1, 2, 3):
    ...     _ = save_checkpoint_dir({"global_step": step, "w": torch.ones(1)}, os.path.join(folder, f"ba{step}"))
    >>> records = scan_records(storage, folder, NameFormat("ba{batch}", argument="filename"))
    >>> rotate(storage, folder, records, KeepLatest(1))
    ['ba1', 'ba2']
    >>> sorted(os.listdir(folder))
    ['ba3']
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection

from lightning_ckpt import layout
from lightning_ckpt.checkpoint import remove_checkpoint_dir
from lightning_ckpt.discovery import list_committed
from lightning_ckpt.errors import CheckpointError
from lightning_ckpt.incremental import references_in
from lightning_ckpt.layout import NameFormat
from lightning_ckpt.policies import CheckpointRecord, RetentionPolicy, plan_deletions
from lightning_ckpt.storage import Storage

__all__ = [
    "METRIC_KEY",
    "RUN_ID_KEY",
    "check_writable",
    "delete_checkpoints",
    "deletion_order",
    "rotate",
    "scan_records",
]

log = logging.getLogger("lightning_ckpt")

METRIC_KEY = "monitor_value"
RUN_ID_KEY = "run_id"  # manifest metadata: which run saved the checkpoint (rotation stays within its run)


def scan_records(storage: Storage, folder: str, filename: NameFormat) -> list[CheckpointRecord]:
    """Committed checkpoints in ``folder`` named by ``filename``, oldest first."""
    records = []
    for name, manifest in list_committed(storage, folder):
        if filename.parse(name) is None:
            continue
        metric = manifest.metadata.get(METRIC_KEY)
        run_id = manifest.metadata.get(RUN_ID_KEY)
        records.append(
            CheckpointRecord(
                name=name,
                epoch=manifest.epoch,
                step=manifest.global_step,
                metric=float(metric) if metric is not None else None,
                run_id=str(run_id) if run_id is not None else None,
            )
        )
    return records


def rotate(
    storage: Storage,
    folder: str,
    records: list[CheckpointRecord],
    policy: RetentionPolicy,
    *,
    protected: Collection[str] = (),
    delete: bool = True,
) -> list[str]:
    """Delete what ``policy`` drops (never the newest or ``protected``); return the dropped names.

    ``records`` is updated in place to list only what remains. With ``delete=False`` only the
    records change: ranks that share a folder keep the same list, and one of them deletes.
    """
    keep_always = set(protected)
    if records:
        keep_always.add(records[-1].name)
    doomed = plan_deletions(records, policy, protected=keep_always)
    if delete:
        held = set(delete_checkpoints(storage, folder, doomed))
        doomed = [name for name in doomed if name not in held]
    records[:] = [r for r in records if r.name not in set(doomed)]
    return doomed


def deletion_order(storage: Storage, folder: str, names: Collection[str]) -> tuple[list[str], list[str]]:
    """``names`` split into what may be deleted, in a safe order, and what incremental checkpoints still need.

    A checkpoint is kept while any checkpoint of ``folder`` that is not being deleted references its
    files (:func:`lightning_ckpt.incremental.references_in`); among those deleted, the ones that
    reference others go first, so a crash between two deletions never leaves a dangling reference.

    Example:
        >>> import tempfile
        >>> deletion_order(*Storage.open(tempfile.mkdtemp()), ["ba1", "ba2"])
        (['ba1', 'ba2'], [])
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return [], []
    references = references_in(storage, folder)
    doomed = set(wanted)
    while held := {r for name, refs in references.items() if name not in doomed for r in refs} & doomed:
        doomed -= held
    order = [n for n in wanted if n in doomed and n in references] + [
        n for n in wanted if n in doomed and n not in references
    ]
    return order, [n for n in wanted if n not in doomed]


def delete_checkpoints(
    storage: Storage, folder: str, names: Collection[str], *, retry: Collection[str] = ()
) -> list[str]:
    """Delete checkpoints of ``folder`` by name, each manifest first (a half-deleted one never looks committed).

    A checkpoint whose files a remaining incremental checkpoint reads is not deleted (see
    :func:`deletion_order`); the names kept for that reason are returned, to be passed as ``retry``
    to a later call, which deletes those still there once nothing reads them.
    """
    again = [n for n in sorted(set(retry) - set(names)) if storage.exists(storage.join(folder, n))]
    order, held = deletion_order(storage, folder, [*names, *again])
    for name in order:
        log.info("Removing old checkpoint %s", storage.url(storage.join(folder, name)))
        remove_checkpoint_dir(storage, storage.join(folder, name))
    if held:
        log.info("Keeping %s in %s for now: incremental checkpoints still read tensors from them", held,
                 storage.url(folder))  # fmt: skip
    return held


def check_writable(storage: Storage, folder: str) -> None:
    """Fail fast, before training, when ``folder`` cannot be written: write and delete a small object.

    Raises:
        CheckpointError: naming the URL and the underlying error.
    """
    probe = storage.join(folder, layout.probe_filename(uuid.uuid4().hex[:12], 0))
    try:
        storage.makedirs(folder)
        storage.write_bytes_atomic(probe, b"")
        storage.remove_file(probe)
    except Exception as err:
        hint = (
            "choose a folder this process can write (a read-only mount, permissions or a full disk stop it)"
            if storage.is_local
            else "check the bucket name, credentials and storage_options"
        )
        raise CheckpointError(
            f"folder={storage.url(folder)!r} is not writable ({type(err).__name__}: {err}); {hint}"
        ) from err
