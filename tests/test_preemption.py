"""Preemption: SIGTERM or SIGUSR1 from outside the training process asks for a save; then a clean exit.

The tests send real signals to real training processes in the middle of training (the worker
sleeps a little per step so the signal lands between steps at a random point, as on a cluster)
and then restart with ``ckpt_path="last"``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import torch

from lightning_ckpt import latest

from .faults import ENV_VAR
from .s3_server import S3Bucket
from .test_distributed import ROOT, WORKER, _torchrun


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop(ENV_VAR, None)
    return env


def _start(ranks: int, *args: str) -> subprocess.Popen[str]:
    if ranks == 1:  # one plain process, as `python train.py` on one machine
        cmd = [sys.executable, WORKER, "--devices", "1", *args]
    else:
        cmd = _torchrun(ranks, *args)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _wait_for_step(prefix: Path, rank: int, step: int, proc: subprocess.Popen[str], timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    marker = Path(f"{prefix}.rank{rank}.step")
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if marker.exists() and int(marker.read_text() or 0) >= step:
            return int(marker.read_text())
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} did not reach step {step}")


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _reference(ranks: int, root: Path) -> dict[str, torch.Tensor]:
    proc = _start(ranks, "--folder", str(root / "ref"), "--save-weights", str(root / "ref.pt"))
    code, err = _finish(proc)
    assert code == 0, err[-3000:]
    return torch.load(root / "ref.pt", weights_only=True)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_saves_at_the_next_step_exits_cleanly_and_the_restart_resumes_there(
    sig: signal.Signals, tmp_path: Path
) -> None:
    folder, marks = tmp_path / "ckpts", tmp_path / "marks"
    # No scheduled save before the end of the run: the only mid-run checkpoint is the preemption's.
    args = ["--folder", str(folder), "--interval", "100ba", "--mark-steps", str(marks)]
    proc = _start(1, *args, "--step-sleep", "0.3")
    signalled_after = _wait_for_step(marks, 0, 5, proc)
    os.kill(int(Path(f"{marks}.rank0.pid").read_text()), sig)
    code, err = _finish(proc)
    assert code == 0, err[-3000:]  # a clean exit, like Lightning's own SIGTERM handling
    assert f"Preemption ({sig.name}): saving a checkpoint" in err
    newest = latest(folder)
    assert newest is not None
    step = json.loads(Path(newest, "manifest.json").read_text())["global_step"]
    # The handler only sets a flag: the save happens at the first step boundary after the signal.
    assert signalled_after <= step <= signalled_after + 1, (signalled_after, step)
    assert int(Path(f"{marks}.rank0.step").read_text()) == step, "training stopped right after the save"

    resumed = _start(1, *args, "--resume", "--save-weights", str(tmp_path / "w.pt"))
    code, err = _finish(resumed)
    assert code == 0, err[-3000:]
    assert f"Restoring states from the checkpoint path at {newest}" in err
    assert _equal(torch.load(tmp_path / "w.pt", weights_only=True), _reference(1, tmp_path))


def test_ddp_signal_on_one_rank_saves_on_every_rank_flushes_uploads_and_resumes(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    folder, marks = f"{s3_bucket.url}/run", tmp_path / "marks"
    args = [
        "--folder",
        folder,
        "--s3-endpoint",
        s3_bucket.storage_options["client_kwargs"]["endpoint_url"],
        "--interval",
        "100ba",
    ]
    args += ["--local-folder", str(tmp_path / "local"), "--cache-dir", str(tmp_path / "cache")]
    proc = _start(2, *args, "--mark-steps", str(marks), "--step-sleep", "0.3")
    signalled_after = _wait_for_step(marks, 1, 3, proc)
    os.kill(int(Path(f"{marks}.rank1.pid").read_text()), signal.SIGUSR1)  # only rank 1 hears it
    code, err = _finish(proc)
    assert code == 0, err[-3000:]
    assert "Preemption (SIGUSR1): saving" in err and "Preemption (a signal on another rank): saving" in err
    newest = latest(folder, s3_bucket.storage_options)  # uploaded and committed in the store before exiting
    assert newest is not None
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options)
    manifest = json.loads(fs.cat_file(f"{newest}/manifest.json"))
    assert manifest["metadata"]["writer_ranks"] == [0, 1], "every rank wrote its shard"
    step = manifest["global_step"]
    assert signalled_after <= step <= signalled_after + 8, (signalled_after, step)  # ranks agree about once a second
    committed_in = re.search(r"committed ([\d.]+) s after the signal", err)
    assert committed_in is not None and float(committed_in.group(1)) < 30  # inside a typical grace period

    resumed = _start(
        2, *args, "--resume", "--save-weights", str(tmp_path / "w.pt"), "--cache-dir", str(tmp_path / "c2")
    )
    code, err = _finish(resumed)
    assert code == 0, err[-3000:]
    assert _equal(torch.load(tmp_path / "w.pt", weights_only=True), _reference(2, tmp_path))
