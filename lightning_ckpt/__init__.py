"""lightning-ckpt: sharded, atomic, resumable checkpointing for PyTorch Lightning.

Example:
    >>> from lightning_ckpt import CheckpointSaver, ShardedCheckpointIO, latest
    >>> saver = CheckpointSaver(folder="/tmp/runs/{run_name}", run_name="demo", save_interval="2ba")
    >>> saver.save_interval
    EveryNBatches(2)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_ckpt.callback import CheckpointSaver
    from lightning_ckpt.discovery import latest
    from lightning_ckpt.errors import (
        CheckpointError,
        CheckpointNotFoundError,
        CollectiveError,
        ConfigError,
        ConfigTypeError,
        CorruptCheckpointError,
        FolderConflictError,
        FolderInUseError,
        PlanError,
        TargetExistsError,
    )
    from lightning_ckpt.hooks import WriterHook
    from lightning_ckpt.interval import Event, SaveSchedule
    from lightning_ckpt.into import load_into
    from lightning_ckpt.plugin import ShardedCheckpointIO
    from lightning_ckpt.reader import read_checkpoint
    from lightning_ckpt.transfer import RetryPolicy

# Names are imported on first use (PEP 562), so that the command line and the storage modules
# start without importing Lightning (several seconds); ``from lightning_ckpt import X`` is unchanged.
_EXPORTS: dict[str, str] = {
    "CheckpointError": "lightning_ckpt.errors",
    "CheckpointNotFoundError": "lightning_ckpt.errors",
    "CheckpointSaver": "lightning_ckpt.callback",
    "CollectiveError": "lightning_ckpt.errors",
    "ConfigError": "lightning_ckpt.errors",
    "ConfigTypeError": "lightning_ckpt.errors",
    "CorruptCheckpointError": "lightning_ckpt.errors",
    "Event": "lightning_ckpt.interval",
    "FolderConflictError": "lightning_ckpt.errors",
    "FolderInUseError": "lightning_ckpt.errors",
    "PlanError": "lightning_ckpt.errors",
    "RetryPolicy": "lightning_ckpt.transfer",
    "SaveSchedule": "lightning_ckpt.interval",
    "ShardedCheckpointIO": "lightning_ckpt.plugin",
    "TargetExistsError": "lightning_ckpt.errors",
    "WriterHook": "lightning_ckpt.hooks",
    "latest": "lightning_ckpt.discovery",
    "load_into": "lightning_ckpt.into",
    "read_checkpoint": "lightning_ckpt.reader",
}

__version__ = "0.2.0"

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointSaver",
    "CollectiveError",
    "ConfigError",
    "ConfigTypeError",
    "CorruptCheckpointError",
    "Event",
    "FolderConflictError",
    "FolderInUseError",
    "PlanError",
    "RetryPolicy",
    "SaveSchedule",
    "ShardedCheckpointIO",
    "TargetExistsError",
    "WriterHook",
    "latest",
    "load_into",
    "read_checkpoint",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
