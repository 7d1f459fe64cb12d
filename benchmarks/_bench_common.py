"""Helpers shared by ``bench_checkpoint.py`` and ``bench_fit.py`` (not a benchmark itself).

* the Lightning-shaped state (parameters + Adam moments) and tree helpers (flatten, copy into targets);
* page-cache control (``posix_fadvise DONTNEED`` on every file of a checkpoint), fsync, deletion;
* memory: resident set size, its peak over a window (``/proc/self/clear_refs`` + ``VmHWM``, or a
  5 ms sampling thread where that is not available), ``malloc_trim`` between measurements;
* the disk limits: buffered ``os.write`` + fsync, ``O_DIRECT`` writes through two prefaulted
  4096-aligned staging buffers + fsync, cold buffered ``readinto``, cold ``O_DIRECT`` reads + ``copy_``;
* medians with min-max, markdown cells, and a description of the machine.
"""

from __future__ import annotations

import ctypes
import gc
import math
import mmap
import os
import platform
import shutil
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from typing import Any

import torch

MIB = 2**20
GIB = 2**30
ALIGN = 4096
STAGING_BYTES = 64 * MIB

# -- state ------------------------------------------------------------------------------------------


def make_state(gib: float, seed: int = 0) -> dict[str, Any]:
    """A Lightning checkpoint dict of ~``gib`` GiB of fp32 tensors: parameters plus Adam's two moments.

    Square layers of width 2048 (16 MiB each); smaller states (``--smoke``)
    use narrower layers so that they still have a dozen or more tensors of each kind.
    """
    torch.manual_seed(seed)
    total_params = max(1, int(gib * GIB / 4 / 3))
    width = 2048 if total_params >= 16 * 2048 * 2048 else max(32, int(math.sqrt(total_params / 16)) // 32 * 32)
    params: dict[str, torch.Tensor] = {}
    count, i = 0, 0
    while count + width * width + width <= total_params or i == 0:
        params[f"layers.{i}.weight"] = torch.randn(width, width)
        params[f"layers.{i}.bias"] = torch.randn(width)
        count += width * width + width
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
        "hyper_parameters": {"width": width},
    }


def flatten(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested dict/list, keyed by its ``/``-joined path (keys as ``str``)."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        items: Any = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def like(tree: Any) -> Any:
    """The same structure with every tensor replaced by a new, already-faulted tensor of the same shape."""
    if isinstance(tree, torch.Tensor):
        return torch.empty_like(tree).fill_(0)
    if isinstance(tree, dict):
        return {k: like(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [like(v) for v in tree]
    return tree


def nbytes_of(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_into(loaded: Any, targets: dict[str, torch.Tensor]) -> None:
    """Copy every loaded tensor into the target of the same path (what ``load_state_dict`` costs)."""
    source = flatten(loaded)
    for key, dst in targets.items():
        dst.copy_(source[key])


def byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


# -- files -----------------------------------------------------------------------------------------


def files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    out: list[str] = []
    for root, _, names in os.walk(path):
        out.extend(os.path.join(root, n) for n in names)
    return out


def drop_cache(path: str) -> None:
    """fsync then evict from the page cache every file of a checkpoint (a file or a directory tree)."""
    for p in files_under(path):
        if os.path.islink(p) or not os.path.isfile(p):
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- memory ----------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def malloc_trim(collect: bool = False) -> None:
    """Hand freed heap memory back to the OS (after a garbage collection if ``collect``), for a clean baseline.

    Call ``gc.freeze()`` once the long-lived objects exist, or every collection walks torch's and
    Lightning's objects (~0.3 s each on a busy 2-core machine).
    """
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """The peak resident set size over a window: ``reset()`` ... ``peak()``.

    Uses the kernel's high-water mark (``VmHWM``, reset by writing ``5`` to ``/proc/self/clear_refs``);
    where that cannot be reset, a thread samples ``/proc/self/statm`` every 5 ms.
    """

    def __init__(self) -> None:
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._clear()
            self.exact = True
        except OSError:
            self.exact = False
            self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._thread.start()

    @staticmethod
    def _clear() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, rss_bytes())

    def reset(self) -> None:
        if self.exact:
            self._clear()
        self._peak = rss_bytes()

    def peak(self) -> int:
        current = max(self._peak, rss_bytes())
        return max(current, _hwm_bytes()) if self.exact else current

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# -- disk limits -----------------------------------------------------------------------------------


class Staging:
    """Two prefaulted, page-aligned (mmap) staging buffers for ``O_DIRECT`` I/O."""

    def __init__(self, size: int = STAGING_BYTES) -> None:
        self.size = size
        self.maps = [mmap.mmap(-1, size) for _ in range(2)]
        self.tensors = [torch.frombuffer(m, dtype=torch.uint8) for m in self.maps]
        for t in self.tensors:
            t.fill_(1)  # fault every page in now, not while timing

    def close(self) -> None:
        self.tensors = []
        for m in self.maps:
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere; the mapping goes with it
                pass


def _pieces(tensors: Sequence[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    """The bytes of ``tensors`` cut into consecutive lists of byte views totalling ``size`` (last: less)."""
    batch: list[torch.Tensor] = []
    fill = 0
    for t in tensors:
        view, offset = byte_view(t), 0
        while offset < view.numel():
            take = min(size - fill, view.numel() - offset)
            batch.append(view[offset : offset + take])
            offset += take
            fill += take
            if fill == size:
                yield batch
                batch, fill = [], 0
    if batch:
        yield batch


def raw_write_buffered(tensors: Sequence[torch.Tensor], path: str) -> None:
    """One ``os.write`` loop straight from tensor memory, then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in tensors:
            view = byte_view(t).numpy().data
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def raw_write_direct(tensors: Sequence[torch.Tensor], path: str, staging: Staging) -> None:
    """``O_DIRECT`` writes: copy into one staging buffer while a thread writes the other; then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    total = 0
    pending: Future[None] | None = None
    try:
        with ThreadPoolExecutor(1) as pool:
            for index, batch in enumerate(_pieces(tensors, staging.size)):
                buf, mm = staging.tensors[index % 2], staging.maps[index % 2]
                fill = 0
                for piece in batch:
                    buf[fill : fill + piece.numel()].copy_(piece)
                    fill += piece.numel()
                padded = -(-fill // ALIGN) * ALIGN
                if pending is not None:
                    pending.result()
                pending = pool.submit(_pwrite_all, fd, memoryview(mm)[:padded], total)
                total += fill
            if pending is not None:
                pending.result()
        os.ftruncate(fd, total)
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_read_buffered(path: str, targets: Sequence[torch.Tensor]) -> None:
    """Buffered ``readinto`` straight into already-faulted tensors."""
    with open(path, "rb", buffering=0) as f:
        for t in targets:
            view = byte_view(t).numpy().data
            while view:
                got = f.readinto(view)
                if not got:
                    raise EOFError(path)
                view = view[got:]


def _pread_all(fd: int, view: memoryview, offset: int, want: int) -> int:
    """Read at least ``want`` bytes (whole aligned blocks; the file's tail may end short) at ``offset``."""
    done = 0
    while done < want:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def raw_read_direct(path: str, targets: Sequence[torch.Tensor], staging: Staging) -> None:
    """``O_DIRECT`` reads into one staging buffer while the other is copied into the targets."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with ThreadPoolExecutor(1) as pool:
            batches = list(_pieces(targets, staging.size))
            want = min(staging.size, size)
            pending = pool.submit(_pread_all, fd, memoryview(staging.maps[0]), 0, want)
            offset = 0
            for index, batch in enumerate(batches):
                if pending.result() < want:
                    raise EOFError(path)
                offset += want
                if index + 1 < len(batches):
                    want = min(staging.size, size - offset)
                    nxt = staging.maps[(index + 1) % 2]
                    pending = pool.submit(_pread_all, fd, memoryview(nxt), offset, want)
                buf, fill = staging.tensors[index % 2], 0
                for piece in batch:
                    piece.copy_(buf[fill : fill + piece.numel()])
                    fill += piece.numel()
    finally:
        os.close(fd)


# -- numbers and text ------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the raw values (an empty summary for no values)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}


def cell(summary: dict[str, Any] | None, fmt: str = "{:.3f}") -> str:
    """``median (min..max)`` or an em dash."""
    if not summary or summary.get("median") is None:
        return "—"
    if summary["min"] == summary["max"]:
        return fmt.format(summary["median"])
    return f"{fmt.format(summary['median'])} ({fmt.format(summary['min'])}..{fmt.format(summary['max'])})"


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when either is missing or not positive (a stall can be <= 0 within the noise)."""
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return a / b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def machine_facts(directory: str) -> dict[str, Any]:
    """CPU count, RAM, kernel, versions, and the filesystem of ``directory`` (``df -T``)."""
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    try:
        df = subprocess.run(["df", "-T", directory], capture_output=True, text=True, timeout=10, check=False)
        df_line = df.stdout.strip().splitlines()[-1] if df.stdout.strip() else df.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        df_line = f"df failed: {err}"
    fields = df_line.split()
    return {
        "cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "lightning": _version("lightning"),
        "safetensors": _version("safetensors"),
        "lightning_ckpt": _version("lightning-ckpt"),
        "dir": os.path.abspath(directory),
        "df_T": df_line,
        "filesystem": fields[1] if len(fields) > 1 else "?",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def machine_line(facts: dict[str, Any]) -> str:
    return (
        f"Machine: {facts['cpus']} CPUs ({facts['affinity_cpus']} usable), {facts['ram_gib']} GiB RAM,"
        f" Linux {facts['kernel']}, Python {facts['python']}, torch {facts['torch']}"
        f" ({facts['torch_threads']} threads), lightning {facts['lightning']}, safetensors {facts['safetensors']},"
        f" lightning-ckpt {facts['lightning_ckpt']}\nScratch dir: {facts['dir']} — df -T: {facts['df_T']}"
    )
