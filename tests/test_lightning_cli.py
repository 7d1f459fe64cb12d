"""``CheckpointSaver`` and ``ShardedCheckpointIO`` configured through a real ``LightningCLI``: from the command
line (in process), from a YAML file (in a subprocess), and resumed with ``fit --ckpt_path last``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI  # needs jsonargparse[signatures]: the test extra installs it

from lightning_ckpt import CheckpointSaver, RetryPolicy, ShardedCheckpointIO, latest, read_checkpoint
from lightning_ckpt.demo import TinyRegressor, state_of

ROOT = str(Path(__file__).resolve().parents[1])

# TinyRegressor: 64 samples, batch size 8 -> 8 steps per epoch.
QUIET = [
    "--seed_everything=0",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.deterministic=true",
    "--trainer.limit_val_batches=0",
]


def _committed(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.is_symlink() and (p / "manifest.json").is_file())


def _cli(root: Path, folder: Path, *extra: str, epochs: int) -> LightningCLI:
    args = [
        "fit",
        *QUIET,
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.callbacks+=lightning_ckpt.CheckpointSaver",
        f"--trainer.callbacks.folder={folder}",
        "--trainer.callbacks.filename=ep{epoch}-ba{batch}",
        "--trainer.callbacks.save_interval=2ba",
        "--trainer.callbacks.num_checkpoints_to_keep=2",
        "--trainer.callbacks.preemption_signals=[SIGTERM, SIGUSR1]",
        "--trainer.plugins+=lightning_ckpt.ShardedCheckpointIO",
        "--trainer.plugins.async_save=true",
        "--trainer.plugins.barrier_timeout_s=42",
        "--trainer.plugins.upload_retry=lightning_ckpt.RetryPolicy",
        "--trainer.plugins.upload_retry.attempts=3",
        *extra,
    ]
    return LightningCLI(TinyRegressor, args=args)


def _parts(cli: LightningCLI) -> tuple[CheckpointSaver, ShardedCheckpointIO]:
    savers = [c for c in cli.trainer.callbacks if isinstance(c, CheckpointSaver)]
    io = cli.trainer.strategy.checkpoint_io
    assert len(savers) == 1 and isinstance(io, ShardedCheckpointIO)
    return savers[0], io


def test_command_line_configures_both_and_fit_resumes_from_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # the command line is args=[...], not pytest's
    folder = tmp_path / "ckpts"
    first = _cli(tmp_path / "run1", folder, epochs=1)
    saver, io = _parts(first)

    assert io.async_save is True and io.barrier_timeout_s == 42.0
    assert io.upload_retry == RetryPolicy(attempts=3)
    assert saver.filename.pattern == "ep{epoch}-ba{batch}" and str(saver.save_interval) == "EveryNBatches(2)"
    assert first.trainer.global_step == 8
    assert _committed(folder) == ["ep0-ba6", "ep0-ba8"]  # every 2 batches, newest 2 kept
    assert latest(str(folder)) == str(folder / "ep0-ba8")
    assert read_checkpoint(str(folder / "ep0-ba8"))["global_step"] == 8
    assert io.last_save is not None

    resumed = _cli(tmp_path / "run2", folder, "--ckpt_path=last", epochs=2)
    _, resumed_io = _parts(resumed)
    assert resumed_io.loaded_path == str(folder / "ep0-ba8")
    assert resumed.trainer.global_step == 16 and resumed.trainer.current_epoch == 2
    # Newest 2 of this run; rotation never deletes the checkpoint the run resumed from.
    assert _committed(folder) == ["ep0-ba8", "ep1-ba14", "ep1-ba16"]

    straight = LightningCLI(
        TinyRegressor, args=["fit", *QUIET, f"--trainer.default_root_dir={tmp_path / 'run3'}", "--trainer.max_epochs=2"]
    )
    a, b = state_of(resumed.model), state_of(straight.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from a straight one"


SCRIPT = """
import json, sys
from lightning.pytorch.cli import LightningCLI
from lightning_ckpt import CheckpointSaver
from lightning_ckpt.demo import TinyRegressor

cli = LightningCLI(TinyRegressor)
io = cli.trainer.strategy.checkpoint_io
saver = next(c for c in cli.trainer.callbacks if isinstance(c, CheckpointSaver))
print("RESULT " + json.dumps({
    "io": type(io).__name__, "async_save": io.async_save, "barrier_timeout_s": io.barrier_timeout_s,
    "verify_checksums": io.verify_checksums, "attempts": io.upload_retry.attempts,
    "signals": sorted(int(s) for s in saver.preemption_signals), "step": cli.trainer.global_step,
}))
"""


def _yaml(folder: Path, root: Path) -> str:
    return f"""\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_ckpt.CheckpointSaver
      init_args:
        folder: {folder}/{{run_name}}
        run_name: yaml-run
        filename: "step{{batch}}"
        latest_filename: newest
        save_interval: 3ba
        num_checkpoints_to_keep: -1
        ignore_keys: [optimizer_states]
        storage_options: {{}}
        preemption_signals: [SIGTERM, 10]
  plugins:
    - class_path: lightning_ckpt.ShardedCheckpointIO
      init_args:
        async_save: true
        barrier_timeout_s: 30.5
        verify_checksums: false
        upload_retry:
          class_path: lightning_ckpt.RetryPolicy
          init_args: {{attempts: 2}}
"""


def _run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    command: Sequence[str] = [sys.executable, "-c", SCRIPT, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env, check=False)


def test_yaml_config_in_a_subprocess(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    config = tmp_path / "config.yaml"
    config.write_text(_yaml(folder, tmp_path / "root"))

    result = _run_script("fit", "--config", str(config))

    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    settings = json.loads(line[len("RESULT ") :])
    assert settings == {
        "io": "ShardedCheckpointIO",
        "async_save": True,
        "barrier_timeout_s": 30.5,
        "verify_checksums": False,
        "attempts": 2,
        "signals": [10, 15],
        "step": 8,
    }
    run = folder / "yaml-run"
    assert _committed(run) == ["step3", "step6"]  # every 3 batches of 8, all kept
    assert (run / "newest").resolve() == (run / "step6").resolve()  # the configured latest_filename
    assert latest(str(run)) == str(run / "step6")
    saved = read_checkpoint(str(run / "step6"))
    assert saved["global_step"] == 6 and "optimizer_states" not in saved  # ignore_keys took effect
