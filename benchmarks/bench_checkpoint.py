"""Checkpoint a ~1 GiB Lightning-shaped state: stall per save, time to durable commit, cold load, peak memory.

Every peer saves the same state (fp32 parameters + Adam's two moments, ``make_state``) in one
process run, with one warm-up and ``--reps`` timed repetitions; medians and min-max are reported.
With ``--ranks 1,2`` a second run spawns 2 processes (gloo, a TCPStore on 127.0.0.1) that hold the
same replicated state, as DDP does.

Peers:

* Lightning ``TorchCheckpointIO.save_checkpoint`` (what ``Trainer.save_checkpoint`` runs: ``torch.save``
  into a ``BytesIO``, written through fsspec ``_atomic_save``) — **as Lightning runs it, without fsync**,
  so its "durable" time is only "written to the page cache" (marked † in the table);
* Lightning ``AsyncCheckpointIO(TorchCheckpointIO())``: clones every tensor on the calling thread,
  then writes in a thread (no fsync either, †); waited for with ``teardown()`` as ``fit`` does;
* ``torch.save`` into a file + fsync; ``safetensors.torch.save_file`` + fsync (tensors only);
* ``torch.distributed.checkpoint.save`` with ``FileSystemWriter(thread_count=4, sync_files=True)``;
* ``dcp.async_save`` with the same writer, thread checkpointer, on a dedicated gloo group, staged by
  one ``DefaultStager(StagingOptions(False, False, False, False))`` kept across saves: it caches its
  staging storages and copies into them again (reused buffers; torch 2.13's documented way on CPU:
  ``FileSystemWriter(cache_staged_state_dict=True)`` pins memory and fails without an accelerator);
* this package: ``ShardedCheckpointIO(async_save=False)`` and ``ShardedCheckpointIO(async_save=True)``
  (``save_checkpoint`` with 1 rank; ``save_collective`` on every rank with 2 ranks).

With 2 ranks, ``TorchCheckpointIO``, ``AsyncCheckpointIO``, ``torch.save`` and safetensors write
everything from rank 0 (as Lightning does); DCP and this package save from both ranks. Every
saving step ends with a barrier (Lightning's ``save_checkpoint`` has one). Figures are rank 0's;
durable time is the max over the ranks.

Figures per peer:

* **stall per save**: a simulated training step mutates every state tensor in place
  (``t.mul_(0.999).add_(0.001)``); a saving step is such a step plus the blocking save call.
  Stall = saving step - median normal step of the same peer;
* **save call**: the blocking call alone;
* **durable**: from the call's start until the checkpoint is durable (sync savers: the call; async
  ones: until their future / ``wait_for_save()`` completes, waited for with nothing else running;
  ours reports it in ``io.last_save.durable_s``);
* **bg slowdown** (async savers): a second save per repetition while training continues: the extra
  time of the steps that ran while the background write was in flight (sum of each - median step);
* **cold load**: every file of the checkpoint dropped from the page cache (``posix_fadvise DONTNEED``) and
  freed heap memory handed back to the OS (``malloc_trim``), so loads allocate as a freshly started
  process does,
  then load and ``copy_`` every tensor into already-allocated tensors of the same shapes (what
  resuming costs); ``TorchCheckpointIO.load_checkpoint`` (``torch.load``), ``torch.load(mmap=True)``
  for ``torch.save``, ``safetensors.torch.load_file``, ``dcp.load`` in place into the preallocated
  tensors; ours two ways: the ``ours_sync`` row is ``lightning_ckpt.load_into`` in place into the
  preallocated tensors (as ``dcp.load``), the ``ours_async`` row is ``ShardedCheckpointIO.load_checkpoint``
  (the dict Lightning's restore gets) + ``copy_``;
* **peak extra RSS**: the process's peak resident set (``VmHWM``, reset per save through
  ``/proc/self/clear_refs``) from the call's start to durable, minus the RSS with the state resident
  measured before the peer's first save (buffers a saver keeps between saves count);
* **correct** (untimed, once per peer): the checkpoint saved, then the state mutated right after the
  call, then loaded: it must equal the state at the time of the call.

Limits in the same run (1 rank; with 2 ranks the writes are split by bytes across the ranks):
buffered ``os.write`` of the same bytes + fsync; ``O_DIRECT`` writes through two prefaulted 64 MiB
aligned staging buffers + fsync; cold reads: buffered ``readinto`` into the already-faulted tensors,
and ``O_DIRECT`` into staging + ``copy_``; ``copy_`` of the whole state into already-faulted tensors
(the floor for a blocking snapshot).

Usage::

    python benchmarks/bench_checkpoint.py [--gib 0.94] [--reps 5] [--ranks 1,2] [--dir PATH] [--json out.json]
    python benchmarks/bench_checkpoint.py --smoke      # 8 MiB, 1 rep, no warm-up: every peer, for CI

Exit status 1 if any peer failed (its row says why); the others are still measured and printed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import (
    MIB,
    PeakRSS,
    Staging,
    cell,
    copy_into,
    drop_cache,
    flatten,
    free_port,
    like,
    machine_facts,
    machine_line,
    make_state,
    malloc_trim,
    nbytes_of,
    ratio,
    raw_read_buffered,
    raw_read_direct,
    raw_write_buffered,
    raw_write_direct,
    remove,
    rss_bytes,
    summarize,
)

NORMAL_STEPS = 2  # normal steps timed before every saving step

# -- peers ---------------------------------------------------------------------------------------------


class Ctx:
    """What every peer sees: the rank, the state, the preallocated targets, the DCP group."""

    def __init__(self, rank: int, world: int, state: dict[str, Any], work: str) -> None:
        self.rank, self.world, self.state, self.work = rank, world, state, work
        self.target_tree = like(state)  # the "model" resumed into, allocated (and faulted) once
        self.targets = flatten(self.target_tree)
        self.state_flat = flatten(state)
        self.dcp_group: Any = dist.new_group(backend="gloo") if dist.is_initialized() else None

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class Peer:
    """One way of saving and loading. ``save`` is the blocking call; ``wait`` blocks until durable."""

    key = ""
    label = ""
    is_async = False
    all_ranks = False  # with several ranks: does every rank save (else rank 0 alone)
    note = ""
    suffix = ""  # file name suffix (single-file formats)

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx

    def writes(self) -> bool:
        return self.all_ranks or self.ctx.rank == 0

    def save(self, state: dict[str, Any], path: str) -> None:
        raise NotImplementedError

    def wait(self) -> float | None:
        """Block until the last save is durable; the saver's own durable time in seconds if it knows it."""
        return None

    def load_into(self, path: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TorchIOPeer(Peer):
    key, label, suffix = "torch_io", "Lightning TorchCheckpointIO †", ".ckpt"
    note = "Trainer.save_checkpoint's path (_atomic_save via fsspec); no fsync"

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        from lightning.fabric.plugins import TorchCheckpointIO

        self.io = TorchCheckpointIO()

    def save(self, state: dict[str, Any], path: str) -> None:
        self.io.save_checkpoint(state, path)

    def load_into(self, path: str) -> None:
        copy_into(self.io.load_checkpoint(path, weights_only=True), self.ctx.targets)


class AsyncIOPeer(TorchIOPeer):
    key, label, is_async = "async_io", "Lightning AsyncCheckpointIO(TorchCheckpointIO) †", True
    note = "clones tensors on the caller, writes in a thread; no fsync; waited for with teardown()"

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        from lightning.pytorch.plugins.io import AsyncCheckpointIO

        self.async_io = AsyncCheckpointIO(self.io)

    def save(self, state: dict[str, Any], path: str) -> None:
        self.async_io.save_checkpoint(state, path)

    def wait(self) -> float | None:
        self.async_io.teardown()  # waits for the thread's writes and raises their error
        return None

    def close(self) -> None:
        self.async_io.teardown()


class TorchSavePeer(Peer):
    key, label, suffix = "torch_save", "torch.save + fsync", ".pt"
    note = "load: torch.load(mmap=True, weights_only=True)"

    def save(self, state: dict[str, Any], path: str) -> None:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    def load_into(self, path: str) -> None:
        copy_into(torch.load(path, mmap=True, weights_only=True), self.ctx.targets)


class SafetensorsPeer(Peer):
    key, label, suffix = "safetensors", "safetensors save_file + fsync", ".safetensors"
    note = "tensors only (non-tensor entries not saved)"

    def save(self, state: dict[str, Any], path: str) -> None:
        from safetensors.torch import save_file

        save_file(flatten(state), path, metadata={"global_step": str(state.get("global_step"))})
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load_into(self, path: str) -> None:
        from safetensors.torch import load_file

        copy_into(load_file(path), self.ctx.targets)


class DcpPeer(Peer):
    key, label, all_ranks = "dcp", "dcp.save (FileSystemWriter 4 threads, sync_files)", True
    note = "every rank calls it; replicated tensors de-duplicated by the planner"

    def _writer(self, path: str) -> Any:
        return dcp.FileSystemWriter(path, thread_count=4, sync_files=True)

    def save(self, state: dict[str, Any], path: str) -> None:
        dcp.save(state, checkpoint_id=path, storage_writer=self._writer(path), process_group=self.ctx.dcp_group)

    def load_into(self, path: str) -> None:
        dcp.load(self.ctx.target_tree, checkpoint_id=path, process_group=self.ctx.dcp_group)


class DcpAsyncPeer(DcpPeer):
    key, label, is_async = "dcp_async", "dcp.async_save (4 threads, reused DefaultStager)", True
    note = (
        "one DefaultStager (no pinning/shared memory, synchronous staging) kept across saves: it caches and reuses"
        " its staging storages; FileSystemWriter(cache_staged_state_dict=True) pins memory and fails without CUDA"
    )

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        options = StagingOptions(
            use_pinned_memory=False, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False
        )
        self.stager = DefaultStager(options)
        self.future: Any = None
        self.started = 0.0
        self.done_at = 0.0

    def save(self, state: dict[str, Any], path: str) -> None:
        if self.future is not None:
            self.future.result()  # one save in flight at a time
        self.started = time.perf_counter()
        future = dcp.async_save(
            state,
            checkpoint_id=path,
            storage_writer=self._writer(path),
            async_stager=self.stager,
            process_group=self.ctx.dcp_group,
        )
        if not hasattr(future, "add_done_callback"):  # AsyncSaveResponse (staging + upload futures)
            future = future.upload_completion
        future.add_done_callback(self._done)
        self.future = future

    def _done(self, _: Any) -> None:
        self.done_at = time.perf_counter()

    def wait(self) -> float | None:
        future, self.future = self.future, None
        if future is None:
            return None
        future.result()
        return self.done_at - self.started if self.done_at >= self.started else None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.stager.close()


class OursPeer(Peer):
    key, label, all_ranks = "ours_sync", "ours ShardedCheckpointIO(async_save=False)", True
    async_flag = False
    verify_replicas = False
    note = "1 rank: save_checkpoint; 2 ranks: save_collective (each rank writes ~1/N)"

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        from lightning_ckpt import ShardedCheckpointIO

        self.io = ShardedCheckpointIO(
            async_save=self.async_flag, barrier_timeout_s=300.0, verify_replicas=self.verify_replicas
        )

    def save(self, state: dict[str, Any], path: str) -> None:
        if self.ctx.world > 1:  # the state is the same on every rank, as DDP's parameters: split by bytes
            self.io.save_collective(state, path, replicated=lambda key, tensor: True)
        else:
            self.io.save_checkpoint(state, path)

    def wait(self) -> float | None:
        if self.async_flag:
            self.io.wait_for_save()
        stats = getattr(self.io, "last_save", None)
        durable = getattr(stats, "durable_s", None)
        return float(durable) if durable is not None else None

    def load_into(self, path: str) -> None:
        if self.async_flag:  # the dict a CheckpointIO returns, copied into the state (what Lightning's restore does)
            copy_into(self.io.load_checkpoint(path), self.ctx.targets)
        else:  # in place into the existing tensors, as dcp.load
            from lightning_ckpt import load_into

            load_into(path, self.ctx.target_tree)

    def close(self) -> None:
        try:
            if self.async_flag:
                self.io.wait_for_save()
        finally:
            self.io.teardown()


class OursAsyncPeer(OursPeer):
    key, label, is_async, async_flag = "ours_async", "ours ShardedCheckpointIO(async_save=True)", True, True
    note = "returns once tensors are copied into reused staging buffers; commits in a thread"


class OursVerifyPeer(OursPeer):
    key, label, verify_replicas = "ours_verify", "ours ShardedCheckpointIO(verify_replicas=True)", True
    note = "as ours_sync, plus a CRC32 of every replicated tensor compared across ranks before writing"


PEERS: list[type[Peer]] = [
    TorchIOPeer,
    AsyncIOPeer,
    TorchSavePeer,
    DcpPeer,
    DcpAsyncPeer,
    SafetensorsPeer,
    OursPeer,
    OursAsyncPeer,
    OursVerifyPeer,
]

# -- measurement -----------------------------------------------------------------------------------------


def step(tensors: list[torch.Tensor]) -> None:
    """A simulated optimizer step: every parameter and optimizer tensor changes in place."""
    torch._foreach_mul_(tensors, 0.999)
    torch._foreach_add_(tensors, 0.001)


def gather_max(value: float, world: int) -> float:
    if world == 1:
        return value
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    return max(float(v) for v in values)


def gather_all(flag: bool, world: int) -> bool:
    if world == 1:
        return flag
    values: list[Any] = [None] * world
    dist.all_gather_object(values, flag)
    return all(values)


def measure_peer(cls: type[Peer], ctx: Ctx, reps: int, warmup: int, rss: PeakRSS) -> dict[str, Any]:
    """Warm-up, timed repetitions, then one untimed correctness round; returns rank 0's figures."""
    state, rank, world = ctx.state, ctx.rank, ctx.world
    tensors = list(flatten(state).values())
    malloc_trim(collect=True)
    baseline = rss_bytes()
    peer = cls(ctx)
    normal: list[float] = []
    saving: list[float] = []
    calls: list[float] = []
    durable: list[float] = []
    loads: list[float] = []
    peaks: list[float] = []
    overlap_steps: list[list[float]] = []
    durable_training: list[float] = []

    def path(tag: str) -> str:
        return os.path.join(ctx.work, f"{cls.key}-{tag}{cls.suffix}")

    def cleanup(*paths: str) -> None:
        ctx.barrier()
        if rank == 0:
            for p in paths:
                remove(p)
        ctx.barrier()

    try:
        for rep in range(warmup + reps):
            timed = rep >= warmup
            here = path(f"r{rep}")
            ctx.barrier()
            for _ in range(NORMAL_STEPS):
                start = time.perf_counter()
                step(tensors)
                if timed:
                    normal.append(time.perf_counter() - start)
            ctx.barrier()
            malloc_trim(collect=False)  # heap an earlier rep's load freed is not a buffer the saver keeps
            rss.reset()
            start = time.perf_counter()
            step(tensors)
            call = time.perf_counter()
            if peer.writes():
                peer.save(state, here)
            call_end = time.perf_counter()
            ctx.barrier()
            end = time.perf_counter()
            own = peer.wait() if peer.writes() else None
            done = time.perf_counter()
            if not peer.writes():
                mine = 0.0
            elif own is not None:
                mine = own
            else:  # sync savers are durable when the call returns; async ones when wait() returns
                mine = done - call if cls.is_async else call_end - call
            peak = rss.peak() - baseline
            worst = gather_max(mine, world)
            if timed:
                saving.append(end - start)
                calls.append(call_end - call)
                durable.append(worst)
                peaks.append(peak / MIB)
            if cls.is_async:  # the same again while training goes on
                other = path(f"r{rep}-overlap")
                ctx.barrier()
                running: list[float] = []
                step(tensors)
                if peer.writes():
                    flag = threading.Event()
                    box: dict[str, Any] = {}

                    def waiter(box: dict[str, Any] = box, flag: threading.Event = flag, saver: Peer = peer) -> None:
                        try:
                            box["own"] = saver.wait()
                        except BaseException as err:  # re-raised on the main thread
                            box["error"] = err
                        finally:
                            box["at"] = time.perf_counter()
                            flag.set()

                    call = time.perf_counter()
                    peer.save(state, other)
                    thread = threading.Thread(target=waiter, daemon=True)
                    thread.start()
                    while not flag.is_set():
                        t0 = time.perf_counter()
                        step(tensors)
                        running.append(time.perf_counter() - t0)
                    thread.join()
                    if "error" in box:
                        raise box["error"]
                    mine = box["own"] if box.get("own") is not None else box["at"] - call
                else:
                    mine = 0.0
                worst = gather_max(mine, world)
                # keep the replicas identical (elementwise steps are deterministic): catch up to the busiest rank
                for _ in range(int(gather_max(len(running), world)) - len(running)):
                    step(tensors)
                if timed:
                    overlap_steps.append(running)
                    durable_training.append(worst)
                cleanup(other)
            # cold load of the first checkpoint of this repetition
            ctx.barrier()
            if rank == 0:
                drop_cache(here)
            malloc_trim()  # memory freed earlier goes back to the OS: loads allocate like a freshly started process
            ctx.barrier()
            start = time.perf_counter()
            peer.load_into(here)
            elapsed = time.perf_counter() - start
            if timed:
                loads.append(elapsed)
            malloc_trim(collect=True)  # a loaded checkpoint caught in a reference cycle keeps its mmaps resident
            cleanup(here)
        correct = check(peer, ctx, tensors, path("check"))
    finally:
        try:
            peer.close()
        finally:
            del peer
            malloc_trim(collect=True)
    med_normal = summarize(normal)["median"] or 0.0
    bg = [sum(t - med_normal for t in steps) for steps in overlap_steps]
    nbytes = nbytes_of(tensors)
    row: dict[str, Any] = {
        "label": cls.label,
        "kind": "peer",
        "note": cls.note,
        "async": cls.is_async,
        "writers": "all ranks" if cls.all_ranks else "rank 0",
        "normal_step_s": summarize(normal),
        "saving_step_s": summarize(saving),
        "stall_s": summarize([s - med_normal for s in saving]),
        "save_call_s": summarize(calls),
        "durable_s": summarize(durable),
        "durable_gbps": summarize([nbytes / 1e9 / d for d in durable if d > 0]),
        "load_s": summarize(loads),
        "load_gbps": summarize([nbytes / 1e9 / t for t in loads if t > 0]),
        "peak_extra_rss_mib": summarize(peaks),
        "correct": correct,
    }
    if cls.is_async:
        row["bg_slowdown_s"] = summarize(bg)
        row["bg_steps"] = [len(s) for s in overlap_steps]
        row["durable_while_training_s"] = summarize(durable_training)
    return row


def check(peer: Peer, ctx: Ctx, tensors: list[torch.Tensor], path: str) -> bool:
    """Save, mutate right after the call, wait, load: the load must equal the state at the call."""
    ctx.barrier()
    step(tensors)
    expected = {k: t.clone() for k, t in flatten(ctx.state).items()}
    if peer.writes():
        peer.save(ctx.state, path)
    step(tensors)  # what the next training step does while an async save is still writing
    if peer.writes():
        peer.wait()
    ctx.barrier()
    for t in ctx.targets.values():
        t.zero_()
    peer.load_into(path)
    ok = all(torch.equal(ctx.targets[k], v) for k, v in expected.items())
    first = next(iter(expected))
    changed = not torch.equal(ctx.state_flat[first], expected[first])  # else the check proves nothing
    del expected
    ok = gather_all(ok and changed, ctx.world)
    ctx.barrier()
    if ctx.rank == 0:
        remove(path)
    ctx.barrier()
    return ok


def measure_limits(ctx: Ctx, reps: int, warmup: int) -> dict[str, dict[str, Any]]:
    """The disk's and memory's limits for the same bytes, in the same run (writes split across ranks)."""
    tensors = list(flatten(ctx.state).values())
    rank, world = ctx.rank, ctx.world
    mine = split_by_bytes(tensors, world)[rank] if world > 1 else tensors  # 1 rank: file order = targets order
    nbytes = nbytes_of(tensors)
    staging = Staging()
    raw = os.path.join(ctx.work, f"raw-{rank}.bin")
    targets = [ctx.targets[k] for k in flatten(ctx.state)]
    rows: dict[str, dict[str, Any]] = {}

    def timed(fn: Callable[[], None], before: Callable[[], None] | None = None) -> list[float]:
        out = []
        for rep in range(warmup + reps):
            if before is not None:
                before()
            ctx.barrier()
            start = time.perf_counter()
            fn()
            elapsed = gather_max(time.perf_counter() - start, world)
            if rep >= warmup:
                out.append(elapsed)
        return out

    def add(key: str, label: str, column: str, times: list[float], note: str) -> None:
        row: dict[str, Any] = {"label": label, "kind": "limit", "note": note, column: summarize(times)}
        if column in ("durable_s", "load_s"):
            row[column.replace("_s", "_gbps")] = summarize([nbytes / 1e9 / t for t in times if t > 0])
        rows[key] = row

    def copy_all() -> None:
        for dst, src in zip(targets, tensors, strict=True):
            dst.copy_(src)

    try:
        add("limit_copy", "limit: copy_ into already-faulted tensors", "stall_s", timed(copy_all),
            "floor for a blocking snapshot")  # fmt: skip
        add("limit_write", "limit: buffered os.write + fsync", "durable_s",
            timed(lambda: raw_write_buffered(mine, raw)), "from tensor memory" + split_note(world))  # fmt: skip
        add("limit_write_direct", "limit: O_DIRECT write + fsync", "durable_s",
            timed(lambda: raw_write_direct(mine, raw, staging)),
            "2 x 64 MiB prefaulted aligned staging buffers" + split_note(world))  # fmt: skip
        if world == 1:
            add("limit_read", "limit: cold read, buffered readinto", "load_s",
                timed(lambda: raw_read_buffered(raw, targets), lambda: drop_cache(raw)),
                "into the already-faulted tensors")  # fmt: skip
            add("limit_read_direct", "limit: cold read, O_DIRECT + copy_", "load_s",
                timed(lambda: raw_read_direct(raw, targets, staging), lambda: drop_cache(raw)),
                "2 x 64 MiB staging buffers, copy_ into the tensors")  # fmt: skip
    finally:
        remove(raw)
        staging.close()
    return rows


def split_note(world: int) -> str:
    return f"; each of {world} ranks writes ~1/{world} at once" if world > 1 else ""


def split_by_bytes(tensors: list[torch.Tensor], parts: int) -> list[list[torch.Tensor]]:
    """Largest first, each onto the lightest part (as the package splits replicated state)."""
    loads = [0] * parts
    out: list[list[torch.Tensor]] = [[] for _ in range(parts)]
    for t in sorted(tensors, key=lambda t: -t.numel() * t.element_size()):
        i = loads.index(min(loads))
        out[i].append(t)
        loads[i] += t.numel() * t.element_size()
    return out


def run_rank(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    """One rank's whole run (the main process with 1 rank; a spawned process with 2)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cpus = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cpus // world))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}",
        timeout=datetime.timedelta(seconds=600),
    )  # fmt: skip
    result: dict[str, Any] = {"rows": {}, "errors": {}}
    rss = PeakRSS()
    try:
        state = make_state(cfg["gib"])
        ctx = Ctx(rank, world, state, cfg["work"])
        gc.freeze()  # long-lived objects out of the collector's way
        result["tensors"] = len(ctx.targets)
        result["bytes"] = nbytes_of(list(ctx.targets.values()))
        result["baseline_rss_mib"] = rss_bytes() / MIB
        result["rss_exact"] = rss.exact
        try:
            result["rows"].update(measure_limits(ctx, cfg["reps"], cfg["warmup"]))
        except Exception as err:
            result["errors"]["limits"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        for cls in PEERS:
            if cfg["peers"] and cls.key not in cfg["peers"]:
                continue
            started = time.perf_counter()
            try:
                row = measure_peer(cls, ctx, cfg["reps"], cfg["warmup"], rss)
            except Exception as err:
                row = {"label": cls.label, "kind": "peer", "note": cls.note, "error": f"{type(err).__name__}: {err}"}
                if rank == 0:
                    traceback.print_exc()
            row["seconds"] = round(time.perf_counter() - started, 1)
            result["rows"][cls.key] = row
            if rank == 0:
                print(f"  [{world} rank(s)] {cls.key}: {row.get('error') or 'done'} ({row['seconds']} s)", flush=True)
    finally:
        rss.close()
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
        dist.destroy_process_group()


def run_world(world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    work = tempfile.mkdtemp(prefix=f"bench_ckpt_{world}r_", dir=cfg["base"])
    out = os.path.join(work, "result.json")
    cfg = {**cfg, "work": work}
    try:
        if world == 1:
            run_rank(0, 1, free_port(), cfg, out)
        else:
            mp.spawn(run_rank, args=(world, free_port(), cfg, out), nprocs=world, join=True)
        with open(out) as f:
            return dict(json.load(f))
    except Exception as err:
        traceback.print_exc()
        return {"rows": {}, "errors": {"run": f"{type(err).__name__}: {err}"}}
    finally:
        remove(work)


# -- report ------------------------------------------------------------------------------------------------


def med(rows: dict[str, Any], key: str, field: str) -> float | None:
    row = rows.get(key) or {}
    value = (row.get(field) or {}).get("median")
    return float(value) if value is not None else None


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    one = results.get("1", {}).get("rows", {})
    out: dict[str, float | None] = {}
    r = one
    if r:
        out["our async stall / copy_ floor"] = ratio(med(r, "ours_async", "stall_s"), med(r, "limit_copy", "stall_s"))
        out["our async stall / AsyncCheckpointIO stall"] = ratio(
            med(r, "ours_async", "stall_s"), med(r, "async_io", "stall_s")
        )
        out["our async stall / dcp.async_save stall"] = ratio(
            med(r, "ours_async", "stall_s"), med(r, "dcp_async", "stall_s")
        )
        for ours in ("ours_sync", "ours_async"):
            for limit, name in (
                ("limit_write", "buffered write+fsync"),
                ("limit_write_direct", "O_DIRECT write+fsync"),
            ):
                out[f"{ours} durable / raw {name}"] = ratio(med(r, ours, "durable_s"), med(r, limit, "durable_s"))
        out["TorchCheckpointIO durable (no fsync) / ours_sync"] = ratio(
            med(r, "torch_io", "durable_s"), med(r, "ours_sync", "durable_s")
        )
        out["torch.save+fsync durable / ours_sync"] = ratio(
            med(r, "torch_save", "durable_s"), med(r, "ours_sync", "durable_s")
        )
        out["dcp.save durable / ours_sync"] = ratio(med(r, "dcp", "durable_s"), med(r, "ours_sync", "durable_s"))
        out["dcp.async_save durable / ours_async"] = ratio(
            med(r, "dcp_async", "durable_s"), med(r, "ours_async", "durable_s")
        )
        for limit, name in (("limit_read", "buffered"), ("limit_read_direct", "O_DIRECT")):
            out[f"ours load / raw cold read ({name})"] = ratio(med(r, "ours_sync", "load_s"), med(r, limit, "load_s"))
        out["TorchCheckpointIO load (torch.load) / ours load"] = ratio(
            med(r, "torch_io", "load_s"), med(r, "ours_sync", "load_s")
        )
        out["dcp.load / ours load"] = ratio(med(r, "dcp", "load_s"), med(r, "ours_sync", "load_s"))
        out["ours dict load (load_checkpoint + copy_) / ours load"] = ratio(
            med(r, "ours_async", "load_s"), med(r, "ours_sync", "load_s")
        )
        out["TorchCheckpointIO load (torch.load) / ours dict load"] = ratio(
            med(r, "torch_io", "load_s"), med(r, "ours_async", "load_s")
        )
    for world, rows in results.items():
        out[f"{world} rank(s) verify_replicas=True / ours_sync durable"] = ratio(
            med(rows.get("rows", {}), "ours_verify", "durable_s"), med(rows.get("rows", {}), "ours_sync", "durable_s")
        )
    two = results.get("2", {}).get("rows", {})
    if one and two:
        for key in ("ours_sync", "ours_async", "dcp", "torch_io", "limit_write_direct"):
            out[f"2 ranks / 1 rank durable: {key}"] = ratio(med(two, key, "durable_s"), med(one, key, "durable_s"))
    return out


def table(result: dict[str, Any]) -> str:
    lines = [
        "| peer / limit | stall per save s | save call s | durable s | durable GB/s | cold load s | load GB/s"
        " | peak extra RSS MiB | bg slowdown s | correct |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result.get("rows", {}).values():
        if "error" in row:
            lines.append(f"| {row['label']} | error: {row['error'][:150]} |" + " |" * 8)
            continue
        peak = row.get("peak_extra_rss_mib")
        peak_cell = f"{peak['max']:.0f}" if peak and peak.get("max") is not None else "—"
        correct = {True: "yes", False: "**NO**"}.get(row.get("correct"), "—")
        lines.append(
            f"| {row['label']} | {cell(row.get('stall_s'))} | {cell(row.get('save_call_s'))}"
            f" | {cell(row.get('durable_s'))} | {cell(row.get('durable_gbps'), '{:.2f}')}"
            f" | {cell(row.get('load_s'))} | {cell(row.get('load_gbps'), '{:.2f}')} | {peak_cell}"
            f" | {cell(row.get('bg_slowdown_s'))} | {correct} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gib", type=float, default=None, help="state size in GiB (default 0.94; smoke 8 MiB)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; smoke 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up repetitions (default 1; smoke 0)")
    parser.add_argument("--ranks", default=None, help="comma-separated world sizes (default 1,2; smoke 1)")
    parser.add_argument("--peers", default="", help="comma-separated peer keys to run (default: all)")
    parser.add_argument("--dir", default=None, help="scratch directory (default benchmarks/results)")
    parser.add_argument("--json", default=None, help="write every figure here")
    parser.add_argument("--smoke", action="store_true", help="tiny and quick: every peer, 1 rep, no warm-up")
    args = parser.parse_args()
    gib = args.gib if args.gib is not None else (8 / 1024 if args.smoke else 0.94)
    reps = args.reps if args.reps is not None else (1 if args.smoke else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 1)
    worlds = [int(w) for w in (args.ranks or ("1" if args.smoke else "1,2")).split(",") if w.strip()]
    base = args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(base, exist_ok=True)
    facts = machine_facts(base)
    print(machine_line(facts), flush=True)
    peers = [p for p in args.peers.split(",") if p]
    cfg = {"gib": gib, "reps": reps, "warmup": warmup, "base": base, "peers": peers}
    results: dict[str, dict[str, Any]] = {}
    for world in worlds:
        print(f"Running {world} rank(s)...", flush=True)
        results[str(world)] = run_world(world, cfg)
    failed = False
    for ranks, result in results.items():
        size = f"{result.get('bytes', 0) / 2**30:.3f} GiB in {result.get('tensors', '?')} tensors"
        print(f"\n### {ranks} rank(s): {size} per rank; {reps} reps after {warmup} warm-up; median (min..max)\n")
        print(table(result))
        for where, error in result.get("errors", {}).items():
            print(f"\nerror ({where}): {error}")
            failed = True
        failed = failed or any("error" in row or row.get("correct") is False for row in result["rows"].values())
    found = ratios(results)
    print("\n| ratio | value |\n|---|---|")
    for name, value in found.items():
        print(f"| {name} | {'—' if value is None else f'{value:.2f}x'} |")
    print(
        "\n† no fsync: as Lightning runs it, 'durable' is only 'written to the page cache'."
        "\nA ratio shows — when a figure is missing or its median is <= 0 (a stall within the noise)."
        "\nstall = saving step (step + blocking call + barrier) - median normal step; durable: call start to durable,"
        " nothing else running; bg slowdown: extra step time while a second async save was in flight;"
        " peak extra RSS: max over reps above the RSS with the state resident before the peer's first save."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "config": cfg, "results": results, "ratios": found}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
