"""``ShardedModelParallelStrategy`` and ``ShardedFSDPStrategy``: Lightning's own callers save and load this format.

Lightning's FSDP and ModelParallel strategies save and load sharded checkpoints themselves
(``torch.distributed.checkpoint``), never through a ``CheckpointIO``, and turn paths into
``pathlib.Path`` (which breaks ``s3://``, Lightning #18786). ``CheckpointSaver`` needs neither
subclass; ``ModelCheckpoint``, ``trainer.save_checkpoint`` and ``trainer.fit(ckpt_path=...)`` with a
stock callback do. These take the same arguments as Lightning's, plus ``checkpoint_io`` (a
:class:`~lightning_ckpt.ShardedCheckpointIO`, default one made for you) and:

- ``save_checkpoint`` (every rank, as Lightning calls it): a collective save where every rank writes
  the chunks it holds, atomically committed; URLs stay strings.
- ``load_checkpoint``: this format in place (each rank reads the chunks it needs); a DCP directory
  with ``meta.pt`` or a ``.ckpt`` file goes to Lightning's loader, so a run can switch mid-way.
- ``remove_checkpoint``: only what this package wrote (``ModelCheckpoint``'s rotation).

Example:
    >>> from lightning_ckpt.strategies import ShardedModelParallelStrategy
    >>> strategy = ShardedModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    >>> type(strategy.checkpoint_io).__name__
    'ShardedCheckpointIO'
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_ckpt._lightning import InPlace, is_our_checkpoint
from lightning_ckpt.collective import checkpoint_dir_path
from lightning_ckpt.errors import ConfigError
from lightning_ckpt.plugin import ShardedCheckpointIO

__all__ = ["ShardedFSDPStrategy", "ShardedModelParallelStrategy"]


def _use(strategy: Any, io: ShardedCheckpointIO | None) -> None:
    strategy.checkpoint_io = io or ShardedCheckpointIO()


def _sharded_io(strategy: Any) -> ShardedCheckpointIO:
    io = strategy.checkpoint_io
    if not isinstance(io, ShardedCheckpointIO):
        io = strategy.checkpoint_io = ShardedCheckpointIO()
    return io


def _save(strategy: Any, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None) -> None:
    """Every rank writes its chunks of ``checkpoint`` to the directory ``filepath`` (rank 0's path)."""
    if storage_options is not None:
        raise ConfigError(
            "storage_options",
            storage_options,
            f"{type(strategy).__name__}(checkpoint_io=ShardedCheckpointIO(storage_options={{...}}))",
            "The sharded strategies save through their ShardedCheckpointIO, which holds the storage options",
        )
    path = strategy.broadcast(os.fspath(filepath))
    _sharded_io(strategy).save_collective(checkpoint, checkpoint_dir_path(path))


def _load(strategy: Any, checkpoint_path: Any, weights_only: bool | None) -> dict[str, Any] | None:
    """This format loaded in place (the rest of the checkpoint returned), or ``None`` for Lightning's loader."""
    path = os.fspath(strategy.broadcast(checkpoint_path))
    if not is_our_checkpoint(path, _sharded_io(strategy).storage_options):
        return None
    module = strategy.lightning_module
    into = InPlace(strategy.model, list(strategy.optimizers), module.strict_loading if module else True)
    return _sharded_io(strategy).load_checkpoint(path, weights_only=weights_only, into=into)


def _remove(strategy: Any, filepath: Any) -> None:
    """Delete a checkpoint this package wrote (rank 0; anything else is refused and kept)."""
    if strategy.is_global_zero:
        _sharded_io(strategy).remove_checkpoint(os.fspath(filepath))


class _ThisFormat:
    """``save_checkpoint``, ``load_checkpoint`` and ``remove_checkpoint`` in this format, over a Lightning strategy."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        _save(self, checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        loaded = _load(self, checkpoint_path, weights_only)
        if loaded is not None:
            return loaded
        return super().load_checkpoint(checkpoint_path, weights_only)  # type: ignore[misc]

    def remove_checkpoint(self, filepath: Any) -> None:
        _remove(self, filepath)


class ShardedModelParallelStrategy(_ThisFormat, ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2, tensor parallel, both) saving and loading this format.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(strategy=ShardedModelParallelStrategy(), accelerator="cpu", devices=1, logger=False)
        >>> type(trainer.strategy).__name__
        'ShardedModelParallelStrategy'
    """

    def __init__(self, *args: Any, checkpoint_io: ShardedCheckpointIO | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _use(self, checkpoint_io)


class ShardedFSDPStrategy(_ThisFormat, FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1; ``state_dict_type="sharded"`` by default) saving and loading this format.

    Example:
        >>> ShardedFSDPStrategy()._state_dict_type
        'sharded'
    """

    def __init__(self, *args: Any, checkpoint_io: ShardedCheckpointIO | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("state_dict_type", "sharded")
        super().__init__(*args, **kwargs)
        _use(self, checkpoint_io)
