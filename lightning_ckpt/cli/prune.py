"""``lightning-ckpt prune``: delete all but the N newest committed checkpoints of a folder (never the latest)."""

from __future__ import annotations

import argparse
from typing import Any

from lightning_ckpt import layout
from lightning_ckpt.cli._common import UsageError, latest_name
from lightning_ckpt.errors import CheckpointNotFoundError
from lightning_ckpt.lock import FolderLock
from lightning_ckpt.policies import KeepLatest
from lightning_ckpt.rotation import rotate, scan_records
from lightning_ckpt.storage import Storage

__all__ = ["cmd_prune", "prune"]

_ANY_NAME = "{run_name}"  # a NameFormat whose only variable matches any text: every checkpoint name


def prune(folder: str, keep: int, storage_options: dict[str, Any] | None = None, *, dry_run: bool = False) -> list[str]:
    """Delete all but the ``keep`` newest committed checkpoints of ``folder``; return the names (to be) deleted.

    The rules of ``CheckpointSaver(num_checkpoints_to_keep=keep)``: newest by step, and never the
    newest checkpoint or the one ``latest`` points to. Each is deleted manifest first. Deleting
    takes the folder's lock (:mod:`lightning_ckpt.lock`), so it is refused while a run saves there.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> folder = tempfile.mkdtemp()
        >>> for step in (1, 2, 3):
        ...     _ = save_checkpoint_dir({"w": torch.ones(1), "global_step": step}, os.path.join(folder, f"ba{step}"))
        >>> prune(folder, 1, dry_run=True), sorted(os.listdir(folder))
        (['ba1', 'ba2'], ['ba1', 'ba2', 'ba3'])
    """
    storage, root = Storage.open(folder, storage_options)
    if not storage.isdir(root):
        raise CheckpointNotFoundError(f"{storage.url(root)} is not a folder of checkpoints")
    records = scan_records(storage, root, layout.NameFormat(_ANY_NAME, argument="FOLDER"))
    latest = latest_name(storage, root)
    protected = {latest} if latest else set()
    if dry_run:
        return rotate(storage, root, records, KeepLatest(keep), protected=protected, delete=False)
    lock = FolderLock.acquire(storage, root, run_name="lightning-ckpt prune")  # refused while a run saves there
    try:
        return rotate(storage, root, records, KeepLatest(keep), protected=protected)
    finally:
        lock.release()


def cmd_prune(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``prune FOLDER --keep N [--dry-run]``.

    Example:
        >>> import tempfile
        >>> cmd_prune(argparse.Namespace(folder=tempfile.mkdtemp(), keep=1, dry_run=True), {})
        nothing to delete
        0
    """
    if args.keep < 0:
        raise UsageError(f"--keep must be >= 0, got {args.keep}")
    doomed = prune(args.folder, args.keep, options, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for name in doomed:
        print(f"{verb} {name}")
    if not doomed:
        print("nothing to delete")
    return 0
