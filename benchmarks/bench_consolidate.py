"""Peak memory and time of exporting a checkpoint (``lightning_ckpt.export.consolidate``), tensor by tensor.

A Lightning-shaped state of ``--gib`` GiB (fp32 weights plus Adam's two moments, 16 MiB tensors;
see ``_bench_common.make_state``) is saved once as a checkpoint directory. Each export then runs in
a fresh Python process, which reports its peak resident set size (``getrusage``'s ``ru_maxrss``),
its resident size before the export (after imports) and the export's time. The peak is ``VmHWM``
after writing ``5`` to ``/proc/self/clear_refs`` once the imports are done (importing Lightning
peaks higher than a small export; ``ru_maxrss``, the whole life's peak, is in the JSON too):

* **ckpt**: the whole checkpoint as one ``torch.save``-format file (streamed);
* **ckpt weights-only bf16**: ``weights_only=True, dtype="bf16"``;
* **safetensors**: the weights as ``model.safetensors``;
* **read_checkpoint + torch.save**: the in-memory way (what ``consolidate`` did before it streamed), for reference.

Usage::

    python benchmarks/bench_consolidate.py [--gib 1.0] [--dir PATH] [--json out.json] [--smoke]

Example:
    >>> row("ckpt", {"checkpoint": 2**30, "output": 2**30, "peak": 2**29, "before": 2**28, "seconds": 1.5})
    '| ckpt | 1024.0 | 1024.0 | 512.0 | 256.0 | 256.0 | 1.50 |'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 2**20

# Run in a fresh process; prints one JSON line: peak RSS of the export (VmHWM, reset after the imports), RSS
# before it, ru_maxrss (the process's whole-life peak, imports included), seconds, output bytes.
_CHILD = """
import json, os, resource, sys, time
import torch
from lightning_ckpt import read_checkpoint
from lightning_ckpt.export import consolidate
src, out, how = sys.argv[1], sys.argv[2], sys.argv[3]
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: the imports' own peak is not the export's
before = status("VmRSS")
start = time.perf_counter()
if how == "ckpt":
    files = consolidate(src, out)
elif how == "weights_bf16":
    files = consolidate(src, out, weights_only=True, dtype="bf16")
elif how == "safetensors":
    files = consolidate(src, out, format="safetensors")
else:
    torch.save(read_checkpoint(src), out)
    files = [out]
seconds = time.perf_counter() - start
peak = status("VmHWM")
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = sum(os.path.getsize(f) for f in files)
print(json.dumps({"peak": peak, "before": before, "maxrss": maxrss, "seconds": seconds, "output": out}))
"""

EXPORTS = {
    "ckpt": ("ckpt", "model.ckpt"),
    "ckpt weights-only bf16": ("weights_bf16", "weights.ckpt"),
    "safetensors": ("safetensors", "hf"),
    "read_checkpoint + torch.save": ("in_memory", "in_memory.ckpt"),
}


def row(name: str, result: dict[str, Any]) -> str:
    """One markdown row: sizes and memory in MiB, time in seconds."""
    cells = [result[k] / MIB for k in ("checkpoint", "output", "peak", "before")]
    cells.append((result["peak"] - result["before"]) / MIB)
    return f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {result['seconds']:.2f} |"


def _save(gib: float, path: str) -> int:
    sys.path.insert(0, HERE)
    from _bench_common import make_state

    from lightning_ckpt.collective import save_checkpoint_dir

    save_checkpoint_dir(make_state(gib), path)
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def _export(src: str, out: str, how: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, src, out, how], capture_output=True, text=True, env=env,
                          timeout=1800, check=True)  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the state to export")
    parser.add_argument("--dir", default=None, help="scratch directory (default: benchmarks/results)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="64 MiB, for CI")
    args = parser.parse_args(argv)
    gib = 1 / 16 if args.smoke else args.gib
    base = args.dir or os.path.join(HERE, "results")
    os.makedirs(base, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="bench-consolidate-", dir=base)
    try:
        src = os.path.join(scratch, "ep3-ba1500")
        size = _save(gib, src)
        results = {}
        for name, (how, out) in EXPORTS.items():
            results[name] = {"checkpoint": size, **_export(src, os.path.join(scratch, out), how)}
            shutil.rmtree(os.path.join(scratch, out), ignore_errors=True) if out == "hf" else None
            if os.path.isfile(os.path.join(scratch, out)):
                os.unlink(os.path.join(scratch, out))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("| export | checkpoint MiB | output MiB | peak RSS MiB | RSS before MiB | peak extra MiB | time s |")
    print("|---|---|---|---|---|---|---|")
    for name, result in results.items():
        print(row(name, result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gib": gib, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
