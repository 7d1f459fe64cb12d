"""Saving and loading a checkpoint of very many small tensors: where per-tensor overhead, not bytes, is the cost.

A state of ``--tensors`` tensors of ``--floats`` float32 values each (100,000 x 16 by default:
6.1 MiB of data, a manifest of about 19 MiB) is saved and loaded by each peer, in one process,
on the same data:

* **ours**: ``ShardedCheckpointIO().save_checkpoint`` (synchronous, durable: fsynced, committed)
  and ``ShardedCheckpointIO().load_checkpoint``;
* **torch.save**: one file, no fsync (what ``Trainer.save_checkpoint`` does), and ``torch.load``;
* **torch.save + fsync**: the same file made durable, as ours is;
* **dcp.save**: ``torch.distributed.checkpoint.save`` with its default writer and ``dcp.load``
  (skipped with ``--no-dcp``).

Every run of every peer is loaded back and compared with the state; each round runs every peer
once, in turn. Usage::

    python benchmarks/bench_many_tensors.py [--tensors 100000] [--floats 16] [--reps 5] [--no-dcp]
        [--dir PATH] [--json out.json] [--smoke]

Example:
    >>> row("ours", {"median": 2.0, "min": 1.5, "max": 2.5, "values": []}, None, 4.0)
    '| ours | 2.000 (1.500..2.500) | — | 0.50 |'
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import cell, machine_facts, machine_line, ratio, summarize

PEERS = {
    "ours": "ours: ShardedCheckpointIO().save_checkpoint (fsync)",
    "torch_save": "torch.save (no fsync)",
    "torch_save_fsync": "torch.save + fsync",
    "dcp": "dcp.save / dcp.load",
}


def row(name: str, save: dict[str, Any] | None, load: dict[str, Any] | None, torch_save_s: float | None) -> str:
    """One table row: the peer, its save and load medians, and its save time over ``torch.save``'s."""
    r = ratio(save["median"], torch_save_s) if save else None
    return f"| {name} | {cell(save)} | {cell(load)} | {'—' if r is None else f'{r:.2f}'} |"


def make_state(tensors: int, floats: int) -> dict[str, Any]:
    """A Lightning-shaped checkpoint dict of ``tensors`` float32 tensors of ``floats`` values."""
    generator = torch.Generator().manual_seed(0)
    weights = {f"layers.{i}.weight": torch.randn(floats, generator=generator) for i in range(tensors)}
    return {"state_dict": weights, "epoch": 0, "global_step": 1}


def _torch_save(state: dict[str, Any], path: str, fsync: bool) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _dcp_save(state: dict[str, Any], path: str) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(state["state_dict"], checkpoint_id=path, no_dist=True)


def _dcp_load(path: str, like: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    target = {k: torch.empty_like(v) for k, v in like["state_dict"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(target, checkpoint_id=path, no_dist=True)
    return {"state_dict": target}


def _peers(io: Any) -> dict[str, tuple[Callable[[dict[str, Any], str], None], Callable[[str], Any]]]:
    """Each peer's ``(save(state, path), load(path))``."""
    return {
        "ours": (io.save_checkpoint, io.load_checkpoint),
        "torch_save": (lambda s, p: _torch_save(s, p, False), torch.load),
        "torch_save_fsync": (lambda s, p: _torch_save(s, p, True), torch.load),
    }


def _same(loaded: dict[str, Any], state: dict[str, Any]) -> bool:
    got, want = loaded["state_dict"], state["state_dict"]
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def _once(
    state: dict[str, Any], path: str, save: Callable[[dict[str, Any], str], None], load: Callable[[str], Any]
) -> tuple[float, float, bool]:
    """Save and load once: the two times, and whether the loaded state equals ``state``."""
    gc.collect()
    start = time.perf_counter()
    save(state, path)
    saved = time.perf_counter() - start
    gc.collect()
    start = time.perf_counter()
    loaded = load(path)
    loaded_s = time.perf_counter() - start
    correct = _same(loaded, state)
    del loaded
    _remove(path)
    return saved, loaded_s, correct


def measure(
    state: dict[str, Any],
    directory: str,
    peers: dict[str, tuple[Callable[[dict[str, Any], str], None], Callable[[str], Any]]],
    reps: int,
) -> dict[str, dict[str, Any]]:
    """Median save and load times of every peer over ``reps`` rounds after one warm-up round.

    Each round runs every peer once, in turn, so a slow moment of a shared machine hits all of them.
    """
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in peers}
    correct: dict[str, bool] = {}
    for index in range(reps + 1):
        for name, (save, load) in peers.items():
            saved, loaded, same = _once(state, os.path.join(directory, f"{name}-{index}"), save, load)
            correct[name] = correct.get(name, True) and same
            if index:
                times[name].append((saved, loaded))
    return {
        name: {
            "save_s": summarize([s for s, _ in runs]),
            "load_s": summarize([lo for _, lo in runs]),
            "correct": correct[name],
        }
        for name, runs in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tensors", type=int, default=100_000)
    parser.add_argument("--floats", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-dcp", action="store_true", help="skip torch.distributed.checkpoint")
    parser.add_argument("--dir", default=None, help="scratch folder (default: benchmarks/results)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="2,000 tensors, one repetition (CI)")
    args = parser.parse_args()
    tensors, reps = (2_000, 1) if args.smoke else (args.tensors, args.reps)

    from lightning_ckpt import ShardedCheckpointIO

    root = args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(root, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="bench-many-", dir=root)
    state = make_state(tensors, args.floats)
    peers = _peers(ShardedCheckpointIO())
    if not args.no_dcp:
        peers["dcp"] = (_dcp_save, lambda p: _dcp_load(p, state))
    try:
        rows = measure(state, scratch, peers, reps)
        facts = machine_facts(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    torch_save_s = rows["torch_save"]["save_s"]["median"]
    print(machine_line(facts))
    print(f"\n{tensors} float32 tensors of {args.floats} values; {reps} runs after one warm-up;"
          " seconds, median (min..max)\n")  # fmt: skip
    print("| peer | save s | load s | save / torch.save |")
    print("|---|---|---|---|")
    for name, result in rows.items():
        print(row(PEERS[name], result["save_s"], result["load_s"], torch_save_s))
    wrong = [name for name, result in rows.items() if not result["correct"]]
    print(f"\nloaded state equal to the saved state: {'every peer' if not wrong else 'NOT ' + ', '.join(wrong)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "tensors": tensors, "floats": args.floats, "reps": reps, "rows": rows}, f,
                      indent=1)  # fmt: skip
    if wrong:
        sys.exit(1)


if __name__ == "__main__":
    main()
