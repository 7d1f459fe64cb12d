"""Resume latency: from process start to the end of the first training step after ``fit(ckpt_path=...)``.

A model of ``--mib`` MiB of fp32 parameters (square ``Linear`` layers, Adam: a checkpoint is ~3x
that) is trained for 2 steps once per variant and checkpointed (untimed). Then, ``--reps`` times per
variant, in a rotating order and with the page cache dropped first, a fresh Python process starts,
imports Lightning, builds the trainer and resumes; it reports when its first training step ends
(forward, backward and the optimizer's update: costs a loader defers, such as copy-on-write faults
of optimizer state mapped from the file, are paid there),
measured from just before the parent started it:

* ``ModelCheckpoint``: ``ModelCheckpoint`` through Lightning's default ``TorchCheckpointIO``,
  resumed with ``ckpt_path=<its last.ckpt>``;
* ``CheckpointSaver``: this package, resumed with ``ckpt_path="last"``;
* ``none``: the same process without resuming (imports, trainer and first step: the floor);
* the same three under ``ModelParallelStrategy`` (1 process, gloo, each layer ``fully_shard``-ed in
  ``configure_model``), marked ``(FSDP2)``: ``ModelCheckpoint`` there is Lightning's DCP path
  (``torch.distributed.checkpoint`` save and load); ``CheckpointSaver`` loads in place, reading each
  piece straight into the sharded parameters and the optimizer state the strategy created.

Usage::

    python benchmarks/bench_resume.py [--mib 300] [--reps 5] [--dir PATH] [--json out.json]
    python benchmarks/bench_resume.py --smoke      # 4 MiB, 1 rep, for CI

Example:
    >>> widths_for(4)
    (1024, 1)
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = [
    "none", "ModelCheckpoint", "CheckpointSaver", "none (FSDP2)", "ModelCheckpoint (FSDP2)", "CheckpointSaver (FSDP2)"
]  # fmt: skip

# One resume in a fresh process. argv: variant, root, width, layers, parent's start time.
_CHILD = """
import os, sys, time
variant, root, width, layers, started = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[6])))
from bench_resume import build
trainer, model, ckpt_path = build(variant, root, width, layers, steps=3, first_step_at=started)
trainer.fit(model, ckpt_path=ckpt_path)
"""

# The checkpoint a variant resumes from: 2 steps in a fresh process. argv: variant, root, width, layers.
_PREPARE = """
import os, sys
variant, root, width, layers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[5])))
from bench_resume import build
trainer, model, _ = build(variant, root, width, layers, steps=2)
trainer.fit(model)
"""


def widths_for(mib: float) -> tuple[int, int]:
    """``(width, layers)`` of square ``Linear`` layers (weights only) making about ``mib`` MiB of fp32."""
    width = 1024 if mib < 64 else 2048
    return width, max(1, round(mib * 2**20 / (4 * width * width)))


def build(variant: str, root: str, width: int, layers: int, *, steps: int, first_step_at: float | None = None) -> Any:
    """``(trainer, model, ckpt_path)`` for ``variant``; with ``first_step_at``, print the resume latency and exit."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ckpt import CheckpointSaver

    parallel = variant.endswith("(FSDP2)")
    kind = variant.removesuffix(" (FSDP2)")

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])

        def configure_model(self) -> None:
            if parallel:
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for layer in self.net:
                    fully_shard(layer, mesh=mesh)
                fully_shard(self.net, mesh=mesh)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

        def train_dataloader(self) -> DataLoader[Any]:
            return DataLoader(TensorDataset(torch.randn(16, width)), batch_size=2)

    class FirstStep(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if first_step_at is not None:
                step = trainer.global_step - 1  # the step this batch started at
                print(json.dumps({"resume_s": time.time() - first_step_at, "step": step}), flush=True)
                os._exit(0)

    folder = os.path.join(root, variant.replace(" ", "_").replace("(", "").replace(")", ""))
    callbacks: list[L.Callback] = [FirstStep()]
    ckpt_path: str | None = None
    if kind == "ModelCheckpoint":
        callbacks.append(ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_last=True))
        ckpt_path = os.path.join(folder, "last.ckpt") if first_step_at is not None else None
    elif kind == "CheckpointSaver":
        callbacks.append(CheckpointSaver(folder=folder, save_interval="2ba", async_save=False, run_name="bench"))
        ckpt_path = "last" if first_step_at is not None else None
    strategy: Any = "auto"
    if parallel:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer = L.Trainer(
        default_root_dir=root, accelerator="cpu", devices=1, max_steps=steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        enable_checkpointing=kind != "none", strategy=strategy,
    )  # fmt: skip
    return trainer, Model(), ckpt_path


def _drop_cache(root: str) -> None:
    from _bench_common import drop_cache

    drop_cache(root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=float, default=300)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where the scratch folder goes (default: benchmarks/results)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.mib, args.reps = 4, 1
    sys.path.insert(0, HERE)
    from _bench_common import cell, machine_facts, machine_line, ratio, summarize

    parent = args.dir or os.path.join(HERE, "results")
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="bench-resume-", dir=parent)
    width, layers = widths_for(args.mib)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, HERE]), "OMP_NUM_THREADS": "2"}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for variant in VARIANTS:  # the checkpoints to resume from (untimed), each in its own process
            if not variant.startswith("none"):
                command = [sys.executable, "-c", _PREPARE, variant, root, str(width), str(layers), __file__]
                out = subprocess.run(command, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    raise RuntimeError(f"{variant}: {out.stderr[-3000:]}")
        for rep in range(args.reps):
            for variant in VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]:
                _drop_cache(root)
                command = [sys.executable, "-c", _CHILD, variant, root, str(width), str(layers)]
                started = time.time()
                out = subprocess.run([*command, str(started), __file__], env=env, capture_output=True, text=True)
                lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
                if out.returncode != 0 or not lines:
                    raise RuntimeError(f"{variant}: {out.stderr[-3000:]}")
                result = json.loads(lines[-1])
                if not variant.startswith("none") and result["step"] != 2:
                    raise RuntimeError(f"{variant} resumed at step {result['step']}, not 2")
                times[variant].append(result["resume_s"])
        facts = machine_facts(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = {v: summarize(t) for v, t in times.items()}
    print(machine_line(facts))
    print(f"model: {layers} x Linear({width}, {width}), {layers * width * width * 4 / 2**20:.0f} MiB of weights, Adam")
    print("| variant | start to end of first step s | over none s |")
    print("|---|---|---|")
    for v in VARIANTS:
        floor = "none (FSDP2)" if v.endswith("(FSDP2)") else "none"
        over = rows[v]["median"] - rows[floor]["median"]
        print(f"| {v} | {cell(rows[v])} | {'—' if v == floor else f'{over:.3f}'} |")
    print()
    for suffix in ("", " (FSDP2)"):
        none, theirs, ours = (rows[v + suffix]["median"] for v in ("none", "ModelCheckpoint", "CheckpointSaver"))
        speedup, overhead = ratio(theirs, ours), ratio(theirs - none, ours - none)
        print(f"ModelCheckpoint{suffix} / CheckpointSaver{suffix}: {'—' if speedup is None else f'{speedup:.2f}'}"
              f"; their resume cost / ours (over none): {'—' if overhead is None else f'{overhead:.2f}'}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": facts, "width": width, "layers": layers, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
