"""Save and load a ~1 GiB Lightning-shaped checkpoint: ShardedCheckpointIO vs Lightning's TorchCheckpointIO.

Everything is measured in one process run on the same state, with a warm-up and N repetitions
(medians and min-max reported), next to the disk's own limit measured in the same run:

* save (durable): the plugin's ``save_checkpoint`` including its fsyncs; ``TorchCheckpointIO``
  as Lightning runs it (no fsync) and with an fsync of the file added, for a like-for-like figure;
* load (cold): page cache for the checkpoint files dropped first (``posix_fadvise DONTNEED``),
  then ``load_checkpoint`` and a copy of every tensor into already-allocated model/optimizer
  tensors, which is what resuming costs;
* limit: one raw ``os.write`` of the same bytes from tensor memory + fsync, and a cold read back.

Usage::

    python benchmarks/bench_save_load.py [--gib 0.94] [--reps 5] [--dir /path/on/the/disk] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from lightning_ckpt import ShardedCheckpointIO


def make_state(gib: float) -> dict[str, Any]:
    """Parameters plus Adam's two moments, as ``Trainer.save_checkpoint`` would hold them (fp32)."""
    total_params = int(gib * 2**30 / 4 / 3)
    layer = 2048 * 2048
    params: dict[str, torch.Tensor] = {}
    i = 0
    while sum(p.numel() for p in params.values()) + layer + 2048 <= total_params:
        params[f"layers.{i}.weight"] = torch.randn(2048, 2048)
        params[f"layers.{i}.bias"] = torch.randn(2048)
        i += 1
    opt_state = {
        n: {"step": torch.tensor(100.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
        for n, p in enumerate(params.values())
    }
    return {
        "epoch": 3,
        "global_step": 1500,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": params,
        "optimizer_states": [{"state": opt_state, "param_groups": [{"lr": 1e-3, "params": list(range(len(params)))}]}],
        "lr_schedulers": [],
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 3}}}},
        "callbacks": {},
        "hyper_parameters": {"width": 2048},
    }


def tensors_of(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors_of(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors_of(v)]
    return []


def drop_cache(path: str) -> None:
    """Evict a file's (or a directory's files') pages from the page cache."""
    paths = [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else [path]
    for p in paths:
        if os.path.isfile(p):
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def timed(fn: Callable[[], Any], reps: int, before: Callable[[], None] | None = None) -> list[float]:
    """Warm-up once, then ``reps`` timed runs; ``before`` runs untimed before each."""
    times = []
    for rep in range(reps + 1):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if rep > 0:
            times.append(elapsed)
    return times


def raw_write(state_tensors: list[torch.Tensor], path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for t in state_tensors:
        view = t.reshape(-1).view(torch.uint8).numpy().data.cast("B")
        while view:
            view = view[os.write(fd, view) :]
    os.fsync(fd)
    os.close(fd)


def raw_read(path: str, into: list[torch.Tensor]) -> None:
    with open(path, "rb", buffering=0) as f:
        for t in into:
            view = t.reshape(-1).view(torch.uint8).numpy().data.cast("B")
            while view:
                view = view[f.readinto(view) :]


def copy_into(loaded: dict[str, Any], targets: list[torch.Tensor]) -> None:
    for dst, src in zip(targets, tensors_of(loaded), strict=True):
        dst.copy_(src)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=0.94)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir under benchmarks/results)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    base = args.dir or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(dir=base)
    state = make_state(args.gib)
    flat = tensors_of(state)
    nbytes = sum(t.numel() * t.element_size() for t in flat)
    targets = [torch.empty_like(t) for t in flat]  # the "model" to resume into, allocated once
    ours, theirs = ShardedCheckpointIO(), TorchCheckpointIO()
    ours_path, theirs_path, raw_path = (os.path.join(work, n) for n in ("ours", "theirs.ckpt", "raw.bin"))

    def theirs_durable() -> None:
        theirs.save_checkpoint(state, theirs_path)
        fsync_file(theirs_path)

    results: dict[str, list[float]] = {}
    try:
        results["limit: raw write + fsync"] = timed(lambda: raw_write(flat, raw_path), args.reps)
        results["limit: raw cold read"] = timed(
            lambda: raw_read(raw_path, targets), args.reps, lambda: drop_cache(raw_path)
        )
        results["ShardedCheckpointIO save (fsync'd)"] = timed(lambda: ours.save_checkpoint(state, ours_path), args.reps)
        results["TorchCheckpointIO save (no fsync)"] = timed(
            lambda: theirs.save_checkpoint(state, theirs_path), args.reps
        )
        results["TorchCheckpointIO save + fsync"] = timed(theirs_durable, args.reps)
        results["ShardedCheckpointIO cold load + copy"] = timed(
            lambda: copy_into(ours.load_checkpoint(ours_path), targets), args.reps, lambda: drop_cache(ours_path)
        )
        results["TorchCheckpointIO cold load + copy"] = timed(
            lambda: copy_into(theirs.load_checkpoint(theirs_path, weights_only=True), targets),
            args.reps,
            lambda: drop_cache(theirs_path),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    gb = nbytes / 1e9
    print(f"\nState: {len(flat)} tensors, {nbytes / 2**30:.2f} GiB; {args.reps} reps after 1 warm-up; medians\n")
    print("| operation | median s | min-max s | GB/s | vs raw limit |")
    print("|---|---|---|---|---|")
    for key, times in results.items():
        limit = med["limit: raw cold read"] if "load" in key or "read" in key else med["limit: raw write + fsync"]
        print(
            f"| {key} | {med[key]:.2f} | {min(times):.2f}-{max(times):.2f} | {gb / med[key]:.2f}"
            f" | {med[key] / limit:.2f}x |"
        )
    save_ratio = med["TorchCheckpointIO save + fsync"] / med["ShardedCheckpointIO save (fsync'd)"]
    save_ratio_nofsync = med["TorchCheckpointIO save (no fsync)"] / med["ShardedCheckpointIO save (fsync'd)"]
    load_ratio = med["TorchCheckpointIO cold load + copy"] / med["ShardedCheckpointIO cold load + copy"]
    print(f"\nsave: ShardedCheckpointIO is {save_ratio:.2f}x faster than TorchCheckpointIO+fsync")
    print(f"      ({save_ratio_nofsync:.2f}x faster than TorchCheckpointIO without any fsync)")
    print(f"load: ShardedCheckpointIO is {load_ratio:.2f}x faster than TorchCheckpointIO")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bytes": nbytes, "reps": args.reps, "times_s": results, "median_s": med}, f, indent=1)


if __name__ == "__main__":
    main()
