"""Write one shard file: a valid safetensors file written straight from tensor memory.

Shard layout (the safetensors format, so any safetensors reader opens our shards)::

    8 bytes    little-endian u64 N: length of the JSON header
    N bytes    JSON header {key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
               padded with spaces so the data starts on a 4096-byte boundary
    ...        raw tensor bytes, back to back, largest element size first (so every tensor is
               aligned to its element size and can be memory-mapped as is)

This module decides which bytes a shard holds and in what order; :mod:`lightning_ckpt.fastwrite`
writes them straight from tensor memory, never pickled or gathered into one buffer, with the
CRC32 computed beside the writes.

Example:
    >>> import tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "shard-00000-of-00001.safetensors")
    >>> plan = plan_shard({"w": torch.arange(4, dtype=torch.float32)}, file=os.path.basename(path))
    >>> written = write_shard_local(path, plan, rank=0)
    >>> written.file.size == plan.total_size, written.entries[0].offset, written.entries[0].crc32
    (True, 4096, 'crc32:25601b8b')
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, NamedTuple

import torch

from lightning_ckpt import _faults
from lightning_ckpt.checksum import checksum_string, crc32
from lightning_ckpt.checksum import checksum_string as _checksum_string
from lightning_ckpt.fastwrite import ALIGNMENT as ALIGNMENT
from lightning_ckpt.fastwrite import DIRECT_CHUNK_BYTES as DIRECT_CHUNK_BYTES
from lightning_ckpt.fastwrite import (
    WRITER_THREADS,
    RunningChecksum,
    image_blocks,
    tensor_bytes,
    write_blocks,
    write_bounced,
    write_with_checksum,
)
from lightning_ckpt.fastwrite import DirectFile as _DirectFile  # its old name here (tests/test_async.py)
from lightning_ckpt.manifest import ChunkOf, FileEntry, TensorEntry
from lightning_ckpt.tree import DTYPE_TO_SAFETENSORS

__all__ = [
    "ShardPlan",
    "WrittenShard",
    "checksum_of",
    "plan_shard",
    "tensor_bytes",
    "write_shard_local",
    "write_shard_stream",
]

CHUNK_BYTES = 64 * 1024 * 1024


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

    @property
    def segments(self) -> list[int]:
        """The byte lengths of the file's consecutive parts: the header, then each piece in file order."""
        return [len(self.header), *(e.nbytes for e in self.entries)]

    def written(self, file: FileEntry, checksum: RunningChecksum) -> WrittenShard:
        """The shard's entries once written: each piece with the CRC32 computed while its bytes were written."""
        crcs = checksum.segment_crcs[1:]
        entries = [
            TensorEntry(
                e.key, e.dtype, e.shape, e.file, e.offset, e.nbytes, e.device, _checksum_string(crc), e.chunk_of
            )
            for e, crc in zip(self.entries, crcs, strict=True)
        ]
        return WrittenShard(file, entries)


class WrittenShard(NamedTuple):
    """A shard file as written: its file entry and its pieces' entries (with their CRC32s)."""

    file: FileEntry
    entries: list[TensorEntry]


def plan_shard(
    tensors: Mapping[str, torch.Tensor],
    *,
    file: str,
    devices: Mapping[str, str] | None = None,
    chunks: Mapping[str, ChunkOf] | None = None,
) -> ShardPlan:
    """Order the tensors and lay out the header; tensors must already be on the CPU.

    ``devices`` records each tensor's original device in its entry (default: where it is now);
    ``chunks`` says which keys are chunks of a sharded tensor (:func:`lightning_ckpt.layout.chunk_key`).
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
    chunk_of = chunks or {}
    entries = [
        TensorEntry(key, dtype, shape, file, start + off, nbytes, device, None, chunk_of.get(key))
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


def _byte_tensors(plan: ShardPlan) -> Iterator[torch.Tensor]:
    """The file's bytes in order as flat uint8 tensors: the header, then each tensor's memory."""
    yield torch.frombuffer(bytearray(plan.header), dtype=torch.uint8)
    for tensor in plan.tensors:
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            yield (flat if flat.is_contiguous() else flat.contiguous()).view(torch.uint8)


def write_shard_local(
    path: str, plan: ShardPlan, *, rank: int, image: torch.Tensor | None = None, direct_io: bool = True
) -> WrittenShard:
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
    _faults.reached("shard.half", rank, _faults.Writing(path, _chunks(plan, image), plan.total_size))
    file = _DirectFile(path, direct=direct_io)
    segments = plan.segments
    try:
        if image is not None:
            blocks = image_blocks(image, plan.total_size, file.direct)
            checksum = write_blocks(file, blocks, WRITER_THREADS, segments)
        elif file.direct:
            checksum = write_bounced(file, _byte_tensors(plan), segments)
        else:
            position = [0]

            def write(chunk: memoryview) -> None:
                file.pwrite(chunk, position[0])
                position[0] += len(chunk)

            checksum = write_with_checksum(_chunks(plan), write, segments)
    except BaseException as err:
        file.abort()
        _name_the_file(err, path)
        raise
    try:
        file.finish(plan.total_size)
    except OSError as err:  # fsync can be the first to report a full disk
        _name_the_file(err, path)
        raise
    return plan.written(FileEntry(plan.file, plan.total_size, checksum.value, rank), checksum)


def _name_the_file(err: BaseException, path: str) -> None:
    """Add the file (inside the checkpoint's hidden staging directory) to an I/O error the kernel reported
    without it, e.g. ``[Errno 28] No space left on device`` from ``pwrite``."""
    if isinstance(err, OSError) and not err.filename:
        err.add_note(f"lightning_ckpt: while writing {path}; this checkpoint is not committed")


def write_shard_stream(
    stream: IO[bytes], plan: ShardPlan, *, rank: int, image: torch.Tensor | None = None
) -> WrittenShard:
    """Write ``plan`` (from its staged ``image`` if given) to an open binary stream (an fsspec file)."""

    def write(chunk: memoryview) -> None:
        stream.write(chunk)

    checksum = write_with_checksum(_chunks(plan, image), write, plan.segments)
    return plan.written(FileEntry(plan.file, plan.total_size, checksum.value, rank), checksum)


def checksum_of(data: bytes | memoryview) -> str:
    """The checksum string of an in-memory file, in the manifest's format.

    Example:
        >>> checksum_of(b"abc")
        'crc32:352441c2'
    """
    return checksum_string(crc32(data))
