"""What watching for preemption costs a multi-rank training step: ours against Lightning's own.

With several ranks, some collective must tell every rank that one of them was signalled.

* **Lightning** (``_SignalConnector`` and the training loop) broadcasts a one-element tensor
  from rank 0 at *every* training step.
* **lightning-ckpt** (``CheckpointSaver``, :mod:`lightning_ckpt.preemption`) combines every rank's
  flag (and rank 0's choice of the next check step) in one 2-integer all-reduce, only at steps
  that rank 0 names about once a second of training.

Lightning's broadcast still runs while a ``CheckpointSaver`` watches (it is part of Lightning's
training loop), so the saver's cost adds to it; the table shows both.

The script measures both collectives on gloo with real processes (2 ranks on this machine) and
prints the cost per training step for several step times, with the ratio ours / Lightning's.

Usage::

    python benchmarks/bench_preemption_check.py [--reps 5] [--iters 1000] [--json out.json] [--smoke]

Example:
    >>> round(per_step_cost_us(check_us=700.0, step_s=0.1, every_s=1.0), 1)
    70.0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import free_port

from lightning_ckpt.preemption import PREEMPTION_CHECK_S

STEP_TIMES_S = (0.01, 0.05, 0.2, 1.0)


def per_step_cost_us(check_us: float, step_s: float, every_s: float | None) -> float:
    """Microseconds per step of a ``check_us`` check done every ``every_s`` seconds (``None``: every step)."""
    if every_s is None:
        return check_us
    steps_between = max(1, int(every_s / step_s))
    return check_us / steps_between


def _worker(rank: int, port: int, reps: int, iters: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    flags = torch.zeros(2, dtype=torch.int64)
    sigterm = torch.zeros(1, dtype=torch.int64)

    def ours() -> None:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)

    def lightnings() -> None:
        dist.broadcast(sigterm, src=0)

    results: dict[str, list[float]] = {}
    for name, check in (("ours", ours), ("lightning", lightnings)):
        for _ in range(max(10, iters // 10)):  # warm-up
            check()
        runs = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(iters):
                check()
            runs.append((time.perf_counter() - start) / iters * 1e6)
        results[name] = runs
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def measure(reps: int, iters: int) -> dict[str, list[float]]:
    """Per-check microseconds of both collectives, ``reps`` runs of ``iters`` checks each."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(free_port(), reps, iters, out), nprocs=2)
        with open(out) as f:
            return dict(json.load(f))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="a few iterations: checks the script runs")
    args = parser.parse_args(argv)
    reps, iters = (2, 20) if args.smoke else (args.reps, args.iters)
    runs = measure(reps, iters)
    check = {name: statistics.median(values) for name, values in runs.items()}
    print(f"One check, gloo, 2 ranks, median of {reps} x {iters}: ours {check['ours']:.0f} us"
          f" (all-reduce), Lightning's {check['lightning']:.0f} us (broadcast)")  # fmt: skip
    print()
    print("| step time | ours: checks | ours per step (added) | Lightning's per step (always) | ours / Lightning |")
    print("|---|---|---|---|---|")
    rows = []
    for step_s in STEP_TIMES_S:
        ours = per_step_cost_us(check["ours"], step_s, PREEMPTION_CHECK_S)
        theirs = per_step_cost_us(check["lightning"], step_s, None)
        every = max(1, int(PREEMPTION_CHECK_S / step_s))
        rows.append({"step_s": step_s, "every_n_steps": every, "ours_us": ours, "lightning_us": theirs})
        print(f"| {step_s * 1000:.0f} ms | every {every} steps | {ours:.1f} us ({ours / (step_s * 1e4):.3f} %) |"
              f" {theirs:.1f} us ({theirs / (step_s * 1e4):.3f} %) | {ours / theirs:.2f}x |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs_us": runs, "check_us": check, "rows": rows, "smoke": args.smoke}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
