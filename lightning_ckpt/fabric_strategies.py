"""Fabric's ``ModelParallelStrategy`` (FSDP2, tensor parallel) with ``fabric.save``/``fabric.load`` in this format.

Fabric's FSDP and ModelParallel strategies refuse a ``CheckpointIO`` plugin, so the strategy itself
holds a :class:`~lightning_ckpt.ShardedCheckpointIO`. ``fabric.save(path, state)`` turns each model
into its sharded state dict and each optimizer into its state by parameter name, then every rank
writes the chunks it holds (a collective save, committed atomically; URLs stay strings).
``fabric.load(path, state)`` fills the models and optimizers of ``state`` in place (each rank reads
only the chunks its shards need), restores the other entries of ``state`` and returns what is left,
as Fabric's own loader does; a DCP directory with ``meta.pt`` or a single file goes to Fabric's loader.

Example:
    >>> def parallelize(model, device_mesh):  # your fully_shard / parallelize_module calls
    ...     return model
    >>> strategy = ShardedModelParallelStrategy(parallelize, data_parallel_size=2, tensor_parallel_size=1)
    >>> type(strategy.sharded_io).__name__
    'ShardedCheckpointIO'
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.strategies import ModelParallelStrategy
from typing_extensions import override

from lightning_ckpt._lightning import is_our_checkpoint
from lightning_ckpt.collective import checkpoint_dir_path
from lightning_ckpt.errors import ConfigError
from lightning_ckpt.plugin import ShardedCheckpointIO
from lightning_ckpt.sharded import sharded_state_dicts

__all__ = ["ShardedModelParallelStrategy"]


class ShardedModelParallelStrategy(ModelParallelStrategy):
    """Fabric's ``ModelParallelStrategy`` saving and loading this format; same arguments plus ``checkpoint_io``.

    Example:
        >>> from lightning.fabric import Fabric
        >>> strategy = ShardedModelParallelStrategy(lambda model, device_mesh: model)
        >>> fabric = Fabric(strategy=strategy, accelerator="cpu", devices=1)
        >>> type(fabric.strategy).__name__
        'ShardedModelParallelStrategy'
    """

    def __init__(self, *args: Any, checkpoint_io: ShardedCheckpointIO | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sharded_io = checkpoint_io or ShardedCheckpointIO()

    @override
    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, Any],
        storage_options: Any | None = None,
        filter: dict[str, Any] | None = None,
    ) -> None:
        """Every rank writes its chunks of ``state`` (models and optimizers as sharded state dicts)."""
        if storage_options is not None or filter is not None:
            name = "storage_options" if storage_options is not None else "filter"
            raise ConfigError(
                name,
                storage_options if storage_options is not None else filter,
                "ShardedModelParallelStrategy(checkpoint_io=ShardedCheckpointIO(storage_options={...})), no filter",
                "Storage options belong to the strategy's ShardedCheckpointIO; filtered sharded saves are refused",
            )
        target = checkpoint_dir_path(self.broadcast(os.fspath(path)))
        full = not self._save_distributed_checkpoint
        self.sharded_io.save_collective(sharded_state_dicts(state, full=full), target)

    @override
    def load_checkpoint(
        self,
        path: Any,
        state: Any = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Fill the models and optimizers of ``state`` in place, restore its other entries, return the rest."""
        target = os.fspath(self.broadcast(path))
        if not is_our_checkpoint(target, self.sharded_io.storage_options):
            return super().load_checkpoint(path, state, strict, weights_only)
        if isinstance(state, torch.nn.Module):
            state = {"model": state}
        if not isinstance(state, dict) or not state:
            raise ConfigError(
                "state", state, "fabric.load(path, {'model': model, 'optimizer': optimizer, ...})",
                "Loading this format in place needs the model (and its optimizers) by the keys they were saved under",
            )  # fmt: skip
        modules = {k: v for k, v in state.items() if isinstance(v, torch.nn.Module)}
        optimizers = {k: v for k, v in state.items() if isinstance(v, torch.optim.Optimizer)}
        if len(modules) != 1:
            raise ConfigError("state", state, "{'model': model, 'optimizer': optimizer}", "It must hold one model")
        [(module_key, module)] = modules.items()
        into = (module, list(optimizers.values()), strict)
        rest = self.sharded_io.load_checkpoint(
            target,
            weights_only=weights_only,
            into=into,
            module_key=module_key,
            optimizer_keys=[(k,) for k in optimizers],
        )
        for key, value in state.items():
            if key in modules or key in optimizers or key not in rest:
                continue
            loaded = rest.pop(key)
            if hasattr(value, "load_state_dict") and not isinstance(value, dict):
                value.load_state_dict(loaded)
            else:
                state[key] = loaded
        return rest
