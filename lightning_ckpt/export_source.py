"""The source of an export: one committed checkpoint read piece by piece, and the output files' safe writing.

:class:`CheckpointSource` reads each stored piece with a ranged read (local ``preadv`` into the tensor;
a ranged GET on an object store), verified by its own CRC32 (format v1: each shard file's CRC32, streamed
once when the source opens). :func:`atomic_outputs` gives the writers temporary files that become the
outputs only once everything is written and fsynced. Used by :mod:`lightning_ckpt.export_ckpt` and
:mod:`lightning_ckpt.export_safetensors`; the entry point is :func:`lightning_ckpt.export.consolidate`.

Example:
    >>> import os, tempfile, torch
    >>> from lightning_ckpt.collective import save_checkpoint_dir
    >>> src = save_checkpoint_dir({"state_dict": {"w": torch.ones(3)}}, os.path.join(tempfile.mkdtemp(), "a"))
    >>> source = CheckpointSource.open(src, None, allow_pickle=False)
    >>> [block] = source.blocks(source.tensors["state_dict/w"])
    >>> block
    tensor([1., 1., 1.])
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import IO, Any

import torch

from lightning_ckpt import layout
from lightning_ckpt.checksum import checksum_string, crc32
from lightning_ckpt.chunks import assemble
from lightning_ckpt.discovery import resolve
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError
from lightning_ckpt.file_reads import read_whole
from lightning_ckpt.inplace import PieceReader
from lightning_ckpt.localfs import fsync_dir
from lightning_ckpt.manifest import FileEntry, LogicalTensor, Manifest, TensorEntry
from lightning_ckpt.reader import check_sizes, load_objects, read_manifest
from lightning_ckpt.storage import Storage

__all__ = ["ByteCounter", "CheckpointSource", "Progress", "atomic_outputs", "bytes_of", "cast_blocks", "target_dtype"]

_CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # not float8: quantized on purpose
_BLOCK = 16 * 1024 * 1024
Progress = Callable[[int, int], object]


@dataclass
class CheckpointSource:
    """One committed checkpoint: its manifest, tensors and (unpickled) skeleton, and verified reads of its pieces."""

    storage: Storage
    ckpt_dir: str
    manifest: Manifest
    tensors: dict[str, LogicalTensor]
    skeleton: dict[str, Any]
    reader: PieceReader

    @classmethod
    def open(cls, path: str, storage_options: dict[str, Any] | None, allow_pickle: bool) -> CheckpointSource:
        found = resolve(path, storage_options)
        if found.kind != "dir":
            raise CheckpointError(f"{found.url} is already a single-file checkpoint; pass a checkpoint directory")
        storage, ckpt_dir = found.storage, found.path
        manifest = read_manifest(storage, ckpt_dir)
        check_sizes(storage, ckpt_dir, manifest)
        v1_files = sorted({p.file for p in manifest.tensors.values() if p.crc32 is None})  # format v1
        for name in v1_files:
            _verify_streamed(storage, ckpt_dir, manifest.file(name))
        skeleton: Any = {}
        if manifest.objects_file is not None:
            raw = read_whole(storage, ckpt_dir, manifest.file(manifest.objects_file), True)
            skeleton = load_objects(storage, ckpt_dir, manifest.objects_file, raw, "cpu", not allow_pickle)
        if not isinstance(skeleton, dict):
            raise CorruptCheckpointError(f"{storage.url(ckpt_dir)}: expected a dict checkpoint")
        reader = PieceReader(storage, ckpt_dir, manifest, verified_files=v1_files)
        return cls(storage, ckpt_dir, manifest, manifest.logical_tensors(), skeleton, reader)

    def read(self, piece: TensorEntry) -> torch.Tensor:
        """One stored piece in memory of its own, verified by its CRC32 (v1: its file was verified on open)."""
        tensor = torch.empty(piece.shape, dtype=getattr(torch, piece.dtype))
        self.reader.read_into(piece, tensor)
        return tensor

    def blocks(self, tensor: LogicalTensor) -> Iterator[torch.Tensor]:
        """The tensor's elements in row-major order, as consecutive contiguous tensors.

        Chunks that are whole slabs along dim 0 (FSDP2's ``Shard(0)``) are yielded one by one, never
        assembled; any other layout is assembled into one tensor first.
        """
        if _row_slabs(tensor):
            for piece in sorted(tensor.pieces, key=lambda p: p.offsets[:1]):
                yield self.read(piece)
        else:
            yield assemble(
                tensor.shape, getattr(torch, tensor.dtype), ((p.offsets, self.read(p)) for p in tensor.pieces)
            )


def _row_slabs(tensor: LogicalTensor) -> bool:
    return all(
        p.offsets[1:] == (0,) * (len(tensor.shape) - 1) and p.shape[1:] == tensor.shape[1:] for p in tensor.pieces
    )


def bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous tensor's memory."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def _verify_streamed(storage: Storage, ckpt_dir: str, entry: FileEntry) -> None:
    """A format-v1 shard's CRC32, read in blocks (v1 pieces have no checksum of their own)."""
    path = storage.join(ckpt_dir, entry.name)
    crc = 0
    with storage.open_read(path) as f:
        while block := f.read(_BLOCK):
            crc = crc32(block, crc)
    if checksum_string(crc) != entry.checksum:
        raise CorruptCheckpointError(
            f"{storage.url(path)}: checksum {checksum_string(crc)}, expected {entry.checksum} (the file was modified"
            " or damaged)"
        )


def target_dtype(key: str, dtype: str, cast: torch.dtype | None, weights_prefix: str) -> torch.dtype:
    saved = getattr(torch, dtype)
    if cast is not None and saved in _CASTABLE and key.startswith(weights_prefix):
        return cast
    return saved


def cast_blocks(source: CheckpointSource, tensor: LogicalTensor, dtype: torch.dtype) -> Iterator[memoryview]:
    for block in source.blocks(tensor):
        yield bytes_of(block.to(dtype).contiguous())


# --- output files: temporary names, then renames ------------------------------------------------------------------


@contextmanager
def atomic_outputs(finals: list[str], force: bool, stale: Sequence[str] = ()) -> Iterator[list[IO[bytes]]]:
    """Open a temporary file next to each of ``finals``; on success fsync, rename each onto its final name and
    remove the ``stale`` files (an earlier export's) that were not replaced. Existing files need ``force``."""
    existing = [name for name in [*finals, *stale] if os.path.lexists(name)]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} already exists; pass --force (force=True) to overwrite it")
    directories = sorted({os.path.dirname(os.path.abspath(name)) for name in finals})
    for directory in directories:
        os.makedirs(directory, exist_ok=True)
    temps: list[str] = []
    with ExitStack() as stack:
        try:
            files: list[IO[bytes]] = []
            for name in finals:
                fd, temp = tempfile.mkstemp(
                    prefix=layout.temp_prefix(os.path.basename(name)), dir=os.path.dirname(os.path.abspath(name))
                )
                temps.append(temp)
                files.append(stack.enter_context(os.fdopen(fd, "wb")))
            yield files
            for f in files:
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            stack.close()
            for temp in temps:
                if os.path.exists(temp):
                    os.unlink(temp)
            raise
    for temp, name in zip(temps, finals, strict=True):
        os.replace(temp, name)
    for name in stale:
        if name not in finals and os.path.isfile(name):
            os.unlink(name)
    for directory in directories:
        fsync_dir(directory)


class ByteCounter:
    """Counts the bytes written and reports them to ``progress``."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self._progress = total, 0, progress

    def add(self, n: int) -> None:
        self.done += n
        if self._progress is not None:
            self._progress(self.done, self.total)
