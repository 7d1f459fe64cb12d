"""``ShardedCheckpointIO``: the Lightning ``CheckpointIO`` adapter (mechanism, no policy).

Two ways in:

* ``save_checkpoint`` — Lightning's contract, called on global rank 0 only (stock
  ``ModelCheckpoint``, ``trainer.save_checkpoint``): a one-shard checkpoint, written atomically,
  never waiting on other ranks, so nothing can deadlock.
* ``save_collective`` — called by :class:`~lightning_ckpt.CheckpointSaver` on **every** rank:
  each rank writes its share of the tensors, ranks meet at a barrier with a timeout, each
  writer group's leader commits (:mod:`lightning_ckpt.collective`).

Loading runs on every rank and accepts everything :func:`lightning_ckpt.discovery.resolve`
does, including legacy single-file ``.ckpt`` files. When a *folder* is given with several ranks
running, the ranks agree on the newest checkpoint committed in every rank's folder (node-local
disks can differ if a job died mid-commit).

Example:
    >>> import lightning as L
    >>> trainer = L.Trainer(plugins=[ShardedCheckpointIO()], logger=False, enable_progress_bar=False)
    >>> type(trainer.strategy.checkpoint_io).__name__
    'ShardedCheckpointIO'
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from typing_extensions import override

from lightning_ckpt.checkpoint import remove_checkpoint_dir
from lightning_ckpt.collective import (
    SaveResult,
    WriterHook,
    collective_save,
    discover_peers,
    new_nonce,
    save_checkpoint_dir,
)
from lightning_ckpt.discovery import Resolved, list_committed, resolve
from lightning_ckpt.dist import Exchange
from lightning_ckpt.errors import CheckpointNotFoundError, ConfigError
from lightning_ckpt.reader import MapLocation, load_checkpoint_dir
from lightning_ckpt.storage import Storage

__all__ = ["ShardedCheckpointIO"]


class ShardedCheckpointIO(CheckpointIO):
    """Checkpoint IO that stores each checkpoint as a directory of raw tensor shards plus a manifest.

    Args:
        storage_options: fsspec options for remote paths (``s3://...``); never logged.
        verify_checksums: compare each file's CRC32 with the manifest when loading.
        barrier_timeout_s: how long ranks wait for each other during a collective save or load.
        writer_hooks: :class:`~lightning_ckpt.WriterHook` instances called around each collective commit.

    Example:
        >>> import tempfile, os, torch
        >>> io = ShardedCheckpointIO()
        >>> path = os.path.join(tempfile.mkdtemp(), "epoch=0-step=1.ckpt")
        >>> io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)
        >>> io.load_checkpoint(path)["state_dict"]["w"]
        tensor([1., 1.])
    """

    _instances = 0

    def __init__(
        self,
        *,
        storage_options: Mapping[str, Any] | None = None,
        verify_checksums: bool = True,
        barrier_timeout_s: float = 600.0,
        writer_hooks: Sequence[WriterHook] = (),
    ) -> None:
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise TypeError(
                f"storage_options must be a dict of fsspec options, got {type(storage_options).__name__};"
                " e.g. storage_options={'anon': False}"
            )
        if (
            isinstance(barrier_timeout_s, bool)
            or not isinstance(barrier_timeout_s, (int, float))
            or barrier_timeout_s <= 0
        ):
            raise ConfigError("barrier_timeout_s", barrier_timeout_s, "600 (seconds)", "It must be a positive number")
        if not all(isinstance(h, WriterHook) for h in writer_hooks):
            raise ConfigError(
                "writer_hooks", writer_hooks, "[MyHook()] where MyHook subclasses lightning_ckpt.WriterHook"
            )
        self.storage_options = dict(storage_options or {})
        self.verify_checksums = verify_checksums
        self.barrier_timeout_s = float(barrier_timeout_s)
        self.writer_hooks = list(writer_hooks)
        # Instances are created in the same order on every rank, so this names the same object everywhere.
        ShardedCheckpointIO._instances += 1
        self._namespace = f"io{ShardedCheckpointIO._instances}"
        self._saves = 0
        self._loads = 0
        self._nonce: str | None = None
        self._peers: dict[str, list[int]] = {}
        self._previous: Exchange | None = None
        self._redirects: dict[str, str] = {}
        self.loaded_path: str | None = None

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

    def save_collective(
        self,
        checkpoint: dict[str, Any],
        path: Any,
        *,
        latest_filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> SaveResult:
        """Save from every rank at once (all ranks must call this together)."""
        exchange = Exchange.current(prefix=f"{self._namespace}/save{self._saves}", timeout_s=self.barrier_timeout_s)
        self._saves += 1
        if self._nonce is None:
            self._nonce = exchange.child("nonce").broadcast("value", new_nonce() if exchange.rank == 0 else None)
        storage, target = Storage.open(os.fspath(path), self.storage_options)
        folder = storage.dirname(target)
        if folder not in self._peers:
            self._peers[folder] = discover_peers(exchange.child("peers"), storage, folder)
        previous, self._previous = self._previous, exchange
        return collective_save(
            checkpoint,
            os.fspath(path),
            exchange=exchange,
            previous=previous,
            nonce=f"{self._nonce}{self._saves}",
            peers=self._peers[folder],
            storage_options=self.storage_options,
            latest_filename=latest_filename,
            metadata=metadata,
            hooks=self.writer_hooks,
        )

    def redirect(self, path: str, checkpoint: str) -> None:
        """Load ``checkpoint`` the next time ``path`` is loaded (the saver's agreed ``"last"``)."""
        self._redirects[path] = checkpoint

    def _agree_on_newest(self, resolved: Resolved) -> Resolved:
        """With several ranks, pick the newest checkpoint committed in *every* rank's folder."""
        exchange = Exchange.current(prefix=f"{self._namespace}/load{self._loads}", timeout_s=self.barrier_timeout_s)
        self._loads += 1
        if exchange.world_size == 1:
            return resolved
        storage = resolved.storage
        folder = storage.dirname(resolved.path)
        mine = [[name, m.global_step] for name, m in list_committed(storage, folder)]
        views = exchange.barrier("committed", payload=mine)
        common = set.intersection(*({(n, s) for n, s in view} for view in views.values()))
        if not common:
            empty = [r for r, view in views.items() if not view]
            raise CheckpointNotFoundError(
                f"ranks found no checkpoint committed in every rank's folder (rank(s) {empty or 'none'} have none;"
                f" this rank's folder is {storage.url(folder)}); use a folder every node can read"
            )
        name = max(common, key=lambda item: (item[1], item[0]))[0]
        return Resolved(storage, storage.join(folder, name), "dir")

    @override
    def load_checkpoint(
        self, path: Any, map_location: MapLocation = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load a checkpoint directory, folder (newest committed), pointer, URL or legacy ``.ckpt`` file."""
        redirected = self._redirects.pop(os.fspath(path), None)
        resolved = resolve(redirected or os.fspath(path), self.storage_options)
        if resolved.from_folder and redirected is None:
            resolved = self._agree_on_newest(resolved)
        self.loaded_path = resolved.url
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
