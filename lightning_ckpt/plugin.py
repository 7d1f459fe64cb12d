"""``ShardedCheckpointIO``: the Lightning ``CheckpointIO`` adapter (mechanism, no policy).

Lightning calls ``save_checkpoint`` on global rank 0 only; this plugin therefore writes a
one-shard checkpoint directory there, atomically, and never waits on other ranks. Loading runs
on every rank and accepts everything :func:`lightning_ckpt.discovery.resolve` does, including
legacy single-file ``.ckpt`` checkpoints written by ``torch.save``.

Example:
    >>> import lightning as L
    >>> trainer = L.Trainer(plugins=[ShardedCheckpointIO()], logger=False, enable_progress_bar=False)
    >>> type(trainer.strategy.checkpoint_io).__name__
    'ShardedCheckpointIO'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from typing_extensions import override

from lightning_ckpt.checkpoint import remove_checkpoint_dir, save_checkpoint_dir
from lightning_ckpt.discovery import resolve
from lightning_ckpt.reader import MapLocation, load_checkpoint_dir
from lightning_ckpt.storage import Storage

__all__ = ["ShardedCheckpointIO"]


class ShardedCheckpointIO(CheckpointIO):
    """Checkpoint IO that stores each checkpoint as a directory of raw tensor shards plus a manifest.

    Args:
        storage_options: fsspec options for remote paths (``s3://...``); never logged.
        verify_checksums: compare each file's CRC32 with the manifest when loading.

    Example:
        >>> import tempfile, os, torch
        >>> io = ShardedCheckpointIO()
        >>> path = os.path.join(tempfile.mkdtemp(), "epoch=0-step=1.ckpt")
        >>> io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)
        >>> io.load_checkpoint(path)["state_dict"]["w"]
        tensor([1., 1.])
    """

    def __init__(self, *, storage_options: Mapping[str, Any] | None = None, verify_checksums: bool = True) -> None:
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise TypeError(
                f"storage_options must be a dict of fsspec options, got {type(storage_options).__name__};"
                " e.g. storage_options={'anon': False}"
            )
        self.storage_options = dict(storage_options or {})
        self.verify_checksums = verify_checksums

    def __repr__(self) -> str:
        return f"ShardedCheckpointIO(verify_checksums={self.verify_checksums})"

    def _options(self, storage_options: Any) -> dict[str, Any]:
        if storage_options is None:
            return self.storage_options
        if not isinstance(storage_options, Mapping):
            raise TypeError(f"storage_options must be a dict of fsspec options, got {type(storage_options).__name__}")
        return {**self.storage_options, **storage_options}

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` as a one-shard checkpoint directory at ``path`` (atomic locally)."""
        save_checkpoint_dir(checkpoint, os.fspath(path), storage_options=self._options(storage_options))

    @override
    def load_checkpoint(
        self, path: Any, map_location: MapLocation = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load a checkpoint directory, folder (newest committed), pointer, URL or legacy ``.ckpt`` file."""
        resolved = resolve(os.fspath(path), self.storage_options)
        if resolved.kind == "dir":
            return load_checkpoint_dir(
                resolved.storage,
                resolved.path,
                map_location=map_location,
                weights_only=weights_only,
                verify_checksums=self.verify_checksums,
            )
        with resolved.storage.open_read(resolved.path) as f:
            loaded = torch.load(f, map_location=map_location, weights_only=weights_only)
        if not isinstance(loaded, dict):
            raise TypeError(f"{resolved.url} holds a {type(loaded).__name__}, not a Lightning checkpoint dict")
        return loaded

    @override
    def remove_checkpoint(self, path: Any) -> None:
        """Delete a checkpoint (manifest first) or a legacy file; a missing path is not an error."""
        storage, target = Storage.open(os.fspath(path), self.storage_options)
        if storage.exists(target):
            remove_checkpoint_dir(storage, target)

    @override
    def teardown(self) -> None:
        """Nothing runs in the background yet; kept for Lightning's contract."""
