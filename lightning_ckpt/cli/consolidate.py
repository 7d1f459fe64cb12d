"""``lightning-ckpt consolidate``: a checkpoint of any number of shards as one ``.ckpt`` file or as safetensors.

The work is :func:`lightning_ckpt.export.consolidate` (tensor by tensor, never the whole model in
memory); this module adds the arguments, a progress bar and the ``wrote ...`` lines.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from lightning_ckpt import export
from lightning_ckpt.cli._common import UsageError, human_size, progress

__all__ = ["add_arguments", "cmd_consolidate", "consolidate", "parse_size"]

HELP = "write a checkpoint as one standard Lightning .ckpt file, or as Hugging Face safetensors"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str, argument: str = "--max-shard-size") -> int:
    """A size such as ``5GB``, ``500MB``, ``2GiB`` or ``1000`` (bytes) as a number of bytes.

    Example:
        >>> parse_size("5GB"), parse_size("2GiB"), parse_size("1000")
        (5000000000, 2147483648, 1000)
        >>> parse_size("5 parsecs")
        Traceback (most recent call last):
        ...
        lightning_ckpt.cli._common.UsageError: --max-shard-size '5 parsecs' is not a size; use e.g. 5GB, 500MB or 2GiB
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = found.group(2).upper() if found else ""
    if found is None or unit not in _UNITS or float(found.group(1)) * _UNITS[unit] < 1:
        raise UsageError(f"{argument} {text!r} is not a size; use e.g. 5GB, 500MB or 2GiB")
    return int(float(found.group(1)) * _UNITS[unit])


def add_arguments(command: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``consolidate`` to its subparser (``build_parser`` calls it).

    Example:
        >>> args = add_arguments(argparse.ArgumentParser()).parse_args(["ckpt", "out", "--format", "safetensors"])
        >>> args.format, args.dtype, args.weights_only, args.force
        ('safetensors', None, False, False)
    """
    command.add_argument("ckpt", metavar="CKPT")
    command.add_argument(
        "out", metavar="OUT", help="the .ckpt file; for safetensors a directory or a path ending in .safetensors"
    )
    command.add_argument(
        "--format",
        choices=export.FORMATS,
        default=None,
        help="ckpt (torch.save, the whole checkpoint) or safetensors (the model's weights, Hugging Face layout);"
        " default: safetensors if OUT ends with .safetensors, else ckpt",
    )
    command.add_argument(
        "--dtype",
        choices=sorted(export.DTYPES),
        default=None,
        help="cast the floating-point weights (not optimizer state)",
    )
    command.add_argument(
        "--weights-only",
        action="store_true",
        help="ckpt: keep only state_dict and what load_from_checkpoint reads (epoch, global_step, hyper_parameters)",
    )
    command.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="safetensors: start a new file before one exceeds SIZE (default 5GB, like Hugging Face)",
    )
    command.add_argument("--force", action="store_true", help="overwrite existing output files")
    command.add_argument(
        "--allow-pickle", action="store_true", help="unpickle objects.pt with weights_only=False (trusted files only)"
    )
    return command


def consolidate(
    src: str, out: str, storage_options: dict[str, Any] | None = None, *, allow_pickle: bool = False, **options: Any
) -> str:
    """Write the checkpoint ``src`` as one ``torch.save`` file ``out`` (or safetensors: ``options``); return ``out``.

    Kept for callers of 0.x; ``options`` are those of :func:`lightning_ckpt.export.consolidate`,
    which returns every file written.

    Example:
        >>> import tempfile, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> root = tempfile.mkdtemp()
        >>> src = save_checkpoint_dir({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, os.path.join(root, "a"))
        >>> torch.load(consolidate(src, os.path.join(root, "a.ckpt")))["state_dict"]["w"]
        tensor([1., 1.])
    """
    export.consolidate(src, out, storage_options=storage_options, allow_pickle=allow_pickle, **options)
    return out


def cmd_consolidate(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``consolidate CKPT OUT``: write one standard ``.ckpt`` file, or safetensors with ``--format safetensors``.

    Example:
        >>> import tempfile, torch
        >>> from lightning_ckpt.collective import save_checkpoint_dir
        >>> root = tempfile.mkdtemp()
        >>> src = save_checkpoint_dir({"state_dict": {"w": torch.ones(2)}}, os.path.join(root, "a"))
        >>> cmd_consolidate(argparse.Namespace(ckpt=src, out=os.path.join(root, "a.ckpt"), allow_pickle=False), {})
        ... # doctest: +ELLIPSIS
        wrote .../a.ckpt (... KiB)
        0
    """
    with progress(0, "write") as bar:

        def report(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        written = export.consolidate(
            args.ckpt,
            args.out,
            format=getattr(args, "format", None),
            dtype=getattr(args, "dtype", None),
            weights_only=getattr(args, "weights_only", False),
            storage_options=options,
            max_shard_bytes=parse_size(getattr(args, "max_shard_size", "5GB")),
            allow_pickle=args.allow_pickle,
            force=getattr(args, "force", False),
            progress=report,
        )
        bar.total = bar.n  # the pickle and headers are not counted: end the bar at 100 %
        bar.refresh()
    for path in written:
        print(f"wrote {path} ({human_size(os.path.getsize(path))})")
    return 0
