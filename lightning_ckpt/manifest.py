"""The on-storage schema of a checkpoint: ``manifest.json``, written last, is the commit.

A checkpoint exists iff its manifest exists, parses, and every file it lists has the listed
size. File names in a manifest are plain names inside the checkpoint directory; anything else
(``../x``, ``/etc/passwd``, ``a/b``) is rejected as corrupt, so a manifest can never make a
reader touch a file outside its checkpoint.

Format version 2 lists, per tensor, its global ``shape`` and ``chunks``: each chunk's ``offsets``
and ``sizes`` in the tensor, and where its raw bytes are (``file``, ``byte_offset``, ``nbytes``)
with their own ``crc32``, so a reader can fetch and verify just the range it needs. A whole tensor
is one chunk. Version 1 (one ``file``/``offset``/``nbytes`` per tensor, no chunk CRC) is read
forever. In memory, :attr:`Manifest.tensors` holds one :class:`TensorEntry` per *stored piece*
(a whole tensor, or one chunk of a sharded one, keyed ``key@offsets``), the unit that is read,
mapped and verified; :meth:`Manifest.logical_tensors` groups the pieces per tensor.

Example:
    >>> m = Manifest(name="ep0-ba4", epoch=0, global_step=4, world_size=1,
    ...              files=[FileEntry("objects.pt", 10, "crc32:0000abcd", 0)], tensors={})
    >>> Manifest.from_json(m.to_json(), source="manifest.json").files[0].size
    10
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from importlib import metadata as importlib_metadata
from typing import Any

from lightning_ckpt import layout
from lightning_ckpt.errors import CorruptCheckpointError, NewerFormatError
from lightning_ckpt.plan import coverage_problem, paused_gc

__all__ = ["ChunkOf", "FileEntry", "LogicalTensor", "Manifest", "TensorEntry"]

_ENTRY_ENCODER = json.JSONEncoder(sort_keys=True, separators=(", ", ": "))
_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii  # json.dumps of a str, as the encoder writes it


def _json_lines(lines: list[str]) -> str:
    """A JSON list at the manifest's top level with one compact object per line."""
    return "[\n  " + ",\n  ".join(lines) + "\n ]" if lines else "[]"


def _entry_json(entry: FileEntry) -> str:
    return _ENTRY_ENCODER.encode(vars(entry))


def _chunk_json(entry: TensorEntry) -> str:
    """One chunk of the v2 ``chunks`` list, formatted directly (no encoder per entry: 100,000 tensors)."""
    chunk = entry.chunk_of
    offsets = ", ".join(map(str, chunk.offsets if chunk else (0,) * len(entry.shape)))
    sizes = ", ".join(map(str, entry.shape))
    crc = "null" if entry.crc32 is None else _quote(entry.crc32)
    digest = "" if entry.digest is None else f', "xxh3_128": {_quote(entry.digest)}'
    return (
        f'{{"byte_offset": {entry.offset}, "crc32": {crc}, "file": {_quote(entry.file)},'
        f' "nbytes": {entry.nbytes}, "offsets": [{offsets}], "sizes": [{sizes}]{digest}}}'
    )


def _tensor_json(key: str, pieces: list[TensorEntry]) -> str:
    """One tensor of the v2 ``tensors`` list: its global shape and the chunks that hold it."""
    first = pieces[0]
    shape = ", ".join(map(str, first.chunk_of.shape if first.chunk_of else first.shape))
    chunks = ", ".join(_chunk_json(p) for p in pieces)
    return (
        f'{{"chunks": [{chunks}], "device": {_quote(first.device)}, "dtype": {_quote(first.dtype)},'
        f' "key": {_quote(key)}, "shape": [{shape}]}}'
    )


def _piece_of(tensor: dict[str, Any], chunk: dict[str, Any], whole: bool) -> TensorEntry:
    key, shape = tensor["key"], tuple(tensor["shape"])
    sizes, offsets = tuple(chunk["sizes"]), tuple(chunk["offsets"])
    chunk_of = None if whole else ChunkOf(key, shape, offsets)
    return TensorEntry(
        layout.chunk_key(key, offsets) if chunk_of else key, tensor["dtype"], sizes, chunk["file"],
        chunk["byte_offset"], chunk["nbytes"], tensor.get("device", "cpu"), chunk.get("crc32"), chunk_of,
        chunk.get("xxh3_128"),
    )  # fmt: skip


def _pieces_v2(tensors: list[dict[str, Any]]) -> dict[str, TensorEntry]:
    pieces: dict[str, TensorEntry] = {}
    for tensor in tensors:
        chunks = tensor["chunks"]
        shape = list(tensor["shape"])
        whole = len(chunks) == 1 and list(chunks[0]["sizes"]) == shape and not any(chunks[0]["offsets"])
        for chunk in chunks:
            piece = _piece_of(tensor, chunk, whole)
            pieces[piece.key] = piece
    return pieces


def _entries_of(data: dict[str, Any]) -> tuple[list[FileEntry], dict[str, TensorEntry]]:
    """The file and tensor entries of a parsed manifest; fields this version does not know are ignored."""
    with paused_gc():  # one entry per tensor
        files = [FileEntry(f["name"], f["size"], f["checksum"], f["rank"]) for f in data["files"]]
        if data["format_version"] >= 2:
            return files, _pieces_v2(data["tensors"])
        tensors = {
            t["key"]: TensorEntry(t["key"], t["dtype"], tuple(t["shape"]), t["file"], t["offset"], t["nbytes"],
                                  t.get("device", "cpu"))
            for t in data["tensors"]
        }  # fmt: skip
    return files, tensors


def _check_version(version: object, source: str) -> None:
    """Refuse a ``format_version`` this reader cannot read: newer (upgrade) or not a known version (damaged)."""
    number = isinstance(version, (int, float)) and not isinstance(version, bool)
    if number and version in layout.READABLE_FORMAT_VERSIONS:
        return
    if number and version > layout.FORMAT_VERSION:  # type: ignore[operator]
        raise NewerFormatError(
            f"{source}: format_version {version} was written by a newer lightning-ckpt; this version"
            f" ({_own_version()}) reads format_version {layout.FORMAT_VERSION} and older. Upgrade lightning-ckpt"
            " (pip install -U lightning-ckpt) to read this checkpoint"
        )
    raise CorruptCheckpointError(
        f"{source}: format_version {version!r} is not a lightning-ckpt format version (expected"
        f" {layout.FORMAT_VERSION}); the manifest is damaged or was not written by lightning-ckpt"
    )


def _own_version() -> str:
    try:
        return importlib_metadata.version("lightning-ckpt")
    except importlib_metadata.PackageNotFoundError:
        return "unknown version"


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint.

    Attributes:
        name: plain file name inside the checkpoint directory.
        size: size in bytes.
        checksum: ``"crc32:<8 hex digits>"`` of the whole file.
        rank: the global rank that wrote it.
    """

    name: str
    size: int
    checksum: str
    rank: int


@dataclass(frozen=True)
class ChunkOf:
    """Which part of a sharded tensor a stored piece holds.

    Attributes:
        tensor: the tensor's key in the checkpoint dict.
        shape: the tensor's global shape.
        offsets: where the chunk starts in the tensor, per dimension (its sizes are the piece's shape).
    """

    tensor: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class TensorEntry:
    """Where one stored piece's raw bytes are: a whole tensor, or one chunk of a sharded tensor.

    Attributes:
        key: the tensor's key (its path in the checkpoint dict, see :mod:`lightning_ckpt.tree`); for
            a chunk, the key and its offsets (:func:`lightning_ckpt.layout.chunk_key`).
        dtype: the torch dtype name, e.g. ``"float32"``.
        shape: the piece's shape (a chunk's sizes).
        file: the shard file that holds it.
        offset: byte offset of its first byte in ``file``.
        nbytes: its length in bytes.
        device: the device it was saved from, e.g. ``"cpu"`` or ``"cuda:0"``.
        crc32: ``"crc32:<8 hex digits>"`` of its bytes (format v2), ``None`` in a v1 checkpoint.
        chunk_of: for a chunk of a sharded tensor, which tensor and where in it; ``None`` for a whole tensor.
        digest: ``"xxh3_128:<32 hex digits>"`` of its bytes, recorded by incremental saves
            (:mod:`lightning_ckpt.incremental`) so a later save can tell unchanged bytes; ``None`` otherwise.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int
    device: str = "cpu"
    crc32: str | None = None
    chunk_of: ChunkOf | None = None
    digest: str | None = None

    @property
    def tensor_key(self) -> str:
        """The key of the tensor this piece belongs to."""
        return self.chunk_of.tensor if self.chunk_of is not None else self.key

    @property
    def offsets(self) -> tuple[int, ...]:
        """Where this piece starts in its tensor (all zeros for a whole tensor)."""
        return self.chunk_of.offsets if self.chunk_of is not None else (0,) * len(self.shape)

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        """The global shape of the tensor this piece belongs to."""
        return self.chunk_of.shape if self.chunk_of is not None else self.shape


@dataclass(frozen=True)
class LogicalTensor:
    """One tensor of a checkpoint and the stored pieces that hold it (one for a whole tensor).

    Attributes:
        key: the tensor's key in the checkpoint dict.
        dtype: the torch dtype name.
        shape: its global shape.
        device: the device its first piece was saved from.
        pieces: the stored pieces, each covering the elements it says (:class:`ChunkOf`).
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    device: str
    pieces: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        """The bytes of its stored pieces (the tensor's size: chunks cover it exactly once)."""
        return sum(p.nbytes for p in self.pieces)


@dataclass
class Manifest:
    """Everything a reader needs to find, verify and load a checkpoint."""

    name: str
    epoch: int
    global_step: int
    world_size: int
    files: list[FileEntry]
    tensors: dict[str, TensorEntry]
    objects_file: str | None = layout.OBJECTS_FILENAME
    weights_only: bool = False
    created: float = field(default_factory=time.time)
    versions: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = layout.FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        """Sum of the sizes of every file of the checkpoint (its own and the ones it references)."""
        return sum(f.size for f in self.files)

    @property
    def own_files(self) -> list[FileEntry]:
        """The files in the checkpoint's own directory (what its save wrote)."""
        return [f for f in self.files if layout.parse_reference(f.name) is None]

    @property
    def referenced_files(self) -> list[FileEntry]:
        """Files of earlier checkpoints that this (incremental) checkpoint reads tensors from."""
        return [f for f in self.files if layout.parse_reference(f.name) is not None]

    @property
    def references(self) -> frozenset[str]:
        """Names of the earlier checkpoints (siblings in the folder) whose files this one needs.

        Example:
            >>> m = Manifest(name="b", epoch=0, global_step=2, world_size=1, tensors={},
            ...              files=[FileEntry("../a/shard-00000-of-00001.safetensors", 8192, "crc32:00000000", 0)])
            >>> sorted(m.references), m.format_version_to_write
            (['a'], 3)
        """
        return frozenset(ref[0] for f in self.files if (ref := layout.parse_reference(f.name)) is not None)

    @property
    def format_version_to_write(self) -> int:
        """3 when the checkpoint references earlier ones (older readers must refuse it), else 2."""
        return layout.FORMAT_VERSION if self.references else layout.FULL_FORMAT_VERSION

    def file(self, name: str) -> FileEntry:
        """The entry of file ``name``."""
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def _grouped(self) -> dict[str, list[TensorEntry]]:
        """The pieces of each tensor, tensors in the order of their first piece."""
        groups: dict[str, list[TensorEntry]] = {}
        for piece in self.tensors.values():
            chunk = piece.chunk_of
            if chunk is None:
                groups[piece.key] = [piece]
            else:
                groups.setdefault(chunk.tensor, []).append(piece)
        return groups

    def logical_tensors(self) -> dict[str, LogicalTensor]:
        """Every tensor of the checkpoint with the pieces that hold it (chunks of a sharded tensor, grouped).

        Example:
            >>> piece = TensorEntry("w@2", "float32", (2,), "s.safetensors", 4096, 8, chunk_of=ChunkOf("w", (4,), (2,)))
            >>> m = Manifest(name="a", epoch=0, global_step=1, world_size=1, files=[], tensors={piece.key: piece})
            >>> t = m.logical_tensors()["w"]
            >>> t.shape, [p.offsets for p in t.pieces]
            ((4,), [(2,)])
        """
        return {
            key: LogicalTensor(key, pieces[0].dtype, pieces[0].tensor_shape, pieces[0].device, tuple(pieces))
            for key, pieces in self._grouped().items()
        }

    def to_json(self) -> bytes:
        """The manifest as JSON: sorted keys, one line per file and per tensor.

        Built without :func:`dataclasses.asdict` (which deep-copies every field of every entry) and
        formatted directly per tensor: a 100,000-tensor manifest takes well under a second. Format
        version 2, or 3 when it references files of earlier checkpoints (:attr:`format_version_to_write`),
        whatever was read.

        Example:
            >>> m = Manifest(name="a", epoch=0, global_step=1, world_size=1, files=[], tensors={}, created=0.0)
            >>> json.loads(m.to_json())["global_step"]
            1
        """
        lines = []
        for name in sorted(f.name for f in fields(self)):
            if name in ("files", "tensors"):
                with paused_gc():
                    if name == "tensors":
                        text = _json_lines([_tensor_json(key, pieces) for key, pieces in self._grouped().items()])
                    else:
                        text = _json_lines([_entry_json(f) for f in self.files])
            else:
                value = self.format_version_to_write if name == "format_version" else getattr(self, name)
                text = json.dumps(value, indent=1, sort_keys=True).replace("\n", "\n ")
            lines.append(f" {json.dumps(name)}: {text}")
        return ("{\n" + ",\n".join(lines) + "\n}").encode()

    @classmethod
    def from_json(cls, raw: bytes, *, source: str) -> Manifest:
        """Parse and validate a manifest; ``source`` names the file in error messages.

        Fields this version does not know, at any level, are ignored (see "Compatibility" in
        ``docs/storage_format.md``); a ``format_version`` above :data:`~lightning_ckpt.layout.FORMAT_VERSION`
        is refused with an error that says to upgrade.

        Example:
            >>> raw = b'{"format_version": 1, "name": "a", "epoch": 0, "global_step": 1, "world_size": 1,'
            >>> raw += b' "files": [], "tensors": [], "objects_file": null, "added_later": {"x": 1}}'
            >>> Manifest.from_json(raw, source="manifest.json").global_step
            1
        """
        try:
            with paused_gc():  # a dict and a list per tensor
                data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptCheckpointError(
                f"{source}: not valid JSON ({err}); the manifest is truncated or damaged"
            ) from err
        if not isinstance(data, dict):
            raise CorruptCheckpointError(f"{source}: expected a JSON object, found {type(data).__name__}")
        _check_version(data.get("format_version"), source)
        try:
            files, tensors = _entries_of(data)
            manifest = cls(
                name=str(data["name"]),
                epoch=int(data["epoch"]),
                global_step=int(data["global_step"]),
                world_size=int(data["world_size"]),
                files=files,
                tensors=tensors,
                objects_file=data.get("objects_file"),
                weights_only=bool(data.get("weights_only", False)),
                created=float(data.get("created", 0.0)),
                versions=dict(data.get("versions", {})),
                metadata=dict(data.get("metadata", {})),
                format_version=int(data["format_version"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CorruptCheckpointError(f"{source}: missing or malformed field ({err!r})") from err
        manifest._validate(source)
        return manifest

    def _validate(self, source: str) -> None:
        names = {f.name for f in self.files}
        for entry in self.files:
            if not layout.is_file_name(entry.name):
                raise CorruptCheckpointError(
                    f"{source}: file name {entry.name!r} is neither a plain name inside the checkpoint directory"
                    " nor '../<checkpoint>/<file>' (a file of an earlier checkpoint in the same folder)"
                )
            if self.format_version < layout.FORMAT_VERSION and layout.parse_reference(entry.name) is not None:
                raise CorruptCheckpointError(
                    f"{source}: file {entry.name!r} belongs to another checkpoint, which format_version"
                    f" {self.format_version} cannot express; the manifest is damaged"
                )
            if entry.size < 0:
                raise CorruptCheckpointError(f"{source}: file {entry.name!r} has negative size {entry.size}")
        for tensor in self.tensors.values():
            if tensor.file not in names:
                raise CorruptCheckpointError(f"{source}: tensor {tensor.key!r} names unlisted file {tensor.file!r}")
            end, size = tensor.offset + tensor.nbytes, self.file(tensor.file).size
            if tensor.offset < 0 or end > size:
                raise CorruptCheckpointError(
                    f"{source}: tensor {tensor.key!r} lies outside {tensor.file!r}"
                    f" (bytes {tensor.offset}..{end}, file size {size})"
                )
        for logical in self.logical_tensors().values():
            problem = coverage_problem(logical.shape, [(p.offsets, p.shape) for p in logical.pieces])
            if problem:
                raise CorruptCheckpointError(f"{source}: tensor {logical.key!r}: {problem}")
        if self.objects_file is not None and self.objects_file not in names:
            raise CorruptCheckpointError(f"{source}: objects file {self.objects_file!r} is not listed in files")
