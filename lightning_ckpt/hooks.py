"""``WriterHook``: what a user runs around each commit of a checkpoint (quota checks, notifications).

The save protocol (:mod:`lightning_ckpt.collective`) calls every hook of the plugin's
``writer_hooks`` at two fixed places of each save, on the ranks named below.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any

from lightning_ckpt.errors import ConfigError

__all__ = ["WriterHook", "check_hooks"]


class WriterHook(abc.ABC):
    """Actions around the commit of a collective save.

    * ``pre_commit(path, rank=...)`` runs on **every rank**, after that rank's shard is durable
      and before the barrier. Raising here fails the save on every rank; nothing is committed.
    * ``post_commit(path, rank=...)`` runs on **each writer group's leader** (rank 0 when the
      folder is shared) right after the manifest is written and ``latest`` moved.

    Example:
        >>> class Announce(WriterHook):
        ...     def pre_commit(self, path, **kwargs): pass
        ...     def post_commit(self, path, **kwargs): print("committed", path.rsplit("/", 1)[-1])
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


def check_hooks(writer_hooks: object) -> list[WriterHook]:
    """``writer_hooks`` as a list, if it is an iterable of :class:`WriterHook` (``ConfigError`` naming it otherwise).

    Example:
        >>> check_hooks(())
        []
    """
    example = "[MyHook()] where MyHook subclasses lightning_ckpt.WriterHook"
    if isinstance(writer_hooks, (WriterHook, str)) or not isinstance(writer_hooks, Iterable):
        raise ConfigError("writer_hooks", writer_hooks, example, "It must be a list of hooks")
    hooks = list(writer_hooks)
    if not all(isinstance(h, WriterHook) for h in hooks):
        raise ConfigError("writer_hooks", hooks, example)
    return hooks
