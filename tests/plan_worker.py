"""One rank of a 2-rank Fabric DDP job (torchrun, gloo on CPU) that calls ``save_collective`` with dicts
that differ by rank, as a user of the plugin alone might; each case's outcome goes to
``<results>.rank<r>.json``: ``"ok"`` or the error type and message.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from lightning.fabric import Fabric

from lightning_ckpt import ShardedCheckpointIO, read_checkpoint


def _outcome(io: ShardedCheckpointIO, checkpoint: dict[str, Any], path: str, **kwargs: Any) -> str:
    try:
        io.save_collective(checkpoint, path, **kwargs)
    except Exception as err:  # reported to the test, which asserts the type and message
        return f"{type(err).__name__}: {err}"
    return "ok"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--results", required=True)
    args = parser.parse_args()
    io = ShardedCheckpointIO(barrier_timeout_s=60, verify_replicas=True)
    fabric = Fabric(accelerator="cpu", strategy="ddp", devices=2, plugins=[io])
    fabric.launch()
    rank = fabric.global_rank
    same = {"w": torch.arange(6.0), "b": torch.ones(3)}
    outcomes = {
        "extra_key": _outcome(io, {**same, **({"only_rank1": torch.zeros(2)} if rank else {})}, f"{args.folder}/a"),
        "differs": _outcome(io, {**same, "b": torch.full((3,), float(rank))}, f"{args.folder}/b", replicated=["b"]),
        "equal": _outcome(io, same, f"{args.folder}/c", replicated=["w", "b"]),
    }
    if outcomes["equal"] == "ok":
        loaded = read_checkpoint(f"{args.folder}/c")
        outcomes["equal_loads"] = str(all(torch.equal(loaded[k], same[k]) for k in same))
    with open(f"{args.results}.rank{rank}.json", "w") as f:
        json.dump(outcomes, f)
    fabric.barrier()
    os._exit(0)


if __name__ == "__main__":
    main()
