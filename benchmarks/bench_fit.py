"""What checkpointing costs a real ``lightning.Trainer.fit``: total time, overhead, and stall per save.

A model of ``--mib`` MiB of fp32 parameters (square ``Linear`` layers; Adam, so a checkpoint is
~3x that) trains on a tiny synthetic dataset on the CPU for ``--steps`` optimizer steps
(``logger=False``, no progress bar, no model summary), checkpointing every ``--every`` steps, with:

* ``none``: no checkpointing (``enable_checkpointing=False``);
* ``ModelCheckpoint``: ``ModelCheckpoint(every_n_train_steps=k, save_top_k=-1)`` through Lightning's
  default ``TorchCheckpointIO`` (no fsync — Lightning's local path never syncs);
* ``ModelCheckpoint + AsyncCheckpointIO``: the same with ``plugins=[AsyncCheckpointIO()]`` (clones
  the tensors, then writes in a thread; ``fit`` waits for it in the strategy's teardown);
* ``CheckpointSaver sync``: ``CheckpointSaver(save_interval=f"{k}ba", async_save=False)``;
* ``CheckpointSaver async``: ``CheckpointSaver(save_interval=f"{k}ba", async_save=True)``
  (``fit`` returns only once the last save is committed: the saver waits in ``on_fit_end``).

Every checkpoint is kept during a run (like ``save_top_k=-1``) and deleted, untimed, after it.
The variants run interleaved, in a rotating order, ``--reps`` times, after one short untimed fit
of each (``2 x --every`` steps) that takes imports and first-use costs out of the way.

Reported: total ``fit`` time (median, min-max) and the overhead against no checkpointing
(seconds and %); the stall per save: a callback stamps every ``on_train_batch_start``, a step is
the time from one stamp to the next (so it contains the ``on_train_batch_end`` hooks, where both
``ModelCheckpoint`` and ``CheckpointSaver`` save), and stall = saving step - median step of the
no-checkpointing fits (without that variant: of the other steps of the same fit, which is also
reported as "stall vs own steps": it hides a background writer that slows every step), leaving
out the first step and the last one (whose end is ``on_train_end``); "steps after save": the
extra time of the ``--every - 1`` steps that follow each save (where an async writer competes with
training for the 2 CPUs), summed per save; "tail": from ``on_train_end`` until ``fit`` returns
(teardown, where the last background write is waited for).

Usage::

    python benchmarks/bench_fit.py [--mib 300] [--steps 40] [--every 4] [--reps 3] [--dir PATH] [--json out.json]
    python benchmarks/bench_fit.py --smoke      # 4 MiB model, 8 steps, 1 rep: every variant, for CI
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ckpt import CheckpointSaver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import MIB, cell, machine_facts, machine_line, malloc_trim, remove, summarize

BATCH = 8


class Net(L.LightningModule):
    """A stack of square ``Linear`` layers with Adam: ~``mib`` MiB of parameters."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.layers(x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-5)


def shape_for(mib: float) -> tuple[int, int]:
    """Width and layer count for ~``mib`` MiB of fp32 parameters (the widest of 2048/1024/256 giving >= 4 layers)."""
    params = mib * MIB / 4
    width = next((w for w in (2048, 1024) if params >= 4 * w * (w + 1)), 256)
    return width, max(1, round(params / (width * width + width)))


class StepTimer(Callback):
    """Stamps every ``on_train_batch_start`` and the end of training."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end = time.perf_counter()

    def steps(self) -> list[float]:
        stamps = [*self.starts, self.end]
        return [b - a for a, b in itertools.pairwise(stamps)]


Variant = Callable[[str], tuple[list[Callback], list[Any], bool]]  # folder -> (callbacks, plugins, checkpointing)

VARIANTS: dict[str, str] = {
    "none": "no checkpointing",
    "model_checkpoint": "ModelCheckpoint (TorchCheckpointIO, no fsync)",
    "model_checkpoint_async": "ModelCheckpoint + AsyncCheckpointIO (no fsync)",
    "saver_sync": "CheckpointSaver(async_save=False)",
    "saver_async": "CheckpointSaver(async_save=True)",
}


def build(variant: str, folder: str, every: int) -> tuple[list[Callback], list[Any], bool]:
    if variant == "none":
        return [], [], False
    if variant in ("model_checkpoint", "model_checkpoint_async"):
        callback = ModelCheckpoint(dirpath=folder, every_n_train_steps=every, save_top_k=-1)
        plugins = [AsyncCheckpointIO()] if variant == "model_checkpoint_async" else []
        return [callback], plugins, True
    saver = CheckpointSaver(
        folder=folder,
        save_interval=f"{every}ba",
        async_save=variant == "saver_async",
        overwrite=True,
        run_name="bench",
    )
    return [saver], [], True


def fit_once(variant: str, cfg: dict[str, Any], folder: str) -> dict[str, Any]:
    """One ``fit`` of a fresh model; returns its total time and its step times."""
    torch.manual_seed(0)
    width, layers = cfg["shape"]
    model = Net(width, layers)
    data = DataLoader(TensorDataset(torch.randn(cfg["steps"] * BATCH, width)), batch_size=BATCH)
    callbacks, plugins, checkpointing = build(variant, folder, cfg["every"])
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=cfg["steps"],
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpointing,
        num_sanity_val_steps=0,
        default_root_dir=folder,
        callbacks=[timer, *callbacks],
        plugins=plugins,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    returned = time.perf_counter()
    total = returned - start
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    saved = [
        n for n in names if not os.path.islink(os.path.join(folder, n)) and not n.endswith(".symlink")
        and not n.startswith(".")  # the run's folder lock
    ]  # fmt: skip
    return {
        "total_s": total,
        "steps_s": timer.steps(),
        "tail_s": returned - timer.end,  # on_train_end -> fit returns: teardown, waits for background writes
        "saved": len(saved),
        "names": saved[:3],
    }


def inner_steps(steps: list[float], every: int) -> tuple[list[int], list[float]]:
    """Indices of the saving steps and times of the other steps, without the first and last step."""
    inner = range(1, len(steps) - 1)  # no first step (warm-up), no last one (ends at on_train_end)
    return [i for i in inner if (i + 1) % every == 0], [steps[i] for i in inner if (i + 1) % every != 0]


def stalls(steps: list[float], every: int, base: float) -> tuple[list[float], list[float]]:
    """Per-save stall and the extra time of the steps after each save, both against the step time ``base``."""
    saving, _ = inner_steps(steps, every)
    after = [sum(steps[j] - base for j in range(i + 1, min(i + every, len(steps) - 1))) for i in saving]
    return [steps[i] - base for i in saving], after


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=float, default=None, help="MiB of fp32 parameters (default 300; smoke 4)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per fit (default 40; smoke 8)")
    parser.add_argument("--every", type=int, default=None, help="save every N steps (default 4; smoke 2)")
    parser.add_argument("--reps", type=int, default=None, help="fits per variant (default 3; smoke 1)")
    parser.add_argument("--variants", default="", help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--dir", default=None, help="scratch directory (default benchmarks/results)")
    parser.add_argument("--json", default=None, help="write every figure here")
    parser.add_argument("--smoke", action="store_true", help="tiny and quick: every variant once")
    args = parser.parse_args()
    mib = args.mib if args.mib is not None else (4.0 if args.smoke else 300.0)
    steps = args.steps if args.steps is not None else (8 if args.smoke else 40)
    every = args.every if args.every is not None else (2 if args.smoke else 4)
    reps = args.reps if args.reps is not None else (1 if args.smoke else 3)
    variants = [v for v in (args.variants.split(",") if args.variants else VARIANTS) if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if every < 2 or steps < 2 * every:
        parser.error("--every must be at least 2 (steps without a save are the reference) and --steps >= 2 x --every")
    base = args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench_fit_", dir=base)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    logging.getLogger("lightning_ckpt").setLevel(logging.INFO if os.environ.get("BENCH_LOG") else logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    facts = machine_facts(base)
    print(machine_line(facts), flush=True)
    shape = shape_for(mib)
    params = shape[1] * (shape[0] * shape[0] + shape[0])
    cfg = {"mib": mib, "steps": steps, "every": every, "reps": reps, "shape": shape, "params": params}
    print(
        f"Model: {shape[1]} x Linear({shape[0]}, {shape[0]}) = {params * 4 / MIB:.0f} MiB of parameters,"
        f" checkpoint ~{params * 12 / MIB:.0f} MiB (Adam); {steps} steps, a save every {every}; {reps} reps",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    errors: dict[str, str] = {}
    try:
        for variant in variants:  # imports, threads and first-use costs out of the way, untimed
            warm = os.path.join(work, f"warmup-{variant}")
            try:
                fit_once(variant, {**cfg, "steps": 2 * every}, warm)
            except Exception as err:
                errors[variant] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            finally:
                remove(warm)
        for rep in range(reps):
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for variant in order:
                if variant in errors:
                    continue
                folder = os.path.join(work, f"{variant}-{rep}")
                try:
                    run = fit_once(variant, cfg, folder)
                except Exception as err:
                    errors[variant] = f"{type(err).__name__}: {err}"
                    traceback.print_exc()
                    continue
                finally:
                    remove(folder)
                    os.sync()  # nothing of this run left to write back during the next one
                    gc.collect()
                    malloc_trim()
                runs[variant].append(run)
                print(f"  rep {rep} {variant}: {run['total_s']:.2f} s, {run['saved']} checkpoints", flush=True)
    finally:
        remove(work)

    rows: dict[str, dict[str, Any]] = {}
    base_total = summarize([r["total_s"] for r in runs.get("none", [])])["median"]
    clean = summarize([t for r in runs.get("none", []) for t in inner_steps(r["steps_s"], every)[1]])["median"]
    for variant in variants:
        if variant in errors:
            rows[variant] = {"label": VARIANTS[variant], "error": errors[variant]}
            continue
        totals = [r["total_s"] for r in runs[variant]]
        per_save, after, own_stall, normal = [], [], [], []
        for r in runs[variant]:
            own = statistics.median(inner_steps(r["steps_s"], every)[1])
            normal.append(own)
            s, a = stalls(r["steps_s"], every, clean if clean is not None else own)
            per_save += s
            after += a
            own_stall += stalls(r["steps_s"], every, own)[0]
        total = summarize(totals)
        overhead = None if base_total is None else total["median"] - base_total
        rows[variant] = {
            "label": VARIANTS[variant],
            "total_s": total,
            "overhead_s": overhead,
            "overhead_pct": None if overhead is None or not base_total else 100 * overhead / base_total,
            "normal_step_s": summarize(normal),
            "stall_per_save_s": summarize(per_save) if variant != "none" else summarize([]),
            "stall_vs_own_steps_s": summarize(own_stall) if variant != "none" else summarize([]),
            "baseline": "median step of the no-checkpointing fits" if clean is not None else "own other steps",
            "steps_after_save_s": summarize(after) if variant != "none" else summarize([]),
            "tail_s": summarize([r["tail_s"] for r in runs[variant]]),
            "checkpoints": [r["saved"] for r in runs[variant]],
            "steps_s": [r["steps_s"] for r in runs[variant]],
        }

    print(f"\n### Trainer.fit, {steps} steps, save every {every}; {reps} reps; median (min..max)\n")
    print(
        "| variant | fit s | overhead s | overhead % | stall per save s | stall vs own steps s | steps after save s"
        " | step s | tail s | checkpoints |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows.values():
        if "error" in row:
            print(f"| {row['label']} | error: {row['error'][:150]} |" + " |" * 8)
            continue
        over = "—" if row["overhead_s"] is None else f"{row['overhead_s']:+.2f}"
        pct = "—" if row["overhead_pct"] is None else f"{row['overhead_pct']:+.0f}%"
        print(
            f"| {row['label']} | {cell(row['total_s'], '{:.2f}')} | {over} | {pct}"
            f" | {cell(row['stall_per_save_s'])} | {cell(row['stall_vs_own_steps_s'])}"
            f" | {cell(row['steps_after_save_s'])}"
            f" | {cell(row['normal_step_s'])} | {cell(row['tail_s'])} | {max(row['checkpoints'], default=0)} |"
        )
    print(
        "\nstall per save: saving step (on_train_batch_start to the next one) - median step of the no-checkpointing"
        " fits; stall vs own steps: - median other step of the same fit (hides a slowdown of every step);"
        " steps after save: extra time of the following steps over the no-checkpointing step, summed per save;"
        " tail: from on_train_end until fit returns (teardown; waits for the last background write)."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "config": cfg, "rows": rows}, f, indent=1)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
