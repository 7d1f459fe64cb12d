"""One training process of the kill tests: the demo's model fitted with a ``CheckpointSaver``, resuming ``"last"``.

Run it as ``python -m tests.kill_worker --folder F [--kill-at N] ...`` (``tests.conftest.run_worker``).
With ``--kill-at`` it SIGKILLs itself at that step (:class:`KillAtStep`); with ``LIGHTNING_CKPT_KILL_AT``
set it dies at a point of the save instead (:mod:`tests.faults`). ``--save-weights`` writes the
final weights, to compare with an uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from lightning_ckpt import CheckpointSaver, ShardedCheckpointIO
from lightning_ckpt.demo import TinyRegressor, build_trainer, state_of
from tests.faults import install_from_env

__all__ = ["KillAtStep", "main", "train"]


class KillAtStep(L.Callback):
    """Kills its own process with SIGKILL once ``trainer.global_step`` reaches ``step``.

    With ``settle`` (default) it first lets an asynchronous save in flight commit, so which
    checkpoint survives does not depend on timing; ``settle=False`` kills mid-write.

    Example:
        >>> KillAtStep(10, settle=False).settle
        False
    """

    def __init__(self, step: int, settle: bool = True) -> None:
        self.step, self.settle = step, settle

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step >= self.step:
            io = trainer.strategy.checkpoint_io
            if self.settle and isinstance(io, ShardedCheckpointIO):
                io.wait_for_save()
            os.kill(os.getpid(), signal.SIGKILL)


def train(
    folder: str, *, kill_at: int | None, interval: str = "4ba", keep: int = 2, epochs: int = 3, settle: bool = True
) -> TinyRegressor:
    """Fit ``TinyRegressor`` with checkpoints in ``folder``, resuming from its newest one if any."""
    L.seed_everything(0, verbose=False)
    saver = CheckpointSaver(folder=folder, save_interval=interval, num_checkpoints_to_keep=keep, run_name="demo")
    callbacks: list[L.Callback] = [saver] + ([KillAtStep(kill_at, settle=settle)] if kill_at else [])
    trainer = build_trainer(folder, max_epochs=epochs, callbacks=callbacks, plugins=[ShardedCheckpointIO()])
    model = TinyRegressor()
    trainer.fit(model, ckpt_path="last")
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, train, and write the final weights where ``--save-weights`` says."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--interval", default="4ba")
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--save-weights", default=None)
    parser.add_argument("--no-settle", action="store_true")
    args = parser.parse_args(argv)
    model = train(args.folder, kill_at=args.kill_at, interval=args.interval, keep=args.keep, epochs=args.epochs,
                  settle=not args.no_settle)  # fmt: skip
    if args.save_weights:
        torch.save(state_of(model), args.save_weights)
    return 0


if __name__ == "__main__":
    install_from_env()
    sys.exit(main())
