"""``lightning-ckpt verify``: check the size and checksum of every file of a committed checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from lightning_ckpt.cli._common import PROG, human_size, progress, resolve_dir
from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.manifest import Manifest
from lightning_ckpt.reader import read_manifest, verify_files
from lightning_ckpt.storage import Storage

__all__ = ["cmd_verify", "verify_checkpoint"]


def verify_checkpoint(storage: Storage, ckpt_dir: str, manifest: Manifest) -> list[tuple[str, str | None]]:
    """Check every file's size and checksum; ``[(file, None if it verifies else why not)]``.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> saved = save_checkpoint_dir({"w": torch.ones(2)}, os.path.join(tempfile.mkdtemp(), "c"))
        >>> storage, path = Storage.open(saved)
        >>> [why for _, why in verify_checkpoint(storage, path, read_manifest(storage, path))]
        [None, None]
    """
    results: list[tuple[str, str | None]] = []
    with progress(manifest.total_bytes, "verify") as bar:
        for entry in manifest.files:
            one = dataclasses.replace(manifest, files=[entry], tensors={}, objects_file=None)
            try:
                verify_files(storage, ckpt_dir, one)
                results.append((entry.name, None))
            except CorruptCheckpointError as err:
                results.append((entry.name, str(err)))
            bar.update(entry.size)
    return results


def cmd_verify(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``verify CKPT``: one line per file; exit code 1 when any file fails.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> saved = save_checkpoint_dir({"w": torch.ones(2)}, os.path.join(tempfile.mkdtemp(), "c"))
        >>> cmd_verify(argparse.Namespace(ckpt=saved), {})  # doctest: +ELLIPSIS
        ok    shard-00000-of-00001.safetensors
        ok    objects.pt
        verified ...: 2 files, ...
        0
    """
    storage, ckpt_dir = resolve_dir(args.ckpt, options)
    manifest = read_manifest(storage, ckpt_dir)
    results = verify_checkpoint(storage, ckpt_dir, manifest)
    for name, why in results:
        print(f"ok    {name}" if why is None else f"FAIL  {name}: {why}")
    failed = [name for name, why in results if why is not None]
    if failed:
        print(f"{PROG}: error: {storage.url(ckpt_dir)}: {len(failed)} of {len(results)} files failed", file=sys.stderr)
        return 1
    print(f"verified {storage.url(ckpt_dir)}: {len(results)} files, {human_size(manifest.total_bytes)}")
    return 0
