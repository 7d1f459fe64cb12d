"""``lightning-ckpt inspect``: a committed checkpoint's manifest, files, tensors, non-tensor keys and versions."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import time
from typing import Any

import torch

from lightning_ckpt.cli._common import format_table, human_size, resolve_dir
from lightning_ckpt.manifest import LogicalTensor, Manifest
from lightning_ckpt.reader import read_manifest
from lightning_ckpt.storage import Storage

__all__ = ["cmd_inspect", "inspect_checkpoint"]


def _object_keys(storage: Storage, ckpt_dir: str, manifest: Manifest) -> list[str] | str:
    """Top-level keys of ``objects.pt`` (loaded with ``weights_only=True``), or why they are unknown."""
    if manifest.objects_file is None:
        return []
    raw = storage.read_bytes(storage.join(ckpt_dir, manifest.objects_file))
    try:
        skeleton = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"not loadable with weights_only=True ({first})"
    return [str(k) for k in skeleton] if isinstance(skeleton, dict) else []


def inspect_checkpoint(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-able summary of a committed checkpoint: manifest fields, files, tensors, object keys.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> path = save_checkpoint_dir({"w": torch.ones(2), "global_step": 4}, os.path.join(tempfile.mkdtemp(), "c"))
        >>> info = inspect_checkpoint(path)
        >>> info["global_step"], info["tensors"][0]["shape"], info["object_keys"]
        (4, [2], ['w', 'global_step'])
    """
    storage, ckpt_dir = resolve_dir(path, storage_options or {})
    manifest = read_manifest(storage, ckpt_dir)
    return {
        "path": storage.url(ckpt_dir),
        "name": manifest.name,
        "epoch": manifest.epoch,
        "global_step": manifest.global_step,
        "world_size": manifest.world_size,
        "weights_only": manifest.weights_only,
        "created": manifest.created,
        "format_version": manifest.format_version,
        "total_bytes": manifest.total_bytes,
        "written_bytes": sum(f.size for f in manifest.own_files),
        "references": sorted(manifest.references),
        "files": [dataclasses.asdict(f) for f in manifest.files],
        "tensors": [_tensor_info(t) for t in manifest.logical_tensors().values()],
        "object_keys": _object_keys(storage, ckpt_dir, manifest),
        "versions": dict(manifest.versions),
        "metadata": dict(manifest.metadata),
    }


def _tensor_info(tensor: LogicalTensor) -> dict[str, Any]:
    """One tensor: global shape, bytes, the file of its first chunk, and how many chunks hold it."""
    return {
        "key": tensor.key,
        "dtype": tensor.dtype,
        "shape": list(tensor.shape),
        "nbytes": tensor.nbytes,
        "file": tensor.pieces[0].file,
        "chunks": len(tensor.pieces),
    }


def _print_inspect(info: dict[str, Any]) -> None:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["created"]))
    print(f"checkpoint   {info['path']}")
    print(f"name         {info['name']}")
    print(f"epoch        {info['epoch']}")
    print(f"step         {info['global_step']}")
    print(f"world size   {info['world_size']}")
    print(f"weights only {info['weights_only']}")
    print(f"created      {created}")
    print(f"size         {human_size(info['total_bytes'])}")
    if info["references"]:
        referenced, bases = human_size(info["total_bytes"] - info["written_bytes"]), ", ".join(info["references"])
        print(f"written      {human_size(info['written_bytes'])}; {referenced} read from {bases}")
    print(f"\nfiles ({len(info['files'])})")
    files = [[f["name"], human_size(f["size"]), f["checksum"], str(f["rank"])] for f in info["files"]]
    print(format_table(["NAME", "SIZE", "CHECKSUM", "RANK"], files))
    print(f"\ntensors ({len(info['tensors'])})")
    tensors = [
        [t["key"], t["dtype"], str(tuple(t["shape"])), human_size(t["nbytes"]), str(t["chunks"])]
        for t in info["tensors"]
    ]
    print(format_table(["KEY", "DTYPE", "SHAPE", "BYTES", "CHUNKS"], tensors))
    keys = info["object_keys"]
    print("\nnon-tensor keys: " + (", ".join(keys) if isinstance(keys, list) else keys))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items())))


def cmd_inspect(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``inspect CKPT``: print the summary (or one JSON document with ``--json``).

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> path = save_checkpoint_dir({"w": torch.ones(2), "global_step": 4}, os.path.join(tempfile.mkdtemp(), "c"))
        >>> cmd_inspect(argparse.Namespace(ckpt=path, json=False), {})  # doctest: +ELLIPSIS
        checkpoint   ...
        step         4
        ...
        0
    """
    info = inspect_checkpoint(args.ckpt, options)
    if args.json:
        print(json.dumps(info, indent=1, sort_keys=True))
    else:
        _print_inspect(info)
    return 0
