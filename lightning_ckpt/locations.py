"""What a path or URL names, checked before any I/O: local path or URL, known protocol, storage options.

``storage_options`` may hold credentials: they are checked here (unknown options of filesystems
that would keep them silently are refused), registered with :mod:`lightning_ckpt.redact`, and
never shown in a message (:data:`HIDDEN` stands in for them).

Example:
    >>> is_url("s3://bucket/runs/a"), is_url("/data/runs/a"), is_url("file:///data/runs/a")
    (True, False, False)
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.registry import known_implementations, registry

from lightning_ckpt.errors import ConfigError, ConfigTypeError
from lightning_ckpt.redact import register_secrets

__all__ = ["HIDDEN", "check_storage_options", "check_url", "is_url"]

HIDDEN = "<hidden>"
"""How ``storage_options`` appear in messages: their values may be credentials, so they never do."""

_OPTIONS_EXAMPLE = "{'key': ..., 'secret': ..., 'client_kwargs': {'endpoint_url': 'https://...'}}"
# Filesystems that silently keep options they do not know (s3fs hands them to aiobotocore's AioSession
# only when it first connects, which then fails with a TypeError that does not say where it came from).
_CHECKED_PROTOCOLS = frozenset({"s3", "s3a"})


def is_url(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` names a non-local fsspec location (``s3://``, ``memory://``, ...).

    Example:
        >>> is_url("s3://bucket/x"), is_url("/tmp/x"), is_url("file:///tmp/x")
        (True, False, False)
    """
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def check_url(url: str, argument: str, example: str) -> None:
    """Raise :class:`ConfigError` naming ``argument`` when ``url`` uses a protocol fsspec does not know.

    Example:
        >>> check_url("s4://bucket/run", "folder", "'s3://bucket/run'")
        Traceback (most recent call last):
        ...
        lightning_ckpt.errors.ConfigError: folder='s4://bucket/run' is not valid. Unknown protocol 's4'; ...
    """
    if not is_url(url) or "::" in url:  # chained URLs (simplecache::s3://...) name several protocols
        return
    protocol = url.split("://", 1)[0]
    if protocol not in known_implementations and protocol not in registry:
        reason = f"Unknown protocol {protocol!r}; use a local path or an fsspec URL (s3://, gs://, az://, memory://)"
        raise ConfigError(argument, url, example, reason)


@functools.cache
def _accepted_options(protocol: str) -> frozenset[str] | None:
    """Option names the filesystem of ``protocol`` accepts, or ``None`` when they cannot be listed."""
    if protocol not in _CHECKED_PROTOCOLS:
        return None
    try:
        fs_class = fsspec.get_filesystem_class(protocol)
        from aiobotocore.session import AioSession
    except ImportError:  # opening the URL reports the missing package
        return None
    names = {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}  # fsspec's own
    for init in [klass.__dict__["__init__"] for klass in fs_class.__mro__ if "__init__" in klass.__dict__] + [
        AioSession.__init__
    ]:
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names.update(p.name for p in parameters if p.kind in kinds and p.name != "self")
    return frozenset(names)


def check_storage_options(
    options: object, url: str | None = None, *, argument: str = "storage_options"
) -> dict[str, Any]:
    """Validate ``storage_options`` (for ``url`` when given) and return them as a new dict.

    Messages name the argument and, for an unknown option, the option's name, but never a value:
    values may be credentials.

    Raises:
        ConfigTypeError: ``options`` is not a mapping of option names.
        ConfigError: an option that the filesystem of ``url`` does not have (S3).

    Example:
        >>> check_storage_options({"key": "AKIA...", "secret": "..."}, "s3://bucket/run")["key"]
        'AKIA...'
        >>> check_storage_options({"secret_key": "..."}, "s3://bucket/run")
        Traceback (most recent call last):
        ...
        lightning_ckpt.errors.ConfigError: storage_options='<hidden>' is not valid. 'secret_key' is not an ...
    """
    if options is None:
        return {}
    if isinstance(options, Mapping):
        register_secrets(options)  # scrubbed from every log record from now on, whoever logs them
    if not isinstance(options, Mapping):
        reason = f"{argument} must be a dict of fsspec options, got {type(options).__name__}"
        raise ConfigTypeError(argument, HIDDEN, _OPTIONS_EXAMPLE, reason)
    for name in options:
        if not isinstance(name, str):
            reason = f"Its keys must be option names (str), not {type(name).__name__}"
            raise ConfigTypeError(argument, HIDDEN, _OPTIONS_EXAMPLE, reason)
    if url is not None and is_url(url) and "::" not in url:
        protocol = url.split("://", 1)[0]
        accepted = _accepted_options(protocol)
        unknown = sorted(set(options) - accepted) if accepted is not None else []
        if unknown:
            fs_class = fsspec.get_filesystem_class(protocol)
            reason = (
                f"{unknown[0]!r} is not an option of {protocol}:// ({fs_class.__module__}.{fs_class.__name__});"
                f" its options are {', '.join(sorted(accepted or ()))}"
            )
            raise ConfigError(argument, HIDDEN, _OPTIONS_EXAMPLE, reason)
    return dict(options)
