"""The SIGKILL points act only where a test worker installs the hook: the package never reads the variable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT
from .faults import ENV_VAR

_SAVE = """
import sys, torch
from lightning_ckpt.collective import save_checkpoint_dir
save_checkpoint_dir({"w": torch.arange(4096.0), "global_step": 1}, sys.argv[1])
"""
_HOOKED = "from tests.faults import install_from_env\ninstall_from_env()\n"


def _save(code: str, path: Path, kill_at: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), ENV_VAR: kill_at}
    return subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip


def test_a_process_without_the_hook_ignores_the_kill_variable(tmp_path: Path) -> None:
    done = _save(_SAVE, tmp_path / "ep0-ba1", "shard.before")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "ep0-ba1" / "manifest.json").is_file()


def test_the_hook_kills_halfway_through_the_shard_and_nothing_is_committed(tmp_path: Path) -> None:
    done = _save(_HOOKED + _SAVE, tmp_path / "ep0-ba1", "shard.half")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (tmp_path / "ep0-ba1").exists()
    (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith(".ep0-ba1.partial-")]
    (shard,) = staging.iterdir()
    assert shard.name == "shard-00000-of-00001.safetensors"
    assert shard.stat().st_size == (4096 + 4096 * 4) // 2, "half of the header and the tensor bytes, made durable"
