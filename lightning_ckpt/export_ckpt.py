"""The ``.ckpt`` writer of an export: what ``torch.save`` writes, streamed tensor by tensor.

The file is a zip of ``data.pkl`` and one record per tensor, each aligned to 64 bytes (so
``torch.load(..., mmap=True)`` works too). The pickle is built first from the manifest (shapes and
dtypes are known), with stand-ins where the tensors go; then each tensor's record is streamed from the
source, cast if asked. ``torch.load`` and ``LightningModule.load_from_checkpoint`` read it without
lightning-ckpt installed. The entry point is :func:`lightning_ckpt.export.consolidate`.

Example:
    >>> import os, tempfile, torch
    >>> from lightning_ckpt.collective import save_checkpoint_dir
    >>> from lightning_ckpt.export_source import CheckpointSource
    >>> root = tempfile.mkdtemp()
    >>> src = save_checkpoint_dir({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, os.path.join(root, "a"))
    >>> source = CheckpointSource.open(src, None, allow_pickle=False)
    >>> out = write_ckpt(source, source.skeleton, os.path.join(root, "a.ckpt"), None, False, None)
    >>> torch.load(out)["epoch"]
    1
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import torch

from lightning_ckpt.checksum import crc32
from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.export_source import (
    ByteCounter,
    CheckpointSource,
    Progress,
    atomic_outputs,
    cast_blocks,
    target_dtype,
)
from lightning_ckpt.manifest import LogicalTensor
from lightning_ckpt.tree import TENSOR_MARKER, merge_tensors

__all__ = ["write_ckpt"]

_ALIGN = 64  # torch.save aligns every record to 64 bytes (mmap loads)


@dataclass(frozen=True)
class _StorageRef:
    """Where a tensor's storage stands in ``data.pkl``: its record key, dtype and element count."""

    key: str
    dtype: torch.dtype
    numel: int


@functools.cache
def _legacy_storage_name(dtype: torch.dtype) -> str | None:
    """``torch.save``'s storage class name for ``dtype`` (``"FloatStorage"``), ``None`` for dtypes without one."""
    try:
        return str(torch.storage.TypedStorage(dtype=dtype, device="cpu", _internal=True)._pickle_storage_type())
    except KeyError:
        return None


class _CheckpointPickler(pickle.Pickler):
    """Pickles a skeleton whose stand-in tensors are pickled as ``torch.save`` pickles the real tensors they stand for.

    A stand-in is a one-element tensor; its address finds the tensor's record key, dtype and shape.
    Other tensors (kept in ``objects.pt``: sparse, complex, ...) are pickled as ``torch.save`` does,
    their storages collected in :attr:`extra` to be written after the streamed ones.
    """

    def __init__(self, f: IO[bytes], refs: dict[int, tuple[_StorageRef, tuple[int, ...]]], first_extra: int) -> None:
        super().__init__(f, protocol=2)
        self._refs = refs
        self.extra: dict[int, tuple[str, torch.UntypedStorage]] = {}
        self._next = first_extra

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not torch.Tensor or obj.data_ptr() not in self._refs:
            return NotImplemented
        ref, shape = self._refs[obj.data_ptr()]
        stride = tuple(int(torch.Size(shape[i + 1 :]).numel()) for i in range(len(shape)))
        args: tuple[Any, ...] = (ref, 0, shape, stride, obj.requires_grad, collections.OrderedDict())
        if _legacy_storage_name(ref.dtype) is None:
            return torch._utils._rebuild_tensor_v3, (*args, ref.dtype)
        return torch._utils._rebuild_tensor_v2, args

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            name = _legacy_storage_name(obj.dtype)
            if name is None:
                return ("storage", torch.UntypedStorage, obj.key, "cpu", obj.numel * obj.dtype.itemsize)
            return ("storage", getattr(torch, name), obj.key, "cpu", obj.numel)
        if isinstance(obj, torch.storage.TypedStorage):  # a tensor objects.pt held (not stored raw)
            untyped = obj._untyped_storage
            if untyped.data_ptr() not in self.extra:
                self.extra[untyped.data_ptr()] = (str(self._next), untyped)
                self._next += 1
            key = self.extra[untyped.data_ptr()][0]
            name = _legacy_storage_name(obj.dtype)
            storage_type = getattr(torch, name) if name else torch.UntypedStorage
            return ("storage", storage_type, key, "cpu", untyped.nbytes() // (obj.dtype.itemsize if name else 1))
        return None


class _TorchZip:
    """Writes records the way ``torch.save`` lays them out: stored (not compressed), data aligned to 64 bytes."""

    def __init__(self, f: IO[bytes], archive: str) -> None:
        self._f, self._archive = f, archive
        self._zip = zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    @contextmanager
    def record(self, name: str, size: int) -> Iterator[IO[bytes]]:
        info = zipfile.ZipInfo(f"{self._archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.file_size = size
        zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule: it then adds a 20-byte extra field
        header = 30 + len(info.filename.encode()) + 4 + (20 if zip64 else 0)
        pad = -(self._f.tell() + header) % _ALIGN
        info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding, as torch.save writes
        with self._zip.open(info, "w", force_zip64=zip64) as w:
            yield w

    def write(self, name: str, data: bytes) -> None:
        with self.record(name, len(data)) as w:
            w.write(data)

    def __enter__(self) -> _TorchZip:
        return self

    def __exit__(self, *exc: object) -> None:
        self._zip.close()  # also on an error: the temporary file is removed, and no ZipFile is left to close it


def _stand_ins(
    source: CheckpointSource, skeleton: Any, cast: torch.dtype | None
) -> tuple[Any, dict[int, tuple[_StorageRef, tuple[int, ...]]], list[tuple[str, LogicalTensor, torch.dtype]]]:
    """The skeleton with each marker replaced by a one-element stand-in tensor, and what each stands for."""
    keys = _marker_keys(skeleton)
    stand_ins: dict[str, torch.Tensor] = {}
    refs: dict[int, tuple[_StorageRef, tuple[int, ...]]] = {}
    records: list[tuple[str, LogicalTensor, torch.dtype]] = []
    for key in keys:
        if key not in source.tensors:
            raise CorruptCheckpointError(
                f"{source.storage.url(source.ckpt_dir)}: tensor {key!r} is not in the manifest"
            )
        tensor = source.tensors[key]
        dtype = target_dtype(key, tensor.dtype, cast, "state_dict/")
        stand_in = torch.empty(1, dtype=dtype)
        record = str(len(records))
        stand_ins[key] = stand_in
        refs[stand_in.data_ptr()] = (_StorageRef(record, dtype, int(torch.Size(tensor.shape).numel())), tensor.shape)
        records.append((record, tensor, dtype))
    return merge_tensors(skeleton, stand_ins), refs, records


def _marker_keys(value: Any) -> list[str]:
    """The tensor keys the skeleton's markers name, each once, in walk order."""
    found: dict[str, None] = {}
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get(TENSOR_MARKER), str):
                found.setdefault(item[TENSOR_MARKER])
            else:
                stack.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
    return list(found)


def write_ckpt(
    source: CheckpointSource, skeleton: Any, out: str, cast: torch.dtype | None, force: bool, progress: Progress | None
) -> str:
    tree, refs, records = _stand_ins(source, skeleton, cast)
    buffer = io.BytesIO()
    pickler = _CheckpointPickler(buffer, refs, len(records))
    pickler.dump(tree)
    data_pkl = buffer.getvalue()
    extra = list(pickler.extra.values())
    counter = ByteCounter(sum(_nbytes(t, d) for _, t, d in records), progress)
    with atomic_outputs([out], force) as [f]:
        with _TorchZip(f, os.path.splitext(os.path.basename(out))[0] or "archive") as archive:
            archive.write("data.pkl", data_pkl)
            archive.write(".format_version", b"1")
            archive.write(".storage_alignment", str(_ALIGN).encode())
            archive.write("byteorder", sys.byteorder.encode())
            for record, tensor, dtype in records:
                with archive.record(f"data/{record}", _nbytes(tensor, dtype)) as w:
                    for block in cast_blocks(source, tensor, dtype):
                        w.write(block)
                        counter.add(len(block))
            for key, storage in extra:
                archive.write(f"data/{key}", _storage_bytes(storage))
            archive.write("version", b"3\n")
            archive.write(".data/serialization_id", f"{crc32(data_pkl):040d}".encode())
    return out


def _nbytes(tensor: LogicalTensor, dtype: torch.dtype) -> int:
    return int(torch.Size(tensor.shape).numel()) * dtype.itemsize


def _storage_bytes(storage: torch.UntypedStorage) -> bytes:
    view = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
    return bytes(view.numpy().tobytes())
