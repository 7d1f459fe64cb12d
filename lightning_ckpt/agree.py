"""Ranks agree on a save's writer groups and plan through the key-value store, before any byte is written.

Call sequence (every rank, on the training thread, inside :func:`lightning_ckpt.collective.prepare_save`):

1. (all ranks) split the checkpoint dict, look for what cannot be saved (a step that is not an int,
   a ``Partial`` DTensor), build the local plan (:func:`lightning_ckpt.plan.local_plan`, plus one
   ``sharded`` row per chunk of a ``DTensor``/``ShardedTensor`` this rank holds).
2. (all ranks) barrier ``plan``: each rank posts its target, pointer, peers, plan digest and
   problem. Every rank sees every post, so every rank computes every writer group (same target,
   same storage) and takes the same decisions below.
3. A problem on any rank raises :class:`~lightning_ckpt.errors.PlanError` on every rank (the rank
   that found it raises its own error, with its type).
4. (all ranks, only when some group's digests differ, as they always do with sharded state)
   barrier ``layout`` with the full plans;
   :func:`lightning_ckpt.plan.resolve` on every group, on every rank: the same plan or the same
   refusal everywhere.
5. (all ranks, only with ``verify_replicas``) barrier ``replicas`` with a CRC32 of every
   ``replicated`` tensor; a difference is refused naming the first key and the ranks.

In steady state (same digests in every group) that is one store round per save.

Example:
    >>> import torch
    >>> from lightning_ckpt.dist import Exchange
    >>> alone = Exchange(None, 0, 1, prefix="doc", timeout_s=1)
    >>> agreed = agree_on_plan(alone, {"state_dict": {"w": torch.ones(2)}, "global_step": 3}, target="/ckpt/ba3",
    ...                        pointer=None, peers=[0], replicated=None)
    >>> agreed.group, agreed.mine, agreed.info["global_step"]
    ([0], ['state_dict/w'], 3)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_ckpt.checksum import crc32
from lightning_ckpt.dist import Exchange
from lightning_ckpt.errors import ConfigError, PlanError
from lightning_ckpt.layout import chunk_key
from lightning_ckpt.manifest import ChunkOf
from lightning_ckpt.plan import (
    Placement,
    ReplicatedTest,
    TensorSpec,
    assign,
    digest,
    local_plan,
    paused_gc,
    resolve,
    sharded_row,
    specs_of,
)
from lightning_ckpt.sharded import LocalChunk, global_shape, is_distributed, local_chunks
from lightning_ckpt.tree import split_tensors

__all__ = ["AgreedPlan", "agree_on_plan", "progress_info"]


@dataclass
class AgreedPlan:
    """What every rank of a writer group agreed on for one save, as seen from this rank.

    Attributes:
        group: the ranks writing this checkpoint together (same target, same storage); ``group[0]`` leads.
        pointer: whether this rank's group moves the ``latest`` pointer (lowest group sharing its name).
        specs: the group's plan (placement of every tensor).
        mine: the keys this rank writes.
        tensors: this rank's tensors by key (for sharded state: each chunk it holds, by the chunk's key).
        skeleton: this rank's checkpoint dict with tensors replaced by markers.
        info: ``epoch``, ``global_step`` and ``weights_only`` of this rank's dict.
        chunks: which of ``tensors`` are chunks of a sharded tensor, and where in it.
    """

    group: list[int]
    pointer: bool
    specs: list[TensorSpec]
    mine: list[str]
    tensors: dict[str, torch.Tensor]
    skeleton: Any
    info: dict[str, Any]
    chunks: dict[str, ChunkOf]


def progress_info(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """``epoch``, ``global_step`` (ints, default 0) and ``weights_only`` of a checkpoint dict.

    Example:
        >>> progress_info({"epoch": torch.tensor(2), "global_step": 40, "optimizer_states": []})
        {'epoch': 2, 'global_step': 40, 'weights_only': False}
        >>> try:
        ...     progress_info({"global_step": "forty"})
        ... except ValueError as err:
        ...     print(err.argument)
        checkpoint['global_step']
    """
    info: dict[str, Any] = {}
    for key in ("epoch", "global_step"):
        value = checkpoint.get(key, 0)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(
                f"checkpoint[{key!r}]",
                value,
                f"checkpoint[{key!r}] = 3 (an int) or no {key!r} key at all (0)",
                "It names the checkpoint's progress in its manifest, so it must be an int",
            )
        info[key] = int(value)
    info["weights_only"] = "optimizer_states" not in checkpoint
    return info


class _LocalPart:
    """This rank's split checkpoint and its plan rows."""

    def __init__(self, checkpoint: Mapping[str, Any], replicated: ReplicatedTest | None) -> None:
        distributed: dict[str, Any] = {}
        with paused_gc():  # a split of 100,000 tensors builds that many markers: no collector passes meanwhile
            self.skeleton, self.tensors = split_tensors(
                dict(checkpoint), is_distributed=is_distributed, distributed=distributed
            )
            self.rows = local_plan(self.tensors, replicated)
        self.chunks: dict[str, ChunkOf] = {}
        for key, value in distributed.items():
            self._add_chunks(key, value)
        self.info = progress_info(checkpoint)

    def _add_chunks(self, key: str, value: Any) -> None:
        shape = global_shape(value)
        chunks = local_chunks(key, value)
        if not chunks and not all(shape):  # an empty tensor: one empty whole piece, so the key exists
            chunks = [LocalChunk(tuple(0 for _ in shape), torch.empty(shape, dtype=value.dtype))]
        for offsets, chunk in chunks:
            whole = tuple(chunk.shape) == shape
            piece = key if whole else chunk_key(key, offsets)
            if piece in self.tensors:
                raise PlanError(f"{piece!r} names both a tensor and a chunk of {key!r}; nothing was written")
            self.tensors[piece] = chunk
            self.rows.append(sharded_row(piece, key, offsets, shape, chunk))
            if not whole:
                self.chunks[piece] = ChunkOf(key, shape, tuple(offsets))


def agree_on_plan(
    exchange: Exchange,
    checkpoint: Mapping[str, Any],
    *,
    target: str,
    pointer: str | None,
    peers: Sequence[int],
    replicated: ReplicatedTest | None,
    verify_replicas: bool = False,
    precheck: Callable[[], object] | None = None,
) -> AgreedPlan:
    """Steps 1-5 of the module docstring; raises on every rank, or returns this rank's part of the plan.

    ``precheck`` runs first on each rank (e.g. whether its target may be replaced); its error too is
    raised on every rank."""
    error: Exception | None = None
    part: _LocalPart | None = None
    try:
        if precheck is not None:
            precheck()
        part = _LocalPart(checkpoint, replicated)
    except Exception as err:  # refused on every rank below
        error = err
    rows = part.rows if part is not None else []
    problem = f"{type(error).__name__}: {error}" if error is not None else None
    posts = exchange.barrier("plan", payload=[target, pointer, sorted(peers), digest(rows), problem])
    rank = exchange.rank
    if error is not None:
        raise error
    assert part is not None
    refused = [(r, p[4]) for r, p in sorted(posts.items()) if p[4]]
    if refused:
        raise PlanError(f"rank {refused[0][0]} cannot save its part of the checkpoint: {refused[0][1]}")
    groups = _groups(posts)
    with paused_gc():
        specs_by_group = _agreed_specs(exchange, groups, posts, rows)
    group = groups[rank]
    specs = specs_by_group[tuple(group)]
    if verify_replicas:
        _verify_replicas(exchange, groups, part.tensors, specs_by_group)
    same_pointer = [r for r in sorted(peers) if r in posts and posts[r][1] == pointer] or [rank]
    with paused_gc():
        mine = assign(specs, len(group))[group.index(rank)]
    pointer_group = group[0] == min(same_pointer)
    return AgreedPlan(group, pointer_group, specs, mine, part.tensors, part.skeleton, part.info, part.chunks)


def _groups(posts: Mapping[int, Sequence[Any]]) -> dict[int, list[int]]:
    """Every rank's writer group: the ranks it shares storage with (its peers) that save to the same target."""
    groups = {}
    for rank, (target, _, peers, _, _) in posts.items():
        groups[rank] = [r for r in peers if r in posts and posts[r][0] == target] or [rank]
    return groups


def _agreed_specs(
    exchange: Exchange, groups: Mapping[int, list[int]], posts: Mapping[int, Sequence[Any]], rows: list[list[Any]]
) -> dict[tuple[int, ...], list[TensorSpec]]:
    distinct = {tuple(g) for g in groups.values()}
    disagree = [g for g in sorted(distinct) if len({posts[r][3] for r in g}) > 1]
    specs = {g: specs_of(rows, len(g)) for g in distinct if g not in disagree and exchange.rank in g}
    if not disagree:
        return specs
    plans = exchange.barrier("layout", payload=rows)
    for group in disagree:  # every rank resolves every group: the same refusal reaches every rank
        specs[group] = resolve({r: plans[r] for r in group}, list(group))
    return specs


def _verify_replicas(
    exchange: Exchange,
    groups: Mapping[int, list[int]],
    tensors: Mapping[str, torch.Tensor],
    specs: Mapping[tuple[int, ...], list[TensorSpec]],
) -> None:
    """Compare a CRC32 of every ``replicated`` tensor across each group; refuse naming the first difference.

    Every rank posts ``[key, crc]`` rows and checks every group, so all ranks refuse together.
    """
    own = specs[tuple(groups[exchange.rank])]
    rows = [[s.key, _crc32(tensors[s.key])] for s in own if s.placement is Placement.REPLICATED]
    posted = exchange.barrier("replicas", payload=rows)
    for group in sorted({tuple(g) for g in groups.values()}):
        expected = {key: crc for key, crc in posted[group[0]]}
        for rank in group[1:]:
            for key, crc in posted[rank]:
                if expected.get(key, crc) != crc:
                    raise PlanError(
                        f"verify_replicas: tensor {key!r} differs between rank {group[0]} and rank {rank}, although"
                        " the save plan treats it as replicated (under DDP a LightningModule parameter or its"
                        " optimizer state; with the plugin alone, named in save_collective(replicated=...))."
                        " Nothing was written. Something changed it on one rank only (an update outside DDP's"
                        " all-reduce): fix that, leave it out of `replicated` so rank 0's copy is saved, or save"
                        " one checkpoint per rank with '{rank}' in the filename"
                    )


def _crc32(tensor: torch.Tensor) -> int:
    if tensor.numel() == 0:
        return 0
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return crc32(data.numpy().data)
