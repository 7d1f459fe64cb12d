"""The ``lightning-ckpt`` command line: list, inspect, verify, consolidate, prune and copy checkpoints.

Run it as ``lightning-ckpt`` (installed console script) or ``python -m lightning_ckpt``::

    lightning-ckpt ls /data/runs/a/checkpoints
    lightning-ckpt inspect /data/runs/a/checkpoints/ep1-ba16 --json
    lightning-ckpt verify s3://bucket/run/ep1-ba16 --storage-options '{"anon": false}'
    lightning-ckpt consolidate /data/runs/a/checkpoints/latest model.ckpt
    lightning-ckpt prune /data/runs/a/checkpoints --keep 3 --dry-run
    lightning-ckpt cp /data/runs/a/checkpoints/ep1-ba16 s3://bucket/run/ep1-ba16

Errors are one line on stderr (``lightning-ckpt: error: ...``): exit code 2 for a usage error,
1 for any other failure. Progress bars go to stderr and only when it is a terminal.
See ``docs/cli.md`` for every subcommand with example output.

Example:
    >>> main(["prune", "/nonexistent-folder", "--keep", "-1"])
    2
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, NoReturn, cast

import torch
from tqdm import tqdm

from lightning_ckpt import layout
from lightning_ckpt.checksum import checksum_string, crc32
from lightning_ckpt.commit import commit_dir, read_pointer, stage_dir
from lightning_ckpt.discovery import list_committed, resolve
from lightning_ckpt.errors import CheckpointError, CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from lightning_ckpt.lock import FolderLock
from lightning_ckpt.manifest import FileEntry, Manifest
from lightning_ckpt.policies import KeepLatest
from lightning_ckpt.reader import load_checkpoint_dir, read_manifest, verify_files
from lightning_ckpt.redact import redact
from lightning_ckpt.rotation import rotate, scan_records
from lightning_ckpt.storage import Storage, check_storage_options, fsync_dir

__all__ = ["CheckpointRow", "list_checkpoints", "main"]

PROG = "lightning-ckpt"
_CHUNK = 8 * 1024 * 1024
_ANY_NAME = "{run_name}"  # a NameFormat whose only variable matches any text: every checkpoint name


class UsageError(Exception):
    """A command line the parser or a subcommand rejects (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# -- shared helpers --------------------------------------------------------------------------------


def _progress(total: int, desc: str) -> tqdm[Any]:
    """A byte progress bar on stderr, shown only when stderr is a terminal."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not sys.stderr.isatty())


def _storage_options(text: str | None) -> dict[str, Any]:
    """Parse ``--storage-options``; messages never contain the values (they may be credentials)."""
    if text is None:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--storage-options is not valid JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(options, dict):
        raise UsageError(f"--storage-options must be a JSON object, got a JSON {type(options).__name__}")
    try:
        return check_storage_options(options, argument="--storage-options")
    except ConfigError as err:
        raise UsageError(str(err)) from None


def human_size(n: float) -> str:
    """Bytes as a short human-readable size.

    Example:
        >>> human_size(512), human_size(4608), human_size(3 * 1024**3)
        ('512 B', '4.5 KiB', '3.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    """A duration as its largest unit.

    Example:
        >>> human_age(42), human_age(3 * 3600 + 5), human_age(2 * 86400)
        ('42s', '3h', '2d')
    """
    seconds = max(seconds, 0)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit}"
    return f"{int(seconds)}s"


def _shard_count(manifest: Manifest) -> int:
    return sum(1 for f in manifest.files if layout.parse_shard_filename(f.name) is not None)


def _resolve_dir(path: str, options: dict[str, Any]) -> tuple[Storage, str]:
    """The committed checkpoint directory ``path`` names (a directory, folder or ``latest`` pointer)."""
    found = resolve(path, options)
    if found.kind != "dir":
        raise CheckpointError(f"{found.url} is a single-file checkpoint; this command works on checkpoint directories")
    return found.storage, found.path


def _latest_name(storage: Storage, folder: str) -> str | None:
    """The checkpoint name the folder's ``latest`` pointer (or local symlink) holds, or ``None``."""
    pointer = storage.join(folder, layout.pointer_filename(layout.DEFAULT_LATEST_FILENAME))
    if storage.isfile(pointer):
        return read_pointer(storage, pointer)
    link = storage.join(folder, layout.DEFAULT_LATEST_FILENAME)
    if storage.is_local and os.path.islink(link):
        return os.path.basename(os.readlink(link).rstrip("/"))
    return None


# -- ls --------------------------------------------------------------------------------------------


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


def _uncommitted_rows(storage: Storage, folder: str, committed: set[str], latest: str | None) -> list[CheckpointRow]:
    rows = []
    for name in storage.listdir(folder):
        path = storage.join(folder, name)
        if name in committed or name.endswith(layout.POINTER_SUFFIX) or not storage.isdir(path):
            continue
        if storage.is_local and os.path.islink(path):
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
    latest = _latest_name(storage, root)
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
        )
        for name, m in list_committed(storage, root)
    ]
    return rows + _uncommitted_rows(storage, root, {r.name for r in rows}, latest)


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def _ls_cells(row: CheckpointRow, now: float) -> list[str]:
    def show(value: object) -> str:
        return "-" if value is None else str(value)

    return [
        row.name,
        show(row.epoch),
        show(row.step),
        "-" if row.size is None else human_size(row.size),
        show(row.shards),
        row.state,
        "-" if row.created is None else human_age(now - row.created),
        "<- latest" if row.latest else "",
    ]


def cmd_ls(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``ls FOLDER``: print the checkpoint table (or JSON with ``--json``)."""
    rows = list_checkpoints(args.folder, options)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
        return 0
    if not rows:
        print(f"no checkpoints in {args.folder}")
        return 0
    header = ["NAME", "EPOCH", "STEP", "SIZE", "SHARDS", "STATE", "AGE", "LATEST"]
    now = time.time()
    print(_format_table(header, [_ls_cells(r, now) for r in rows]))
    return 0


# -- inspect ---------------------------------------------------------------------------------------


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
    storage, ckpt_dir = _resolve_dir(path, storage_options or {})
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
        "files": [dataclasses.asdict(f) for f in manifest.files],
        "tensors": [
            {"key": t.key, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes, "file": t.file}
            for t in manifest.tensors.values()
        ],
        "object_keys": _object_keys(storage, ckpt_dir, manifest),
        "versions": dict(manifest.versions),
        "metadata": dict(manifest.metadata),
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
    print(f"\nfiles ({len(info['files'])})")
    files = [[f["name"], human_size(f["size"]), f["checksum"], str(f["rank"])] for f in info["files"]]
    print(_format_table(["NAME", "SIZE", "CHECKSUM", "RANK"], files))
    print(f"\ntensors ({len(info['tensors'])})")
    tensors = [[t["key"], t["dtype"], str(tuple(t["shape"])), human_size(t["nbytes"])] for t in info["tensors"]]
    print(_format_table(["KEY", "DTYPE", "SHAPE", "BYTES"], tensors))
    keys = info["object_keys"]
    print("\nnon-tensor keys: " + (", ".join(keys) if isinstance(keys, list) else keys))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(info["versions"].items())))


def cmd_inspect(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``inspect CKPT``: print the summary (or one JSON document with ``--json``)."""
    info = inspect_checkpoint(args.ckpt, options)
    if args.json:
        print(json.dumps(info, indent=1, sort_keys=True))
    else:
        _print_inspect(info)
    return 0


# -- verify ----------------------------------------------------------------------------------------


def verify_checkpoint(storage: Storage, ckpt_dir: str, manifest: Manifest) -> list[tuple[str, str | None]]:
    """Check every file's size and checksum; ``[(file, None if it verifies else why not)]``.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> saved = save_checkpoint_dir({"w": torch.ones(2)}, os.path.join(tempfile.mkdtemp(), "c"))
        >>> storage, path = Storage.open(saved)
        >>> [why for _, why in verify_checkpoint(storage, path, read_manifest(storage, path))]
        [None, None]
    """
    results: list[tuple[str, str | None]] = []
    with _progress(manifest.total_bytes, "verify") as bar:
        for entry in manifest.files:
            one = dataclasses.replace(manifest, files=[entry], tensors={}, objects_file=None)
            try:
                verify_files(storage, ckpt_dir, one)
                results.append((entry.name, None))
            except CorruptCheckpointError as err:
                results.append((entry.name, str(err)))
            bar.update(entry.size)
    return results


def cmd_verify(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``verify CKPT``: one line per file; exit code 1 when any file fails."""
    storage, ckpt_dir = _resolve_dir(args.ckpt, options)
    manifest = read_manifest(storage, ckpt_dir)
    results = verify_checkpoint(storage, ckpt_dir, manifest)
    for name, why in results:
        print(f"ok    {name}" if why is None else f"FAIL  {name}: {why}")
    failed = [name for name, why in results if why is not None]
    if failed:
        print(f"{PROG}: error: {storage.url(ckpt_dir)}: {len(failed)} of {len(results)} files failed", file=sys.stderr)
        return 1
    print(f"verified {storage.url(ckpt_dir)}: {len(results)} files, {human_size(manifest.total_bytes)}")
    return 0


# -- cp --------------------------------------------------------------------------------------------


def _copy_stream(src: IO[bytes], dst: IO[bytes], entry: FileEntry, url: str, bar: tqdm[Any]) -> None:
    """Copy one file's bytes, checking its size and checksum against ``entry`` before it is accepted."""
    crc, size = 0, 0
    while chunk := src.read(_CHUNK):
        crc = crc32(chunk, crc)
        size += len(chunk)
        dst.write(chunk)
        bar.update(len(chunk))
    if size != entry.size:
        raise CorruptCheckpointError(f"{url} has {size} bytes, expected {entry.size} (truncated or damaged)")
    if checksum_string(crc) != entry.checksum:
        raise CorruptCheckpointError(
            f"{url}: checksum {checksum_string(crc)}, expected {entry.checksum} (the file was modified or damaged)"
        )


@contextmanager
def _open_dst(storage: Storage, path: str) -> Iterator[IO[bytes]]:
    if not storage.is_local:
        with storage.open_write(path) as stream:
            yield stream
        return
    with open(path, "wb") as stream:
        yield stream
        stream.flush()
        os.fsync(stream.fileno())


def _split_dst(dst: str, src_name: str) -> tuple[str, str]:
    """DST as (folder, name): ``DST/`` (trailing slash) means ``DST/<source name>``."""
    if dst.endswith("/"):
        return dst.rstrip("/"), src_name
    cut = dst.rstrip("/")
    head, _, tail = cut.rpartition("/")
    if not layout.is_plain_name(tail) or not head:
        raise UsageError(f"DST={dst!r} must name a checkpoint directory, e.g. 's3://bucket/run/ep1-ba16'")
    return head, tail


def copy_checkpoint(src: str, dst: str, storage_options: dict[str, Any] | None = None) -> str:
    """Copy the committed checkpoint ``src`` to ``dst``, verifying every file; the manifest is written last.

    A file whose size or checksum does not match the source manifest stops the copy and nothing is
    committed at ``dst``. Returns the committed URL.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> root = tempfile.mkdtemp()
        >>> src = save_checkpoint_dir({"w": torch.ones(2)}, os.path.join(root, "a"))
        >>> sorted(os.listdir(copy_checkpoint(src, os.path.join(root, "copies", "b"))))
        ['manifest.json', 'objects.pt', 'shard-00000-of-00001.safetensors']
    """
    src_storage, src_dir = _resolve_dir(src, storage_options or {})
    manifest = read_manifest(src_storage, src_dir)
    folder, name = _split_dst(os.fspath(dst), src_storage.basename(src_dir))
    dst_storage, dst_folder = Storage.open(folder, storage_options)
    if dst_storage.exists(dst_storage.join(dst_folder, name, layout.MANIFEST_FILENAME)):
        raise CheckpointError(f"{dst_storage.url(dst_storage.join(dst_folder, name))} is already a checkpoint")
    staged = stage_dir(dst_storage, dst_folder, name)
    try:
        with _progress(manifest.total_bytes, "copy") as bar:
            for entry in manifest.files:
                src_path = src_storage.join(src_dir, entry.name)
                with (
                    src_storage.open_read(src_path) as f,
                    _open_dst(dst_storage, dst_storage.join(staged, entry.name)) as g,
                ):
                    _copy_stream(f, g, entry, src_storage.url(src_path), bar)
        return dst_storage.url(
            commit_dir(dst_storage, dst_folder, name, staged, dataclasses.replace(manifest, name=name))
        )
    except BaseException:
        dst_storage.remove_tree(staged)
        raise


def cmd_cp(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``cp SRC DST``: copy and verify; prints the committed destination."""
    print(f"copied to {copy_checkpoint(args.src, args.dst, options)}")
    return 0


# -- consolidate -----------------------------------------------------------------------------------


def _clone_tensors(value: Any) -> Any:
    """Give each tensor its own storage (loaded tensors share their shard's mapping, which torch.save would keep)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        items = {k: _clone_tensors(v) for k, v in value.items()}
        if type(value) is dict:
            return items
        copy = value.copy()  # OrderedDict, AttributeDict, ...: keep the type
        copy.update(items)
        return copy
    if isinstance(value, list):
        return [_clone_tensors(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_clone_tensors(v) for v in value)
    return value


def _save_atomic(obj: Any, out: str, total: int) -> None:
    """``torch.save`` into a temporary file next to ``out``, fsync, then rename onto ``out``."""
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f, _progress(total, "write") as bar:
            torch.save(obj, cast(IO[bytes], _CountingWriter(f, bar.update)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _CountingWriter(io.RawIOBase):
    """A write-only stream that forwards to ``target`` and reports each write's length."""

    def __init__(self, target: IO[bytes], report: Callable[[int], object]) -> None:
        super().__init__()
        self._target, self._report = target, report

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = self._target.write(data)
        self._report(n)
        return n

    def flush(self) -> None:
        self._target.flush()


def consolidate(
    src: str, out: str, storage_options: dict[str, Any] | None = None, *, allow_pickle: bool = False
) -> str:
    """Write the checkpoint ``src`` (any number of shards, local or remote) as one ``torch.save`` file ``out``.

    The result is the full checkpoint dict (as :func:`lightning_ckpt.read_checkpoint` returns it),
    so ``MyModule.load_from_checkpoint(out)`` and ``torch.load(out)`` read it. Every file is
    verified first; ``out`` appears atomically (temporary file + rename). Remote checkpoints are
    downloaded (and verified) into a temporary directory first.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> root = tempfile.mkdtemp()
        >>> src = save_checkpoint_dir({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, os.path.join(root, "a"))
        >>> torch.load(consolidate(src, os.path.join(root, "a.ckpt")))["state_dict"]["w"]
        tensor([1., 1.])
    """
    storage, ckpt_dir = _resolve_dir(src, storage_options or {})
    with tempfile.TemporaryDirectory(prefix="lightning-ckpt-") as scratch:
        if not storage.is_local:
            local = copy_checkpoint(
                storage.url(ckpt_dir), os.path.join(scratch, storage.basename(ckpt_dir)), storage_options
            )
            storage, ckpt_dir = Storage.open(local)
        manifest = read_manifest(storage, ckpt_dir)
        failed = [(name, why) for name, why in verify_checkpoint(storage, ckpt_dir, manifest) if why is not None]
        if failed:
            raise CorruptCheckpointError(failed[0][1])
        checkpoint = load_checkpoint_dir(storage, ckpt_dir, weights_only=not allow_pickle, verify_checksums=False)
        _save_atomic(_clone_tensors(checkpoint), out, manifest.total_bytes)
    return out


def cmd_consolidate(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``consolidate CKPT OUT``: write one standard ``.ckpt`` file."""
    out = consolidate(args.ckpt, args.out, options, allow_pickle=args.allow_pickle)
    print(f"wrote {out} ({human_size(os.path.getsize(out))})")
    return 0


# -- prune -----------------------------------------------------------------------------------------


def prune(folder: str, keep: int, storage_options: dict[str, Any] | None = None, *, dry_run: bool = False) -> list[str]:
    """Delete all but the ``keep`` newest committed checkpoints of ``folder``; return the names (to be) deleted.

    The rules of ``CheckpointSaver(num_checkpoints_to_keep=keep)``: newest by step, and never the
    newest checkpoint or the one ``latest`` points to. Each is deleted manifest first. Deleting
    takes the folder's lock (:mod:`lightning_ckpt.lock`), so it is refused while a run saves there.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> folder = tempfile.mkdtemp()
        >>> for step in (1, 2, 3):
        ...     _ = save_checkpoint_dir({"w": torch.ones(1), "global_step": step}, os.path.join(folder, f"ba{step}"))
        >>> prune(folder, 1, dry_run=True), sorted(os.listdir(folder))
        (['ba1', 'ba2'], ['ba1', 'ba2', 'ba3'])
    """
    storage, root = Storage.open(folder, storage_options)
    if not storage.isdir(root):
        raise CheckpointNotFoundError(f"{storage.url(root)} is not a folder of checkpoints")
    records = scan_records(storage, root, layout.NameFormat(_ANY_NAME, argument="FOLDER"))
    latest = _latest_name(storage, root)
    protected = {latest} if latest else set()
    if dry_run:
        return rotate(storage, root, records, KeepLatest(keep), protected=protected, delete=False)
    lock = FolderLock.acquire(storage, root, run_name="lightning-ckpt prune")  # refused while a run saves there
    try:
        return rotate(storage, root, records, KeepLatest(keep), protected=protected)
    finally:
        lock.release()


def cmd_prune(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``prune FOLDER --keep N [--dry-run]``."""
    if args.keep < 0:
        raise UsageError(f"--keep must be >= 0, got {args.keep}")
    doomed = prune(args.folder, args.keep, options, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for name in doomed:
        print(f"{verb} {name}")
    if not doomed:
        print("nothing to delete")
    return 0


# -- parser and entry point ------------------------------------------------------------------------

_OPTIONS_HELP = 'fsspec options for remote URLs as a JSON object, e.g. \'{"key": ..., "secret": ...}\''


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-ckpt``.

    Example:
        >>> build_parser().parse_args(["prune", "runs/a", "--keep", "3"]).keep
        3
    """
    common = _Parser(add_help=False)
    common.add_argument("--storage-options", default=argparse.SUPPRESS, metavar="JSON", help=_OPTIONS_HELP)
    parser = _Parser(prog=PROG, description="Inspect, verify, convert, prune and copy lightning-ckpt checkpoints.")
    parser.add_argument("--storage-options", default=None, metavar="JSON", help=_OPTIONS_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def add(
        name: str, handler: Callable[[argparse.Namespace, dict[str, Any]], int], help: str
    ) -> argparse.ArgumentParser:
        command = sub.add_parser(name, parents=[common], help=help, description=help)
        command.set_defaults(handler=handler)
        return command

    ls = add("ls", cmd_ls, "list the checkpoints of a folder, the latest one marked")
    ls.add_argument("folder", metavar="FOLDER_OR_URL")
    ls.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    inspect = add("inspect", cmd_inspect, "show a checkpoint's manifest, tensors, non-tensor keys and versions")
    inspect.add_argument("ckpt", metavar="CKPT")
    inspect.add_argument("--json", action="store_true", help="print one JSON document")
    verify = add("verify", cmd_verify, "check the size and checksum of every file (exit code 0 only if all verify)")
    verify.add_argument("ckpt", metavar="CKPT")
    consolidate_cmd = add("consolidate", cmd_consolidate, "write a checkpoint as one standard Lightning .ckpt file")
    consolidate_cmd.add_argument("ckpt", metavar="CKPT")
    consolidate_cmd.add_argument("out", metavar="OUT.ckpt")
    consolidate_cmd.add_argument(
        "--allow-pickle", action="store_true", help="unpickle objects.pt with weights_only=False (trusted files only)"
    )
    prune_cmd = add("prune", cmd_prune, "delete all but the N newest checkpoints (never the latest)")
    prune_cmd.add_argument("folder", metavar="FOLDER")
    prune_cmd.add_argument("--keep", type=int, required=True, metavar="N", help="how many of the newest to keep")
    prune_cmd.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    cp = add("cp", cmd_cp, "copy a checkpoint between fsspec locations, verifying checksums; DST/ copies into DST")
    cp.add_argument("src", metavar="SRC")
    cp.add_argument("dst", metavar="DST")
    return parser


def _fail(message: str, code: int) -> int:
    text = " ".join(redact(message).split()) or "unknown error"
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 1 failure, 2 usage error).

    Example:
        >>> main(["verify", "/nonexistent/ep0-ba1"])
        1
    """
    try:
        args = build_parser().parse_args(argv)
        options = _storage_options(args.storage_options)
        handler: Callable[[argparse.Namespace, dict[str, Any]], int] = args.handler
        return handler(args, options)
    except (UsageError, ConfigError) as err:  # a ConfigError is always an argument value the user gave
        return _fail(str(err), 2)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except (CheckpointError, OSError, ValueError) as err:
        return _fail(str(err), 1)
    except Exception as err:
        return _fail(f"{type(err).__name__}: {err}", 1)
