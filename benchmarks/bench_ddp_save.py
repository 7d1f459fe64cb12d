"""Collective save of a ~1 GiB replicated (DDP) state: 1 rank alone vs 2 ranks writing in parallel.

Real processes and a real gloo process group (``torch.multiprocessing.spawn``). Every rank holds
the same state, as in DDP; ``ShardedCheckpointIO.save_collective`` splits it by bytes so each rank
writes its share, then the ranks meet at the barrier and rank 0 commits. Timed on rank 0 from a
barrier before the call to its return (the checkpoint is durable and committed then). The limit
in the same run: the same bytes written raw with ``os.write`` + fsync by 1 process, and split
between 2 processes writing at once.

Usage::

    python benchmarks/bench_ddp_save.py [--gib 0.94] [--reps 5] [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_save_load import make_state, raw_write, tensors_of

from lightning_ckpt import ShardedCheckpointIO
from lightning_ckpt.sharding import assign_by_bytes


def _rank_main(rank: int, world: int, port: int, gib: float, reps: int, work: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, 2 // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    state = make_state(gib)
    io = ShardedCheckpointIO()
    flat = tensors_of(state)
    share = assign_by_bytes({str(i): t.numel() * t.element_size() for i, t in enumerate(flat)}, world)[rank]
    mine = [flat[int(k)] for k in share]
    times: dict[str, list[float]] = {"save_collective": [], "raw": []}
    for rep in range(reps + 1):
        for kind in ("raw", "save_collective"):
            dist.barrier()
            start = time.perf_counter()
            if kind == "raw":
                raw_write(mine, os.path.join(work, f"raw-{rank}.bin"))
                dist.barrier()
            else:
                io.save_collective(state, os.path.join(work, f"ckpt{rep}"))
            elapsed = time.perf_counter() - start
            if rep > 0:
                times[kind].append(elapsed)
        if rank == 0 and rep > 0:
            shutil.rmtree(os.path.join(work, f"ckpt{rep - 1}"), ignore_errors=True)
    if rank == 0:
        with open(out, "w") as f:
            f.write(repr(times))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=0.94)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    rows = {}
    for world in (1, 2):
        work = tempfile.mkdtemp(dir=args.dir)
        out = os.path.join(work, "times.txt")
        try:
            mp.spawn(_rank_main, args=(world, _free_port(), args.gib, args.reps, work, out), nprocs=world, join=True)
            with open(out) as f:
                rows[world] = eval(f.read())  # written by this script above
        finally:
            shutil.rmtree(work, ignore_errors=True)
    nbytes = sum(t.numel() * t.element_size() for t in tensors_of(make_state(args.gib)))
    print(f"\nReplicated state: {nbytes / 2**30:.2f} GiB; {args.reps} reps after 1 warm-up; medians (min-max)\n")
    print("| ranks | save_collective s | GB/s | raw write+fsync of the same split s | vs raw |")
    print("|---|---|---|---|---|")
    med = {}
    for world, times in rows.items():
        save, raw = statistics.median(times["save_collective"]), statistics.median(times["raw"])
        med[world] = save
        print(
            f"| {world} | {save:.2f} ({min(times['save_collective']):.2f}-{max(times['save_collective']):.2f})"
            f" | {nbytes / 1e9 / save:.2f} | {raw:.2f} ({min(times['raw']):.2f}-{max(times['raw']):.2f})"
            f" | {save / raw:.2f}x |"
        )
    print(f"\n2 ranks in parallel vs 1 rank: {med[1] / med[2]:.2f}x faster")


if __name__ == "__main__":
    main()
