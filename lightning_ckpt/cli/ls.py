"""``lightning-ckpt ls``: the checkpoints of a folder, their state, and which one ``latest`` names.

Example:
    >>> import tempfile
    >>> list_checkpoints(tempfile.mkdtemp())
    []
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

from lightning_ckpt import layout
from lightning_ckpt.cli._common import format_table, human_age, human_size, latest_name
from lightning_ckpt.discovery import list_committed
from lightning_ckpt.errors import CheckpointNotFoundError
from lightning_ckpt.manifest import Manifest
from lightning_ckpt.storage import Storage

__all__ = ["CheckpointRow", "cmd_ls", "list_checkpoints"]


@dataclasses.dataclass(frozen=True)
class CheckpointRow:
    """One row of ``lightning-ckpt ls``.

    Attributes:
        name: the checkpoint directory's name.
        state: ``committed`` (local, manifest present and every file has its size), ``uploaded``
            (the same, in a remote store), ``incomplete`` (no manifest: a save, upload or copy that
            did not finish, or a hidden ``.partial-*`` staging directory) or ``damaged`` (a manifest
            whose files are missing or have the wrong size).
        epoch: the manifest's epoch (``None`` unless committed).
        step: the manifest's global step (``None`` unless committed).
        size: total bytes of the listed files (``None`` unless committed).
        shards: number of tensor shard files (``None`` unless committed).
        created: the manifest's creation time (``None`` unless committed).
        latest: whether the folder's ``latest`` pointer names it.
        written: bytes of its own files, what its save wrote (``size`` less what it references).
        references: the earlier checkpoints whose files it reads (an incremental checkpoint's base).

    Example:
        >>> CheckpointRow("ep0-ba8", "committed", 0, 8, 4096, 1, 0.0, True).latest
        True
    """

    name: str
    state: str
    epoch: int | None = None
    step: int | None = None
    size: int | None = None
    shards: int | None = None
    created: float | None = None
    latest: bool = False
    written: int | None = None
    references: tuple[str, ...] = ()


def _shard_count(manifest: Manifest) -> int:
    return sum(1 for f in manifest.files if layout.parse_shard_filename(f.name) is not None)


def _uncommitted_rows(storage: Storage, folder: str, committed: set[str], latest: str | None) -> list[CheckpointRow]:
    rows = []
    for name in storage.listdir(folder):
        path = storage.join(folder, name)
        if name in committed or name.endswith(layout.POINTER_SUFFIX) or not storage.isdir(path):
            continue
        if storage.islink(path):
            continue
        if layout.is_hidden_name(name):
            if layout.is_partial_dirname(name):
                rows.append(CheckpointRow(name, "incomplete"))
            continue
        has_manifest = storage.exists(storage.join(path, layout.MANIFEST_FILENAME))
        rows.append(CheckpointRow(name, "damaged" if has_manifest else "incomplete", latest=name == latest))
    return rows


def list_checkpoints(folder: str, storage_options: dict[str, Any] | None = None) -> list[CheckpointRow]:
    """Every checkpoint directory in ``folder`` (path or URL): committed ones oldest first, then the rest.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> folder = tempfile.mkdtemp()
        >>> _ = save_checkpoint_dir({"w": torch.ones(2), "global_step": 4}, os.path.join(folder, "ba4"),
        ...                         latest_filename="latest")
        >>> os.makedirs(os.path.join(folder, "ba8"))
        >>> [(r.name, r.state, r.step, r.latest) for r in list_checkpoints(folder)]
        [('ba4', 'committed', 4, True), ('ba8', 'incomplete', None, False)]
    """
    storage, root = Storage.open(folder, storage_options)
    if not storage.isdir(root):
        kind = "a file" if storage.isfile(root) else "not found"
        raise CheckpointNotFoundError(f"{storage.url(root)}: {kind}; pass the folder that holds checkpoints")
    latest = latest_name(storage, root)
    state = "committed" if storage.is_local else "uploaded"
    rows = [
        CheckpointRow(
            name=name,
            state=state,
            epoch=m.epoch,
            step=m.global_step,
            size=m.total_bytes,
            shards=_shard_count(m),
            created=m.created,
            latest=name == latest,
            written=sum(f.size for f in m.own_files),
            references=tuple(sorted(m.references)),
        )
        for name, m in list_committed(storage, root)
    ]
    return rows + _uncommitted_rows(storage, root, {r.name for r in rows}, latest)


def _ls_cells(row: CheckpointRow, now: float) -> list[str]:
    def show(value: object) -> str:
        return "-" if value is None else str(value)

    return [
        row.name,
        show(row.epoch),
        show(row.step),
        "-" if row.size is None else human_size(row.size),
        "-" if row.written is None else human_size(row.written) + "".join(f" +{r}" for r in row.references),
        show(row.shards),
        row.state,
        "-" if row.created is None else human_age(now - row.created),
        "<- latest" if row.latest else "",
    ]


def cmd_ls(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``ls FOLDER``: print the checkpoint table (or JSON with ``--json``).

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> cmd_ls(argparse.Namespace(folder=folder, json=True), {})
        []
        0
    """
    rows = list_checkpoints(args.folder, options)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
        return 0
    if not rows:
        print(f"no checkpoints in {args.folder}")
        return 0
    header = ["NAME", "EPOCH", "STEP", "SIZE", "WRITTEN", "SHARDS", "STATE", "AGE", "LATEST"]
    now = time.time()
    print(format_table(header, [_ls_cells(r, now) for r in rows]))
    return 0
