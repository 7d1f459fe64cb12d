"""Argument checks shared by every public constructor: each raises ``ConfigError`` naming the argument and a fix.

Example:
    >>> try:
    ...     check_count("num_concurrent_uploads", 0, "4")
    ... except ConfigError as err:
    ...     print(err)
    num_concurrent_uploads=0 is not valid. It must be an int >= 1. Example of a valid value: 4.
"""

from __future__ import annotations

import math
import os

from lightning_ckpt.errors import ConfigError

__all__ = ["check_bool", "check_count", "check_directory", "check_seconds"]


def check_bool(argument: str, value: object) -> bool:
    """``value`` if it is a ``bool`` (not merely truthy).

    Example:
        >>> check_bool("async_save", True)
        True
    """
    if not isinstance(value, bool):
        raise ConfigError(argument, value, "True or False")
    return value


def check_count(argument: str, value: object, example: str, *, low: int = 1) -> int:
    """``value`` if it is an ``int >= low``.

    Example:
        >>> check_count("num_checkpoints_to_keep", -1, "3", low=-1)
        -1
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(argument, value, example, f"It must be an int >= {low}")
    return value


def check_seconds(argument: str, value: object, example: str) -> float:
    """``value`` as a float if it is a positive, finite number of seconds.

    Example:
        >>> check_seconds("barrier_timeout_s", 600, "600 (seconds)")
        600.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(argument, value, example, "It must be a positive, finite number of seconds")
    return float(value)


def check_directory(argument: str, value: object, example: str) -> str | None:
    """``value`` as a ``str`` if it is a non-empty path (``None`` passes through).

    Example:
        >>> check_directory("cache_dir", None, "'/local/nvme/cache'") is None
        True
    """
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ConfigError(argument, value, example)
    return str(os.fspath(value))
