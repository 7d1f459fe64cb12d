"""How long a ``lightning-ckpt`` command takes, start to exit, against what Python must import anyway.

A command-line tool for hundreds of jobs is run from shells and scripts, so its start-up is its
speed. Each variant runs in a fresh interpreter on the same one-checkpoint folder:

* **ours**: the installed ``lightning-ckpt ls FOLDER`` (the package loads its names lazily and the
  command line never imports Lightning);
* **with Lightning imported**: the same command after ``import lightning``, which is what it cost
  while ``import lightning_ckpt`` imported the Lightning callback and plugin eagerly (before 0.1.0's
  lazy exports);
* **import torch alone**: ``python -c "import torch"``, which any tool that reads tensors pays (the
  command imports torch too, so it cannot beat this by more than the noise).

Usage::

    python benchmarks/bench_cli_startup.py [--reps 5] [--json out.json] [--smoke]

Example:
    >>> summary_row("ours", {"median": 2.0, "min": 1.9, "max": 2.1, "values": []}, 1.0)
    '| ours | 2.000 (1.900..2.100) | 2.00 |'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import cell, machine_facts, machine_line, ratio, summarize


def summary_row(name: str, summary: dict[str, Any], torch_s: float | None) -> str:
    """One table row: the variant, its time in seconds, and its ratio to ``import torch`` alone."""
    r = ratio(summary["median"], torch_s)
    return f"| {name} | {cell(summary)} | {'—' if r is None else f'{r:.2f}'} |"


def _time(command: list[str], reps: int, expect: str) -> dict[str, Any]:
    runs = []
    for _ in range(reps):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        runs.append(time.perf_counter() - start)
        if done.returncode != 0 or expect not in done.stdout:
            raise RuntimeError(f"{command} failed: {done.stdout[-500:]} {done.stderr[-1500:]}")
    return summarize(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="one repetition (CI)")
    args = parser.parse_args()
    reps = 1 if args.smoke else args.reps

    import torch

    from lightning_ckpt.collective import save_checkpoint_dir

    folder = tempfile.mkdtemp(prefix="bench-cli-")
    try:
        save_checkpoint_dir({"state_dict": {"w": torch.ones(4)}, "global_step": 8}, os.path.join(folder, "ep0-ba8"))
        script = shutil.which("lightning-ckpt")
        ours = [script, "ls", folder] if script else [sys.executable, "-m", "lightning_ckpt", "ls", folder]
        with_lightning = [
            sys.executable,
            "-c",
            "import sys, lightning; from lightning_ckpt.cli import main; sys.exit(main(sys.argv[1:]))",
            "ls",
            folder,
        ]
        variants = {
            "ours": _time(ours, reps, "ep0-ba8"),
            "with_lightning_imported": _time(with_lightning, reps, "ep0-ba8"),
            "import_torch": _time([sys.executable, "-c", "import torch; print('ep0-ba8')"], reps, "ep0-ba8"),
        }
        facts = machine_facts(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    torch_s = variants["import_torch"]["median"]
    print(machine_line(facts))
    print(f"\n`lightning-ckpt ls` on a one-checkpoint folder; {reps} runs each; seconds, median (min..max)\n")
    print("| variant | start to exit s | ratio to import torch |")
    print("|---|---|---|")
    for name, label in (
        ("ours", "ours: lightning-ckpt ls"),
        ("with_lightning_imported", "the same with Lightning imported (eager package)"),
        ("import_torch", "python -c 'import torch' alone"),
    ):
        print(summary_row(label, variants[name], torch_s))
    speedup = ratio(variants["with_lightning_imported"]["median"], variants["ours"]["median"])
    print(f"\n| ratio | value |\n|---|---|\n| with Lightning / ours | {'—' if speedup is None else f'{speedup:.2f}'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "reps": reps, "variants": variants}, f, indent=1)


if __name__ == "__main__":
    main()
