"""Which rank writes which tensor: replicated state split across ranks, balanced by bytes.

The assignment is a pure function of the tensor keys and sizes, so every rank computes the
same one without talking to the others. Largest tensors are placed first, each on the rank with
the fewest bytes so far (ties: lower rank), which keeps every rank within one tensor of the mean.

Example:
    >>> assign_by_bytes({"a": 100, "b": 60, "c": 50, "d": 10}, 2)
    [['a', 'd'], ['b', 'c']]
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

__all__ = ["assign_by_bytes"]


def assign_by_bytes(sizes: Mapping[str, int], parts: int) -> list[list[str]]:
    """Split ``sizes`` (key -> bytes) into ``parts`` lists of keys with near-equal byte totals.

    Keys inside each part keep the size-descending order they were placed in.
    """
    if parts < 1:
        raise ValueError(f"parts={parts} must be at least 1")
    heap = [(0, index) for index in range(parts)]
    assignment: list[list[str]] = [[] for _ in range(parts)]
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        load, index = heapq.heappop(heap)
        assignment[index].append(key)
        heapq.heappush(heap, (load + sizes[key], index))
    return assignment
