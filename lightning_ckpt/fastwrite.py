"""Fast, checksummed writes of one new local file: the CRC32 runs beside the writes, O_DIRECT where allowed.

Bytes are never pickled or gathered into one buffer: each piece of tensor memory is handed to
``os.write``/``os.pwrite`` directly, while a second thread chains the CRC32 over the bytes
already handed over (:func:`lightning_ckpt.checksum.crc32` releases the GIL, so the two overlap).
With ``O_DIRECT`` (large aligned writes that bypass the page cache) a staged file image is
written in aligned blocks by a few threads; tensors that are not staged go through a small ring
of reused aligned blocks. :mod:`lightning_ckpt.writer` decides what the bytes of a shard are.

Example:
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "f")
    >>> file = DirectFile(path, direct=True)  # buffered where the filesystem refuses O_DIRECT
    >>> checksum = write_bounced(file, [torch.arange(3, dtype=torch.uint8)])
    >>> file.finish(3)
    >>> open(path, "rb").read() == bytes([0, 1, 2]), checksum.value == checksum_string(crc32(bytes([0, 1, 2])))
    (True, True)
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from lightning_ckpt.checksum import checksum_string, crc32, crc32_combine
from lightning_ckpt.plan import paused_gc

__all__ = [
    "ALIGNMENT",
    "DIRECT_CHUNK_BYTES",
    "WRITER_THREADS",
    "DirectFile",
    "RunningChecksum",
    "image_blocks",
    "tensor_bytes",
    "write_blocks",
    "write_bounced",
    "write_with_checksum",
]

ALIGNMENT = 4096
DIRECT_CHUNK_BYTES = 16 * 1024 * 1024
BOUNCE_BUFFERS = 3
WRITER_THREADS = 2
O_DIRECT: int = getattr(os, "O_DIRECT", 0)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A flat byte view of a CPU tensor's memory (copies only if the tensor is not contiguous)."""
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


class RunningChecksum:
    """CRC32 over blocks in file order, computed on one helper thread (it releases the GIL).

    With ``segments`` (the byte lengths of consecutive parts of the file: the header, then each
    tensor or chunk) it keeps one CRC32 per segment, each starting from zero, and the file's CRC is
    combined from them (:func:`~lightning_ckpt.checksum.crc32_combine`): no second pass over the bytes.
    Blocks may start and end anywhere; a block that spans segments is split at their boundaries.

    Example:
        >>> from concurrent.futures import ThreadPoolExecutor
        >>> with ThreadPoolExecutor(1) as pool:
        ...     checksum = RunningChecksum(pool, segments=[2, 0, 3])
        ...     checksum.add(memoryview(b"abc")).result(); checksum.add(memoryview(b"de")).result()
        >>> checksum.value == checksum_string(crc32(b"abcde"))
        True
        >>> checksum.segment_crcs == [crc32(b"ab"), 0, crc32(b"cde")]
        True
    """

    def __init__(self, pool: ThreadPoolExecutor, segments: Sequence[int] | None = None) -> None:
        self._pool, self._crc = pool, 0
        self._segments = list(segments) if segments is not None else None
        self._crcs: list[int] = []
        self._left = self._segments[0] if self._segments else 0
        self._segment_crc = 0

    def _update(self, view: memoryview) -> None:
        if self._segments is None:
            self._crc = crc32(view, self._crc)
            return
        position, length, segments, crcs = 0, len(view), self._segments, self._crcs
        while position < length:
            while self._left == 0 and len(crcs) < len(segments) - 1:  # finished or empty segments
                crcs.append(self._segment_crc)
                self._segment_crc, self._left = 0, segments[len(crcs)]
            taken = min(self._left, length - position)
            if taken == 0:
                raise ValueError(f"{length - position} bytes beyond the {sum(segments)} bytes of the segments")
            self._segment_crc = crc32(view[position : position + taken], self._segment_crc)
            self._left -= taken
            position += taken

    def add(self, view: memoryview) -> Future[None]:
        return self._pool.submit(self._update, view)  # one worker: blocks are chained in submission order

    @property
    def segment_crcs(self) -> list[int]:
        """The CRC32 of every segment, in order (call once every block has been added and processed)."""
        if self._segments is None:
            return []
        crcs = list(self._crcs)
        if len(crcs) < len(self._segments):
            crcs.append(self._segment_crc)
        return crcs + [0] * (len(self._segments) - len(crcs))

    @property
    def value(self) -> str:
        """The file's checksum string."""
        if self._segments is None:
            return checksum_string(self._crc)
        crc = 0
        for size, segment_crc in zip(self._segments, self.segment_crcs, strict=True):
            crc = crc32_combine(crc, segment_crc, size)
        return checksum_string(crc)


def write_with_checksum(
    chunks: Iterator[memoryview], write: Callable[[memoryview], None], segments: Sequence[int] | None = None
) -> RunningChecksum:
    """Write every chunk in order while the checksum thread computes the CRC32 over the same chunks."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-crc") as pool:
        checksum = RunningChecksum(pool, segments)
        pending = []
        for chunk in chunks:
            pending.append(checksum.add(chunk))
            write(chunk)
        for future in pending:
            future.result()
    return checksum


class DirectFile:
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


def write_blocks(
    file: DirectFile,
    blocks: Iterator[tuple[memoryview, memoryview, int]],
    workers: int,
    segments: Sequence[int] | None = None,
) -> RunningChecksum:
    """Write ``(write_view, exact_view, offset)`` blocks with ``workers`` threads, checksumming ``exact_view``."""
    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lightning_ckpt-write") as writers,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-crc") as crc_pool,
    ):
        checksum = RunningChecksum(crc_pool, segments)
        pending: list[Future[None]] = []
        for write_view, exact_view, offset in blocks:
            pending += [writers.submit(file.pwrite, write_view, offset), checksum.add(exact_view)]
        for future in pending:
            future.result()
    return checksum


def image_blocks(image: torch.Tensor, size: int, direct: bool) -> Iterator[tuple[memoryview, memoryview, int]]:
    """Blocks of a staged image: aligned (padded) write views for ``O_DIRECT``, exact views to checksum."""
    padded = tensor_bytes(image[: _round_up(size)] if direct else image[:size])
    exact = padded[:size]
    for start in range(0, len(padded), DIRECT_CHUNK_BYTES):
        yield padded[start : start + DIRECT_CHUNK_BYTES], exact[start : start + DIRECT_CHUNK_BYTES], start


def _round_up(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _fill(block: torch.Tensor, pieces: list[torch.Tensor], size: int) -> None:
    """Copy ``pieces`` back to back into ``block[:size]``: one ``torch.cat`` for many small tensors
    (a ``copy_`` per 64-byte tensor costs more than its bytes), ``copy_`` for a single piece."""
    if len(pieces) == 1:
        block[:size].copy_(pieces[0])  # torch copies with all threads
    elif pieces:
        torch.cat(pieces, out=block[:size])


def write_bounced(
    file: DirectFile, sources: Iterable[torch.Tensor], segments: Sequence[int] | None = None
) -> RunningChecksum:
    """Pack ``sources`` (flat ``uint8`` tensors, in file order) into a ring of aligned blocks; write each block.

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
            checksum = RunningChecksum(crc_pool, segments)
            busy: list[list[Future[None]]] = [[] for _ in blocks]
            index, filled, offset = 0, 0, 0
            block = blocks[0]
            view = tensor_bytes(block)
            pieces: list[torch.Tensor] = []  # what fills the current block, copied at once when it is full
            for source in sources:
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
    return checksum
