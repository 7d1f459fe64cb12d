"""Write one shard file: a valid safetensors file written straight from tensor memory.

Shard layout (the safetensors format, so any safetensors reader opens our shards)::

    8 bytes    little-endian u64 N: length of the JSON header
    N bytes    JSON header {key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
               padded with spaces so the data starts on a 4096-byte boundary
    ...        raw tensor bytes, back to back, largest element size first (so every tensor is
               aligned to its element size and can be memory-mapped as is)

Tensor bytes are never pickled or copied into an intermediate buffer: each tensor's memory is
handed to ``os.write`` directly, while a second thread computes the CRC32 of the bytes already
written (``zlib`` releases the GIL, so the two overlap).

Example:
    >>> import tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "shard-00000-of-00001.safetensors")
    >>> plan = plan_shard({"w": torch.arange(4, dtype=torch.float32)}, file=os.path.basename(path))
    >>> entry = write_shard_local(path, plan, rank=0)
    >>> entry.size == plan.total_size, plan.entries[0].offset
    (True, 4096)
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

import torch

from lightning_ckpt.manifest import FileEntry, TensorEntry
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


def plan_shard(tensors: Mapping[str, torch.Tensor], *, file: str) -> ShardPlan:
    """Order the tensors and lay out the header; tensors must already be on the CPU."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {"__metadata__": {"format": "pt", "writer": "lightning_ckpt"}}
    offsets: list[tuple[str, int, int]] = []
    position = 0
    for key in order:
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        header[key] = {
            "dtype": DTYPE_TO_SAFETENSORS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [position, position + nbytes],
        }
        offsets.append((key, position, nbytes))
        position += nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    padded = -(-(8 + len(body)) // ALIGNMENT) * ALIGNMENT - 8
    body = body + b" " * (padded - len(body))
    raw_header = len(body).to_bytes(8, "little") + body
    start = len(raw_header)
    entries = [
        TensorEntry(
            key=key,
            dtype=str(tensors[key].dtype).removeprefix("torch."),
            shape=tuple(tensors[key].shape),
            file=file,
            offset=start + off,
            nbytes=nbytes,
            device=str(tensors[key].device),
        )
        for key, off, nbytes in offsets
    ]
    return ShardPlan(file=file, header=raw_header, entries=entries, tensors=[tensors[k] for k in order])


def _chunks(plan: ShardPlan) -> Iterator[memoryview]:
    yield memoryview(plan.header)
    for tensor in plan.tensors:
        view = tensor_bytes(tensor)
        for start in range(0, len(view), CHUNK_BYTES):
            yield view[start : start + CHUNK_BYTES]


def _write_with_checksum(plan: ShardPlan, write: Callable[[memoryview], None]) -> str:
    """Write every chunk in order while a helper thread chains the CRC32 over the same chunks."""
    crc = 0
    pending: Future[int] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightning_ckpt-crc") as pool:
        for chunk in _chunks(plan):
            previous = pending.result() if pending is not None else crc
            pending = pool.submit(zlib.crc32, chunk, previous)
            write(chunk)
        if pending is not None:
            crc = pending.result()
    return f"crc32:{crc:08x}"


def write_shard_local(path: str, plan: ShardPlan, *, rank: int) -> FileEntry:
    """Write ``plan`` to the new local file ``path`` and fsync it.

    The caller writes into a hidden staging directory that is renamed into place on commit,
    so ``path`` itself is already a temporary location.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:

        def write(chunk: memoryview) -> None:
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]

        checksum = _write_with_checksum(plan, write)
        os.fsync(fd)
    finally:
        os.close(fd)
    return FileEntry(name=plan.file, size=plan.total_size, checksum=checksum, rank=rank)


def write_shard_stream(stream: IO[bytes], plan: ShardPlan, *, rank: int) -> FileEntry:
    """Write ``plan`` to an open binary stream (an fsspec file on an object store)."""

    def write(chunk: memoryview) -> None:
        stream.write(chunk)

    checksum = _write_with_checksum(plan, write)
    return FileEntry(name=plan.file, size=plan.total_size, checksum=checksum, rank=rank)


def checksum_of(data: bytes | memoryview) -> str:
    """The checksum string of an in-memory file, in the manifest's format.

    Example:
        >>> checksum_of(b"abc")
        'crc32:352441c2'
    """
    return f"crc32:{zlib.crc32(data):08x}"
