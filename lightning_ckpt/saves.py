"""The sequence of collective saves of one plugin: their store namespace, run nonce, peers and exchanges.

Every rank creates its plugins in the same order, so ``io<N>`` names the same plugin on every
rank; save number ``k`` of that plugin talks over the exchange ``io<N>/save<k>``. The run nonce
(rank 0's, broadcast once) makes staging names unique per run, and the ranks that share each
folder (peers) are discovered once per folder. :meth:`CollectiveSaves.prepare` is the blocking
part of one save: it agrees on the plan and lays out (and stages) this rank's shard.

Example:
    >>> import os, tempfile, torch
    >>> from lightning_ckpt.collective import finish_save
    >>> saves = CollectiveSaves("doc")
    >>> exchange = saves.next_exchange(timeout_s=5)
    >>> target = os.path.join(tempfile.mkdtemp(), "ba1")
    >>> prepared = saves.prepare(exchange, {"w": torch.ones(2), "global_step": 1}, target, storage_options={})
    >>> finish_save(prepared).leader, exchange.prefix
    (True, 'doc/save0')
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from lightning_ckpt.collective import PreparedSave, WriterHook, discover_peers, new_nonce, prepare_save
from lightning_ckpt.dist import Exchange
from lightning_ckpt.incremental import IncrementalState
from lightning_ckpt.plan import ReplicatedTest
from lightning_ckpt.staging import StagingBuffer
from lightning_ckpt.storage import Storage

__all__ = ["CollectiveSaves"]


class CollectiveSaves:
    """Namespace, nonce, peers and the previous exchange of one plugin's collective saves."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.count = 0
        self._nonce: str | None = None
        self._peers: dict[str, list[int]] = {}
        self._previous: Exchange | None = None

    def next_exchange(self, timeout_s: float) -> Exchange:
        """The exchange of the next save (its rounds never mix with another save's)."""
        exchange = Exchange.current(prefix=f"{self.namespace}/save{self.count}", timeout_s=timeout_s)
        self.count += 1
        return exchange

    @property
    def upload_key(self) -> str:
        """The exchange namespace of the upload reports of the latest save (same on every member)."""
        return f"{self.namespace}/upload{self.count}"

    def prepare(
        self,
        exchange: Exchange,
        checkpoint: dict[str, Any],
        target: str,
        *,
        storage_options: Mapping[str, Any],
        latest_filename: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        hooks: Sequence[WriterHook] = (),
        staging: StagingBuffer | None = None,
        replicated: Collection[str] | ReplicatedTest | None = None,
        verify_replicas: bool = False,
        incremental: IncrementalState | None = None,
    ) -> PreparedSave:
        """The blocking part of one collective save into ``target`` (every rank calls it together)."""
        if self._nonce is None:
            self._nonce = exchange.child("nonce").broadcast("value", new_nonce() if exchange.rank == 0 else None)
        storage, local_target = Storage.open(target, storage_options)
        folder = storage.dirname(local_target)
        if folder not in self._peers:
            self._peers[folder] = discover_peers(exchange.child("peers"), storage, folder)
        previous, self._previous = self._previous, exchange
        return prepare_save(
            checkpoint,
            target,
            exchange=exchange,
            previous=previous,
            nonce=f"{self._nonce}{self.count}",
            peers=self._peers[folder],
            storage_options=storage_options,
            latest_filename=latest_filename,
            metadata=metadata,
            hooks=hooks,
            staging=staging,
            replicated=replicated,
            verify_replicas=verify_replicas,
            incremental=incremental,
        )
