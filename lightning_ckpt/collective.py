"""The collective save: every rank writes its own shard, ranks meet at a barrier, the leader commits.

Call sequence (every rank calls :func:`collective_save` at the same point of training):

1. (all ranks) **plan**: post the target path; ranks that see the same storage
   (:func:`discover_peers`, probed once per folder) *and* save to the same path form a writer
   group. Its lowest rank is the group's leader. On a shared filesystem or object store that is
   one group of all ranks; with node-local disks it is one group per node, so every node holds a
   complete copy; with ``{rank}`` in the name it is one group per rank.
2. (all ranks) split the group's tensors across its members, balanced by bytes
   (:func:`~lightning_ckpt.sharding.assign_by_bytes`), and write this rank's shard durably;
   the leader also writes ``objects.pt``.
3. (all ranks) ``WriterHook.pre_commit(path, rank=...)`` for every hook.
4. (all ranks) **barrier** ``written`` with ``barrier_timeout_s``: every rank reports its files or
   its error. If any rank failed or did not arrive, every rank raises
   :class:`~lightning_ckpt.dist.CollectiveError` naming those ranks; nothing is committed and
   the previous checkpoint stays the latest.
5. (leaders) write ``manifest.json`` (the commit), publish the directory, move ``latest``.
6. (leaders) ``WriterHook.post_commit(path, rank=...)`` for every hook.
7. (all ranks) **barrier** ``committed``: a failed commit raises on every rank.

Step 1 and the layout (and, for an asynchronous save, the copy of this rank's tensors into a
staging buffer) are :func:`prepare_save`, the part that blocks training; steps 2-7 are
:func:`finish_save`, which may run on a background thread: the barriers go through the key-value
store, never through a collective of the process group, so they do not interfere with training.

Example:
    >>> import tempfile, os, torch
    >>> from lightning_ckpt.dist import Exchange
    >>> folder = tempfile.mkdtemp()
    >>> result = collective_save({"w": torch.ones(2), "global_step": 3}, os.path.join(folder, "ba3"),
    ...                          exchange=Exchange.current(prefix="doc", timeout_s=10), nonce="n1")
    >>> result.leader, sorted(os.listdir(result.path))
    (True, ['manifest.json', 'objects.pt', 'shard-00000-of-00001.safetensors'])
"""

from __future__ import annotations

import abc
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_ckpt import _faults, layout
from lightning_ckpt.agree import agree_on_plan
from lightning_ckpt.checkpoint import (
    PreparedShard,
    library_versions,
    pickle_objects,
    prepare_shard,
    write_objects,
    write_prepared_shard,
)
from lightning_ckpt.commit import check_target, commit_dir, stage_dir, update_latest
from lightning_ckpt.dist import Exchange
from lightning_ckpt.errors import PlanError
from lightning_ckpt.manifest import FileEntry, Manifest, TensorEntry
from lightning_ckpt.plan import paused_gc, replicated_test
from lightning_ckpt.staging import StagingBuffer
from lightning_ckpt.storage import Storage

__all__ = [
    "PreparedSave",
    "SaveResult",
    "WriterHook",
    "collective_save",
    "discover_peers",
    "finish_save",
    "new_nonce",
    "prepare_save",
    "save_checkpoint_dir",
]


@dataclass(frozen=True)
class SaveResult:
    """What a collective save did on this rank.

    Attributes:
        path: the committed checkpoint (path or URL).
        group: the ranks that wrote it together (same storage, same path).
        leader: whether this rank committed it (and so owns deletions in its folder).
        files: the names of the files this rank wrote.
    """

    path: str
    group: tuple[int, ...]
    leader: bool
    files: tuple[str, ...] = ()


class WriterHook(abc.ABC):
    """Actions around the commit of a collective save.

    * ``pre_commit(path, rank=...)`` runs on **every rank**, after that rank's shard is durable
      and before the barrier. Raising here fails the save on every rank; nothing is committed.
    * ``post_commit(path, rank=...)`` runs on **each writer group's leader** (rank 0 when the
      folder is shared) right after the manifest is written and ``latest`` moved.

    Example:
        >>> class Announce(WriterHook):
        ...     def pre_commit(self, path, **kwargs): pass
        ...     def post_commit(self, path, **kwargs): print("committed", os.path.basename(path))
        >>> Announce().post_commit("/ckpts/ep1-ba8")
        committed ep1-ba8
    """

    @abc.abstractmethod
    def pre_commit(self, path: str, **kwargs: Any) -> None:
        """Called on every rank once its files are durable, before the barrier; raise to fail the save.

        ``kwargs`` holds ``rank``, this process's global rank.

        Example:
            >>> import os, tempfile, torch
            >>> from lightning_ckpt import ShardedCheckpointIO, WriterHook
            >>> class QuotaCheck(WriterHook):
            ...     def pre_commit(self, path, **kwargs): raise RuntimeError("over quota")
            ...     def post_commit(self, path, **kwargs): pass
            >>> path = os.path.join(tempfile.mkdtemp(), "ep0-ba8")
            >>> try:
            ...     ShardedCheckpointIO(writer_hooks=[QuotaCheck()]).save_collective({"w": torch.ones(2)}, path)
            ... except RuntimeError as err:
            ...     print(err, "| committed:", os.path.exists(os.path.join(path, "manifest.json")))
            over quota | committed: False
        """

    @abc.abstractmethod
    def post_commit(self, path: str, **kwargs: Any) -> None:
        """Called on each group leader after the checkpoint is committed (``kwargs`` holds ``rank``).

        Example:
            >>> import os, tempfile, torch
            >>> from lightning_ckpt import ShardedCheckpointIO, WriterHook
            >>> class Announce(WriterHook):
            ...     def pre_commit(self, path, **kwargs): pass
            ...     def post_commit(self, path, **kwargs): print("rank", kwargs["rank"], "committed", path[-7:])
            >>> io = ShardedCheckpointIO(writer_hooks=[Announce()])
            >>> _ = io.save_collective({"w": torch.ones(2)}, os.path.join(tempfile.mkdtemp(), "ep0-ba8"))
            rank 0 committed ep0-ba8
        """


def discover_peers(exchange: Exchange, storage: Storage, folder: str) -> list[int]:
    """Ranks whose folder is the same storage as this rank's (probe files; all ranks call this)."""
    if exchange.world_size == 1:
        return [0]
    probe = exchange.child("probe")
    token = probe.broadcast("token", uuid.uuid4().hex[:12] if exchange.rank == 0 else None)
    storage.makedirs(folder)
    mine = storage.join(folder, layout.probe_filename(token, exchange.rank))
    storage.write_bytes_atomic(mine, b"")
    probe.barrier("written")
    peers = sorted(r for n in storage.listdir(folder) if (r := layout.parse_probe_filename(n, token)) is not None)
    probe.barrier("read")
    storage.remove_file(mine)
    return peers


def _entries(payload: Mapping[str, Any]) -> tuple[list[FileEntry], list[TensorEntry]]:
    """A rank's file and tensor entries from its ``written`` payload (rows in field order, see :func:`_payload`)."""
    with paused_gc():
        files = [FileEntry(*row) for row in payload["files"]]
        rows = payload["tensors"]
        tensors = [TensorEntry(k, dt, tuple(shape), f, off, n, dev) for k, dt, shape, f, off, n, dev in rows]
    return files, tensors


def _payload(files: Sequence[FileEntry], tensors: Sequence[TensorEntry]) -> dict[str, Any]:
    """This rank's entries as JSON-able rows in field order (no ``dataclasses.asdict``: 100,000 tensors are cheap)."""
    with paused_gc():
        return {
            "files": [[f.name, f.size, f.checksum, f.rank] for f in files],
            "tensors": [[t.key, t.dtype, list(t.shape), t.file, t.offset, t.nbytes, t.device] for t in tensors],
        }


@dataclass
class PreparedSave:
    """A collective save after its blocking part: the plan agreed, this rank's shard laid out (and staged).

    :func:`finish_save` writes and commits it, on the calling thread or in the background.
    """

    storage: Storage
    target: str
    group: list[int]
    rank: int
    leader: int
    pointer: str | None
    shard: PreparedShard | None
    objects: bytes | None
    info: dict[str, Any]
    exchange: Exchange
    nonce: str
    metadata: Mapping[str, Any] | None = None
    hooks: Sequence[WriterHook] = ()
    error: BaseException | None = None
    keys: frozenset[str] = frozenset()

    @property
    def url(self) -> str:
        """The checkpoint being saved (path or URL)."""
        return self.storage.url(self.target)

    @property
    def nbytes(self) -> int:
        """Bytes this rank writes."""
        return (self.shard.nbytes if self.shard else 0) + len(self.objects or b"")

    @property
    def result(self) -> SaveResult:
        """What the save does on this rank once finished."""
        files = [] if self.shard is None else [self.shard.plan.file]
        if self.objects is not None:
            files.append(layout.OBJECTS_FILENAME)
        return SaveResult(path=self.url, group=tuple(self.group), leader=self.rank == self.leader, files=tuple(files))


def prepare_save(
    checkpoint: Mapping[str, Any],
    path: str,
    *,
    exchange: Exchange,
    nonce: str,
    peers: Sequence[int] = (0,),
    storage_options: Mapping[str, Any] | None = None,
    latest_filename: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    hooks: Sequence[WriterHook] = (),
    previous: Exchange | None = None,
    staging: StagingBuffer | None = None,
    replicated: Any = None,
    verify_replicas: bool = False,
) -> PreparedSave:
    """The blocking part of :func:`collective_save`: agree on the plan, split, snapshot this rank's share.

    The plan (:mod:`lightning_ckpt.agree`) writes ``replicated`` tensors (keys, or a test
    ``(key, tensor) -> bool``; see :func:`lightning_ckpt.plan.replicated_test`) split across the
    group and everything else from the leader's copy. A checkpoint that cannot be saved correctly
    raises :class:`~lightning_ckpt.errors.PlanError` on every rank before anything is written.

    With ``staging`` every tensor and the pickled non-tensor state are copied, so training may
    change them as soon as this returns. An error after the plan is agreed is kept and reported to
    every rank at the ``written`` barrier of :func:`finish_save`, so no rank is left waiting.
    """
    storage, target = Storage.open(path, storage_options)
    agreed = agree_on_plan(
        exchange,
        checkpoint,
        target=storage.url(target),
        pointer=latest_filename,
        peers=peers,
        replicated=replicated_test(replicated),
        verify_replicas=verify_replicas,
        precheck=lambda: check_target(storage, target),  # a user's file or folder there: refused on every rank
    )
    if previous is not None:
        previous.cleanup()
    group = agreed.group
    index, leader = group.index(exchange.rank), group[0]
    prepared = PreparedSave(
        storage=storage,
        target=target,
        group=group,
        rank=exchange.rank,
        leader=leader,
        pointer=latest_filename if agreed.pointer else None,
        shard=None,
        objects=None,
        info=agreed.info,
        keys=frozenset(spec.key for spec in agreed.specs),
        exchange=exchange,
        nonce=nonce,
        metadata=dict(metadata or {}),
        hooks=tuple(hooks),
    )
    try:
        tensors = agreed.tensors
        prepared.shard = prepare_shard({k: tensors[k] for k in agreed.mine}, index=index, count=len(group),
                                       staging=staging)  # fmt: skip
        if index == 0:
            prepared.objects = pickle_objects(agreed.skeleton)
    except Exception as err:  # reported to every rank at the "written" barrier
        prepared.error = err
    return prepared


def finish_save(prepared: PreparedSave, *, direct_io: bool = True) -> SaveResult:
    """Write this rank's files, meet at the barrier, commit on the leader (steps 2-7 of the module docstring)."""
    storage, target, exchange = prepared.storage, prepared.target, prepared.exchange
    folder, name = storage.dirname(target), storage.basename(target)
    is_leader = exchange.rank == prepared.leader
    staged = ""
    error = prepared.error
    payload: dict[str, Any] = {}
    if error is None:
        try:
            assert prepared.shard is not None
            staged = stage_dir(storage, folder, name, token=prepared.nonce, leader=is_leader)
            _faults.reached("shard.before", exchange.rank)
            shard, entries = write_prepared_shard(storage, staged, prepared.shard, rank=exchange.rank,
                                                  direct_io=direct_io)  # fmt: skip
            files = [shard]
            if prepared.objects is not None:
                files.append(write_objects(storage, staged, prepared.objects, rank=exchange.rank))
            for hook in prepared.hooks:
                hook.pre_commit(storage.url(target), rank=exchange.rank)
            payload = _payload(files, entries)
        except Exception as err:  # reported to every rank by the barrier below
            error = err
    try:
        written = exchange.barrier("written", payload=payload, error=error)
    except BaseException:
        if is_leader and staged and storage.is_local:
            storage.remove_tree(staged)
        raise
    commit_error: BaseException | None = None
    if is_leader:
        try:
            _commit(storage, folder, name, staged, prepared, written)
            for hook in prepared.hooks:
                hook.post_commit(storage.url(target), rank=exchange.rank)
        except Exception as err:
            commit_error = err
    exchange.barrier("committed", error=commit_error)
    return prepared.result


def collective_save(
    checkpoint: Mapping[str, Any],
    path: str,
    *,
    exchange: Exchange,
    nonce: str,
    peers: Sequence[int] = (0,),
    storage_options: Mapping[str, Any] | None = None,
    latest_filename: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    hooks: Sequence[WriterHook] = (),
    previous: Exchange | None = None,
    replicated: Any = None,
) -> SaveResult:
    """Save ``checkpoint`` at ``path`` from every rank (see the module docstring); returns when committed.

    Args:
        checkpoint: this rank's checkpoint dict (identical on every rank for replicated DDP state).
        path: this rank's checkpoint directory (path or URL).
        exchange: the ranks' exchange for this save (a fresh prefix per save).
        nonce: a run-unique token shared by all ranks (names the staging directory).
        peers: ranks that see the same storage as this rank (:func:`discover_peers`).
        storage_options: fsspec options for remote paths.
        latest_filename: the pointer to move after the commit, or ``None``.
        metadata: JSON-able extras stored in the manifest.
        hooks: :class:`WriterHook` instances.
        previous: the previous save's exchange; its last keys are deleted once every rank is here.
        replicated: tensors identical on every rank by construction (keys, or ``(key, tensor) -> bool``),
            written split across the group; the rest comes from the leader (:mod:`lightning_ckpt.plan`).
    """
    prepared = prepare_save(
        checkpoint,
        path,
        exchange=exchange,
        nonce=nonce,
        peers=peers,
        storage_options=storage_options,
        latest_filename=latest_filename,
        metadata=metadata,
        hooks=hooks,
        previous=previous,
        replicated=replicated,
    )
    return finish_save(prepared)


def _commit(
    storage: Storage, folder: str, name: str, staged: str, prepared: PreparedSave, written: Mapping[int, Any]
) -> None:
    files: list[FileEntry] = []
    tensors: dict[str, TensorEntry] = {}
    for rank in prepared.group:
        rank_files, rank_tensors = _entries(written[rank])
        files += rank_files
        tensors.update((t.key, t) for t in rank_tensors)
    if set(tensors) != prepared.keys:  # the written entries must be exactly the agreed plan
        missing, extra = sorted(prepared.keys - set(tensors)), sorted(set(tensors) - prepared.keys)
        raise PlanError(f"the ranks wrote a different set of tensors than planned (missing {missing[:3]},"
                        f" unexpected {extra[:3]}); nothing was committed")  # fmt: skip
    manifest = Manifest(
        name=name,
        epoch=prepared.info["epoch"],
        global_step=prepared.info["global_step"],
        world_size=len(prepared.group),
        files=files,
        tensors=tensors,
        weights_only=prepared.info["weights_only"],
        versions=library_versions(),
        metadata={**dict(prepared.metadata or {}), "writer_ranks": prepared.group},
    )
    _faults.reached("commit.before_manifest", prepared.exchange.rank)
    commit_dir(storage, folder, name, staged, manifest)
    _faults.reached("commit.before_pointer", prepared.exchange.rank)
    if prepared.pointer is not None:
        update_latest(storage, folder, name, prepared.pointer)


def new_nonce() -> str:
    """A run-unique token (call on rank 0 and broadcast).

    Example:
        >>> len(new_nonce()) == 12 and new_nonce() != new_nonce()
        True
    """
    return uuid.uuid4().hex[:12]


def save_checkpoint_dir(
    checkpoint: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    latest_filename: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Save ``checkpoint`` from this process alone as a one-shard checkpoint at ``path``.

    This is Lightning's rank-0 ``CheckpointIO.save_checkpoint`` contract: it never waits on other
    ranks. An existing checkpoint at ``path`` is replaced (atomically, locally) only once the new
    one is complete. Returns the committed path (a URL for remote stores).

    Example:
        >>> import tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> path = save_checkpoint_dir({"w": torch.zeros(2), "global_step": 4}, os.path.join(folder, "ep0-ba4"),
        ...                            latest_filename="latest")
        >>> os.readlink(os.path.join(folder, "latest"))
        'ep0-ba4'
    """
    name = os.path.basename(os.fspath(path).rstrip("/"))
    if not layout.is_plain_name(name):
        raise ValueError(f"path={os.fspath(path)!r} must name a checkpoint directory, e.g. '/data/ckpts/ep0-ba100'")
    alone = Exchange(None, 0, 1, prefix="single", timeout_s=0)
    result = collective_save(
        checkpoint,
        os.fspath(path),
        exchange=alone,
        nonce=new_nonce(),
        storage_options=storage_options,
        latest_filename=latest_filename,
        metadata=metadata,
    )
    return result.path
