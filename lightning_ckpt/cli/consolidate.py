"""``lightning-ckpt consolidate``: a checkpoint of any number of shards as one standard ``torch.save`` file."""

from __future__ import annotations

import argparse
import io
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any, cast

import torch

from lightning_ckpt import layout
from lightning_ckpt.cli._common import human_size, progress, resolve_dir
from lightning_ckpt.cli.cp import copy_checkpoint
from lightning_ckpt.cli.verify import verify_checkpoint
from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.localfs import fsync_dir
from lightning_ckpt.reader import load_checkpoint_dir, read_manifest
from lightning_ckpt.storage import Storage

__all__ = ["cmd_consolidate", "consolidate"]


def _save_atomic(obj: Any, out: str, total: int) -> None:
    """``torch.save`` into a temporary file next to ``out``, fsync, then rename onto ``out``."""
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=layout.temp_prefix(os.path.basename(out)), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f, progress(total, "write") as bar:
            torch.save(obj, cast(IO[bytes], _CountingWriter(f, bar.update)))
            bar.total = bar.n  # ``total`` was an estimate (the checkpoint's size): end the bar at 100 %
            bar.refresh()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _CountingWriter(io.RawIOBase):
    """A write-only stream that forwards to ``target`` and reports each write's length."""

    def __init__(self, target: IO[bytes], report: Callable[[int], object]) -> None:
        super().__init__()
        self._target, self._report = target, report

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = self._target.write(data)
        self._report(n)
        return n

    def flush(self) -> None:
        self._target.flush()


def consolidate(
    src: str, out: str, storage_options: dict[str, Any] | None = None, *, allow_pickle: bool = False
) -> str:
    """Write the checkpoint ``src`` (any number of shards, local or remote) as one ``torch.save`` file ``out``.

    The result is the full checkpoint dict (as :func:`lightning_ckpt.read_checkpoint` returns it),
    so ``MyModule.load_from_checkpoint(out)`` and ``torch.load(out)`` read it. Every file is
    verified first; ``out`` appears atomically (temporary file + rename). Remote checkpoints are
    downloaded (and verified) into a temporary directory first.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> root = tempfile.mkdtemp()
        >>> src = save_checkpoint_dir({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, os.path.join(root, "a"))
        >>> torch.load(consolidate(src, os.path.join(root, "a.ckpt")))["state_dict"]["w"]
        tensor([1., 1.])
    """
    storage, ckpt_dir = resolve_dir(src, storage_options or {})
    with tempfile.TemporaryDirectory(prefix="lightning-ckpt-") as scratch:
        if not storage.is_local:
            local = copy_checkpoint(
                storage.url(ckpt_dir), os.path.join(scratch, storage.basename(ckpt_dir)), storage_options
            )
            storage, ckpt_dir = Storage.open(local)
        manifest = read_manifest(storage, ckpt_dir)
        failed = [(name, why) for name, why in verify_checkpoint(storage, ckpt_dir, manifest) if why is not None]
        if failed:
            raise CorruptCheckpointError(failed[0][1])
        checkpoint = load_checkpoint_dir(storage, ckpt_dir, weights_only=not allow_pickle, verify_checksums=False)
        _save_atomic(checkpoint, out, manifest.total_bytes)  # loaded tensors own their memory
    return out


def cmd_consolidate(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``consolidate CKPT OUT``: write one standard ``.ckpt`` file.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> root = tempfile.mkdtemp()
        >>> src = save_checkpoint_dir({"state_dict": {"w": torch.ones(2)}}, os.path.join(root, "a"))
        >>> cmd_consolidate(argparse.Namespace(ckpt=src, out=os.path.join(root, "a.ckpt"), allow_pickle=False), {})
        ... # doctest: +ELLIPSIS
        wrote .../a.ckpt (... KiB)
        0
    """
    out = consolidate(args.ckpt, args.out, options, allow_pickle=args.allow_pickle)
    print(f"wrote {out} ({human_size(os.path.getsize(out))})")
    return 0
