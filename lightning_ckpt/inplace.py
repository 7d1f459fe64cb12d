"""In-place loads into a sharded model and its optimizers: each rank reads only the chunks its shards need.

The live state dicts of the current layout (``get_model_state_dict`` / ``get_optimizer_state_dict``:
``DTensor`` values under FSDP2 and tensor parallel, ``ShardedTensor`` under FSDP1, plain tensors
elsewhere) say which region of each tensor this rank holds. For every region, each stored piece of
that tensor that overlaps it (:mod:`lightning_ckpt.chunks`) is read (a local ``pread``; a ranged GET
on an object store, never the whole checkpoint), verified by its own CRC32, and the overlap copied
in. Any layout loads any other: N ranks saved, M load; ``Shard(1)`` saved, ``Shard(0)`` loads; a
plain (DDP or v1) checkpoint loads into a sharded model. Nothing here talks to other ranks.

Optimizer state is matched by parameter name (FQN). A checkpoint whose optimizer state is keyed by
parameter index (DDP, or a rank-0 full dict) is matched by position in ``param_groups``, which is the
same for the same model and ``configure_optimizers``.

Example:
    >>> import os, tempfile, torch
    >>> from lightning_ckpt.collective import save_checkpoint_dir
    >>> model = torch.nn.Linear(2, 2)
    >>> path = os.path.join(tempfile.mkdtemp(), "c")
    >>> path = save_checkpoint_dir({"state_dict": model.state_dict(), "epoch": 3}, path)
    >>> other = torch.nn.Linear(2, 2)
    >>> storage, directory = Storage.open(path)
    >>> rest = load_in_place(storage, directory, other, [], strict=True)
    >>> torch.equal(other.weight, model.weight), rest
    (True, {'epoch': 3})
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from lightning_ckpt.checksum import checksum_string, crc32
from lightning_ckpt.chunks import assemble, copy_overlap, overlap
from lightning_ckpt.errors import CorruptCheckpointError
from lightning_ckpt.file_reads import read_whole
from lightning_ckpt.manifest import LogicalTensor, Manifest, TensorEntry
from lightning_ckpt.reader import check_sizes, load_objects, read_manifest
from lightning_ckpt.sharded import distributed_tensor_kind, local_regions
from lightning_ckpt.storage import Storage
from lightning_ckpt.tree import TENSOR_MARKER, join_key, merge_tensors

__all__ = ["PieceReader", "load_in_place", "load_weights_in_place", "markers", "open_pieces"]

_LOADED_IN_PLACE = ("state_dict", "optimizer_states")


class PieceReader:
    """Reads stored pieces of one checkpoint, each verified by its CRC32 (v1: its whole file's, once)."""

    def __init__(
        self,
        storage: Storage,
        ckpt_dir: str,
        manifest: Manifest,
        *,
        verify: bool = True,
        verified_files: Iterable[str] = (),
    ) -> None:
        """``verified_files``: files whose whole-file CRC32 (format v1) the caller has already checked."""
        self.storage, self.ckpt_dir, self.manifest, self.verify = storage, ckpt_dir, manifest, verify
        self._whole_files_checked: set[str] = set(verified_files)
        self._queued: list[tuple[TensorEntry, Callable[[], None]]] = []
        self.bytes_read = 0

    def read(self, piece: TensorEntry) -> torch.Tensor:
        """The piece as a tensor of its own (read straight into new memory, never zero-filled first)."""
        tensor = torch.empty(piece.shape, dtype=getattr(torch, piece.dtype))
        self.read_into(piece, tensor)
        return tensor

    def read_into(self, piece: TensorEntry, target: torch.Tensor) -> None:
        """Read the piece straight into ``target``'s memory (a contiguous CPU tensor of the piece's shape and dtype).

        Locally that is one ``preadv`` into the tensor and a CRC32 over it, with no copy in between.
        """
        if piece.nbytes:
            self._read_into(piece, target.detach().reshape(-1).view(torch.uint8).numpy().data)

    def _read_into(self, piece: TensorEntry, buffer: memoryview) -> None:
        path = self.storage.join(self.ckpt_dir, piece.file)
        got = self.storage.read_range_into(path, piece.offset, buffer)
        self.bytes_read += got
        if got != piece.nbytes:
            raise CorruptCheckpointError(f"{self.storage.url(path)} ended before byte {piece.offset + piece.nbytes}")
        if self.verify:
            self._check(piece, buffer)

    def _check(self, piece: TensorEntry, data: memoryview) -> None:
        if piece.crc32 is None:  # format v1: only the file has a CRC
            if piece.file not in self._whole_files_checked:
                read_whole(self.storage, self.ckpt_dir, self.manifest.file(piece.file), True)
                self._whole_files_checked.add(piece.file)
            return
        found = checksum_string(crc32(data))
        if found != piece.crc32:
            raise CorruptCheckpointError(
                f"{self.storage.url(self.storage.join(self.ckpt_dir, piece.file))}: tensor {piece.key!r} (bytes"
                f" {piece.offset}..{piece.offset + piece.nbytes}) has checksum {found}, expected {piece.crc32}"
                " (the file was modified or damaged)"
            )

    def whole(self, tensor: LogicalTensor) -> torch.Tensor:
        """The whole tensor, in memory of its own."""
        if len(tensor.pieces) == 1 and tensor.pieces[0].chunk_of is None:
            return self.read(tensor.pieces[0])
        return assemble(tensor.shape, getattr(torch, tensor.dtype), [(p.offsets, self.read(p)) for p in tensor.pieces])

    def fill(self, key: str, tensor: LogicalTensor, target: Any) -> None:
        """Queue copying the stored values into ``target`` (a DTensor, ShardedTensor or tensor of the same global
        shape); :meth:`run_queued` reads them."""
        kind = distributed_tensor_kind(target)
        shape = tuple(target.size() if kind == "ShardedTensor" else target.shape)
        dtype = str(target.dtype).removeprefix("torch.")
        if shape != tensor.shape or dtype != tensor.dtype:
            raise CorruptCheckpointError(
                f"{key!r} is {tensor.dtype} {list(tensor.shape)} in the checkpoint but {dtype} {list(shape)} in the"
                " model being resumed: the checkpoint was saved from a different model"
            )
        for offsets, region in local_regions(target):
            for piece in tensor.pieces:
                if not region.numel() or overlap(piece.offsets, piece.shape, offsets, region.shape) is None:
                    continue
                self._queued.append((piece, self._copier(piece, offsets, region)))

    def _copier(self, piece: TensorEntry, offsets: Sequence[int], region: torch.Tensor) -> Callable[[], None]:
        if _is_exactly(piece, offsets, region):  # the same layout as saved: read into it, no copy in between
            return lambda: self.read_into(piece, region)

        def copy() -> None:
            copy_overlap(piece.offsets, self.read(piece).to(region.device), offsets, region)

        return copy

    def run_queued(self) -> None:
        """Do the queued reads in file order (one sequential pass over each file on a cold disk)."""
        queued, self._queued = self._queued, []
        for _, copy in sorted(queued, key=lambda item: (item[0].file, item[0].offset)):
            copy()


def _is_exactly(piece: TensorEntry, offsets: Sequence[int], region: torch.Tensor) -> bool:
    """Whether ``piece`` is all of ``region`` and ``region`` is memory it can be read into directly."""
    return (
        tuple(piece.offsets) == tuple(offsets)
        and tuple(piece.shape) == tuple(region.shape)
        and region.device.type == "cpu"
        and region.is_contiguous()
        and str(region.dtype).removeprefix("torch.") == piece.dtype
    )


def load_in_place(
    storage: Storage,
    ckpt_dir: str,
    module: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    *,
    strict: bool = True,
    weights_only: bool | None = None,
    verify: bool = True,
    module_key: str = "state_dict",
    optimizer_keys: Sequence[tuple[Any, ...]] | None = None,
) -> dict[str, Any]:
    """Load ``module_key`` into ``module`` and each optimizer's state in place; return the rest of the checkpoint.

    ``optimizer_keys`` are where each optimizer's state sits in the checkpoint dict: Lightning's
    ``("optimizer_states", i)`` by default, e.g. ``("optimizer",)`` for a Fabric state dict. The rest
    is the checkpoint dict without ``module_key`` and those entries (loops, callbacks, schedulers, ...),
    as Lightning's sharded loaders return it.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    paths = (
        list(optimizer_keys)
        if optimizer_keys is not None
        else [("optimizer_states", i) for i in range(len(optimizers))]
    )
    reader, tensors, skeleton = open_pieces(storage, ckpt_dir, verify=verify, weights_only=weights_only)
    model_state = get_model_state_dict(module)
    _fill_model(reader, tensors, model_state, strict, module_key)
    reader.run_queued()
    set_model_state_dict(module, model_state, options=StateDictOptions(strict=strict))
    for path, optimizer in zip(paths, optimizers, strict=True):
        saved = _at(skeleton, path)
        if not isinstance(saved, dict):
            raise CorruptCheckpointError(
                f"the checkpoint holds no optimizer state at {join_key(*path)!r}; it was saved without this"
                " optimizer. Resume with weights_only=True to load the weights alone"
            )
        state = get_optimizer_state_dict(module, optimizer)
        groups = _merged(reader, tensors, saved.get("param_groups", []))  # hyperparameters
        filled = _optimizer_state(state, groups, path, reader, tensors)
        reader.run_queued()
        set_optimizer_state_dict(module, optimizer, filled)
    loaded_here = {module_key, *(path[0] for path in paths)}
    rest = {k: v for k, v in skeleton.items() if k not in loaded_here}
    return _merged(reader, tensors, rest)


def load_weights_in_place(
    storage: Storage,
    ckpt_dir: str,
    module: torch.nn.Module,
    *,
    strict: bool = True,
    weights_only: bool | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """The whole checkpoint dict, its ``state_dict`` read straight into ``module``'s own tensors.

    For a model that is not sharded (one device, DDP): every stored weight and buffer the module has
    is read into the module's memory (no fresh memory, no copy), and the returned ``state_dict`` holds
    the module's tensors themselves, so Lightning's ``load_state_dict`` that follows copies nothing.
    Stored entries the module lacks come back as tensors of their own (Lightning's ``strict`` check
    still sees them); everything else (optimizer state, loops, callbacks) is read as by
    :func:`~lightning_ckpt.reader.read_checkpoint`, each tensor with memory of its own.

    Example:
        >>> import os, tempfile, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> saved = torch.nn.Linear(2, 2)
        >>> path = os.path.join(tempfile.mkdtemp(), "c")
        >>> path = save_checkpoint_dir({"state_dict": saved.state_dict(), "epoch": 3}, path)
        >>> model = torch.nn.Linear(2, 2)
        >>> checkpoint = load_weights_in_place(*Storage.open(path), model)
        >>> weight = checkpoint["state_dict"]["weight"]
        >>> torch.equal(model.weight, saved.weight), weight.data_ptr() == model.weight.data_ptr(), checkpoint["epoch"]
        (True, True, 3)
    """
    reader, tensors, skeleton = open_pieces(storage, ckpt_dir, verify=verify, weights_only=weights_only)
    saved = skeleton.get("state_dict")
    if not isinstance(saved, dict):
        raise CorruptCheckpointError(f"{storage.url(ckpt_dir)} holds no 'state_dict': it is not a Lightning checkpoint")
    own = module.state_dict()
    _fill_model(reader, tensors, own, strict, "state_dict")
    reader.run_queued()
    loaded = {name for name in own if join_key("state_dict", name) in tensors}
    rest = _merged(reader, tensors, {**skeleton, "state_dict": {n: v for n, v in saved.items() if n not in loaded}})
    rest["state_dict"] = {name: own[name] if name in loaded else rest["state_dict"][name] for name in saved}
    return rest


def _at(tree: Any, path: Sequence[Any]) -> Any:
    """The value at ``path`` (dict keys, list indices) in ``tree``, or ``None``."""
    for part in path:
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, (list, tuple)) and isinstance(part, int) and part < len(tree):
            tree = tree[part]
        else:
            return None
    return tree


def open_pieces(
    storage: Storage, ckpt_dir: str, *, verify: bool, weights_only: bool | None
) -> tuple[PieceReader, dict[str, LogicalTensor], dict[str, Any]]:
    """A committed checkpoint opened for piece reads: its reader, its tensors by key, and its unpickled skeleton
    (the dict with a marker where each tensor goes; sizes checked, nothing else read yet)."""
    manifest = read_manifest(storage, ckpt_dir)
    check_sizes(storage, ckpt_dir, manifest)
    reader = PieceReader(storage, ckpt_dir, manifest, verify=verify)
    return reader, manifest.logical_tensors(), _skeleton(storage, ckpt_dir, manifest, weights_only)


def _skeleton(storage: Storage, ckpt_dir: str, manifest: Manifest, weights_only: bool | None) -> dict[str, Any]:
    if manifest.objects_file is None:
        return {}
    raw = read_whole(storage, ckpt_dir, manifest.file(manifest.objects_file), True)
    skeleton = load_objects(storage, ckpt_dir, manifest.objects_file, raw, None, weights_only)
    if not isinstance(skeleton, dict):
        raise CorruptCheckpointError(f"{storage.url(ckpt_dir)}: expected a dict checkpoint")
    return skeleton


def _merged(reader: PieceReader, tensors: Mapping[str, LogicalTensor], skeleton: Any) -> Any:
    """``skeleton`` with each marker replaced by its whole tensor (read now, in file order; only those it names)."""
    wanted = [tensors[key] for key in set(markers(skeleton)) if key in tensors]
    wanted.sort(key=lambda t: min((p.file, p.offset) for p in t.pieces) if t.pieces else ("", 0))
    return merge_tensors(skeleton, {tensor.key: reader.whole(tensor) for tensor in wanted})


def markers(value: Any) -> list[str]:
    """The tensor keys whose markers ``value`` (a skeleton or part of one) holds."""
    if isinstance(value, dict):
        if TENSOR_MARKER in value and isinstance(value[TENSOR_MARKER], str):
            return [value[TENSOR_MARKER]]
        return [key for item in value.values() for key in markers(item)]
    if isinstance(value, (list, tuple)):
        return [key for item in value for key in markers(item)]
    return []


def _fill_model(
    reader: PieceReader, tensors: Mapping[str, LogicalTensor], model_state: Mapping[str, Any], strict: bool, root: str
) -> None:
    for name, value in model_state.items():
        key = join_key(root, name)
        if key not in tensors:
            if strict:
                raise CorruptCheckpointError(
                    f"the model being resumed has {name!r}, which the checkpoint does not hold ({key!r}); the"
                    " checkpoint was saved from a different model. Set strict_loading=False on the"
                    " LightningModule to resume the rest"
                )
            continue
        reader.fill(key, tensors[key], value)


def _optimizer_state(
    live: dict[str, Any],
    saved_groups: Sequence[Mapping[str, Any]],
    path: Sequence[Any],
    reader: PieceReader,
    tensors: Mapping[str, LogicalTensor],
) -> dict[str, Any]:
    """The live optimizer state dict filled from the saved one, keyed by FQN (saved by index: by position)."""
    names = _saved_names(live.get("param_groups", []), saved_groups)
    for name, values in live.get("state", {}).items():
        saved_name = names.get(name, name)
        for field, value in values.items():
            key = join_key(*path, "state", saved_name, field)
            if key in tensors and isinstance(value, torch.Tensor):
                reader.fill(key, tensors[key], value)
            elif key not in tensors:
                raise CorruptCheckpointError(
                    f"optimizer {join_key(*path)!r}: the checkpoint holds no {field!r} for parameter {name!r}"
                    f" ({key!r}): it was saved with a different optimizer or model. Resume with weights_only=True"
                    " to load the weights alone"
                )
    groups = [
        {**group, "params": live_group["params"]}
        for group, live_group in zip(saved_groups, live.get("param_groups", []), strict=False)
    ]
    return {"state": live.get("state", {}), "param_groups": groups or live.get("param_groups", [])}


def _saved_names(live_groups: Sequence[Mapping[str, Any]], saved_groups: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Live parameter name -> the name (or index) the checkpoint's optimizer state uses for it, by position."""
    names: dict[str, Any] = {}
    for live_group, saved_group in zip(live_groups, saved_groups, strict=False):
        names.update(zip(live_group["params"], saved_group.get("params", []), strict=False))
    return names
