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
    "CollectiveError",
    "ConfigError",
    "ConfigTypeError",
    "CorruptCheckpointError",
    "FolderConflictError",
    "FolderInUseError",
    "NewerFormatError",
    "PlanError",
    "TargetExistsError",
    "UploadError",
]


class CheckpointError(Exception):
    """Base class of every error this package raises about checkpoints on storage.

    Example:
        >>> import os, tempfile
        >>> from lightning_ckpt import CheckpointError, read_checkpoint
        >>> try:
        ...     read_checkpoint(os.path.join(tempfile.mkdtemp(), "ep0-ba100"))
        ... except CheckpointError as err:  # missing, corrupt, folder in use, a rank failed, ...
        ...     print(type(err).__name__)
        CheckpointNotFoundError
    """


class ConfigError(ValueError):
    """A public argument has a wrong type or value.

    Args:
        argument: the argument's name, as the user typed it.
        value: the value that was given.
        example: an example of a valid value.
        reason: optional extra explanation.

    Example:
        >>> from lightning_ckpt import CheckpointSaver, ConfigError
        >>> try:
        ...     CheckpointSaver(save_interval="3 parsecs", run_name="demo")
        ... except ConfigError as err:  # also a ValueError
        ...     print(err.argument, "|", err.reason)
        save_interval | Unknown unit 'parsecs'; the units are ep, ba, s, sec, min, h, d
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
    """No committed checkpoint exists at the given path (it is also a ``FileNotFoundError``).

    Example:
        >>> import tempfile
        >>> from lightning_ckpt import ShardedCheckpointIO
        >>> try:
        ...     ShardedCheckpointIO().load_checkpoint(tempfile.mkdtemp())  # an empty folder
        ... except FileNotFoundError as err:
        ...     print(type(err).__name__, "|", str(err).split(": ")[-1])
        CheckpointNotFoundError | the folder holds no committed checkpoint
    """


class CorruptCheckpointError(CheckpointError):
    """A checkpoint on storage does not match its manifest (or has no valid manifest).

    The message names the file and what was expected versus found.

    Example:
        >>> import os, tempfile, torch
        >>> from lightning_ckpt import CorruptCheckpointError, ShardedCheckpointIO, read_checkpoint
        >>> path = os.path.join(tempfile.mkdtemp(), "ep0-ba1")
        >>> ShardedCheckpointIO().save_checkpoint({"w": torch.ones(4)}, path)
        >>> shard = os.path.join(path, "shard-00000-of-00001.safetensors")
        >>> os.truncate(shard, 1)  # a damaged shard
        >>> try:
        ...     read_checkpoint(path)
        ... except CorruptCheckpointError as err:
        ...     print(str(err).split(" has ")[1])
        1 bytes, expected 4112 (truncated or damaged)
    """


class FolderConflictError(CheckpointError):
    """A checkpoint folder already holds checkpoints this run would overwrite.

    Raised before training starts, unless ``CheckpointSaver(overwrite=True)``.

    Example:
        >>> import tempfile, lightning as L
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from lightning_ckpt import CheckpointSaver, FolderConflictError
        >>> folder = tempfile.mkdtemp()
        >>> def fit():  # a run from scratch: 2 steps, a checkpoint at each
        ...     saver = CheckpointSaver(folder, save_interval="1ba", run_name="demo")
        ...     L.Trainer(max_steps=2, callbacks=[saver], logger=False, enable_progress_bar=False).fit(BoringModel())
        >>> fit()
        >>> try:
        ...     fit()  # the same folder again, without ckpt_path="last"
        ... except FolderConflictError as err:
        ...     print(str(err).split("(")[1].split(")")[0])
        ep0-ba1, ep0-ba2
    """


class FolderInUseError(FolderConflictError):
    """Another live run holds the checkpoint folder (see :mod:`lightning_ckpt.lock`).

    Example:
        >>> import tempfile
        >>> from lightning_ckpt import FolderInUseError
        >>> from lightning_ckpt.lock import FolderLock
        >>> from lightning_ckpt.storage import Storage
        >>> storage, folder = Storage.open(tempfile.mkdtemp())
        >>> first_run = FolderLock.acquire(storage, folder, run_name="first")
        >>> try:
        ...     FolderLock.acquire(storage, folder, run_name="second")
        ... except FolderInUseError as err:
        ...     print("in use by run 'first'" in str(err))
        True
        >>> first_run.release()
    """


class PlanError(CheckpointError):
    """A checkpoint cannot be saved correctly, so nothing is written (raised on every rank, before staging).

    The message names the tensor, the ranks or the strategy at fault, and the way out. See
    :mod:`lightning_ckpt.plan`.

    Example:
        >>> from lightning_ckpt import PlanError
        >>> from lightning_ckpt.plan import resolve
        >>> rank0, rank1 = [], [["state_dict/w", "float32", [2], 8, "rank0"]]  # rank 1 holds a key rank 0 lacks
        >>> try:
        ...     resolve({0: rank0, 1: rank1}, group=[0, 1])
        ... except PlanError as err:
        ...     print(str(err).split(",")[0])
        tensor 'state_dict/w' is held by rank 1 but not by rank 0
    """


class CollectiveError(CheckpointError):
    """One or more ranks failed or did not arrive; raised on every rank that is still alive.

    Attributes:
        phase: the step of the protocol that failed (e.g. ``"written"``).
        failed: ``{rank: error message}`` of ranks that reported an error.
        missing: ranks that did not arrive within the timeout.

    Example:
        >>> err = CollectiveError("written", {1: "OSError: disk full"}, missing=[3], timeout_s=600)
        >>> print(err)
        checkpoint written failed on rank(s) [1, 3]: rank 1: OSError: disk full; rank(s) 3 did not arrive within 600 s
        >>> err.failed, err.missing
        ({1: 'OSError: disk full'}, [3])
    """

    def __init__(self, phase: str, failed: dict[int, str], missing: list[int], timeout_s: float) -> None:
        self.phase, self.failed, self.missing = phase, failed, missing
        parts = [f"rank {r}: {msg}" for r, msg in sorted(failed.items())]
        if missing:
            parts.append(f"rank(s) {', '.join(map(str, missing))} did not arrive within {timeout_s:g} s")
        super().__init__(f"checkpoint {phase} failed on rank(s) {self.ranks}: " + "; ".join(parts))

    @property
    def ranks(self) -> list[int]:
        """Every rank that failed or went missing, sorted.

        Example:
            >>> CollectiveError("committed", {2: "OSError: quota"}, missing=[0], timeout_s=60).ranks
            [0, 2]
        """
        return sorted({*self.failed, *self.missing})


class UploadError(CheckpointError, RuntimeError):
    """Another rank's upload failed, or did not report within the upload timeout (also a ``RuntimeError``).

    Raised on the committing rank, which then does not commit the checkpoint remotely (see
    :mod:`lightning_ckpt.upload`); the local committed copies are kept.

    Example:
        >>> err = UploadError("checkpoint ep0-ba8: rank(s) [1] did not finish uploading within 60 s")
        >>> isinstance(err, CheckpointError), isinstance(err, RuntimeError)
        (True, True)
    """


class TargetExistsError(CheckpointError, FileExistsError):
    """A save's target exists and is neither a checkpoint of this format nor a legacy ``.ckpt`` file.

    Nothing was written; the existing file or directory is untouched (``torch.save`` would
    overwrite a file; this package never replaces what it did not write).

    Example:
        >>> import os, tempfile
        >>> from lightning_ckpt import ShardedCheckpointIO, TargetExistsError
        >>> folder = tempfile.mkdtemp()
        >>> open(os.path.join(folder, "notes.txt"), "w").close()
        >>> try:
        ...     ShardedCheckpointIO().save_checkpoint({"epoch": 1}, folder)
        ... except TargetExistsError as err:
        ...     print("notes.txt" in str(err), os.listdir(folder))
        True ['notes.txt']
    """


class NewerFormatError(CorruptCheckpointError):
    """A checkpoint written by a newer lightning-ckpt in a ``format_version`` this version cannot read.

    Nothing is wrong with the checkpoint: upgrade lightning-ckpt to read it. ``"last"`` skips it with a
    warning that says so.

    Example:
        >>> from lightning_ckpt.manifest import Manifest
        >>> try:
        ...     Manifest.from_json(b'{"format_version": 99}', source="ep1-ba8/manifest.json")
        ... except NewerFormatError as err:
        ...     print("Upgrade lightning-ckpt" in str(err))
        True
    """
