"""``lightning-ckpt cp``: copy a committed checkpoint between any two fsspec locations, verifying every file.

Each end has its own storage options (``--src-storage-options``, ``--dst-storage-options``; both
default to ``--storage-options``), so a copy between two S3 endpoints or accounts works.
``--set-latest`` moves the destination folder's ``latest`` pointers to the copy once it is committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from tqdm import tqdm

from lightning_ckpt import layout
from lightning_ckpt.checksum import checksum_string, crc32
from lightning_ckpt.cli._common import UsageError, parse_storage_options, progress, resolve_dir
from lightning_ckpt.commit import commit_dir, stage_dir, update_latest
from lightning_ckpt.errors import CheckpointError, CorruptCheckpointError
from lightning_ckpt.manifest import FileEntry, Manifest
from lightning_ckpt.reader import read_manifest
from lightning_ckpt.storage import Storage

__all__ = ["cmd_cp", "copy_checkpoint"]

_CHUNK = 8 * 1024 * 1024


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
    with storage.open_write(path) as stream:  # durable once closed (fsynced locally)
        yield stream


def _split_dst(dst: str, src_name: str) -> tuple[str, str]:
    """DST as (folder, name): ``DST/`` (trailing slash) means ``DST/<source name>``; a relative local DST is
    taken from the current directory, as ``cp`` does."""
    if "://" not in dst:
        dst = os.path.abspath(dst) + ("/" if dst.endswith("/") else "")
    if dst.endswith("/"):
        return dst.rstrip("/"), src_name
    cut = dst.rstrip("/")
    head, _, tail = cut.rpartition("/")
    if not layout.is_plain_name(tail) or not head:
        raise UsageError(f"DST={dst!r} must name a checkpoint directory, e.g. 's3://bucket/run/ep1-ba16'")
    return head, tail


def _refuse_copy_into_itself(src_url: str, dst_url: str, src: str, dst: str) -> None:
    """A destination inside the source checkpoint (or the source itself) would copy it into itself."""
    if "://" not in src_url and "://" not in dst_url:
        src_url, dst_url = (
            os.path.realpath(src_url),
            os.path.join(os.path.realpath(os.path.dirname(dst_url)), os.path.basename(dst_url)),
        )
    if dst_url == src_url or dst_url.startswith(src_url.rstrip("/") + "/"):
        raise UsageError(
            f"DST={dst!r} is inside the checkpoint SRC={src!r}: a copy cannot go into what it copies; name a"
            " destination outside it, e.g. a sibling directory 'backup/' or 's3://bucket/run/ep1-ba16'"
        )


def _own_name(name: str) -> str:
    """The name a file gets in a copy: its own, or for a file of the base checkpoint, ``base-<base>-<file>``.

    Example:
        >>> _own_name("objects.pt"), _own_name("../ep0-ba8/shard-00000-of-00001.safetensors")
        ('objects.pt', 'base-ep0-ba8-shard-00000-of-00001.safetensors')
    """
    reference = layout.parse_reference(name)
    return name if reference is None else f"base-{reference[0]}-{reference[1]}"


def _self_contained(manifest: Manifest, name: str, renamed: dict[str, str]) -> Manifest:
    """The copy's manifest: every file in its own directory (an incremental checkpoint's base files renamed)."""
    files = [dataclasses.replace(f, name=renamed[f.name]) for f in manifest.files]
    tensors = {k: dataclasses.replace(t, file=renamed[t.file]) for k, t in manifest.tensors.items()}
    return dataclasses.replace(manifest, name=name, files=files, tensors=tensors)


def copy_checkpoint(
    src: str,
    dst: str,
    storage_options: dict[str, Any] | None = None,
    *,
    src_storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    set_latest: bool = False,
) -> str:
    """Copy the committed checkpoint ``src`` to ``dst``, verifying every file; the manifest is written last.

    The copy is self-contained: the files of an incremental checkpoint's base that it reads from are
    copied into it (as ``base-<base>-<file>``), so it loads without the base and is a full checkpoint
    (``format_version`` 2). A file whose size or checksum does not match the source manifest stops
    the copy and nothing is committed at ``dst``. ``src_storage_options`` / ``dst_storage_options``
    are each end's fsspec options; either one that is ``None`` is ``storage_options``. With
    ``set_latest``, the ``latest`` pointers of ``dst``'s folder (the pointer file, and locally the
    symlink) then name the copy; otherwise they are not touched. Returns the committed URL.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> root = tempfile.mkdtemp()
        >>> src = save_checkpoint_dir({"w": torch.ones(2)}, os.path.join(root, "a"))
        >>> copied = copy_checkpoint(src, os.path.join(root, "copies", "b"), set_latest=True)
        >>> sorted(os.listdir(copied)), os.readlink(os.path.join(root, "copies", "latest"))
        (['manifest.json', 'objects.pt', 'shard-00000-of-00001.safetensors'], 'b')
    """
    src_options = storage_options if src_storage_options is None else src_storage_options
    dst_options = storage_options if dst_storage_options is None else dst_storage_options
    src_storage, src_dir = resolve_dir(src, src_options or {})
    manifest = read_manifest(src_storage, src_dir)
    folder, name = _split_dst(os.fspath(dst), src_storage.basename(src_dir))
    dst_storage, dst_folder = Storage.open(folder, dst_options)
    _refuse_copy_into_itself(src_storage.url(src_dir), dst_storage.url(dst_storage.join(dst_folder, name)), src, dst)
    if dst_storage.exists(dst_storage.join(dst_folder, name, layout.MANIFEST_FILENAME)):
        raise CheckpointError(f"{dst_storage.url(dst_storage.join(dst_folder, name))} is already a checkpoint")
    staged = stage_dir(dst_storage, dst_folder, name)
    renamed = {f.name: _own_name(f.name) for f in manifest.files}
    try:
        with progress(manifest.total_bytes, "copy") as bar:
            for entry in manifest.files:
                src_path = src_storage.join(src_dir, entry.name)
                with (
                    src_storage.open_read(src_path) as f,
                    _open_dst(dst_storage, dst_storage.join(staged, renamed[entry.name])) as g,
                ):
                    _copy_stream(f, g, entry, src_storage.url(src_path), bar)
        committed = commit_dir(dst_storage, dst_folder, name, staged, _self_contained(manifest, name, renamed))
    except BaseException:
        dst_storage.remove_tree(staged)
        raise
    if set_latest:  # outside the try: a failure here must not remove the committed copy
        try:
            update_latest(dst_storage, dst_folder, name, layout.DEFAULT_LATEST_FILENAME)
        except OSError as err:
            raise CheckpointError(
                f"copied to {dst_storage.url(committed)}, but moving the 'latest' pointer failed: {err}"
            ) from err
    return dst_storage.url(committed)


def cmd_cp(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``cp SRC DST [--src-storage-options JSON] [--dst-storage-options JSON] [--set-latest]``: copy and verify.

    Prints the committed destination. ``options`` (``--storage-options``) is used for an end whose
    own option is not given.

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> root = tempfile.mkdtemp()
        >>> src = save_checkpoint_dir({"w": torch.ones(2)}, os.path.join(root, "a"))
        >>> args = argparse.Namespace(src=src, dst=os.path.join(root, "b"), src_storage_options=None,
        ...                           dst_storage_options=None, set_latest=False)
        >>> cmd_cp(args, {})  # doctest: +ELLIPSIS
        copied to .../b
        0
    """
    src_options = _end_options(args.src_storage_options, "--src-storage-options", args.src, options)
    dst_options = _end_options(args.dst_storage_options, "--dst-storage-options", args.dst, options)
    copied = copy_checkpoint(
        args.src, args.dst, src_storage_options=src_options, dst_storage_options=dst_options, set_latest=args.set_latest
    )
    print(f"copied to {copied}")
    return 0


def _end_options(text: str | None, argument: str, url: str, default: dict[str, Any]) -> dict[str, Any]:
    """One end's options: its own argument's JSON, checked against ``url`` (naming ``argument``), else ``default``."""
    return default if text is None else parse_storage_options(text, argument, url=url)
