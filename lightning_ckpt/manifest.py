"""The on-storage schema of a checkpoint: ``manifest.json``, written last, is the commit.

A checkpoint exists iff its manifest exists, parses, and every file it lists has the listed
size. File names in a manifest are plain names inside the checkpoint directory; anything else
(``../x``, ``/etc/passwd``, ``a/b``) is rejected as corrupt, so a manifest can never make a
reader touch a file outside its checkpoint.

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
from lightning_ckpt.plan import paused_gc

__all__ = ["FileEntry", "Manifest", "TensorEntry"]

_ENTRY_ENCODER = json.JSONEncoder(sort_keys=True, separators=(", ", ": "))
_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii  # json.dumps of a str, as the encoder writes it


def _json_lines(lines: list[str]) -> str:
    """A JSON list at the manifest's top level with one compact object per line."""
    return "[\n  " + ",\n  ".join(lines) + "\n ]" if lines else "[]"


def _entry_json(entry: FileEntry | TensorEntry) -> str:
    return _ENTRY_ENCODER.encode(vars(entry))


def _tensor_json(entry: TensorEntry) -> str:
    """What :func:`_entry_json` writes for a tensor, formatted directly (3x faster: no encoder per entry)."""
    ints = (entry.nbytes, entry.offset, *entry.shape)
    if not _TENSOR_FIELDS_KNOWN or not all(type(n) is int for n in ints):  # a new field, a bool: the encoder
        return _entry_json(entry)
    shape = ", ".join(map(str, entry.shape))
    return (
        f'{{"device": {_quote(entry.device)}, "dtype": {_quote(entry.dtype)}, "file": {_quote(entry.file)},'
        f' "key": {_quote(entry.key)}, "nbytes": {entry.nbytes}, "offset": {entry.offset}, "shape": [{shape}]}}'
    )


def _entries_of(data: dict[str, Any]) -> tuple[list[FileEntry], dict[str, TensorEntry]]:
    """The file and tensor entries of a parsed manifest; fields this version does not know are ignored."""
    with paused_gc():  # one entry per tensor
        files = [FileEntry(f["name"], f["size"], f["checksum"], f["rank"]) for f in data["files"]]
        tensors = {
            t["key"]: TensorEntry(t["key"], t["dtype"], tuple(t["shape"]), t["file"], t["offset"], t["nbytes"],
                                  t.get("device", "cpu"))
            for t in data["tensors"]
        }  # fmt: skip
    return files, tensors


def _check_version(version: object, source: str) -> None:
    """Refuse a ``format_version`` this reader cannot read: newer (upgrade) or not a known version (damaged)."""
    number = isinstance(version, (int, float)) and not isinstance(version, bool)
    if number and version == layout.FORMAT_VERSION:
        return
    if number and version > layout.FORMAT_VERSION:  # type: ignore[operator]
        raise NewerFormatError(
            f"{source}: format_version {version} was written by a newer lightning-ckpt; this version"
            f" ({_own_version()}) reads format_version {layout.FORMAT_VERSION} only. Upgrade lightning-ckpt"
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
class TensorEntry:
    """Where one tensor's raw bytes are.

    Attributes:
        key: the tensor's key (its path in the checkpoint dict, see :mod:`lightning_ckpt.tree`).
        dtype: the torch dtype name, e.g. ``"float32"``.
        shape: the shape.
        file: the shard file that holds it.
        offset: byte offset of its first byte in ``file``.
        nbytes: its length in bytes.
        device: the device it was saved from, e.g. ``"cpu"`` or ``"cuda:0"``.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int
    device: str = "cpu"


_TENSOR_FIELDS_KNOWN = [f.name for f in fields(TensorEntry)] == [
    "key", "dtype", "shape", "file", "offset", "nbytes", "device"
]  # fmt: skip  # what _tensor_json writes; any other field set goes through the JSON encoder


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
        """Sum of the sizes of every file of the checkpoint."""
        return sum(f.size for f in self.files)

    def file(self, name: str) -> FileEntry:
        """The entry of file ``name``."""
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def to_json(self) -> bytes:
        """The manifest as JSON: sorted keys, one line per file and per tensor.

        Built without :func:`dataclasses.asdict` (which deep-copies every field of every entry) and
        with the C JSON encoder per entry: a 100,000-tensor manifest takes well under a second.

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
                        text = _json_lines([_tensor_json(t) for t in self.tensors.values()])
                    else:
                        text = _json_lines([_entry_json(f) for f in self.files])
            else:
                text = json.dumps(getattr(self, name), indent=1, sort_keys=True).replace("\n", "\n ")
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
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CorruptCheckpointError(f"{source}: missing or malformed field ({err!r})") from err
        manifest._validate(source)
        return manifest

    def _validate(self, source: str) -> None:
        names = {f.name for f in self.files}
        for entry in self.files:
            if not layout.is_plain_name(entry.name):
                raise CorruptCheckpointError(
                    f"{source}: file name {entry.name!r} is not a plain name inside the checkpoint directory"
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
        if self.objects_file is not None and self.objects_file not in names:
            raise CorruptCheckpointError(f"{source}: objects file {self.objects_file!r} is not listed in files")
