"""One rank of a 2-rank Trainer job (torchrun, gloo, CPU) with FSDP2 checkpointed by Lightning's own callers.

``--strategy ours`` is :class:`lightning_ckpt.strategies.ShardedModelParallelStrategy`, ``stock`` Lightning's
``ModelParallelStrategy`` (DCP directories with ``meta.pt``). A stock ``ModelCheckpoint`` saves
at each epoch's end (keeping 2, plus ``last``); ``--final PATH`` calls ``trainer.save_checkpoint(PATH)`` after the fit.
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightning_ckpt.demo import build_trainer
from lightning_ckpt.strategies import ShardedModelParallelStrategy
from tests.ddp_worker import ShardedRegressor


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=["ours", "stock"], default="ours")
    p.add_argument("--folder", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--ckpt-path", default=None)
    p.add_argument("--final", default=None)
    args = p.parse_args()
    L.seed_everything(0, verbose=False)
    kind = ShardedModelParallelStrategy if args.strategy == "ours" else ModelParallelStrategy
    strategy = kind(data_parallel_size=2, tensor_parallel_size=1)
    checkpoint = ModelCheckpoint(dirpath=args.folder, save_top_k=2, monitor="step", mode="max", save_last=True)
    trainer = build_trainer(os.path.dirname(args.folder), max_epochs=args.epochs, callbacks=[checkpoint],
                            strategy=strategy, devices=2, limit_val_batches=0)  # fmt: skip
    trainer.fit(ShardedRegressor(), ckpt_path=args.ckpt_path)
    if args.final:
        trainer.save_checkpoint(args.final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
