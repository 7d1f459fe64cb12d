"""Write one shard file: a valid safetensors file written straight from tensor memory.

Shard layout (the safetensors format, so any safetensors reader opens our shards)::

    8 bytes    little-endian u64 N: length of the JSON header
    N bytes    JSON header {key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
               padded with spaces so the data starts on a 4096-byte boundary
    ...        raw tensor bytes, back to back, largest element size first (so every tensor is
               aligned to its element size and can be memory-mapped as is)

Tensor bytes are never pickled or copied into an intermediate buffer: each tensor's memory is
handed to ``os.write`` directly, while a second thread computes the CRC32 of the bytes already
written (:func:`lightning_ckpt.checksum.crc32` releases the GIL, so the two overlap).

Example:
    >>> import tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "shard-00000-of-00001.safetensors")
    >>> plan = plan_shard({"w": torch.arange(4, dtype=torch.float32)}, file=os.path.basename(path))
    >>> entry = write_shard_local(path, plan, rank=0)
    >>> entry.size == plan.total_size, plan.entries[0].offset
    (True, 4096)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

import torch

from lightning_ckpt import _faults
from lightning_ckpt.checksum import checksum_string, crc32
from lightning_ckpt.manifest import FileEntry, TensorEntry
from lightning_ckpt.plan import paused_gc
from lightning_ckpt.tree import DTYPE_TO_SAFETENSORS

__all__ = [
    "ShardPlan",
    "checksum_of",
    "plan_shard",
    "tensor_bytes",
    "write_shard_local",
    "write_shard_stream",
]

ALIGNMENT = 4096
CHUNK_BYTES = 64 * 1024 * 1024
DIRECT_CHUNK_BYTES = 16 * 1024 * 1024
BOUNCE_BUFFERS = 3
WRITER_THREADS = 2
O_DIRECT: int = getattr(os, "O_DIRECT", 0)


@dataclass
class ShardPlan:
    """The header bytes and the ordered tensors of one shard file, with their offsets."""

    file: str
    header: bytes
    entries: list[TensorEntry]
    tensors: list[torch.Tensor]

    @property
    def total_size(self) -> int:
        return len(self.header) + sum(e.nbytes for e in self.entries)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of a CPU tensor's memory (copies only if the tensor is not contiguous)."""
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


def plan_shard(
    tensors: Mapping[str, torch.Tensor], *, file: str, devices: Mapping[str, str] | None = None
) -> ShardPlan:
    """Order the tensors and lay out the header; tensors must already be on the CPU.

    ``devices`` records each tensor's original device in its entry (default: where it is now).
    One pass over the tensors, no per-tensor JSON: 100,000 small tensors are planned in well under a second.
    """
    rows = [(-t.dtype.itemsize, key, t) for key, t in tensors.items()]
    rows.sort(key=_order)
    names: dict[torch.dtype, tuple[str, str]] = {}
    header: dict[str, object] = {"__metadata__": {"format": "pt", "writer": "lightning_ckpt"}}
    layout: list[tuple[str, str, tuple[int, ...], int, int, str]] = []
    position = 0
    for _, key, t in rows:
        dtype = t.dtype
        if dtype not in names:
            names[dtype] = (DTYPE_TO_SAFETENSORS[dtype], str(dtype).removeprefix("torch."))
        safetensors_name, torch_name = names[dtype]
        shape = tuple(t.shape)
        nbytes = t.nbytes
        header[key] = {"dtype": safetensors_name, "shape": shape, "data_offsets": [position, position + nbytes]}
        device = devices[key] if devices is not None else str(t.device)
        layout.append((key, torch_name, shape, position, nbytes, device))
        position += nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    padded = -(-(8 + len(body)) // ALIGNMENT) * ALIGNMENT - 8
    body = body + b" " * (padded - len(body))
    raw_header = len(body).to_bytes(8, "little") + body
    start = len(raw_header)
    entries = [
        TensorEntry(key, dtype, shape, file, start + off, nbytes, device)
        for key, dtype, shape, off, nbytes, device in layout
    ]
    return ShardPlan(file=file, header=raw_header, entries=entries, tensors=[row[2] for row in rows])


def _order(row: tuple[int, str, torch.Tensor]) -> tuple[int, str]:
    return row[0], row[1]


def _chunks(plan: ShardPlan, image: torch.Tensor | None = None) -> Iterator[memoryview]:
    """The file's bytes in order: from the staged image if there is one, else header then tensors."""
    if image is not None:
        view = tensor_bytes(image[: plan.total_size])
        for start in range(0, len(view), CHUNK_BYTES):
            yield view[start : start + CHUNK_BYTES]
        return
    yield memoryview(plan.header)
    for tensor in plan.tensors:
        view = tensor_bytes(tensor)
        for start in range(0, len(view), CHUNK_BYTES):
            yield view[start : start + CHUNK_BYTES]


class _Checksum:
    """CRC32 chained over blocks in file order, computed on one helper thread (it releases the GIL)."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool, self._crc = pool, 0

    def _update(self, view: memoryview) -> None:
        self._crc = crc32(view, self._crc)

    def add(self, view: memoryview) -> Future[None]:
        return self._pool.submit(self._update, view)  # one worker: blocks are chained in submission order

    @property
    def value(self) -> str:
        return checksum_string(self._crc)


def _write_with_checksum(chunks: Iterator[memoryview], write: Callable[[memoryview], None]) -> str:
    """Write every chunk in order while the checksum thread chains the CRC32 over the same chunks."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-crc") as pool:
        checksum = _Checksum(pool)
        pending = []
        for chunk in chunks:
            pending.append(checksum.add(chunk))
            write(chunk)
        for future in pending:
            future.result()
    return checksum.value


class _DirectFile:
    """A new file opened for ``O_DIRECT`` writes where the filesystem allows them, buffered otherwise.

    ``O_DIRECT`` needs the memory address, length and file offset of every write aligned to the
    device's block size (4096 covers every common device). Writes that the kernel refuses with
    ``EINVAL`` switch the file back to buffered I/O, so the save still succeeds on tmpfs and the like.
    """

    def __init__(self, path: str, *, direct: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        self.direct = direct and O_DIRECT != 0
        if self.direct:
            try:
                self.fd = os.open(path, flags | O_DIRECT, 0o644)
                return
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self.direct = False
        self.fd = os.open(path, flags, 0o644)

    def pwrite(self, view: memoryview, offset: int) -> None:
        while view:
            try:
                written = os.pwrite(self.fd, view, offset)
            except OSError as err:
                if err.errno != errno.EINVAL or not self.direct:
                    raise
                self._to_buffered()
                continue
            view, offset = view[written:], offset + written

    def _to_buffered(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~O_DIRECT)
        self.direct = False

    def finish(self, size: int) -> None:
        """Cut the padding of the last aligned block, fsync, close."""
        try:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        finally:
            os.close(self.fd)

    def abort(self) -> None:
        os.close(self.fd)


class _BouncePool:
    """A few aligned, already-faulted blocks for ``O_DIRECT`` writes of tensors that are not staged.

    Kept for the life of the process (``BOUNCE_BUFFERS`` x ``DIRECT_CHUNK_BYTES`` = 48 MiB), so
    synchronous saves never fault in fresh memory.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []

    def take(self) -> torch.Tensor:
        with self._lock:
            if self._free:
                return self._free.pop()
        raw = torch.empty(DIRECT_CHUNK_BYTES + ALIGNMENT, dtype=torch.uint8)
        shift = (-raw.data_ptr()) % ALIGNMENT
        block = raw[shift : shift + DIRECT_CHUNK_BYTES]
        block.zero_()
        return block

    def give(self, block: torch.Tensor) -> None:
        with self._lock:
            self._free.append(block)


_BOUNCE = _BouncePool()


def _write_blocks(file: _DirectFile, blocks: Iterator[tuple[memoryview, memoryview, int]], workers: int) -> str:
    """Write ``(write_view, exact_view, offset)`` blocks with ``workers`` threads, checksumming ``exact_view``."""
    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lightning_ckpt-write") as writers,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-crc") as crc_pool,
    ):
        checksum = _Checksum(crc_pool)
        pending: list[Future[None]] = []
        for write_view, exact_view, offset in blocks:
            pending += [writers.submit(file.pwrite, write_view, offset), checksum.add(exact_view)]
        for future in pending:
            future.result()
    return checksum.value


def _image_blocks(image: torch.Tensor, size: int, direct: bool) -> Iterator[tuple[memoryview, memoryview, int]]:
    """Blocks of a staged image: aligned (padded) write views for ``O_DIRECT``, exact views to checksum."""
    padded = tensor_bytes(image[: _round_up(size)] if direct else image[:size])
    exact = padded[:size]
    for start in range(0, len(padded), DIRECT_CHUNK_BYTES):
        yield padded[start : start + DIRECT_CHUNK_BYTES], exact[start : start + DIRECT_CHUNK_BYTES], start


def _round_up(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _byte_tensors(plan: ShardPlan) -> Iterator[torch.Tensor]:
    """The file's bytes in order as flat uint8 tensors: the header, then each tensor's memory."""
    yield torch.frombuffer(bytearray(plan.header), dtype=torch.uint8)
    for tensor in plan.tensors:
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            yield (flat if flat.is_contiguous() else flat.contiguous()).view(torch.uint8)


def _fill(block: torch.Tensor, pieces: list[torch.Tensor], size: int) -> None:
    """Copy ``pieces`` back to back into ``block[:size]``: one ``torch.cat`` for many small tensors
    (a ``copy_`` per 64-byte tensor costs more than its bytes), ``copy_`` for a single piece."""
    if len(pieces) == 1:
        block[:size].copy_(pieces[0])  # torch copies with all threads
    elif pieces:
        torch.cat(pieces, out=block[:size])


def _write_bounced(file: _DirectFile, plan: ShardPlan) -> str:
    """Pack the header and tensor bytes into a ring of aligned blocks and write each with ``O_DIRECT``.

    The calling thread copies (memory speed); writer threads and the checksum thread drain the ring.
    A block is refilled only once its write and checksum are done.
    """
    blocks = [_BOUNCE.take() for _ in range(BOUNCE_BUFFERS)]
    try:
        with (
            paused_gc(),  # a view per tensor: with 100,000 small tensors the collector would walk them all, often
            ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="lightning_ckpt-write") as writers,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-crc") as crc_pool,
        ):
            checksum = _Checksum(crc_pool)
            busy: list[list[Future[None]]] = [[] for _ in blocks]
            index, filled, offset = 0, 0, 0
            block = blocks[0]
            view = tensor_bytes(block)
            pieces: list[torch.Tensor] = []  # what fills the current block, copied at once when it is full
            for source in _byte_tensors(plan):
                taken = 0
                while taken < source.numel():
                    n = min(source.numel() - taken, DIRECT_CHUNK_BYTES - filled)
                    pieces.append(source if n == source.numel() else source[taken : taken + n])
                    filled, taken = filled + n, taken + n
                    if filled < DIRECT_CHUNK_BYTES:
                        continue
                    _fill(block, pieces, filled)
                    busy[index] = [writers.submit(file.pwrite, view, offset), checksum.add(view)]
                    offset += filled
                    index = (index + 1) % len(blocks)
                    for future in busy[index]:
                        future.result()
                    block, filled, pieces = blocks[index], 0, []
                    view = tensor_bytes(block)
            _fill(block, pieces, filled)
            if filled:
                busy[index] = [writers.submit(file.pwrite, view[: _round_up(filled)], offset),
                               checksum.add(view[:filled])]  # fmt: skip
            for futures in busy:
                for future in futures:
                    future.result()
    finally:
        for block in blocks:
            _BOUNCE.give(block)
    return checksum.value


def write_shard_local(
    path: str, plan: ShardPlan, *, rank: int, image: torch.Tensor | None = None, direct_io: bool = True
) -> FileEntry:
    """Write ``plan`` to the new local file ``path`` and fsync it.

    Args:
        path: the new file (inside the hidden staging directory that the commit renames into place).
        plan: the shard plan.
        rank: the writing rank (recorded in the manifest entry).
        image: the shard's staged file image (:mod:`lightning_ckpt.staging`), written as is;
            without it, tensors are written from their own memory.
        direct_io: use ``O_DIRECT`` (large aligned writes that bypass the page cache) where the
            filesystem supports it; tensors that are not staged then go through a few reused
            16 MiB aligned blocks.
    """
    if _faults.armed("shard.half", rank):
        _faults.write_part_then_die(path, _chunks(plan, image), plan.total_size)
    file = _DirectFile(path, direct=direct_io)
    try:
        if image is not None:
            checksum = _write_blocks(file, _image_blocks(image, plan.total_size, file.direct), WRITER_THREADS)
        elif file.direct:
            checksum = _write_bounced(file, plan)
        else:
            position = [0]

            def write(chunk: memoryview) -> None:
                file.pwrite(chunk, position[0])
                position[0] += len(chunk)

            checksum = _write_with_checksum(_chunks(plan), write)
    except BaseException as err:
        file.abort()
        _name_the_file(err, path)
        raise
    try:
        file.finish(plan.total_size)
    except OSError as err:  # fsync can be the first to report a full disk
        _name_the_file(err, path)
        raise
    return FileEntry(name=plan.file, size=plan.total_size, checksum=checksum, rank=rank)


def _name_the_file(err: BaseException, path: str) -> None:
    """Add the file (inside the checkpoint's hidden staging directory) to an I/O error the kernel reported
    without it, e.g. ``[Errno 28] No space left on device`` from ``pwrite``."""
    if isinstance(err, OSError) and not err.filename:
        err.add_note(f"lightning_ckpt: while writing {path}; this checkpoint is not committed")


def write_shard_stream(
    stream: IO[bytes], plan: ShardPlan, *, rank: int, image: torch.Tensor | None = None
) -> FileEntry:
    """Write ``plan`` (from its staged ``image`` if given) to an open binary stream (an fsspec file)."""

    def write(chunk: memoryview) -> None:
        stream.write(chunk)

    checksum = _write_with_checksum(_chunks(plan, image), write)
    return FileEntry(name=plan.file, size=plan.total_size, checksum=checksum, rank=rank)


def checksum_of(data: bytes | memoryview) -> str:
    """The checksum string of an in-memory file, in the manifest's format.

    Example:
        >>> checksum_of(b"abc")
        'crc32:352441c2'
    """
    return checksum_string(crc32(data))
