"""Sharded (FSDP2) checkpoints on 2 ranks: this package against ``torch.distributed.checkpoint``.

A stack of ``Linear(D, D)`` layers is sharded with ``fully_shard`` over 2 CPU processes (torchrun,
gloo); with Adam's two moments the whole state is ``--size-mib`` MiB (default 1024), half per rank.
Each rank saves {model, optimizer} as sharded state dicts (what Lightning's ``ModelParallelStrategy``
hands to DCP), ``--repeats`` times per method, into a fresh folder each time:

* **dcp_save**: ``dcp.save`` (Lightning's own sharded path); stall = durable;
* **dcp_async_save**: ``dcp.async_save``; stall = until it returns, durable = until its future is done;
* **ours_sync**: ``ShardedCheckpointIO().save_collective``; stall = durable = committed;
* **ours_async**: the same with ``async_save=True``; stall = until it returns, durable = ``wait()``;
* **limit_write**: each rank writes its share of the bytes to one file and fsyncs it (the disk's pace).

Load: ``dcp.load`` + ``set_state_dict`` (what Lightning's loader does) against this package's in-place
load (``load_checkpoint(into=...)``), cold (page cache dropped first: a restart on another node) and
warm (files cached: a restart on the same node, if the save left them cached; this package writes with
``O_DIRECT`` and so leaves nothing cached), taking turns at going first, after ``--settle-s`` seconds
(on the development machine's virtual disk a file read right after gigabytes were written reads up to
3x slower, whoever wrote it). Every time is the slowest rank's;
peak extra RSS is the largest rank's ``VmHWM`` rise during the save (reset through ``clear_refs``).

Usage::

    python benchmarks/bench_sharded.py [--size-mib 1024] [--repeats 3] [--dir PATH] [--json out.json] [--smoke]

Example:
    >>> layers_for(1024, 2048)
    21
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 2**20
SAVES = ["dcp_save", "dcp_async_save", "ours_sync", "ours_async", "limit_write"]
LOADS = ["dcp_load_cold", "ours_load_cold", "dcp_load_warm", "ours_load_warm"]


def layers_for(size_mib: float, width: int) -> int:
    """How many ``Linear(width, width)`` layers (weights and bias, fp32, plus two Adam moments) make ``size_mib``."""
    per_layer = 3 * 4 * (width * width + width)
    return max(1, round(size_mib * MIB / per_layer))


def _hwm_reset() -> int:
    from _bench_common import rss_bytes

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def worker(args: argparse.Namespace) -> None:
    """One rank: build the sharded model and optimizer, time every method, rank 0 writes the JSON rows."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from _bench_common import drop_cache, fsync_file, malloc_trim, raw_write_buffered
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_ckpt import ShardedCheckpointIO
    from lightning_ckpt.sharded import sharded_state_dicts

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 1e-3
    optimizer.step()  # Adam's state exists
    optimizer.zero_grad(set_to_none=True)

    def slowest(value: float) -> float:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return max(gathered)

    def dcp_state() -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def ours_state() -> dict[str, Any]:
        return sharded_state_dicts({"model": model, "optimizer": optimizer})

    ours_sync, ours_async = ShardedCheckpointIO(async_save=False), ShardedCheckpointIO(async_save=True)
    pieces = [t.to_local() for t in model.state_dict().values()]
    pieces += [v.to_local() for s in optimizer.state.values() for v in s.values() if v.dim() > 0]

    def save(method: str, path: str) -> tuple[Callable[[], None], Callable[[], Any]]:
        """(start, wait): start returns when training could go on; wait returns when the save is durable."""
        box: dict[str, Any] = {}
        if method == "dcp_save":
            return (lambda: dcp.save(dcp_state(), checkpoint_id=path)), (lambda: None)
        if method == "dcp_async_save":
            return (lambda: box.update(f=dcp.async_save(dcp_state(), checkpoint_id=path))), (lambda: box["f"].result())
        if method == "ours_sync":
            return (lambda: box.update(h=ours_sync.save_collective(ours_state(), path))), (lambda: box["h"].wait())
        if method == "ours_async":
            return (lambda: box.update(h=ours_async.save_collective(ours_state(), path))), (lambda: box["h"].wait())

        def raw() -> None:
            os.makedirs(path, exist_ok=True)
            target = os.path.join(path, f"rank{rank}.bin")
            raw_write_buffered(pieces, target)
            fsync_file(target)

        return raw, (lambda: None)

    rows: dict[str, Any] = {m: {"stall_s": [], "durable_s": [], "peak_extra_mib": []} for m in SAVES}
    rows.update({m: {"load_s": []} for m in LOADS})
    shared = args.dir
    for repeat in range(args.repeats):
        for method in SAVES:
            path = os.path.join(shared, f"{method}-{repeat}")
            start, wait = save(method, path)
            malloc_trim(collect=True)
            base = _hwm_reset()
            dist.barrier()
            t0 = time.perf_counter()
            start()
            stall = time.perf_counter() - t0
            wait()
            durable = time.perf_counter() - t0
            peak = _hwm() - base
            rows[method]["stall_s"].append(slowest(stall))
            rows[method]["durable_s"].append(slowest(durable))
            rows[method]["peak_extra_mib"].append(slowest(peak / MIB))
            dist.barrier()
        if rank == 0:  # only the two checkpoints to load stay; the disk settles before the loads
            for method in SAVES:
                if method not in ("dcp_save", "ours_sync"):
                    shutil.rmtree(os.path.join(shared, f"{method}-{repeat}"), ignore_errors=True)
        time.sleep(args.settle_s)
        pairs = [("dcp", "dcp_save"), ("ours", "ours_sync")]
        for temperature in ("cold", "warm"):  # cold: page cache dropped; warm: the cold load left it cached
            for who, saved_by in pairs if repeat % 2 == 0 else pairs[::-1]:  # alternate who goes first
                path = os.path.join(shared, f"{saved_by}-{repeat}")
                if rank == 0 and temperature == "cold":
                    drop_cache(path)
                dist.barrier()
                t0 = time.perf_counter()
                if who == "dcp":
                    state = dcp_state()
                    dcp.load(state, checkpoint_id=path)
                    model_sd, optim_sd = state["model"], state["optimizer"]
                    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
                else:
                    ours_sync.load_checkpoint(path, into=(model, [optimizer], True), module_key="model",
                                              optimizer_keys=[("optimizer",)])  # fmt: skip
                rows[f"{who}_load_{temperature}"]["load_s"].append(slowest(time.perf_counter() - t0))
                dist.barrier()
        if rank == 0:
            for method in SAVES:
                shutil.rmtree(os.path.join(shared, f"{method}-{repeat}"), ignore_errors=True)
        dist.barrier()
    ours_sync.teardown()
    ours_async.teardown()
    if rank == 0:
        with open(args.rows, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _summaries(raw: dict[str, Any]) -> dict[str, Any]:
    from _bench_common import summarize

    return {method: {field: summarize(values) for field, values in fields.items()} for method, fields in raw.items()}


def report(rows: dict[str, Any], state_bytes: int) -> str:
    from _bench_common import cell, ratio

    lines = ["| method | stall s | durable s | load s | peak extra RSS MiB / rank |", "|---|---|---|---|---|"]
    for method in SAVES:
        r = rows[method]
        peak = cell(r["peak_extra_mib"], "{:.0f}")
        lines.append(f"| {method} | {cell(r['stall_s'])} | {cell(r['durable_s'])} | — | {peak} |")
    for method in LOADS:
        lines.append(f"| {method} | — | — | {cell(rows[method]['load_s'])} | — |")

    def of(a: str, b: str, field: str) -> float | None:
        return ratio(rows[a][field]["median"], rows[b][field]["median"])

    targets = [
        ("stall ours_async / dcp_async_save (target <= 1)", of("ours_async", "dcp_async_save", "stall_s")),
        ("durable ours_sync / dcp_save (target <= 0.8)", of("ours_sync", "dcp_save", "durable_s")),
        ("durable ours_async / dcp_async_save", of("ours_async", "dcp_async_save", "durable_s")),
        ("cold load speed-up dcp / ours (target >= 1.25)", of("dcp_load_cold", "ours_load_cold", "load_s")),
        ("warm load speed-up dcp / ours (target >= 1.25)", of("dcp_load_warm", "ours_load_warm", "load_s")),
        ("durable ours_sync / limit_write (disk pace)", of("ours_sync", "limit_write", "durable_s")),
    ]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {'—' if value is None else f'{value:.2f}'} |" for name, value in targets]
    lines.append(f"\nstate: {state_bytes / MIB:.0f} MiB over 2 ranks (medians, min..max over repeats)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=float, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=10.0, help="pause between the saves and the loads")
    parser.add_argument("--dir", default=None, help="where the scratch folder goes (default: benchmarks/results)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="8 MiB, one repeat")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    if args.worker:
        worker(args)
        return 0
    if args.smoke:
        args.size_mib, args.width, args.repeats, args.settle_s = 8, 256, 1, 0.0
    from _bench_common import free_port, machine_facts, machine_line

    parent = args.dir or os.path.join(HERE, "results")
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="bench-sharded-", dir=parent)
    layers = layers_for(args.size_mib, args.width)
    state_bytes = 3 * 4 * layers * (args.width**2 + args.width)
    rows_path = os.path.join(scratch, "rows.json")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    command += [os.path.abspath(__file__), "--worker", "--layers", str(layers), "--width", str(args.width)]
    command += ["--repeats", str(args.repeats), "--settle-s", str(args.settle_s), "--dir", scratch, "--rows", rows_path]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, HERE]), "OMP_NUM_THREADS": "1"}
    try:
        subprocess.run(command, check=True, env=env)
        with open(rows_path) as f:
            rows = _summaries(json.load(f))
        facts = machine_facts(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(machine_line(facts))
    print(report(rows, state_bytes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "state_bytes": state_bytes, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
