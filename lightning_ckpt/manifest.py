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
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_ckpt import layout
from lightning_ckpt.errors import CorruptCheckpointError

__all__ = ["FileEntry", "Manifest", "TensorEntry"]


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
        data = asdict(self)
        data["tensors"] = [asdict(t) for t in self.tensors.values()]
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, source: str) -> Manifest:
        """Parse and validate a manifest; ``source`` names the file in error messages."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptCheckpointError(
                f"{source}: not valid JSON ({err}); the manifest is truncated or damaged"
            ) from err
        if not isinstance(data, dict):
            raise CorruptCheckpointError(f"{source}: expected a JSON object, found {type(data).__name__}")
        version = data.get("format_version")
        if version != layout.FORMAT_VERSION:
            raise CorruptCheckpointError(
                f"{source}: format_version {version!r} is not supported (expected {layout.FORMAT_VERSION});"
                " upgrade lightning-ckpt to read it"
            )
        try:
            files = [FileEntry(**f) for f in data["files"]]
            tensors = [TensorEntry(**{**t, "shape": tuple(t["shape"])}) for t in data["tensors"]]
            manifest = cls(
                name=str(data["name"]),
                epoch=int(data["epoch"]),
                global_step=int(data["global_step"]),
                world_size=int(data["world_size"]),
                files=files,
                tensors={t.key: t for t in tensors},
                objects_file=data.get("objects_file"),
                weights_only=bool(data.get("weights_only", False)),
                created=float(data.get("created", 0.0)),
                versions=dict(data.get("versions", {})),
                metadata=dict(data.get("metadata", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
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
