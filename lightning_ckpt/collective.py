"""The collective save: every rank writes its own shard, ranks meet at a barrier, the leader commits.

Call sequence (every rank calls :func:`prepare_save`, then :func:`finish_save`, at the same point of training):

1. (all ranks) **plan**: post the target path; ranks that see the same storage
   (:func:`discover_peers`, probed once per folder) *and* save to the same path form a writer
   group. Its lowest rank is the group's leader. On a shared filesystem or object store that is
   one group of all ranks; with node-local disks it is one group per node, so every node holds a
   complete copy; with ``{rank}`` in the name it is one group per rank.
2. (all ranks) split the group's tensors across its members, balanced by bytes
   (:func:`~lightning_ckpt.plan.assign`), and write this rank's shard durably;
   the leader also writes ``objects.pt``.
3. (all ranks) ``WriterHook.pre_commit(path, rank=...)`` for every hook (:mod:`lightning_ckpt.hooks`).
4. (all ranks) **barrier** ``written`` with ``barrier_timeout_s``: every rank reports its files or
   its error. If any rank failed or did not arrive, every rank raises
   :class:`~lightning_ckpt.dist.CollectiveError` naming those ranks; nothing is committed and
   the previous checkpoint stays the latest.
5. (leaders) write ``manifest.json`` (the commit; :mod:`lightning_ckpt.assembly`), publish the directory,
   move ``latest``.
6. (leaders) ``WriterHook.post_commit(path, rank=...)`` for every hook.
7. (all ranks) **barrier** ``committed``: a failed commit raises on every rank.

Step 1 and the layout (and, for an asynchronous save, the copy of this rank's tensors into a
staging buffer) are :func:`prepare_save`, the part that blocks training; steps 2-7 are
:func:`finish_save`, which may run on a background thread: the barriers go through the key-value
store, never through a collective of the process group, so they do not interfere with training.

A process saving alone (Lightning's rank-0 ``CheckpointIO.save_checkpoint``) runs the same
protocol over a one-rank exchange: :func:`prepare_alone`, then :func:`finish_save`.

Example:
    >>> import tempfile, os, torch
    >>> from lightning_ckpt.dist import Exchange
    >>> folder = tempfile.mkdtemp()
    >>> prepared = prepare_save({"w": torch.ones(2), "global_step": 3}, os.path.join(folder, "ba3"),
    ...                         exchange=Exchange.current(prefix="doc", timeout_s=10), nonce="n1")
    >>> result = finish_save(prepared)
    >>> result.leader, sorted(os.listdir(result.path))
    (True, ['manifest.json', 'objects.pt', 'shard-00000-of-00001.safetensors'])
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_ckpt import _faults, layout
from lightning_ckpt.agree import agree_on_plan
from lightning_ckpt.assembly import assemble_manifest, entry_rows
from lightning_ckpt.checkpoint import PreparedShard, pickle_objects, prepare_shard, write_objects, write_prepared_shard
from lightning_ckpt.commit import Commit, commit_dir, stage_dir, update_latest
from lightning_ckpt.dist import Exchange
from lightning_ckpt.hooks import WriterHook as WriterHook
from lightning_ckpt.incremental import Base, IncrementalState, check_references
from lightning_ckpt.plan import replicated_test
from lightning_ckpt.staging import StagingBuffer
from lightning_ckpt.storage import Storage
from lightning_ckpt.targets import check_target

__all__ = [
    "PreparedSave",
    "SaveResult",
    "WriterHook",
    "checkpoint_dir_path",
    "discover_peers",
    "finish_save",
    "new_nonce",
    "prepare_alone",
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
    incremental: IncrementalState | None = None
    base: Base | None = None

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
    incremental: IncrementalState | None = None,
) -> PreparedSave:
    """The blocking part of a save (steps 1-2 of the module docstring): agree on the plan, split, snapshot.

    With ``incremental`` (this rank's :class:`~lightning_ckpt.incremental.IncrementalState`) the
    pieces whose bytes its base holds are referenced instead of written, and the state learns the
    outcome when :func:`finish_save` ends.

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
        incremental=incremental,
        base=incremental.plan(storage, target) if incremental is not None else None,
    )
    try:
        tensors = agreed.tensors
        prepared.shard = prepare_shard({k: tensors[k] for k in agreed.mine}, index=index, count=len(group),
                                       staging=staging, chunks=agreed.chunks, incremental=incremental is not None,
                                       base=prepared.base)  # fmt: skip
        if index == 0:
            prepared.objects = pickle_objects(agreed.skeleton)
    except Exception as err:  # reported to every rank at the "written" barrier
        prepared.error = err
    return prepared


def finish_save(prepared: PreparedSave, *, direct_io: bool = True) -> SaveResult:
    """Write this rank's files, meet at the barrier, commit on the leader (steps 2-7 of the module docstring)."""
    if prepared.incremental is None:
        return _finish_save(prepared, direct_io=direct_io)
    try:
        result = _finish_save(prepared, direct_io=direct_io)
    except BaseException:
        prepared.incremental.committed(prepared.storage, prepared.target, False, full=prepared.base is None)
        raise
    prepared.incremental.committed(prepared.storage, prepared.target, True, full=prepared.base is None)
    return result


def _finish_save(prepared: PreparedSave, *, direct_io: bool) -> SaveResult:
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
            files, entries = write_prepared_shard(storage, staged, prepared.shard, rank=exchange.rank,
                                                  direct_io=direct_io, incremental=prepared.incremental is not None,
                                                  base=prepared.base)  # fmt: skip
            if prepared.objects is not None:
                files.append(write_objects(storage, staged, prepared.objects, rank=exchange.rank))
            for hook in prepared.hooks:
                hook.pre_commit(storage.url(target), rank=exchange.rank)
            payload = entry_rows(files, entries)
        except Exception as err:  # reported to every rank by the barrier below
            error = err
    try:
        written = exchange.barrier("written", payload=payload, error=error)
    except BaseException:
        if is_leader and staged:
            Commit.for_storage(storage).abort(staged)  # local staging removed (and its lock released)
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


def _commit(
    storage: Storage, folder: str, name: str, staged: str, prepared: PreparedSave, written: Mapping[int, Any]
) -> None:
    """The leader's commit (step 5): the manifest of every rank's entries, then the pointer."""
    manifest = assemble_manifest(name, written, group=prepared.group, keys=prepared.keys, info=prepared.info,
                                 metadata=prepared.metadata)  # fmt: skip
    check_references(storage, staged, manifest)
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


def checkpoint_dir_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a string, once its last component is checked to name a checkpoint directory.

    Example:
        >>> checkpoint_dir_path("/data/ckpts/ep0-ba100/")
        '/data/ckpts/ep0-ba100/'
        >>> checkpoint_dir_path("/")
        Traceback (most recent call last):
        ValueError: path='/' must name a checkpoint directory, e.g. '/data/ckpts/ep0-ba100'
    """
    target = os.fspath(path)
    if not layout.is_plain_name(os.path.basename(target.rstrip("/"))):
        raise ValueError(f"path={target!r} must name a checkpoint directory, e.g. '/data/ckpts/ep0-ba100'")
    return target


def prepare_alone(
    checkpoint: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    latest_filename: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    staging: StagingBuffer | None = None,
    incremental: IncrementalState | None = None,
) -> PreparedSave:
    """The blocking part of a save by this process alone: :func:`prepare_save` over a one-rank exchange.

    It never waits on other ranks (Lightning's rank-0 ``CheckpointIO.save_checkpoint`` contract);
    :func:`finish_save` writes and commits it. With ``staging`` the tensors are copied, so training
    may change them as soon as this returns.

    Example:
        >>> import tempfile, torch
        >>> prepared = prepare_alone({"w": torch.zeros(2)}, os.path.join(tempfile.mkdtemp(), "ep0-ba4"))
        >>> prepared.group, os.path.basename(finish_save(prepared).path)
        ([0], 'ep0-ba4')
    """
    return prepare_save(
        checkpoint,
        checkpoint_dir_path(path),
        exchange=Exchange(None, 0, 1, prefix="single", timeout_s=0),
        nonce=new_nonce(),
        storage_options=storage_options,
        latest_filename=latest_filename,
        metadata=metadata,
        staging=staging,
        incremental=incremental,
    )


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
    prepared = prepare_alone(
        checkpoint, path, storage_options=storage_options, latest_filename=latest_filename, metadata=metadata
    )
    return finish_save(prepared).path
