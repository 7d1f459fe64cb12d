"""What the ``lightning-ckpt`` subcommands share: usage errors, ``--storage-options``, progress bars, sizes and ages,
tables, and finding a checkpoint directory or a folder's ``latest`` checkpoint.

Example:
    >>> human_size(4608), human_age(90)
    ('4.5 KiB', '1m')
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from lightning_ckpt import layout
from lightning_ckpt.commit import read_pointer
from lightning_ckpt.discovery import resolve
from lightning_ckpt.errors import CheckpointError, ConfigError
from lightning_ckpt.locations import check_storage_options
from lightning_ckpt.storage import Storage

__all__ = [
    "PROG",
    "UsageError",
    "format_table",
    "human_age",
    "human_size",
    "latest_name",
    "parse_storage_options",
    "progress",
    "resolve_dir",
]

PROG = "lightning-ckpt"


class UsageError(Exception):
    """A command line the parser or a subcommand rejects (exit code 2).

    Example:
        >>> str(UsageError("--keep must be >= 0, got -1"))
        '--keep must be >= 0, got -1'
    """


def progress(total: int, desc: str) -> tqdm[Any]:
    """A byte progress bar on stderr, shown only when stderr is a terminal.

    Example:
        >>> with progress(1024, "copy") as bar:
        ...     _ = bar.update(1024)
        >>> bar.total
        1024
    """
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not sys.stderr.isatty())


def parse_storage_options(
    text: str | None, argument: str = "--storage-options", url: str | None = None
) -> dict[str, Any]:
    """Parse the JSON of a storage-options argument (checked against ``url``'s filesystem when given).

    Messages name ``argument`` but never contain the values: they may be credentials.

    Example:
        >>> parse_storage_options('{"anon": true}'), parse_storage_options(None)
        ({'anon': True}, {})
        >>> parse_storage_options('{"anon": tru', "--dst-storage-options")
        Traceback (most recent call last):
        ...
        lightning_ckpt.cli._common.UsageError: --dst-storage-options is not valid JSON (Expecting value at character 9)
    """
    if text is None:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{argument} is not valid JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(options, dict):
        raise UsageError(f"{argument} must be a JSON object, got a JSON {type(options).__name__}")
    try:
        return check_storage_options(options, url, argument=argument)
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


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, the header first; trailing spaces stripped.

    Example:
        >>> print(format_table(["NAME", "STEP"], [["ep0-ba4", "4"], ["ep1-ba16", "16"]]))
        NAME      STEP
        ep0-ba4   4
        ep1-ba16  16
    """
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def resolve_dir(path: str, options: dict[str, Any]) -> tuple[Storage, str]:
    """The committed checkpoint directory ``path`` names (a directory, folder or ``latest`` pointer).

    Example:
        >>> import tempfile, os, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> folder = tempfile.mkdtemp()
        >>> _ = save_checkpoint_dir({"w": torch.ones(1)}, os.path.join(folder, "ba4"))
        >>> os.path.basename(resolve_dir(folder, {})[1])
        'ba4'
    """
    found = resolve(path, options)
    if found.kind != "dir":
        raise CheckpointError(f"{found.url} is a single-file checkpoint; this command works on checkpoint directories")
    return found.storage, found.path


def latest_name(storage: Storage, folder: str) -> str | None:
    """The checkpoint name the folder's ``latest`` pointer (or local symlink) holds, or ``None``.

    Example:
        >>> import tempfile
        >>> latest_name(*Storage.open(tempfile.mkdtemp())) is None
        True
    """
    pointer = storage.join(folder, layout.pointer_filename(layout.DEFAULT_LATEST_FILENAME))
    if storage.isfile(pointer):
        return read_pointer(storage, pointer)
    link = storage.join(folder, layout.DEFAULT_LATEST_FILENAME)
    if storage.islink(link):
        return os.path.basename(os.readlink(link).rstrip("/"))
    return None
