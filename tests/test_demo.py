"""``python -m lightning_ckpt.demo`` (README): a run killed with SIGKILL, resumed, equal to an uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_the_demo_is_killed_resumes_from_last_and_ends_bitwise_equal(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "lightning_ckpt.demo"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert "1. training process killed at step 10 (exit code -9)" in lines
    assert "on disk: ['.lightning_ckpt.lock', 'ep0-ba4', 'ep0-ba8', 'latest', 'latest.symlink']" in lines
    assert "newest committed checkpoint: ep0-ba8" in lines
    assert "3. resumed weights equal an uninterrupted run bit for bit: True" in lines
