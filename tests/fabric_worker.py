"""One rank of a real multi-process Fabric DDP run (gloo on CPU), launched by torchrun in tests/test_fabric.py.

Trains a few steps, ``fabric.save``s model, optimizer and plain state with ``ShardedCheckpointIO``,
then loads it into fresh objects with ``fabric.load`` and checks that everything came back.
Each rank writes its findings to ``<results>.rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from lightning.fabric import Fabric

from lightning_ckpt import ShardedCheckpointIO


def build(fabric: Fabric, seed: int) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return fabric.setup(model, optimizer)


def train(fabric: Fabric, model: Any, optimizer: Any, steps: int) -> None:
    g = torch.Generator().manual_seed(100 + fabric.global_rank)
    for _ in range(steps):
        x = torch.randn(4, 8, generator=g)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()


def optimizer_tensors(optimizer: Any) -> dict[str, torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return {f"{i}.{k}": v for i, entry in state.items() for k, v in entry.items() if isinstance(v, torch.Tensor)}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def slow_down_writes(seconds: float) -> None:
    """A slow disk: every shard write (the background part of an async save) starts ``seconds`` late."""
    import lightning_ckpt.pipeline

    real = lightning_ckpt.pipeline.finish_save

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return real(*args, **kwargs)

    lightning_ckpt.pipeline.finish_save = slow  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--results", required=True, help="each rank writes <results>.rank<r>.json")
    parser.add_argument("--async-save", action="store_true", help="ShardedCheckpointIO(async_save=True)")
    parser.add_argument("--slow-write-s", type=float, default=0.0, help="a slow disk: delay each background write")
    args = parser.parse_args()

    if args.slow_write_s:
        slow_down_writes(args.slow_write_s)
    io = ShardedCheckpointIO(barrier_timeout_s=60, async_save=args.async_save)
    fabric = Fabric(accelerator="cpu", strategy="ddp", devices=args.devices, plugins=[io])
    fabric.launch()
    model, optimizer = build(fabric, seed=0)
    train(fabric, model, optimizer, steps=3)  # DDP averages gradients: every rank holds the same weights
    fabric.save(args.path, {"model": model, "optimizer": optimizer, "progress": {"step": 5}, "epoch": 2})
    saved_at = time.monotonic()

    fresh_model, fresh_optimizer = build(fabric, seed=1)
    state: dict[str, Any] = {"model": fresh_model, "optimizer": fresh_optimizer, "progress": {}, "epoch": 0}
    remainder = fabric.load(args.path, state)  # no wait_for_save(): rank 0 may still be writing
    load_waited_s = time.monotonic() - saved_at

    result = {
        "rank": fabric.global_rank,
        "world_size": fabric.world_size,
        "io_is_ours": fabric.strategy.checkpoint_io is io,
        "weights_equal": equal(model.state_dict(), fresh_model.state_dict()),
        "optimizer_equal": equal(optimizer_tensors(optimizer), optimizer_tensors(fresh_optimizer))
        and optimizer.state_dict()["param_groups"] == fresh_optimizer.state_dict()["param_groups"],
        "progress": state["progress"],
        "epoch": state["epoch"],
        "remainder": sorted(remainder),
        "pid": os.getpid(),
        "load_waited_s": load_waited_s,
    }
    with open(f"{args.results}.rank{fabric.global_rank}.json", "w") as f:  # one file per rank: no interleaving
        json.dump(result, f)


if __name__ == "__main__":
    main()
