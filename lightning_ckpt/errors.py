"""Error types raised by ``lightning_ckpt``.

Every error names the argument or file at fault and, where there is one, the fix.

Example:
    >>> from lightning_ckpt.errors import ConfigError
    >>> try:
    ...     raise ConfigError("save_interval", "3 parsecs", "'500ba', '1ep' or '30min'")
    ... except ValueError as err:
    ...     print(err)
    save_interval='3 parsecs' is not valid. Example of a valid value: '500ba', '1ep' or '30min'.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "ConfigTypeError",
    "CorruptCheckpointError",
    "FolderConflictError",
    "FolderInUseError",
]


class CheckpointError(Exception):
    """Base class of every error this package raises about checkpoints on storage."""


class ConfigError(ValueError):
    """A public argument has a wrong type or value.

    Args:
        argument: the argument's name, as the user typed it.
        value: the value that was given.
        example: an example of a valid value.
        reason: optional extra explanation.
    """

    def __init__(self, argument: str, value: object, example: str, reason: str = "") -> None:
        self.argument = argument
        self.value = value
        self.example = example
        self.reason = reason
        detail = f" {reason.rstrip('.')}." if reason else ""
        super().__init__(f"{argument}={value!r} is not valid.{detail} Example of a valid value: {example}.")


class ConfigTypeError(ConfigError, TypeError):
    """A public argument has a wrong type where callers may expect a ``TypeError`` (it is both).

    Example:
        >>> isinstance(ConfigTypeError("path", 3, "'/data/ckpts/ep0-ba100'"), (TypeError, ValueError))
        True
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint exists at the given path."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint on storage does not match its manifest (or has no valid manifest).

    The message names the file and what was expected versus found.
    """


class FolderConflictError(CheckpointError):
    """A checkpoint folder already holds checkpoints this run would overwrite."""


class FolderInUseError(FolderConflictError):
    """Another live run holds the checkpoint folder (see :mod:`lightning_ckpt.lock`)."""
