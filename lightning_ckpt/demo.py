"""A short demo: train, get killed mid-run, resume with ``ckpt_path="last"``, compare.

Run it with ``python -m lightning_ckpt.demo``. It trains a tiny regressor on the CPU three times:

1. a worker process saves a checkpoint every 4 steps and is killed with SIGKILL at step 10;
2. a new process resumes it with ``trainer.fit(model, ckpt_path="last")`` and finishes;
3. an uninterrupted run of the same length, for comparison.

It prints what was on disk after the kill and whether the resumed weights equal the
uninterrupted ones bit for bit. The model and data here are also what the test suite trains.

Example:
    >>> model = TinyRegressor()
    >>> sum(p.numel() for p in model.parameters())
    577
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

if TYPE_CHECKING:
    from lightning_ckpt import ShardedCheckpointIO

__all__ = ["EpochShuffleSampler", "TinyRegressor", "build_trainer", "main", "state_of"]


class EpochShuffleSampler(DistributedSampler[int]):
    """Shuffles with a seed derived from the epoch, so a resumed run sees the same order.

    Under data parallelism each rank takes every ``num_replicas``-th sample of the shuffled order
    (padded so the ranks get equal counts), as ``DistributedSampler`` does; being one, Lightning
    uses it as it is instead of wrapping it. ``skip`` samples of this rank's share are left out of
    the next pass only: that is how a run resumed from a mid-epoch checkpoint continues where it
    stopped (Lightning restarts a plain data loader from its first batch).

    Example:
        >>> s = EpochShuffleSampler(4, seed=0); s.set_epoch(1)
        >>> sorted(s) == [0, 1, 2, 3]
        True
        >>> s.skip = 3; len(list(s)), len(list(s))
        (1, 4)
        >>> halves = [list(EpochShuffleSampler(4, num_replicas=2, rank=r)) for r in (0, 1)]
        >>> sorted(halves[0] + halves[1]) == [0, 1, 2, 3]
        True
    """

    def __init__(self, size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.size, self.seed, self.skip = size, seed, 0

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        order += order[: self.total_size - len(order)]  # pad as DistributedSampler does
        skip, self.skip = self.skip, 0
        return iter(order[self.rank : self.total_size : self.num_replicas][skip:])


class TinyRegressor(L.LightningModule):
    """A 577-parameter MLP trained with Adam on a fixed synthetic data set."""

    def __init__(self, width: int = 32, lr: float = 1e-2, samples: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self(x), y))

    def predict_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])

    def _data(self, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.hparams["samples"], 16, generator=g)
        return TensorDataset(x, x.sum(dim=1, keepdim=True).sin())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Remember how far into its epoch a mid-epoch checkpoint was, to skip those samples (per rank)."""
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        done = progress.get("current", {}).get("processed", 0)
        self._resume_skip = 0 if progress.get("is_last_batch") else done * self.hparams["batch_size"]

    def train_dataloader(self) -> DataLoader[Any]:
        data = self._data(1)
        strategy = self.trainer.strategy if self._trainer is not None else None
        ranks = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        sampler = EpochShuffleSampler(len(data), num_replicas=ranks.get("num_replicas", 1), rank=ranks.get("rank", 0))
        sampler.skip = getattr(self, "_resume_skip", 0)
        return DataLoader(data, batch_size=self.hparams["batch_size"], sampler=sampler)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self._data(2), batch_size=self.hparams["batch_size"])

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader


class _SigkillAt(L.Callback):
    """Kills its own process with SIGKILL once ``trainer.global_step`` reaches ``step``, as when a node dies.

    It first lets the asynchronous save in flight commit, so what survives does not depend on timing.
    """

    def __init__(self, step: int, io: ShardedCheckpointIO) -> None:
        self.step, self.io = step, io

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step >= self.step:
            self.io.wait_for_save()
            os.kill(os.getpid(), signal.SIGKILL)


def build_trainer(root: str, *, max_epochs: int = 3, callbacks: Sequence[L.Callback] = (), **kwargs: Any) -> L.Trainer:
    """A quiet, deterministic CPU trainer rooted at ``root``."""
    options: dict[str, Any] = {
        "default_root_dir": root,
        "max_epochs": max_epochs,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 2,
    }
    options.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **options)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a model's weights, to compare runs."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run(folder: str, *, kill_at: int | None, resume: bool) -> TinyRegressor:
    from lightning_ckpt import CheckpointSaver, ShardedCheckpointIO

    L.seed_everything(0, verbose=False)
    saver = CheckpointSaver(folder=folder, save_interval="4ba", num_checkpoints_to_keep=2, run_name="demo")
    io = ShardedCheckpointIO()
    callbacks: list[L.Callback] = [saver] + ([_SigkillAt(kill_at, io)] if kill_at else [])
    trainer = build_trainer(folder, max_epochs=3, callbacks=callbacks, plugins=[io])
    model = TinyRegressor()
    trainer.fit(model, ckpt_path="last" if resume else None)
    return model


def _killed_run(folder: str, kill_at: int) -> None:
    """The first run, in a child process whose output is silenced: trains until SIGKILLed at ``kill_at``."""
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    _run(folder, kill_at=kill_at, resume=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo: a killed run, its resumption, an uninterrupted run; 0 if the two end bitwise equal."""
    argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None).parse_args(argv)
    from lightning_ckpt import latest

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "run")
        killed = multiprocessing.get_context("spawn").Process(target=_killed_run, args=(folder, 10))
        killed.start()
        killed.join()
        print(f"1. training process killed at step 10 (exit code {killed.exitcode})")
        print(f"   on disk: {sorted(os.listdir(folder))}")
        print(f"   newest committed checkpoint: {os.path.basename(latest(folder) or 'none')}")
        resumed = _run(folder, kill_at=None, resume=True)
        print(f"2. resumed with ckpt_path='last' and finished; kept: {sorted(os.listdir(folder))}")
        fresh = _run(os.path.join(tmp, "fresh"), kill_at=None, resume=False)
        a, b = state_of(resumed), state_of(fresh)
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(f"3. resumed weights equal an uninterrupted run bit for bit: {same}")
        return 0 if same and killed.exitcode == -signal.SIGKILL else 1


if __name__ == "__main__":
    sys.exit(main())
