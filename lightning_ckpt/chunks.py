"""Chunk geometry: where a stored chunk and a wanted region of the same tensor overlap, and copying it.

A sharded tensor is stored as chunks (global offsets and sizes); a reader wants either the whole
tensor (:func:`assemble`) or the region its own shard covers on the current layout, which may be cut
differently from the one that saved it (N ranks saved, M load; ``Shard(1)`` saved, ``Shard(0)``
loads). :func:`copy_overlap` copies the part of one chunk that falls inside a region. Pure: no I/O.

Example:
    >>> import torch
    >>> full = assemble((4,), torch.float32, [((0,), torch.ones(2)), ((2,), torch.zeros(2))])
    >>> full
    tensor([1., 1., 0., 0.])
    >>> region = torch.full((3,), -1.0)  # elements 1..3 of the tensor
    >>> copy_overlap((2,), torch.zeros(2), (1,), region)
    True
    >>> region
    tensor([-1.,  0.,  0.])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["assemble", "copy_overlap", "overlap"]


def overlap(
    offsets: Sequence[int], sizes: Sequence[int], region_offsets: Sequence[int], region_sizes: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """The overlap of a chunk and a region, as slices into each; ``None`` if they do not meet.

    Example:
        >>> overlap((2, 0), (2, 3), (1, 1), (2, 2))
        ((slice(0, 1, None), slice(1, 3, None)), (slice(1, 2, None), slice(0, 2, None)))
    """
    in_chunk, in_region = [], []
    for o, s, ro, rs in zip(offsets, sizes, region_offsets, region_sizes, strict=True):
        start, end = max(o, ro), min(o + s, ro + rs)
        if start >= end:
            return None
        in_chunk.append(slice(start - o, end - o))
        in_region.append(slice(start - ro, end - ro))
    return tuple(in_chunk), tuple(in_region)


def copy_overlap(
    offsets: Sequence[int], chunk: torch.Tensor, region_offsets: Sequence[int], region: torch.Tensor
) -> bool:
    """Copy the part of ``chunk`` (at ``offsets``) that lies in ``region`` (at ``region_offsets``); whether any did.

    A 0-d tensor is its own only chunk: it is copied whole.
    """
    if chunk.dim() == 0:
        region.copy_(chunk)
        return True
    found = overlap(offsets, chunk.shape, region_offsets, region.shape)
    if found is None:
        return False
    in_chunk, in_region = found
    region[in_region].copy_(chunk[in_chunk])
    return True


def assemble(
    shape: Sequence[int], dtype: torch.dtype, chunks: Iterable[tuple[Sequence[int], torch.Tensor]]
) -> torch.Tensor:
    """A new tensor of ``shape`` filled from ``(offsets, chunk)`` pairs that cover it (as a manifest guarantees)."""
    full = torch.empty(tuple(shape), dtype=dtype)
    origin = (0,) * len(shape)
    for offsets, chunk in chunks:
        copy_overlap(offsets, chunk, origin, full)
    return full
