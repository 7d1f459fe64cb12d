"""One fit of a model that is mostly frozen, saved with ``CheckpointSaver(incremental=True)``.

The model is a frozen base (two ``Linear`` layers, ``requires_grad=False``), a ``BatchNorm1d``
whose running statistics move at every step, and a trained head; Adam (on the trainable
parameters) with a ``StepLR`` schedule; 2 steps per epoch (so every save ends an epoch and a
resume replays the same batches). Saves every 2 steps, a full save every 3rd save, keeps 2:
ba2 (full), ba4, ba6 (both reference ba2), ba8 (full), ba10, ba12 (both reference ba8).

Run as ``python tests/faults.py tests/incremental_worker.py --folder F [--resume] [--state OUT]``
(with ``LIGHTNING_CKPT_KILL_AT`` set to die at a point of a save), under torchrun with
``--devices 2`` (DDP, gloo), or call :func:`fit` in-process.
``--state`` writes everything a resume must restore: weights, buffers, optimizer and scheduler
state, the step, and the saver's state.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ckpt import CheckpointSaver

__all__ = ["Adapted", "fit", "full_state"]

STEPS = 12


class Adapted(L.LightningModule):
    """A frozen base, a BatchNorm and a trained head (the shape of adapter fine-tuning)."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 64))
        self.base.requires_grad_(False)
        self.norm = nn.BatchNorm1d(64)
        self.head = nn.Linear(64, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (self.head(self.norm(self.base(x))) - y).pow(2).mean()

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5)}


def fit(
    folder: str,
    *,
    resume: bool = False,
    steps: int = STEPS,
    keep: int = 2,
    full_every: int = 3,
    async_save: bool = True,
    callbacks: Sequence[L.Callback] = (),
    plugins: Sequence[Any] = (),
    devices: int = 1,
    **saver_options: Any,
) -> tuple[L.Trainer, Adapted]:
    """Fit from scratch (or from ``"last"`` in ``folder``) for ``steps`` steps, saving every 2."""
    L.seed_everything(0, verbose=False)
    saver = CheckpointSaver(folder, filename="ba{batch}", save_interval="2ba", num_checkpoints_to_keep=keep,
                            incremental=True, full_every=full_every, async_save=async_save,
                            run_name="adapter", **saver_options)  # fmt: skip
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=-1,
        plugins=list(plugins),
        callbacks=[saver, *callbacks],
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    model = Adapted()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16, 64, generator=g), torch.randn(16, 1, generator=g))  # 2 steps per epoch
    trainer.fit(model, DataLoader(data, batch_size=8), ckpt_path="last" if resume else None)
    return trainer, model


def full_state(trainer: L.Trainer, model: Adapted) -> dict[str, Any]:
    """Everything a resume must restore, detached and copied."""
    saver = next(c for c in trainer.callbacks if isinstance(c, CheckpointSaver))  # type: ignore[attr-defined]
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "global_step": trainer.global_step,
        "saver": saver.state_dict(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--folder", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--state", default=None)
    parser.add_argument("--devices", type=int, default=1, help="ranks (DDP under torchrun when above 1)")
    args = parser.parse_args(argv)
    trainer, model = fit(args.folder, resume=args.resume, devices=args.devices)
    if args.state and trainer.is_global_zero:
        torch.save(full_state(trainer, model), args.state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
