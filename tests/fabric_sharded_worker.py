"""One rank of a 2-rank Fabric job (torchrun, gloo on CPU) with FSDP2 through ``ShardedModelParallelStrategy``.

It trains a few steps, ``fabric.save``s (synchronously, or asynchronously and then changes every parameter
and optimizer value in place before the save is waited for), loads the checkpoint into a fresh model and
optimizer with ``fabric.load``, and writes ``<results>.rank<r>.json``: whether each loaded tensor, gathered
to its full value, equals the value at the moment of the save, and what ``fabric.load`` returned.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from lightning.fabric import Fabric
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from lightning_ckpt import ShardedCheckpointIO
from lightning_ckpt.fabric_strategies import ShardedModelParallelStrategy


def _parallelize(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh["data_parallel"])
    fully_shard(model, mesh=mesh["data_parallel"])
    return model


def _setup(fabric: Fabric) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.ReLU(), torch.nn.Linear(33, 1))  # 33: uneven
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))
    return model, optimizer


def _full(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer tensor gathered to its full value (a collective)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    out = {f"model/{k}": v.clone() for k, v in get_model_state_dict(model, options=options).items()}
    state = get_optimizer_state_dict(model, optimizer, options=options)["state"]
    out.update({f"optim/{k}/{f}": v.clone() for k, fields in state.items() for f, v in fields.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--path", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--async-save", action="store_true")
    args = parser.parse_args()
    io = ShardedCheckpointIO(async_save=args.async_save)
    strategy = ShardedModelParallelStrategy(
        parallelize_fn=_parallelize, data_parallel_size=2, tensor_parallel_size=1, checkpoint_io=io
    )
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    model, optimizer = _setup(fabric)
    generator = torch.Generator().manual_seed(fabric.global_rank)
    for _ in range(3):
        loss = model(torch.randn(8, 16, generator=generator)).pow(2).mean()
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    expected = _full(model, optimizer)
    fabric.save(args.path, {"model": model, "optimizer": optimizer, "step": 3, "note": "hello"})
    if args.async_save:  # the save returned once staged: training may change everything now
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        for fields in optimizer.state.values():
            for value in fields.values():
                value.add_(1.0)
        io.wait_for_save()
    fresh_model, fresh_optimizer = _setup(fabric)
    state: dict[str, Any] = {"model": fresh_model, "optimizer": fresh_optimizer, "step": 0}
    rest = fabric.load(args.path, state)
    loaded = _full(fresh_model, fresh_optimizer)
    outcome = {
        "keys_equal": sorted(loaded) == sorted(expected),
        "different": sorted(k for k in expected if k in loaded and not torch.equal(loaded[k], expected[k])),
        "tensors": len(expected),
        "step": state["step"],
        "rest": rest,
    }
    with open(f"{args.results}.rank{fabric.global_rank}.json", "w") as f:
        json.dump(outcome, f)
    fabric.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
