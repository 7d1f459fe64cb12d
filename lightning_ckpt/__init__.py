"""lightning-ckpt: sharded, atomic, resumable checkpointing for PyTorch Lightning.

Example:
    >>> from lightning_ckpt import CheckpointSaver, ShardedCheckpointIO, latest
    >>> saver = CheckpointSaver(folder="/tmp/runs/{run_name}", run_name="demo", save_interval="2ba")
    >>> saver.save_interval
    EveryNBatches(2)
"""

from lightning_ckpt.callback import CheckpointSaver
from lightning_ckpt.collective import WriterHook
from lightning_ckpt.discovery import latest
from lightning_ckpt.dist import CollectiveError
from lightning_ckpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    ConfigTypeError,
    CorruptCheckpointError,
    FolderConflictError,
    FolderInUseError,
)
from lightning_ckpt.interval import Event, SaveSchedule
from lightning_ckpt.plugin import ShardedCheckpointIO
from lightning_ckpt.reader import read_checkpoint
from lightning_ckpt.transfer import RetryPolicy

__version__ = "0.1.0"

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
    "RetryPolicy",
    "SaveSchedule",
    "ShardedCheckpointIO",
    "WriterHook",
    "latest",
    "read_checkpoint",
]
