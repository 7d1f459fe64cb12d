"""Incremental checkpoints on a mostly frozen model: bytes and time per save, stall, storage kept.

A ``Trainer`` fits a model of ``--mib`` MiB of fp32 parameters of which ``--frozen`` (default
95 %) is a frozen base (square ``Linear`` layers, ``requires_grad=False``) and the rest a trained
adapter (Adam on it alone), for ``--saves`` saves, one every ``--every`` steps, with
``CheckpointSaver(num_checkpoints_to_keep=3)``:

* ``incremental``: ``incremental=True`` (the default ``full_every=10``: the first save is the full base);
* ``full``: ``incremental=False``, every save writes everything;
  both synchronous (``async_save=False``: the save blocks until durable) and asynchronous;
* ``dcp.save``: ``torch.distributed.checkpoint.save`` of the same model and optimizer state dicts
  (``FileSystemWriter(sync_files=True)``), the state of the last step, ``--reps`` times.

Reported per variant (medians over the saves after the first, and over ``--reps`` fits): bytes
written per save (the files in the checkpoint's own directory, read from its manifest at commit) and
the ratio to the bytes that changed (the adapter, its two Adam moments and step counters: the
model's frozen part is unchanged by construction); durable time per save (save call to commit,
less any wait for the previous save) and its ratio to the full save's; stall (how long the save
call blocked training); storage used in the folder after the last save.

Usage::

    python benchmarks/bench_incremental.py [--mib 1024] [--saves 10] [--every 2] [--reps 3] [--json out.json]
    python benchmarks/bench_incremental.py --smoke     # 16 MiB, 4 saves, 1 rep, for CI
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any

import lightning as L
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ckpt import CheckpointSaver, ShardedCheckpointIO, WriterHook
from lightning_ckpt.reader import read_manifest
from lightning_ckpt.storage import Storage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_common import MIB, cell, machine_facts, machine_line, remove, summarize

WIDTH = 2048


class Adapted(L.LightningModule):
    """A frozen stack of ``Linear(WIDTH, WIDTH)`` and a trained adapter ``Linear(WIDTH, adapter)``."""

    def __init__(self, layers: int, adapter: int) -> None:
        super().__init__()
        self.base = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
        self.base.requires_grad_(False)
        self.adapter = nn.Linear(WIDTH, adapter)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            hidden = self.base(batch[0])
        return self.adapter(hidden).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.adapter.parameters(), lr=1e-4)


class Written(WriterHook):
    """Records, at each commit, the bytes of the checkpoint's own files (what the save wrote)."""

    def __init__(self) -> None:
        self.bytes: list[int] = []

    def pre_commit(self, path: str, *, rank: int) -> None:
        pass

    def post_commit(self, path: str, *, rank: int) -> None:
        storage, ckpt_dir = Storage.open(path)
        self.bytes.append(sum(f.size for f in read_manifest(storage, ckpt_dir).own_files))


class Saves(L.Callback):
    """Keeps every save's stats object (filled in once the save is durable)."""

    def __init__(self) -> None:
        self.stats: list[Any] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        last = trainer.strategy.checkpoint_io.last_save  # type: ignore[union-attr]
        if last is not None and (not self.stats or self.stats[-1] is not last):
            self.stats.append(last)


def shape_for(mib: float, frozen: float) -> tuple[int, int]:
    """Base layers and adapter width for ~``mib`` MiB of parameters, ``frozen`` of them in the base."""
    layer = WIDTH * (WIDTH + 1) * 4
    layers = max(1, round(mib * MIB * frozen / layer))
    adapter = max(1, round(mib * MIB * (1 - frozen) / ((WIDTH + 1) * 4)))
    return layers, adapter


def changed_bytes(model: Adapted) -> int:
    """What changes between saves: the adapter, its Adam moments (same size) and their step counters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(3 * p.nbytes for p in trainable) + 4 * len(trainable)


def fit_once(cfg: dict[str, Any], folder: str, incremental: bool, asynchronous: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Adapted(*cfg["shape"])
    steps = cfg["saves"] * cfg["every"]
    data = DataLoader(TensorDataset(torch.randn(steps * 4, WIDTH)), batch_size=4)
    hook, saves = Written(), Saves()
    saver = CheckpointSaver(folder, filename="ba{batch}", save_interval=f"{cfg['every']}ba", num_checkpoints_to_keep=3,
                            incremental=incremental, async_save=asynchronous, run_name="bench")  # fmt: skip
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=folder,
        callbacks=[saver, saves], plugins=[ShardedCheckpointIO(writer_hooks=[hook])],
    )  # fmt: skip
    trainer.fit(model, data)
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs
                 if not os.path.islink(os.path.join(d, f)))  # fmt: skip
    return {
        "written": hook.bytes,
        "durable": [s.durable_s - s.waited_s for s in saves.stats],
        "stall": [s.blocking_s for s in saves.stats],
        "stored": stored,
        "changed": changed_bytes(model),
        "model": model,
        "optimizer": trainer.optimizers[0],
    }


def dcp_once(model: Adapted, optimizer: torch.optim.Optimizer, folder: str) -> tuple[float, int]:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    start = time.perf_counter()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(folder, sync_files=True, thread_count=4))
    took = time.perf_counter() - start
    return took, sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


VARIANTS = {
    "incremental_sync": ("CheckpointSaver(incremental=True, async_save=False)", True, False),
    "full_sync": ("CheckpointSaver(incremental=False, async_save=False)", False, False),
    "incremental_async": ("CheckpointSaver(incremental=True, async_save=True)", True, True),
    "full_async": ("CheckpointSaver(incremental=False, async_save=True)", False, True),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=float, default=None, help="MiB of fp32 parameters (default 1024; smoke 16)")
    parser.add_argument("--frozen", type=float, default=0.95, help="share of the parameters that is frozen")
    parser.add_argument("--saves", type=int, default=None, help="saves per fit (default 10; smoke 4)")
    parser.add_argument("--every", type=int, default=2, help="steps between saves")
    parser.add_argument("--reps", type=int, default=None, help="fits per variant (default 3; smoke 1)")
    parser.add_argument("--dir", default=None, help="scratch directory (default benchmarks/results)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    mib = args.mib if args.mib is not None else (16.0 if args.smoke else 1024.0)
    saves = args.saves if args.saves is not None else (4 if args.smoke else 10)
    reps = args.reps if args.reps is not None else (1 if args.smoke else 3)
    if saves < 2 or not 0 < args.frozen < 1:
        parser.error("--saves must be at least 2 and --frozen between 0 and 1")
    base = args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench_incremental_", dir=base)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_ckpt"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    facts = machine_facts(base)
    print(machine_line(facts), flush=True)
    shape = shape_for(mib, args.frozen)
    cfg = {"shape": shape, "saves": saves, "every": args.every}
    params = shape[0] * WIDTH * (WIDTH + 1) + shape[1] * (WIDTH + 1)
    frozen_pct = 100 * shape[0] * WIDTH * (WIDTH + 1) / params
    print(f"Model: {shape[0]} frozen x Linear({WIDTH}, {WIDTH}) + adapter Linear({WIDTH}, {shape[1]}) ="
          f" {params * 4 / MIB:.0f} MiB of parameters, {frozen_pct:.1f} % frozen; Adam on the adapter;"
          f" {saves} saves, one every {args.every} steps, keep 3; {reps} reps", flush=True)  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    dcp_times: list[float] = []
    dcp_bytes = 0
    changed = 0
    try:
        for rep in range(reps):
            for variant, (_, incremental, asynchronous) in VARIANTS.items():
                folder = os.path.join(work, f"{variant}-{rep}")
                run = fit_once(cfg, folder, incremental, asynchronous)
                remove(folder)
                changed = run["changed"]
                if variant == "full_sync":
                    target = os.path.join(work, f"dcp-{rep}")
                    took, dcp_bytes = dcp_once(run["model"], run["optimizer"], target)
                    dcp_times.append(took)
                    shutil.rmtree(target)
                del run["model"], run["optimizer"]
                runs[variant].append(run)
                print(f"  rep {rep} {variant}: written {[round(b / MIB, 1) for b in run['written']]} MiB", flush=True)
    finally:
        remove(work)

    rows: dict[str, dict[str, Any]] = {}
    for variant, (label, _, _) in VARIANTS.items():
        later = [b for r in runs[variant] for b in r["written"][1:]]  # after the first (full) save
        rows[variant] = {
            "label": label,
            "written_mib": summarize([b / MIB for b in later]),
            "durable_s": summarize([d for r in runs[variant] for d in r["durable"][1:]]),
            "stall_s": summarize([s for r in runs[variant] for s in r["stall"][1:]]),
            "stored_mib": summarize([r["stored"] / MIB for r in runs[variant]]),
        }
    rows["dcp"] = {
        "label": "torch.distributed.checkpoint.save (sync_files=True)",
        "written_mib": summarize([dcp_bytes / MIB] * len(dcp_times)),
        "durable_s": summarize(dcp_times),
        "stall_s": summarize(dcp_times),
        "stored_mib": summarize([3 * dcp_bytes / MIB]),  # keep 3: three full saves
    }
    changed_mib = changed / MIB
    print(f"\n### {saves} saves, one every {args.every} steps, keep 3; medians of the saves after the first"
          f" (min..max); changed per save: {changed_mib:.1f} MiB\n")  # fmt: skip
    print("| variant | written per save MiB | written / changed | durable per save s | vs full (same mode)"
          " | stall s | storage after last save MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    full_of = {"incremental_sync": "full_sync", "incremental_async": "full_async", "dcp": "full_sync"}
    for variant, row in rows.items():
        written = row["written_mib"]["median"]
        full = rows.get(full_of.get(variant, variant), row)["durable_s"]["median"]
        versus = row["durable_s"]["median"] / full if full else None
        row["written_over_changed"] = written / changed_mib if written is not None and changed_mib else None
        row["durable_vs_full"] = versus
        print(
            f"| {row['label']} | {cell(row['written_mib'], '{:.1f}')} | {row['written_over_changed']:.2f}x"
            f" | {cell(row['durable_s'])} | {'—' if versus is None else f'{versus:.2f}x'}"
            f" | {cell(row['stall_s'])} | {cell(row['stored_mib'], '{:.0f}')} |"
        )
    print("\nwritten: the files in the checkpoint's own directory; changed: the adapter, its Adam moments and steps;"
          " durable: save call to commit, less any wait for the previous save; the dcp row is one save of the"
          " final state (storage: three of them).")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "config": {**cfg, "mib": mib, "frozen": args.frozen, "reps": reps},
                       "changed_mib": changed_mib, "rows": rows, "runs": runs}, f, indent=1, default=str)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
