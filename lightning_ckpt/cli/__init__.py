"""The ``lightning-ckpt`` command line: list, inspect, verify, consolidate, prune and copy checkpoints.

Run it as ``lightning-ckpt`` (installed console script) or ``python -m lightning_ckpt``::

    lightning-ckpt ls /data/runs/a/checkpoints
    lightning-ckpt inspect /data/runs/a/checkpoints/ep1-ba16 --json
    lightning-ckpt verify s3://bucket/run/ep1-ba16 --storage-options '{"anon": false}'
    lightning-ckpt consolidate /data/runs/a/checkpoints/latest model.ckpt
    lightning-ckpt prune /data/runs/a/checkpoints --keep 3 --dry-run
    lightning-ckpt cp /data/runs/a/checkpoints/ep1-ba16 s3://bucket/run/ep1-ba16 --set-latest

Errors are one line on stderr (``lightning-ckpt: error: ...``): exit code 2 for a usage error,
1 for any other failure. Progress bars go to stderr and only when it is a terminal.
See ``docs/cli.md`` for every subcommand with example output.

One module per command (:mod:`~lightning_ckpt.cli.ls`, :mod:`~lightning_ckpt.cli.inspect`,
:mod:`~lightning_ckpt.cli.verify`, :mod:`~lightning_ckpt.cli.consolidate`,
:mod:`~lightning_ckpt.cli.prune`, :mod:`~lightning_ckpt.cli.cp`); the parser and entry point are in
:mod:`lightning_ckpt.cli.app`, shared helpers in ``_common``. Everything public is importable from here.

Example:
    >>> main(["prune", "/nonexistent-folder", "--keep", "-1"])
    2
"""

from lightning_ckpt.cli._common import PROG, UsageError, human_age, human_size
from lightning_ckpt.cli.app import build_parser, main
from lightning_ckpt.cli.consolidate import cmd_consolidate, consolidate
from lightning_ckpt.cli.cp import cmd_cp, copy_checkpoint
from lightning_ckpt.cli.inspect import cmd_inspect, inspect_checkpoint
from lightning_ckpt.cli.ls import CheckpointRow, cmd_ls, list_checkpoints
from lightning_ckpt.cli.prune import cmd_prune, prune
from lightning_ckpt.cli.verify import cmd_verify, verify_checkpoint

__all__ = [
    "PROG",
    "CheckpointRow",
    "UsageError",
    "build_parser",
    "cmd_consolidate",
    "cmd_cp",
    "cmd_inspect",
    "cmd_ls",
    "cmd_prune",
    "cmd_verify",
    "consolidate",
    "copy_checkpoint",
    "human_age",
    "human_size",
    "inspect_checkpoint",
    "list_checkpoints",
    "main",
    "prune",
    "verify_checkpoint",
]
