"""The save plan: where every tensor of a checkpoint comes from, decided before any byte is written.

Each tensor gets one placement, the same on every rank of a writer group:

==============  ===============================================================  ==============================
placement       which tensors                                                    written by
==============  ===============================================================  ==============================
``replicated``  provably identical on every rank: under DDP, the LightningModule  the group, split by bytes
                parameters and the optimizer state of those parameters, and
                every rank reports the key with the same dtype and shape
``rank0``       everything else: buffers (BatchNorm statistics), loop and        the group's leader (rank 0's
                callback tensors, anything the plan cannot prove identical       copy, as stock Lightning)
``sharded``     one chunk (global offsets and sizes) of a ``DTensor`` or         one rank holding it, balanced
                ``ShardedTensor`` (FSDP, tensor parallel)                        by bytes; a replica once
==============  ===============================================================  ==============================

``rank0`` is the default, because it is always right: DDP re-broadcasts rank 0's buffers at the
next forward and stock Lightning saves rank 0's copy, so only rank 0's values resume into the
model that was trained. A sharded chunk held by several ranks (a ``Replicate`` mesh dimension, HSDP)
is written once: ``DTensor`` guarantees its replicas are equal. Before anything is written, the
chunks of each sharded tensor must cover it exactly once (:func:`coverage_problem`).

How ranks agree (:mod:`lightning_ckpt.collective`): each rank builds its :func:`local_plan`
(rows of key, dtype, shape, bytes and its placement *claim*) and posts its :func:`digest` in the
first barrier of the save. When every digest of a group is equal, each rank derives the same
assignment from its own rows, no second round. Otherwise every rank posts its rows and every rank
runs :func:`resolve` on the same data, so all of them reach the same plan or the same
:class:`~lightning_ckpt.errors.PlanError`.

Everything here is pure: no I/O, no ``torch.distributed``.

Example:
    >>> rows = [["state_dict/w", "float32", [4, 4], 64, "replicated"],
    ...         ["state_dict/bn.mean", "float32", [4], 16, "rank0"]]
    >>> specs = resolve({0: rows, 1: rows}, group=[0, 1])
    >>> [(s.key, s.placement.value) for s in specs]
    [('state_dict/w', 'replicated'), ('state_dict/bn.mean', 'rank0')]
    >>> assign(specs, 2)  # the leader writes rank 0's buffer, the other rank the replicated weight
    [['state_dict/bn.mean'], ['state_dict/w']]
"""

from __future__ import annotations

import contextlib
import enum
import gc
import hashlib
import heapq
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_ckpt.errors import PlanError

__all__ = [
    "Placement",
    "ReplicatedTest",
    "TensorSpec",
    "assign",
    "coverage_problem",
    "digest",
    "local_plan",
    "paused_gc",
    "replicated_test",
    "resolve",
    "sharded_row",
]

ReplicatedTest = Callable[[str, torch.Tensor], bool]
"""``(key, tensor) -> bool``: whether this rank claims ``tensor`` is identical on every rank."""


class Placement(str, enum.Enum):
    """Where a tensor's bytes come from (see the module docstring)."""

    REPLICATED = "replicated"
    RANK0 = "rank0"
    SHARDED = "sharded"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the plan: what every rank agreed on.

    Attributes:
        key: the ``/``-joined path in the checkpoint dict.
        dtype: ``str`` of the torch dtype without the ``torch.`` prefix.
        shape: the tensor's shape.
        nbytes: its size in bytes.
        placement: where its bytes come from.
        tensor_key: for a ``sharded`` chunk, the key of its tensor (``key`` is the chunk's own key).
        offsets: for a ``sharded`` chunk, where it starts in its tensor.
        tensor_shape: for a ``sharded`` chunk, its tensor's global shape.
        holders: for a ``sharded`` chunk, the group members (indices) that hold it.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    placement: Placement
    tensor_key: str | None = None
    offsets: tuple[int, ...] = ()
    tensor_shape: tuple[int, ...] = ()
    holders: tuple[int, ...] = ()


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a save builds its many small objects.

    Planning and writing 100,000 tensors allocates a few hundred thousand dicts, lists and tuples
    while the tensors are alive, and each full collection this triggers walks all of them: that made
    such a save 1.7x slower. Nothing a save builds is cyclic garbage (reference counting frees it),
    so the collector just runs at its next threshold afterwards. Nested or concurrent uses are safe:
    only a pause that found the collector enabled turns it back on.

    Example:
        >>> import gc
        >>> with paused_gc():
        ...     gc.isenabled()
        False
        >>> gc.isenabled()
        True
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def replicated_test(replicated: Any) -> ReplicatedTest | None:
    """Normalise the ``replicated=`` argument of a save: ``None``, a collection of keys, or a callable.

    Example:
        >>> test = replicated_test(["state_dict/w"])
        >>> test("state_dict/w", torch.ones(1)), test("state_dict/bn.mean", torch.ones(1))
        (True, False)
    """
    if replicated is None:
        return None
    if callable(replicated):
        return replicated
    if isinstance(replicated, (str, bytes)) or not all(isinstance(k, str) for k in replicated):
        from lightning_ckpt.errors import ConfigError

        raise ConfigError(
            "replicated",
            replicated,
            "['state_dict/layer.weight', ...] (keys as lightning-ckpt inspect shows them), a callable"
            " (key, tensor) -> bool, or None (every tensor is written from rank 0's copy)",
        )
    keys = frozenset(replicated)
    return lambda key, tensor: key in keys


def local_plan(tensors: Mapping[str, torch.Tensor], is_replicated: ReplicatedTest | None) -> list[list[Any]]:
    """This rank's rows ``[key, dtype, shape, nbytes, claim]``, JSON-able, in the order of ``tensors``.

    Example:
        >>> local_plan({"w": torch.zeros(2, 3)}, lambda key, t: True)
        [['w', 'float32', [2, 3], 24, 'replicated']]
    """
    rows = []
    names: dict[torch.dtype, str] = {}
    replicated, rank0 = Placement.REPLICATED.value, Placement.RANK0.value
    for key, tensor in tensors.items():
        claim = replicated if is_replicated is not None and is_replicated(key, tensor) else rank0
        dtype = tensor.dtype
        name = names.get(dtype)
        if name is None:
            name = names[dtype] = str(dtype).removeprefix("torch.")
        rows.append([key, name, list(tensor.shape), tensor.nbytes, claim])
    return rows


def digest(rows: Sequence[Sequence[Any]]) -> str:
    """A short fingerprint of a local plan: equal digests mean equal plans.

    Example:
        >>> digest([["w", "float32", [2], 8, "rank0"]]) == digest([["w", "float32", [2], 8, "rank0"]])
        True
    """
    return hashlib.sha1(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def sharded_row(
    key: str, tensor_key: str, offsets: Sequence[int], shape: Sequence[int], chunk: torch.Tensor
) -> list[Any]:
    """The plan row of one chunk this rank holds: ``[key, dtype, sizes, nbytes, "sharded", tensor, offsets, shape]``.

    Example:
        >>> sharded_row("w@2", "w", [2], [4], torch.zeros(2))
        ['w@2', 'float32', [2], 8, 'sharded', 'w', [2], [4]]
    """
    dtype, sharded = str(chunk.dtype).removeprefix("torch."), Placement.SHARDED.value
    return [key, dtype, list(chunk.shape), chunk.nbytes, sharded, tensor_key, list(offsets), list(shape)]


def _sharded_spec(row: Sequence[Any], holders: tuple[int, ...]) -> TensorSpec:
    key, dtype, sizes, nbytes, _, tensor_key, offsets, shape = row
    sharded = Placement.SHARDED
    return TensorSpec(key, dtype, tuple(sizes), int(nbytes), sharded, tensor_key, tuple(offsets), tuple(shape), holders)


def specs_of(rows: Sequence[Sequence[Any]], members: int = 1) -> list[TensorSpec]:
    """The plan of a group whose ``members`` ranks all posted these rows (claims are agreed; each chunk held by all)."""
    placements = {p.value: p for p in Placement}
    everyone = tuple(range(members))
    return [
        _sharded_spec(row, everyone) if row[4] == Placement.SHARDED.value
        else TensorSpec(row[0], row[1], tuple(row[2]), int(row[3]), placements.get(row[4]) or Placement(row[4]))
        for row in rows
    ]  # fmt: skip


def resolve(plans: Mapping[int, Sequence[Sequence[Any]]], group: Sequence[int]) -> list[TensorSpec]:
    """The group's plan from every member's rows; raises :class:`PlanError` if it cannot be saved correctly.

    The key set is the leader's (``group[0]``), as stock Lightning saves rank 0's dict. A tensor is
    ``replicated`` only if every member claims so with the same dtype and shape; anything else the
    leader holds is ``rank0``. A tensor some member holds but the leader does not is refused: its
    values exist nowhere the leader could write them from.

    Example:
        >>> rank0 = [["w", "float32", [2], 8, "replicated"], ["bn", "float32", [2], 8, "rank0"]]
        >>> rank1 = [["w", "float32", [2], 8, "replicated"]]  # e.g. a buffer only rank 0 has
        >>> [(s.key, s.placement.value) for s in resolve({0: rank0, 1: rank1}, [0, 1])]
        [('w', 'replicated'), ('bn', 'rank0')]
        >>> try:
        ...     resolve({0: [], 1: rank1}, [0, 1])
        ... except PlanError as err:
        ...     print(str(err)[:44])
        tensor 'w' is held by rank 1 but not by rank
    """
    leader = group[0]
    sharded = Placement.SHARDED.value
    by_rank = {rank: {row[0]: row for row in plans[rank] if row[4] != sharded} for rank in group}
    for rank in group[1:]:
        extra = [key for key in by_rank[rank] if key not in by_rank[leader]]
        if extra:
            raise PlanError(
                f"tensor {extra[0]!r} is held by rank {rank} but not by rank {leader}, the rank whose checkpoint"
                f" dict is saved (as stock Lightning saves rank 0's); {len(extra)} such tensor(s). Nothing was"
                " written. Make every rank's checkpoint dict hold the same keys, or give each rank its own"
                " checkpoint with '{rank}' in the filename"
            )
    specs = []
    for key, dtype, shape, nbytes, claim in (row for row in plans[leader] if row[4] != sharded):
        same = all(
            (row := by_rank[rank].get(key)) is not None and row[1] == dtype and list(row[2]) == list(shape)
            and row[4] == Placement.REPLICATED.value
            for rank in group
        )  # fmt: skip
        placement = Placement.REPLICATED if claim == Placement.REPLICATED.value and same else Placement.RANK0
        specs.append(TensorSpec(key, dtype, tuple(shape), int(nbytes), placement))
    return specs + _sharded_specs(plans, group, {spec.key for spec in specs})


def _sharded_specs(
    plans: Mapping[int, Sequence[Sequence[Any]]], group: Sequence[int], plain: set[str]
) -> list[TensorSpec]:
    """One spec per distinct chunk of the group's sharded tensors, with its holders; refused unless each
    tensor has one dtype and global shape on every rank, is sharded on every rank that holds it, and its
    chunks cover it exactly once."""
    rows: dict[str, Sequence[Any]] = {}
    holders: dict[str, list[int]] = {}
    tensors: dict[str, tuple[str, list[int], int]] = {}
    for index, rank in enumerate(group):
        for row in plans[rank]:
            if row[4] != Placement.SHARDED.value:
                continue
            key, dtype, _, _, _, tensor_key, _, shape = row
            if tensor_key in plain:
                raise PlanError(
                    f"tensor {tensor_key!r} is sharded on rank {rank} but a plain tensor on another rank; nothing"
                    " was written. Every rank must hold the same kind of value under a key"
                )
            known = tensors.setdefault(tensor_key, (dtype, list(shape), rank))
            if known[:2] != (dtype, list(shape)):
                raise PlanError(
                    f"sharded tensor {tensor_key!r} is {known[0]} {known[1]} on rank {known[2]} but {dtype}"
                    f" {list(shape)} on rank {rank}; nothing was written. Every rank must hold the same model"
                )
            if key in rows and list(rows[key][2]) != list(row[2]):
                raise PlanError(f"chunk {key!r} has sizes {rows[key][2]} on one rank and {row[2]} on rank {rank}")
            rows.setdefault(key, row)
            holders.setdefault(key, []).append(index)
    specs = [_sharded_spec(row, tuple(holders[key])) for key, row in rows.items()]
    by_tensor: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        by_tensor.setdefault(str(spec.tensor_key), []).append(spec)
    for tensor_key, chunks in by_tensor.items():
        problem = coverage_problem(chunks[0].tensor_shape, [(c.offsets, c.shape) for c in chunks])
        if problem:
            raise PlanError(
                f"sharded tensor {tensor_key!r}: {problem} on the ranks of this writer group {list(group)}."
                " Nothing was written. Sharded state needs one writer group holding every shard: save to a"
                " folder every rank shares, or to an object store"
            )
    return specs


def assign(specs: Sequence[TensorSpec], parts: int) -> list[list[str]]:
    """Which keys each member of a group writes (index 0 is the leader); deterministic.

    ``rank0`` tensors go to the leader; then ``sharded`` chunks, largest first, each to the holder
    with the fewest bytes so far; then ``replicated`` tensors, largest first, each to the member with
    the fewest bytes so far (ties: lower index), so every member ends within one replicated tensor
    of the others whenever the leader's ``rank0`` bytes are below the mean share.

    Example:
        >>> specs = [TensorSpec(k, "float32", (n,), 4 * n, Placement.REPLICATED) for k, n in (("a", 25), ("b", 15))]
        >>> assign([*specs, TensorSpec("bn", "float32", (10,), 40, Placement.RANK0)], 2)
        [['bn', 'b'], ['a']]
    """
    if parts < 1:
        raise ValueError(f"parts={parts} must be at least 1")
    assignment: list[list[str]] = [[] for _ in range(parts)]
    load = [0] * parts
    for spec in specs:
        if spec.placement is Placement.RANK0:
            assignment[0].append(spec.key)
            load[0] += spec.nbytes
    chunks = [s for s in specs if s.placement is Placement.SHARDED]
    for spec in sorted(chunks, key=lambda s: (-s.nbytes, s.key)):
        index = min(spec.holders, key=lambda i: (load[i], i))
        assignment[index].append(spec.key)
        load[index] += spec.nbytes
    heap = [(load[index], index) for index in range(parts)]
    heapq.heapify(heap)
    replicated = [s for s in specs if s.placement is Placement.REPLICATED]
    for spec in sorted(replicated, key=lambda s: (-s.nbytes, s.key)):
        size, index = heapq.heappop(heap)
        assignment[index].append(spec.key)
        heapq.heappush(heap, (size + spec.nbytes, index))
    return assignment


def _volume(sizes: Sequence[int]) -> int:
    volume = 1
    for size in sizes:
        volume *= size
    return volume


def _overlap(a: tuple[Sequence[int], Sequence[int]], b: tuple[Sequence[int], Sequence[int]]) -> bool:
    return all(
        oa < ob + sb and ob < oa + sa for oa, sa, ob, sb in zip(a[0], a[1], b[0], b[1], strict=True)
    ) and _volume(a[1]) > 0 and _volume(b[1]) > 0  # fmt: skip


def coverage_problem(shape: Sequence[int], chunks: Sequence[tuple[Sequence[int], Sequence[int]]]) -> str | None:
    """What is wrong with ``chunks`` (``(offsets, sizes)`` pairs) as a cover of a tensor of ``shape``, or ``None``.

    Chunks must lie inside the tensor, not overlap, and together hold every element exactly once.
    Pairwise overlap checks: fine for the chunks of one tensor on up to a few hundred ranks.

    Example:
        >>> coverage_problem((4, 2), [((0, 0), (2, 2)), ((2, 0), (2, 2))]) is None
        True
        >>> coverage_problem((4, 2), [((0, 0), (3, 2)), ((2, 0), (2, 2))])
        'chunks at (0, 0) and (2, 0) overlap'
        >>> coverage_problem((4, 2), [((0, 0), (2, 2))])
        'its chunks hold 4 of its 8 elements'
    """
    for offsets, sizes in chunks:
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            return f"a chunk at {tuple(offsets)} has {len(sizes)} dimensions, the tensor {len(shape)}"
        if any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)):
            return f"the chunk at {tuple(offsets)} of sizes {tuple(sizes)} lies outside the shape {tuple(shape)}"
    if len(chunks) > 1:
        for index, first in enumerate(chunks):
            for second in chunks[index + 1 :]:
                if _overlap(first, second):
                    return f"chunks at {tuple(first[0])} and {tuple(second[0])} overlap"
    held, total = sum(_volume(sizes) for _, sizes in chunks), _volume(shape)
    if held != total:
        return f"its chunks hold {held} of its {total} elements"
    return None
