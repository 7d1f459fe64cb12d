"""``lightning-ckpt prune``: the callback's retention rules on a folder (N newest, every M-th step, never latest)."""

from __future__ import annotations

import argparse
from typing import Any

from lightning_ckpt import layout
from lightning_ckpt.cli._common import UsageError, latest_name
from lightning_ckpt.errors import CheckpointNotFoundError
from lightning_ckpt.lock import FolderLock
from lightning_ckpt.policies import build_retention_policy
from lightning_ckpt.rotation import deletion_order, rotate, scan_records
from lightning_ckpt.storage import Storage

__all__ = ["cmd_prune", "prune"]

_ANY_NAME = "{run_name}"  # a NameFormat whose only variable matches any text: every checkpoint name


def prune(
    folder: str,
    keep: int,
    storage_options: dict[str, Any] | None = None,
    *,
    dry_run: bool = False,
    keep_every_n_steps: int | None = None,
) -> list[str]:
    """Delete all but the ``keep`` newest committed checkpoints of ``folder``; return the names (to be) deleted.

    The rules of ``CheckpointSaver(num_checkpoints_to_keep=keep, keep_every_n_steps=...)``: newest by
    step, also every checkpoint whose step is a multiple of ``keep_every_n_steps``, and never the
    newest checkpoint or the one ``latest`` points to, nor one whose files a checkpoint left in the folder
    reads (an incremental checkpoint's base). Each is deleted manifest first. Deleting
    takes the folder's lock (:mod:`lightning_ckpt.lock`), so it is refused while a run saves there.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> folder = tempfile.mkdtemp()
        >>> for step in (1, 2, 3):
        ...     _ = save_checkpoint_dir({"w": torch.ones(1), "global_step": step}, os.path.join(folder, f"ba{step}"))
        >>> prune(folder, 1, dry_run=True), sorted(os.listdir(folder))
        (['ba1', 'ba2'], ['ba1', 'ba2', 'ba3'])
        >>> prune(folder, 1, dry_run=True, keep_every_n_steps=2)
        ['ba1']
    """
    policy = build_retention_policy(num_checkpoints_to_keep=keep, keep_every_n_steps=keep_every_n_steps)
    storage, root = Storage.open(folder, storage_options)
    if not storage.isdir(root):
        raise CheckpointNotFoundError(f"{storage.url(root)} is not a folder of checkpoints")
    records = scan_records(storage, root, layout.NameFormat(_ANY_NAME, argument="FOLDER"))
    latest = latest_name(storage, root)
    protected = {latest} if latest else set()
    if dry_run:
        return deletion_order(storage, root, rotate(storage, root, records, policy, protected=protected, delete=False))[
            0
        ]
    lock = FolderLock.acquire(storage, root, run_name="lightning-ckpt prune")  # refused while a run saves there
    try:
        return rotate(storage, root, records, policy, protected=protected)
    finally:
        lock.release()


def cmd_prune(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``prune FOLDER --keep N [--keep-every-n-steps M] [--dry-run]``.

    Example:
        >>> import tempfile
        >>> cmd_prune(argparse.Namespace(folder=tempfile.mkdtemp(), keep=1, keep_every_n_steps=None, dry_run=True), {})
        nothing to delete
        0
    """
    if args.keep < 0:
        raise UsageError(f"--keep must be >= 0, got {args.keep}")
    if args.keep_every_n_steps is not None and args.keep_every_n_steps < 1:
        raise UsageError(f"--keep-every-n-steps must be >= 1, got {args.keep_every_n_steps}")
    doomed = prune(args.folder, args.keep, options, dry_run=args.dry_run, keep_every_n_steps=args.keep_every_n_steps)
    verb = "would delete" if args.dry_run else "deleted"
    for name in doomed:
        print(f"{verb} {name}")
    if not doomed:
        print("nothing to delete")
    return 0
