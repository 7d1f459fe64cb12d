"""Read one committed checkpoint: its manifest, verified files, tensors and non-tensor objects.

Every loaded tensor has memory of its own, as from ``torch.load``: keeping, changing or saving one
never holds or writes the rest of its shard (how the files are read: :mod:`lightning_ckpt.file_reads`).

Verification: sizes always; CRC32 checksums unless ``verify_checksums=False`` (on all cores, see
:mod:`lightning_ckpt.checksum`). Every failure is
a :class:`~lightning_ckpt.errors.CorruptCheckpointError` naming the file and what was expected.

Example:
    >>> import tempfile, torch, os
    >>> from lightning_ckpt.collective import save_checkpoint_dir
    >>> folder = tempfile.mkdtemp()
    >>> path = save_checkpoint_dir({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, os.path.join(folder, "c"))
    >>> read_checkpoint(path)["state_dict"]["w"]
    tensor([1., 1., 1.])
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from typing import Any

import torch

from lightning_ckpt import layout
from lightning_ckpt.checksum import checksum_string, parallel_crc32
from lightning_ckpt.chunks import assemble
from lightning_ckpt.errors import CheckpointNotFoundError, ConfigError, ConfigTypeError, CorruptCheckpointError
from lightning_ckpt.file_reads import byte_view, load_file, read_ahead, read_whole, tensors_to_map
from lightning_ckpt.locations import check_url
from lightning_ckpt.manifest import FileEntry, Manifest, TensorEntry
from lightning_ckpt.storage import Storage
from lightning_ckpt.tree import merge_tensors

__all__ = ["MapLocation", "load_checkpoint_dir", "read_checkpoint", "read_manifest", "verify_files"]

MapLocation = str | torch.device | dict[str, str] | Callable[..., Any] | None

_PATH_EXAMPLE = "'/data/runs/a/ep3-ba1500' or 's3://bucket/runs/a/ep3-ba1500'"


def _check_load_arguments(map_location: object, weights_only: object) -> None:
    """Reject ``map_location`` / ``weights_only`` values ``torch.load`` would misread or fail on late."""
    if weights_only is not None and not isinstance(weights_only, bool):
        raise ConfigError("weights_only", weights_only, "None (the same as True), True or False")
    example = "'cpu', 'cuda:0', torch.device('cpu'), {'cuda:1': 'cuda:0'} or a callable (storage, location)"
    if isinstance(map_location, str):
        try:
            torch.device(map_location)
        except RuntimeError as err:
            raise ConfigError("map_location", map_location, example, f"It is not a device ({err})") from None
    elif isinstance(map_location, dict):
        if not all(isinstance(k, str) and isinstance(v, (str, torch.device)) for k, v in map_location.items()):
            raise ConfigError("map_location", map_location, example, "A dict maps saved device names to devices")
    elif not (map_location is None or isinstance(map_location, torch.device) or callable(map_location)):
        raise ConfigTypeError("map_location", map_location, example)


def read_manifest(storage: Storage, ckpt_dir: str) -> Manifest:
    """Read and validate the manifest of ``ckpt_dir``; raise if it is missing or damaged."""
    path = storage.join(ckpt_dir, layout.MANIFEST_FILENAME)
    if not storage.exists(path):
        if storage.isdir(ckpt_dir):
            raise CorruptCheckpointError(
                f"{storage.url(path)} is missing: {storage.url(ckpt_dir)} is not a committed checkpoint"
                " (its save did not finish)"
            )
        raise CheckpointNotFoundError(f"no checkpoint at {storage.url(ckpt_dir)}")
    return Manifest.from_json(storage.read_bytes(path), source=storage.url(path))


def check_sizes(storage: Storage, ckpt_dir: str, manifest: Manifest) -> None:
    """Every file the manifest lists exists with its listed size (a committed checkpoint's definition)."""
    for entry in manifest.files:
        _check_size(storage, ckpt_dir, entry)


def _check_size(storage: Storage, ckpt_dir: str, entry: FileEntry) -> None:
    path = storage.join(ckpt_dir, entry.name)
    if not storage.exists(path):
        base = layout.parse_reference(entry.name)
        why = "" if base is None else (
            f"; it belongs to {base[0]!r}, the checkpoint this incremental one reads its unchanged tensors from,"
            " which was deleted or moved outside lightning-ckpt (its rotation and prune keep it)"
        )  # fmt: skip
        raise CorruptCheckpointError(f"{storage.url(path)} is missing (the manifest lists {entry.size} bytes){why}")
    found = storage.size(path)
    if found != entry.size:
        raise CorruptCheckpointError(
            f"{storage.url(path)} has {found} bytes, expected {entry.size} (truncated or damaged)"
        )


def _crc_of_view(view: memoryview) -> str:
    return checksum_string(parallel_crc32(view))


def _check_checksum(storage: Storage, ckpt_dir: str, entry: FileEntry, data: memoryview) -> None:
    found = _crc_of_view(data)
    if found != entry.checksum:
        raise CorruptCheckpointError(
            f"{storage.url(storage.join(ckpt_dir, entry.name))}: checksum {found}, expected {entry.checksum}"
            " (the file was modified or damaged)"
        )


def verify_files(storage: Storage, ckpt_dir: str, manifest: Manifest, *, checksums: bool = True) -> None:
    """Check every listed file's size (and checksum) without loading tensors."""
    for entry in manifest.files:
        _check_size(storage, ckpt_dir, entry)
        if checksums:
            data = _read_file(storage, ckpt_dir, entry)
            _check_checksum(storage, ckpt_dir, entry, byte_view(data))


def _read_file(storage: Storage, ckpt_dir: str, entry: FileEntry) -> torch.Tensor:
    """The file's bytes as a uint8 tensor, to verify it: memory-mapped locally, one read remotely."""
    path = storage.join(ckpt_dir, entry.name)
    if entry.size == 0:
        return torch.empty(0, dtype=torch.uint8)
    if storage.is_local:
        read_ahead(path)
        return torch.from_file(path, shared=False, size=entry.size, dtype=torch.uint8)
    buffer = torch.empty(entry.size, dtype=torch.uint8)
    view = buffer.numpy().data.cast("B")
    with storage.open_read(path) as f:
        filled = 0
        while filled < entry.size:
            n = f.readinto(view[filled:])  # type: ignore[attr-defined]
            if not n:
                break
            filled += n
    if filled != entry.size:
        raise CorruptCheckpointError(f"{storage.url(path)} has {filled} bytes, expected {entry.size}")
    return buffer


def _apply_map_location(tensor: torch.Tensor, saved_device: str, map_location: MapLocation) -> torch.Tensor:
    """Place a loaded CPU tensor as ``torch.load`` would with ``map_location`` (``None``: stay on the CPU)."""
    if map_location is None:
        return tensor
    if isinstance(map_location, (str, torch.device)):
        return tensor.to(map_location)
    if isinstance(map_location, dict):
        target = map_location.get(saved_device, saved_device)
        return tensor if target == "cpu" else tensor.to(target)
    return _call_map_location(map_location, tensor, saved_device)


def _call_map_location(function: Callable[..., Any], tensor: torch.Tensor, saved_device: str) -> torch.Tensor:
    """``torch.load``'s contract: called with the tensor's own CPU storage and its saved location.

    A storage returned is where the tensor lives; ``None`` keeps the CPU storage (as ``map_location=None``).
    """
    placed = function(tensor.untyped_storage(), saved_device)
    if placed is None:
        return tensor
    if isinstance(placed, torch.TypedStorage):
        placed = placed.untyped()
    if not isinstance(placed, torch.UntypedStorage):
        raise ConfigTypeError(
            "map_location",
            function,
            "lambda storage, location: storage.cuda() (a storage, or None to keep it on the CPU)",
            f"It returned {type(placed).__name__} for a tensor saved on {saved_device!r}",
        )
    placed_tensor = torch.empty(0, dtype=tensor.dtype, device=placed.device)
    return placed_tensor.set_(placed, 0, tensor.shape, tensor.stride())


def load_checkpoint_dir(
    storage: Storage,
    ckpt_dir: str,
    *,
    map_location: MapLocation = None,
    weights_only: bool | None = None,
    verify_checksums: bool = True,
) -> dict[str, Any]:
    """Load the committed checkpoint at ``ckpt_dir`` into the dict that was saved.

    Every tensor is read into memory of its own (never a view of a shared buffer), so it can be
    kept, modified or saved again on its own, as a tensor from ``torch.load``.

    Args:
        storage: the storage holding it.
        ckpt_dir: the checkpoint directory.
        map_location: like ``torch.load``'s: a device, a ``{saved: target}`` dict or a callable
            ``(storage, location)`` called once per tensor with its own CPU storage and the device it
            was saved from (``"cpu"``, ``"cuda:0"``), returning a storage (or ``None``: stay on the CPU).
            ``None`` keeps tensors on the CPU, where Lightning copies them into the model.
        weights_only: read ``objects.pt`` with ``torch.load(weights_only=...)``; ``None`` means ``True``.
        verify_checksums: compare each file's CRC32 with the manifest.

    Example:
        >>> import tempfile, torch, os
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> path = save_checkpoint_dir({"w": torch.ones(3), "b": torch.zeros(1)}, os.path.join(tempfile.mkdtemp(), "c"))
        >>> storage, directory = Storage.open(path)
        >>> seen = []
        >>> loaded = load_checkpoint_dir(storage, directory, map_location=lambda s, loc: seen.append((s.nbytes(), loc)))
        >>> sorted(seen), loaded["w"].untyped_storage().nbytes()
        ([(4, 'cpu'), (12, 'cpu')], 12)
    """
    _check_load_arguments(map_location, weights_only)
    manifest = read_manifest(storage, ckpt_dir)
    check_sizes(storage, ckpt_dir, manifest)
    by_file: dict[str, list[TensorEntry]] = {entry.name: [] for entry in manifest.files}
    for t in manifest.tensors.values():
        by_file[t.file].append(t)
    loaded: dict[str, torch.Tensor] = {}
    mapped = tensors_to_map(storage, manifest)
    for entry in manifest.files:
        if entry.name != manifest.objects_file or by_file[entry.name]:  # objects.pt is read on its own below
            loaded.update(load_file(storage, ckpt_dir, entry, by_file[entry.name], mapped, verify_checksums))
    _assemble_sharded(manifest, loaded)
    tensors = {key: _apply_map_location(loaded.pop(key), t.device, map_location) for key, t in _placed(manifest)}
    skeleton: Any = {}
    if manifest.objects_file is not None:
        raw = read_whole(storage, ckpt_dir, manifest.file(manifest.objects_file), verify_checksums)
        skeleton = load_objects(storage, ckpt_dir, manifest.objects_file, raw, map_location, weights_only)

    def missing(key: str) -> Any:
        raise CorruptCheckpointError(f"{storage.url(ckpt_dir)}: tensor {key!r} is referenced but not in the manifest")

    result = merge_tensors(skeleton, tensors, on_missing=missing)
    if not isinstance(result, dict):
        raise CorruptCheckpointError(
            f"{storage.url(ckpt_dir)}: expected a dict checkpoint, found {type(result).__name__}"
        )
    return result


def _assemble_sharded(manifest: Manifest, loaded: dict[str, torch.Tensor]) -> None:
    """Replace the chunks of each sharded tensor in ``loaded`` by the whole tensor, in memory of its own."""
    for tensor in manifest.logical_tensors().values():
        if tensor.pieces[0].chunk_of is None:
            continue
        chunks = [(p.offsets, loaded.pop(p.key)) for p in tensor.pieces]
        loaded[tensor.key] = assemble(tensor.shape, getattr(torch, tensor.dtype), chunks)


def _placed(manifest: Manifest) -> list[tuple[str, TensorEntry]]:
    """Each tensor's key with the entry of its (first) piece, which records the device it was saved from."""
    return [(key, tensor.pieces[0]) for key, tensor in manifest.logical_tensors().items()]


def load_objects(
    storage: Storage,
    ckpt_dir: str,
    name: str,
    data: bytearray,
    map_location: MapLocation,
    weights_only: bool | None,
) -> Any:
    """Unpickle ``objects.pt`` (its bytes ``data``): ``weights_only=True`` unless told otherwise, with an error
    that says how to load a checkpoint one trusts."""
    raw = io.BytesIO(data)
    safe = True if weights_only is None else weights_only
    location = map_location if map_location is not None else "cpu"
    try:
        return torch.load(raw, map_location=location, weights_only=safe)
    except pickle.UnpicklingError as err:
        if not safe:
            raise CorruptCheckpointError(
                f"{storage.url(storage.join(ckpt_dir, name))}: cannot unpickle ({err})"
            ) from err
        raise pickle.UnpicklingError(
            f"{storage.url(storage.join(ckpt_dir, name))} holds objects that weights_only=True refuses to load"
            f" ({str(err).splitlines()[0]}). If you trust this checkpoint, load it with weights_only=False,"
            " e.g. trainer.fit(model, ckpt_path=..., weights_only=False)."
        ) from err


def read_checkpoint(
    path: str,
    *,
    map_location: MapLocation = None,
    weights_only: bool | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint (a local path or URL) into the dict that was saved; ``path`` is what ``ckpt_path=`` takes.

    That is: a checkpoint directory, a folder of checkpoints (its newest committed one), a ``latest``
    symlink or ``latest.symlink`` pointer file, a file inside a checkpoint (that checkpoint), or a
    legacy single-file ``.ckpt`` written by ``torch.save``. Non-tensor state is unpickled with
    ``weights_only=True`` unless ``weights_only=False`` is passed.

    Raises:
        ConfigError: an argument of the wrong type or value (named in the message).
        CheckpointNotFoundError: nothing is at ``path``, or a folder holds no committed checkpoint.
        CorruptCheckpointError: ``path`` is not a committed checkpoint, or does not match its manifest.

    Example:
        >>> import os, tempfile, torch
        >>> from lightning_ckpt import ShardedCheckpointIO
        >>> folder = tempfile.mkdtemp()
        >>> ShardedCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 100},
        ...                                       os.path.join(folder, "ep0-ba100"))
        >>> checkpoint = read_checkpoint(folder, map_location="cpu")  # a folder: its newest checkpoint
        >>> checkpoint["global_step"], checkpoint["state_dict"]["w"]
        (100, tensor([0., 0.]))
    """
    from lightning_ckpt.discovery import load_resolved, resolve  # discovery reads manifests with this module

    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ConfigTypeError("path", path, _PATH_EXAMPLE, "It must be the path or URL of a checkpoint directory")
    check_url(os.fspath(path), "path", _PATH_EXAMPLE)
    _check_load_arguments(map_location, weights_only)
    storage, target = Storage.open(path, storage_options)
    if not storage.exists(target) and not storage.exists(target + layout.POINTER_SUFFIX):
        raise CheckpointNotFoundError(
            f"path={os.fspath(path)!r} does not exist; pass a checkpoint directory, e.g. {_PATH_EXAMPLE}, a folder"
            " of checkpoints (its newest committed one is read), a 'latest' pointer or a legacy .ckpt file"
        )
    try:
        resolved = resolve(os.fspath(path), storage_options)
    except CheckpointNotFoundError as err:  # resolve names the argument of the plugin, ckpt_path
        raise CheckpointNotFoundError(str(err).replace("ckpt_path=", "path=", 1)) from None
    return load_resolved(resolved, map_location=map_location, weights_only=weights_only)
