"""The ``lightning-ckpt`` argument parser and entry point: dispatch to a subcommand, one-line errors, exit codes.

Exit codes: 0 success, 1 failure, 2 usage error (130 when interrupted). Errors are one line on
stderr (``lightning-ckpt: error: ...``), redacted, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from lightning_ckpt.cli._common import PROG, UsageError, parse_storage_options
from lightning_ckpt.cli.consolidate import HELP as CONSOLIDATE_HELP
from lightning_ckpt.cli.consolidate import add_arguments as add_consolidate_arguments
from lightning_ckpt.cli.consolidate import cmd_consolidate
from lightning_ckpt.cli.cp import cmd_cp
from lightning_ckpt.cli.inspect import cmd_inspect
from lightning_ckpt.cli.ls import cmd_ls
from lightning_ckpt.cli.prune import cmd_prune
from lightning_ckpt.cli.verify import cmd_verify
from lightning_ckpt.errors import CheckpointError, ConfigError
from lightning_ckpt.redact import redact

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace, dict[str, Any]], int]

_OPTIONS_HELP = 'fsspec options for remote URLs as a JSON object, e.g. \'{"key": ..., "secret": ...}\''


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


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

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
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
    add_consolidate_arguments(add("consolidate", cmd_consolidate, CONSOLIDATE_HELP))
    prune_cmd = add(
        "prune", cmd_prune, "delete all but the N newest checkpoints (and every M-th step; never the latest)"
    )
    prune_cmd.add_argument("folder", metavar="FOLDER")
    prune_cmd.add_argument("--keep", type=int, required=True, metavar="N", help="how many of the newest to keep")
    prune_cmd.add_argument(
        "--keep-every-n-steps",
        type=int,
        default=None,
        metavar="M",
        help="also keep every checkpoint whose step is a multiple of M",
    )
    prune_cmd.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    cp = add("cp", cmd_cp, "copy a checkpoint between fsspec locations, verifying checksums; DST/ copies into DST")
    cp.add_argument("src", metavar="SRC")
    cp.add_argument("dst", metavar="DST")
    for end in ("src", "dst"):
        cp.add_argument(
            f"--{end}-storage-options",
            default=None,
            metavar="JSON",
            help=f"fsspec options for {end.upper()} (default: --storage-options)",
        )
    cp.add_argument(
        "--set-latest",
        action="store_true",
        help="after the copy is committed, point DST's folder 'latest' pointer at it (default: pointers untouched)",
    )
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
        options = parse_storage_options(args.storage_options)
        handler: Handler = args.handler
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
