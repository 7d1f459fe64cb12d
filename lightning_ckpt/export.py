"""Export a checkpoint (any number of shards, v1 or v2, local or remote) as one ``.ckpt`` file or as safetensors.

:func:`consolidate` streams tensor by tensor: it never holds the whole model, only the tensor being
written (a ``Shard(0)`` tensor, the usual FSDP2 layout, is written chunk by chunk without being
assembled). Each stored piece is read with a ranged read (local ``pread``; a ranged GET on an object
store) and verified by its own CRC32 (format v1: each shard file's CRC32, streamed once first).

``format="ckpt"`` writes what ``torch.save`` writes (a zip of ``data.pkl`` and one record per tensor,
each aligned to 64 bytes, so ``torch.load(..., mmap=True)`` works too): the pickle is built first
from the manifest (shapes and dtypes are known), then each tensor's record is streamed. ``torch.load``
and ``LightningModule.load_from_checkpoint`` read it without lightning-ckpt installed.

``format="safetensors"`` writes the model's ``state_dict`` in the Hugging Face layout: one
``model.safetensors``, or ``model-00001-of-0000N.safetensors`` files and a
``model.safetensors.index.json`` (``weight_map``) when the weights exceed ``max_shard_bytes``. Each
file's header is written first (sizes are known from the manifest), then its tensors.

Every output appears atomically (temporary names in the same directory, fsync, rename; the index
last) and an existing output is refused unless ``force=True``.

Example:
    >>> import os, tempfile, torch
    >>> from lightning_ckpt.collective import save_checkpoint_dir
    >>> root = tempfile.mkdtemp()
    >>> src = save_checkpoint_dir({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, os.path.join(root, "a"))
    >>> [ckpt] = consolidate(src, os.path.join(root, "a.ckpt"))
    >>> torch.load(ckpt)["state_dict"]["w"]
    tensor([1., 1.])
    >>> [st] = consolidate(src, os.path.join(root, "hf"), format="safetensors", dtype="bf16")
    >>> os.path.basename(st)
    'model.safetensors'
"""

from __future__ import annotations

import collections
import functools
import io
import json
import os
import pickle
import struct
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import IO, Any

import torch

from lightning_ckpt import layout
from lightning_ckpt.checksum import checksum_string, crc32
from lightning_ckpt.chunks import assemble
from lightning_ckpt.discovery import resolve
from lightning_ckpt.errors import CheckpointError, ConfigError, ConfigTypeError, CorruptCheckpointError
from lightning_ckpt.file_reads import read_whole
from lightning_ckpt.localfs import fsync_dir
from lightning_ckpt.manifest import FileEntry, LogicalTensor, Manifest, TensorEntry
from lightning_ckpt.reader import check_sizes, load_objects, read_manifest
from lightning_ckpt.storage import Storage
from lightning_ckpt.tree import DTYPE_TO_SAFETENSORS, TENSOR_MARKER, merge_tensors

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "DTYPES", "FORMATS", "WEIGHTS_ONLY_KEYS", "consolidate"]

FORMATS = ("ckpt", "safetensors")
"""The values of ``format``."""
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
"""The values of ``dtype``: what the floating-point weights are cast to."""
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""Hugging Face's default largest safetensors file (5 GB)."""
WEIGHTS_ONLY_KEYS = (
    "state_dict",
    "epoch",
    "global_step",
    "pytorch-lightning_version",
    "hyper_parameters",
    "hparams_name",
    "hparams_type",
    "datamodule_hyper_parameters",
    "datamodule_hparams_name",
)
"""The keys a ``weights_only`` ``.ckpt`` keeps: the weights and what ``load_from_checkpoint`` reads besides."""

_CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # not float8: quantized on purpose
_ALIGN = 64  # torch.save aligns every record to 64 bytes (mmap loads)
_BLOCK = 16 * 1024 * 1024
Progress = Callable[[int, int], object]


def consolidate(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    format: str | None = None,
    dtype: str | None = None,
    weights_only: bool = False,
    storage_options: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    allow_pickle: bool = False,
    force: bool = False,
    weights_key: str = "state_dict",
    progress: Progress | None = None,
) -> list[str]:
    """Write the checkpoint at ``path`` as one ``.ckpt`` file or as safetensors files; return the files written.

    Args:
        path: a checkpoint directory, a folder of checkpoints (its newest) or a ``latest`` pointer; local or a URL.
        out: ``"ckpt"``: the file to write. ``"safetensors"``: a directory (``model.safetensors`` in it), or a
            path ending in ``.safetensors`` (that file, or its numbered parts and ``<out>.index.json``).
        format: ``"ckpt"`` or ``"safetensors"``; by default ``"safetensors"`` if ``out`` ends with
            ``.safetensors``, else ``"ckpt"``.
        dtype: cast the floating-point weights (``state_dict``) to ``"bf16"``, ``"fp16"`` or ``"fp32"``;
            optimizer state keeps its dtype (a resume needs it exact). ``None`` keeps every dtype.
        weights_only: ``"ckpt"`` only: keep :data:`WEIGHTS_ONLY_KEYS` (no optimizer, loops or callbacks).
            safetensors always hold the weights only.
        storage_options: fsspec options for a remote ``path``.
        max_shard_bytes: safetensors only: start a new file before one would exceed this many bytes.
        allow_pickle: unpickle ``objects.pt`` with ``weights_only=False`` (checkpoints you trust only).
        force: replace existing output files (and, for safetensors, remove the parts of an earlier export).
        weights_key: safetensors only: the checkpoint key holding the weights.
        progress: called after each write with (bytes written, bytes to write).

    Raises:
        ConfigError: a bad argument (named, with a valid example).
        FileExistsError: an output exists and ``force`` is False.
        CorruptCheckpointError: a piece does not match its checksum (the file and tensor are named).

    Example:
        >>> import tempfile, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> root = tempfile.mkdtemp()
        >>> src = save_checkpoint_dir({"state_dict": {"w": torch.ones(2)}, "optimizer_states": [{}], "epoch": 1},
        ...                           os.path.join(root, "ep1-ba8"))
        >>> [path] = consolidate(src, os.path.join(root, "weights.ckpt"), weights_only=True, dtype="bf16")
        >>> checkpoint = torch.load(path)
        >>> sorted(checkpoint), checkpoint["state_dict"]["w"]
        (['epoch', 'state_dict'], tensor([1., 1.], dtype=torch.bfloat16))
    """
    src, target, kind = _check_arguments(path, out, format, dtype, max_shard_bytes)
    cast = DTYPES[dtype] if dtype is not None else None
    source = _Source.open(src, storage_options, allow_pickle)
    if kind == "ckpt":
        skeleton = source.skeleton
        if weights_only:
            skeleton = {k: v for k, v in skeleton.items() if k in WEIGHTS_ONLY_KEYS}
        return [_write_ckpt(source, skeleton, target, cast, force, progress)]
    entries = _weights(source, weights_key)
    return _write_safetensors(source, entries, _safetensors_base(target), cast, max_shard_bytes, force, progress)


def _check_arguments(
    path: object, out: object, format: object, dtype: object, max_shard_bytes: object
) -> tuple[str, str, str]:
    """``(path, out, format)`` as strings, after every argument is checked (nothing is read before)."""
    paths = []
    for name, value in (("path", path), ("out", out)):
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise ConfigTypeError(name, value, "'/data/runs/a/ep3-ba1500' (path) or 'model.ckpt' (out)")
        paths.append(str(os.fspath(value)))
    if "://" in paths[1]:
        raise ConfigError("out", out, "'model.ckpt'", "The output is written on this machine; copy it afterwards")
    if format is not None and format not in FORMATS:
        raise ConfigError("format", format, "'ckpt' or 'safetensors'")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError("dtype", dtype, "'bf16', 'fp16' or 'fp32' (or None to keep the saved dtypes)")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ConfigError("max_shard_bytes", max_shard_bytes, f"{DEFAULT_MAX_SHARD_BYTES} (5 GB, a positive int)")
    kind = str(format) if format is not None else "safetensors" if paths[1].endswith(".safetensors") else "ckpt"
    return paths[0], paths[1], kind


@dataclass
class _Source:
    """One committed checkpoint: its manifest, tensors and (unpickled) skeleton, and verified reads of its pieces."""

    storage: Storage
    ckpt_dir: str
    manifest: Manifest
    tensors: dict[str, LogicalTensor]
    skeleton: dict[str, Any]

    @classmethod
    def open(cls, path: str, storage_options: dict[str, Any] | None, allow_pickle: bool) -> _Source:
        found = resolve(path, storage_options)
        if found.kind != "dir":
            raise CheckpointError(f"{found.url} is already a single-file checkpoint; pass a checkpoint directory")
        storage, ckpt_dir = found.storage, found.path
        manifest = read_manifest(storage, ckpt_dir)
        check_sizes(storage, ckpt_dir, manifest)
        for name in sorted({p.file for p in manifest.tensors.values() if p.crc32 is None}):  # format v1
            _verify_streamed(storage, ckpt_dir, manifest.file(name))
        skeleton: Any = {}
        if manifest.objects_file is not None:
            raw = read_whole(storage, ckpt_dir, manifest.file(manifest.objects_file), True)
            skeleton = load_objects(storage, ckpt_dir, manifest.objects_file, raw, "cpu", not allow_pickle)
        if not isinstance(skeleton, dict):
            raise CorruptCheckpointError(f"{storage.url(ckpt_dir)}: expected a dict checkpoint")
        return cls(storage, ckpt_dir, manifest, manifest.logical_tensors(), skeleton)

    def read(self, piece: TensorEntry) -> torch.Tensor:
        """One stored piece in memory of its own, verified by its CRC32 (v1: its file was verified on open)."""
        tensor = torch.empty(piece.shape, dtype=getattr(torch, piece.dtype))
        if piece.nbytes == 0:
            return tensor
        buffer = _bytes_of(tensor)
        path = self.storage.join(self.ckpt_dir, piece.file)
        if self.storage.is_local:
            filled = _pread_into(path, buffer, piece.offset)
        else:
            data = self.storage.read_range(path, piece.offset, piece.nbytes)
            filled = len(data)
            buffer[:filled] = data
        if filled != piece.nbytes:
            raise CorruptCheckpointError(f"{self.storage.url(path)} ended before byte {piece.offset + piece.nbytes}")
        if piece.crc32 is not None and checksum_string(crc32(buffer)) != piece.crc32:
            raise CorruptCheckpointError(
                f"{self.storage.url(path)}: tensor {piece.key!r} (bytes {piece.offset}..{piece.offset + piece.nbytes})"
                f" has checksum {checksum_string(crc32(buffer))}, expected {piece.crc32} (the file was modified"
                " or damaged)"
            )
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


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous tensor's memory."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def _pread_into(path: str, buffer: memoryview, offset: int) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        filled = 0
        while filled < len(buffer):
            n = os.preadv(fd, [buffer[filled:]], offset + filled)
            if n == 0:
                break
            filled += n
        return filled
    finally:
        os.close(fd)


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


def _target_dtype(key: str, dtype: str, cast: torch.dtype | None, weights_prefix: str) -> torch.dtype:
    saved = getattr(torch, dtype)
    if cast is not None and saved in _CASTABLE and key.startswith(weights_prefix):
        return cast
    return saved


def _cast_blocks(source: _Source, tensor: LogicalTensor, dtype: torch.dtype) -> Iterator[memoryview]:
    for block in source.blocks(tensor):
        yield _bytes_of(block.to(dtype).contiguous())


# --- output files: temporary names, then renames ------------------------------------------------------------------


@contextmanager
def _atomic_outputs(finals: list[str], force: bool, stale: Sequence[str] = ()) -> Iterator[list[IO[bytes]]]:
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


class _Counter:
    """Counts the bytes written and reports them to ``progress``."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self._progress = total, 0, progress

    def add(self, n: int) -> None:
        self.done += n
        if self._progress is not None:
            self._progress(self.done, self.total)


# --- .ckpt: torch.save's zip, streamed ----------------------------------------------------------------------------


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
    source: _Source, skeleton: Any, cast: torch.dtype | None
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
        dtype = _target_dtype(key, tensor.dtype, cast, "state_dict/")
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


def _write_ckpt(
    source: _Source, skeleton: Any, out: str, cast: torch.dtype | None, force: bool, progress: Progress | None
) -> str:
    tree, refs, records = _stand_ins(source, skeleton, cast)
    buffer = io.BytesIO()
    pickler = _CheckpointPickler(buffer, refs, len(records))
    pickler.dump(tree)
    data_pkl = buffer.getvalue()
    extra = list(pickler.extra.values())
    counter = _Counter(sum(_nbytes(t, d) for _, t, d in records), progress)
    with _atomic_outputs([out], force) as [f]:
        with _TorchZip(f, os.path.splitext(os.path.basename(out))[0] or "archive") as archive:
            archive.write("data.pkl", data_pkl)
            archive.write(".format_version", b"1")
            archive.write(".storage_alignment", str(_ALIGN).encode())
            archive.write("byteorder", sys.byteorder.encode())
            for record, tensor, dtype in records:
                with archive.record(f"data/{record}", _nbytes(tensor, dtype)) as w:
                    for block in _cast_blocks(source, tensor, dtype):
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


# --- safetensors ----------------------------------------------------------------------------------------------------


def _safetensors_base(out: str) -> str:
    return out if out.endswith(".safetensors") else os.path.join(out, "model.safetensors")


def _weights(source: _Source, weights_key: str) -> list[tuple[str, LogicalTensor]]:
    """``(name, tensor)`` for each tensor of the model's ``state_dict``, in its order."""
    weights = source.skeleton.get(weights_key)
    if not isinstance(weights, Mapping):
        raise ConfigError(
            "weights_key", weights_key, "'state_dict'",
            f"The checkpoint holds no dict under it; its keys are {sorted(map(str, source.skeleton))}",
        )  # fmt: skip
    entries, skipped = [], []
    for name, value in weights.items():
        key = value.get(TENSOR_MARKER) if isinstance(value, dict) else None
        if isinstance(key, str) and key in source.tensors:
            entries.append((str(name), source.tensors[key]))
        elif isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{weights_key}/{name} is a {value.dtype} {value.layout} tensor, which safetensors cannot hold;"
                " export with format='ckpt'"
            )
        else:
            skipped.append(str(name))
    if skipped:
        warnings.warn(f"safetensors hold tensors only; not exported: {', '.join(skipped)}", stacklevel=3)
    return entries


def _plan_files(
    entries: list[tuple[str, LogicalTensor, torch.dtype]], max_shard_bytes: int
) -> list[list[tuple[str, LogicalTensor, torch.dtype]]]:
    """Entries split into files of at most ``max_shard_bytes`` (a larger tensor gets a file of its own)."""
    files: list[list[tuple[str, LogicalTensor, torch.dtype]]] = [[]]
    size = 0
    for entry in entries:
        nbytes = torch.Size(entry[1].shape).numel() * entry[2].itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += nbytes
    return files


def _header(entries: list[tuple[str, LogicalTensor, torch.dtype]]) -> tuple[bytes, int]:
    """A safetensors header (length prefix, JSON padded to 8 bytes) and the data size that follows it."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor, dtype in entries:
        end = offset + torch.Size(tensor.shape).numel() * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_TO_SAFETENSORS[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offset


def _write_safetensors(
    source: _Source,
    weights: list[tuple[str, LogicalTensor]],
    base: str,
    cast: torch.dtype | None,
    max_shard_bytes: int,
    force: bool,
    progress: Progress | None,
) -> list[str]:
    typed = [(name, t, _target_dtype("", t.dtype, cast, "")) for name, t in weights]
    groups = [sorted(g, key=lambda e: (-e[2].itemsize, e[0])) for g in _plan_files(typed, max_shard_bytes)]
    stem = base.removesuffix(".safetensors")
    names = (
        [base]
        if len(groups) == 1
        else [f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    )
    index = base + ".index.json"
    finals = names if len(groups) == 1 else [*names, index]
    counter = _Counter(sum(_header(g)[1] for g in groups), progress)
    with _atomic_outputs(finals, force, stale=_earlier_export(base, index)) as files:
        for f, group in zip(files, groups, strict=False):
            header, _ = _header(group)
            f.write(header)
            for _, tensor, dtype in group:
                for block in _cast_blocks(source, tensor, dtype):
                    f.write(block)
                    counter.add(len(block))
        if len(groups) > 1:
            weight_map = {
                name: os.path.basename(file) for file, group in zip(names, groups, strict=True) for name, _, _ in group
            }
            document = {"metadata": {"total_size": counter.total}, "weight_map": weight_map}
            files[-1].write(json.dumps(document, indent=2, sort_keys=True).encode() + b"\n")
    return finals


def _earlier_export(base: str, index: str) -> list[str]:
    """The files of an earlier export to ``base`` (its single file, or its index and the parts the index names)."""
    found = [base, index]
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        found += sorted({os.path.join(os.path.dirname(base), os.path.basename(str(v))) for v in weight_map.values()})
    except (OSError, ValueError, AttributeError):
        pass
    return found
