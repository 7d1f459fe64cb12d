"""Every name this package writes to storage, and the only code that builds or parses them.

No other module builds these names with f-strings or picks them apart with regular
expressions: they call the constants and functions here, so the layout on storage is
defined in one place. The patterns users choose (``filename``, ``folder``, ``latest_filename``)
are :mod:`lightning_ckpt.naming`'s, re-exported here.

A checkpoint folder looks like this (``ep{epoch}-ba{batch}`` is :data:`DEFAULT_FILENAME`)::

    folder/
        ep0-ba100/                      one committed checkpoint: a directory
            manifest.json               written last; its presence is the commit
            objects.pt                  everything that is not a tensor
            shard-00000-of-00002.safetensors
            shard-00001-of-00002.safetensors
        latest.symlink                  pointer file holding the name of the newest checkpoint
        .lightning_ckpt.lock            the folder's lock: one run saves here at a time
        .ep0-ba200.partial-1f2e3d       a checkpoint still being written (hidden: readers skip it)
        .ep0-ba50.trash-9a8b7c          a checkpoint being deleted (hidden)
        .latest.tmp-5d6e7f              a file being written, renamed onto its name when complete (hidden)

A remote folder's local copies live in a cache directory (:func:`cache_path`)::

    cache_dir/
        uploads/<16 hex digits>/        checkpoints committed here, then uploaded
        downloads/<16 hex digits>/      checkpoints downloaded to resume from
            ep0-ba100.lock              held by the process downloading ``ep0-ba100``

Example:
    >>> NameFormat(DEFAULT_FILENAME, argument="filename").render(progress=Progress(epoch=1, batch=40))
    'ep1-ba40'
    >>> shard_filename(1, 2), pointer_filename(DEFAULT_LATEST_FILENAME)
    ('shard-00001-of-00002.safetensors', 'latest.symlink')
"""

from __future__ import annotations

import hashlib
import os
import re

from lightning_ckpt.errors import ConfigError
from lightning_ckpt.naming import (  # re-exported: layout.NameFormat etc.
    DEFAULT_FILENAME,
    DEFAULT_LATEST_FILENAME,
    DIST_VARIABLES,
    PROGRESS_VARIABLES,
    NameFormat,
    Progress,
    RankInfo,
    dist_values,
)

__all__ = [
    "CACHE_KINDS",
    "DEFAULT_FILENAME",
    "DEFAULT_LATEST_FILENAME",
    "DIST_VARIABLES",
    "FORMAT_VERSION",
    "FULL_FORMAT_VERSION",
    "LOCK_FILENAME",
    "MANIFEST_FILENAME",
    "OBJECTS_FILENAME",
    "POINTER_SUFFIX",
    "PROGRESS_VARIABLES",
    "SHARD_SUFFIX",
    "NameFormat",
    "Progress",
    "RankInfo",
    "READABLE_FORMAT_VERSIONS",
    "cache_lock_filename",
    "chunk_key",
    "cache_path",
    "dist_values",
    "is_hidden_name",
    "is_partial_dirname",
    "is_file_name",
    "is_plain_name",
    "is_temp_filename",
    "is_trash_dirname",
    "parse_probe_filename",
    "parse_reference",
    "parse_shard_filename",
    "partial_dirname",
    "pointer_filename",
    "probe_filename",
    "reference_name",
    "shard_filename",
    "temp_filename",
    "temp_prefix",
    "trash_dirname",
]

FORMAT_VERSION = 3  # the newest this version reads; a checkpoint without references is still written as 2
FULL_FORMAT_VERSION = 2  # written when every file is the checkpoint's own (readers back to 0.2 read it)
READABLE_FORMAT_VERSIONS = (1, 2, 3)  # v1 (0.1.x: one whole tensor per entry) is read forever
MANIFEST_FILENAME = "manifest.json"
OBJECTS_FILENAME = "objects.pt"
SHARD_SUFFIX = ".safetensors"
POINTER_SUFFIX = ".symlink"
LOCK_FILENAME = ".lightning_ckpt.lock"
CACHE_KINDS = ("uploads", "downloads")

_SHARD_RE = re.compile(r"shard-([0-9]{5,})-of-([0-9]{5,})" + re.escape(SHARD_SUFFIX))
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")
_PARTIAL_RE, _TRASH_RE, _TEMP_RE = (re.compile(rf"\..+\.{kind}-[A-Za-z0-9_-]+") for kind in ("partial", "trash", "tmp"))


def _hidden_prefix(kind: str, name: str, example: str) -> str:
    if not is_plain_name(name):
        raise ConfigError("name", name, example, "It must be a single path component")
    return f".{name}.{kind}-"


def _check_token(token: str) -> str:
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise ConfigError("token", token, "'1f2e3d4c'", "It must be letters, digits, '_' or '-'")
    return token


def _hidden(kind: str, name: str, token: str, example: str) -> str:
    return _hidden_prefix(kind, name, example) + _check_token(token)


def chunk_key(key: str, offsets: tuple[int, ...] | list[int]) -> str:
    """The name of one chunk of a sharded tensor in a shard file: its key and global offsets.

    Example:
        >>> chunk_key("state_dict/w", (32, 0))
        'state_dict/w@32,0'
    """
    return f"{key}@{','.join(map(str, offsets))}"


def shard_filename(index: int, count: int) -> str:
    """Name of shard ``index`` of ``count``; ``ConfigError`` (a ``ValueError``) unless ``0 <= index < count``.

    Example:
        >>> shard_filename(0, 4)
        'shard-00000-of-00004.safetensors'
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError("count", count, "4", "It must be an int >= 1")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ConfigError("index", index, f"0 (any int in [0, {count}))", f"It must be in [0, count={count})")
    return f"shard-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def parse_shard_filename(name: str) -> tuple[int, int] | None:
    """``(index, count)`` of a name made by :func:`shard_filename`, else ``None``.

    Example:
        >>> parse_shard_filename("shard-00001-of-00004.safetensors"), parse_shard_filename("objects.pt")
        ((1, 4), None)
    """
    match = _SHARD_RE.fullmatch(name)
    if match is None:
        return None
    index, count = int(match.group(1)), int(match.group(2))
    return (index, count) if index < count and shard_filename(index, count) == name else None


def pointer_filename(latest_filename: str) -> str:
    """Name of the pointer file that records the newest checkpoint.

    Example:
        >>> pointer_filename("latest")
        'latest.symlink'
    """
    if not is_plain_name(latest_filename):
        raise ConfigError("latest_filename", latest_filename, repr(DEFAULT_LATEST_FILENAME), "It must be a plain name")
    return latest_filename + POINTER_SUFFIX


def partial_dirname(name: str, token: str) -> str:
    """Hidden directory where checkpoint ``name`` is written before it is committed.

    Example:
        >>> partial_dirname("ep1-ba4", "ab12"), is_partial_dirname(".ep1-ba4.partial-ab12")
        ('.ep1-ba4.partial-ab12', True)
    """
    return _hidden("partial", name, token, "'ep1-ba4'")


def is_partial_dirname(name: str) -> bool:
    """Whether ``name`` was made by :func:`partial_dirname`.

    Example:
        >>> is_partial_dirname("ep1-ba4")
        False
    """
    return _PARTIAL_RE.fullmatch(name) is not None


def trash_dirname(name: str, token: str) -> str:
    """Hidden name a checkpoint directory is renamed to while it is deleted.

    Example:
        >>> trash_dirname("ep1-ba4", "ab12")
        '.ep1-ba4.trash-ab12'
    """
    return _hidden("trash", name, token, "'ep1-ba4'")


def is_trash_dirname(name: str) -> bool:
    """Whether ``name`` was made by :func:`trash_dirname`.

    Example:
        >>> is_trash_dirname(".ep1-ba4.trash-ab12"), is_trash_dirname(".ep1-ba4.partial-ab12")
        (True, False)
    """
    return _TRASH_RE.fullmatch(name) is not None


def temp_filename(name: str, token: str) -> str:
    """Hidden temporary file that is written and then renamed onto ``name``.

    Example:
        >>> temp_filename("manifest.json", "ab12")
        '.manifest.json.tmp-ab12'
    """
    return temp_prefix(name) + _check_token(token)


def temp_prefix(name: str) -> str:
    """What :func:`temp_filename` puts before the token: the ``prefix`` for :func:`tempfile.mkstemp`.

    Example:
        >>> import tempfile
        >>> fd, path = tempfile.mkstemp(prefix=temp_prefix("model.pt"), dir=tempfile.mkdtemp())
        >>> is_temp_filename(os.path.basename(path)), os.close(fd)
        (True, None)
    """
    return _hidden_prefix("tmp", name, repr(MANIFEST_FILENAME))


def is_temp_filename(name: str) -> bool:
    """Whether ``name`` was made by :func:`temp_filename` (or :func:`temp_prefix`): an unfinished write.

    Example:
        >>> is_temp_filename(".manifest.json.tmp-ab12"), is_temp_filename("manifest.json")
        (True, False)
    """
    return _TEMP_RE.fullmatch(name) is not None


def probe_filename(token: str, rank: int) -> str:
    """Hidden file a rank writes to learn which other ranks see the same folder.

    Example:
        >>> probe_filename("ab12", 3)
        '.probe-ab12-rank3'
    """
    return f".probe-{_check_token(token)}-rank{rank}"


def parse_probe_filename(name: str, token: str) -> int | None:
    """The rank that wrote probe file ``name`` for ``token``, or ``None``.

    Example:
        >>> parse_probe_filename(".probe-ab12-rank3", "ab12"), parse_probe_filename("ep1", "ab12")
        (3, None)
    """
    prefix = f".probe-{token}-rank"
    return int(name[len(prefix) :]) if name.startswith(prefix) and name[len(prefix) :].isdigit() else None


def is_hidden_name(name: str) -> bool:
    """Whether readers skip ``name`` (partial, trash and temporary entries all start with ``.``).

    Example:
        >>> is_hidden_name(".ep1-ba4.partial-ab12"), is_hidden_name("ep1-ba4")
        (True, False)
    """
    return name.startswith(".")


def is_plain_name(name: str) -> bool:
    """Whether ``name`` is one safe path component: non-empty, no separators, not ``.``/``..``, no NUL.

    Example:
        >>> is_plain_name("ep1-ba4"), is_plain_name("../etc"), is_plain_name("..")
        (True, False, False)
    """
    if not isinstance(name, str) or name in ("", ".", ".."):
        return False
    return not any(bad in name for bad in ("/", "\\", "\0"))


def reference_name(checkpoint: str, file: str) -> str:
    """How an incremental checkpoint names file ``file`` of the earlier checkpoint ``checkpoint`` (a sibling).

    Example:
        >>> reference_name("ep0-ba4", "shard-00000-of-00001.safetensors")
        '../ep0-ba4/shard-00000-of-00001.safetensors'
    """
    if not is_plain_name(checkpoint) or not is_plain_name(file):
        raise ValueError(f"checkpoint={checkpoint!r} and file={file!r} must both be plain names")
    return f"../{checkpoint}/{file}"


def parse_reference(name: str) -> tuple[str, str] | None:
    """``(checkpoint, file)`` of a :func:`reference_name`, or ``None`` for any other name.

    Example:
        >>> parse_reference("../ep0-ba4/objects.pt"), parse_reference("objects.pt"), parse_reference("../../x/y")
        (('ep0-ba4', 'objects.pt'), None, None)
    """
    if not isinstance(name, str) or not name.startswith("../"):
        return None
    parts = name[3:].split("/")
    if len(parts) != 2 or not all(is_plain_name(p) for p in parts):
        return None
    return parts[0], parts[1]


def is_file_name(name: str) -> bool:
    """Whether ``name`` may appear in a manifest: a plain name, or a file of a sibling checkpoint.

    Example:
        >>> is_file_name("objects.pt"), is_file_name("../ep0-ba4/objects.pt"), is_file_name("../../etc/passwd")
        (True, True, False)
    """
    return is_plain_name(name) or parse_reference(name) is not None


def cache_path(cache_dir: str, remote_folder_url: str, kind: str) -> str:
    """The directory in ``cache_dir`` that mirrors a remote folder (``kind``: one of :data:`CACHE_KINDS`).

    Example:
        >>> cache_path("/local/nvme/ckpt-cache", "s3://bucket/runs/a", "downloads")
        '/local/nvme/ckpt-cache/downloads/4d896d9c6b21898f'
    """
    if kind not in CACHE_KINDS:
        raise ConfigError("kind", kind, repr(CACHE_KINDS[0]), f"It must be one of {CACHE_KINDS}")
    return os.path.join(cache_dir, kind, hashlib.sha1(remote_folder_url.encode()).hexdigest()[:16])


def cache_lock_filename(name: str) -> str:
    """File, next to a cached copy of checkpoint ``name``, that a process locks while it downloads that copy.

    Example:
        >>> cache_lock_filename("ep1-ba4")
        'ep1-ba4.lock'
    """
    if not is_plain_name(name):
        raise ConfigError("name", name, "'ep1-ba4'", "It must be a single path component")
    return name + ".lock"
