"""Named points of the save pipeline, and the one hook that may act there (none in real runs).

The package calls :func:`reached` at each point below. Unless a hook is installed with
:func:`install`, that is one ``is None`` test and nothing else: no environment variable, file
or setting is read. The test suite installs a hook that SIGKILLs the process at a chosen point
(``tests/faults.py``), so the fault-injection tests kill real processes at exact places.

=========================  ===============================================================
point                      where
=========================  ===============================================================
``shard.before``           a rank has created the staging directory, before its shard
``shard.half``             a rank is about to write its shard file (local writes; the hook
                           gets the file as :class:`Writing`, to write part of it)
``commit.before_manifest`` after the barrier, before the committing rank writes the manifest
``commit.before_pointer``  the checkpoint is committed, the ``latest`` pointer not yet moved
``upload.during``          a rank has uploaded its first file of a checkpoint, not the rest
``rotation.during``        an old checkpoint's manifest is deleted, its other files are not
=========================  ===============================================================

Example:
    >>> seen = []
    >>> previous = install(lambda point, rank, writing: seen.append((point, rank)))
    >>> reached("commit.before_pointer", 0)
    >>> _ = install(previous)
    >>> reached("commit.before_pointer", 1)
    >>> seen
    [('commit.before_pointer', 0)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["POINTS", "FaultHook", "Writing", "install", "reached"]

POINTS = (
    "shard.before",
    "shard.half",
    "commit.before_manifest",
    "commit.before_pointer",
    "upload.during",
    "rotation.during",
)


@dataclass(frozen=True)
class Writing:
    """The file a rank is about to write at a point: its path, its bytes in order (lazily) and its size.

    Example:
        >>> Writing("/tmp/shard", iter([memoryview(b"ab")]), 2).size
        2
    """

    path: str
    chunks: Iterable[memoryview]
    size: int


FaultHook = Callable[[str, int, Writing | None], None]
"""``hook(point, rank, writing)``: called at every point this process passes; it may kill the process."""

_hook: FaultHook | None = None


def install(hook: FaultHook | None) -> FaultHook | None:
    """Make ``hook`` act at every point from now on (``None``: nothing does); returns the hook it replaces.

    Example:
        >>> install(None) is None
        True
    """
    global _hook
    previous, _hook = _hook, hook
    return previous


def reached(point: str, rank: int, writing: Writing | None = None) -> None:
    """This process passes ``point`` on ``rank`` (about to write ``writing``); a no-op unless a hook is installed.

    Example:
        >>> reached("shard.before", 0)
    """
    if _hook is not None:
        _hook(point, rank, writing)
