"""Smoke tests of the benchmark scripts: each runs with ``--smoke`` in a subprocess and reports every peer.

They check that the scripts run end to end and write a figure for every peer; they assert no
timings (the machines are shared and noisy).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

CHECKPOINT_PEERS = [
    *("torch_io", "async_io", "torch_save", "dcp", "dcp_async", "safetensors"),
    *("ours_sync", "ours_async", "ours_verify"),
]
CHECKPOINT_LIMITS = ["limit_copy", "limit_write", "limit_write_direct", "limit_read", "limit_read_direct"]
FIT_VARIANTS = ["none", "model_checkpoint", "model_checkpoint_async", "saver_sync", "saver_async"]


def run_script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(BENCH / name), "--smoke", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )


def positive(summary: Any) -> bool:
    return isinstance(summary, dict) and isinstance(summary.get("median"), float) and summary["median"] > 0


@pytest.mark.timeout(120)
def test_bench_checkpoint_smoke(tmp_path: Path) -> None:
    out = tmp_path / "checkpoint.json"
    proc = run_script("bench_checkpoint.py", "--dir", str(tmp_path), "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| peer / limit |" in proc.stdout and "| ratio | value |" in proc.stdout
    report = json.loads(out.read_text())
    rows = report["results"]["1"]["rows"]
    assert set(CHECKPOINT_PEERS + CHECKPOINT_LIMITS) <= set(rows)
    for key in CHECKPOINT_PEERS:
        row = rows[key]
        assert "error" not in row, row
        for field in ("save_call_s", "durable_s", "load_s", "saving_step_s", "normal_step_s"):
            assert positive(row[field]), (key, field, row[field])
        assert math.isfinite(row["stall_s"]["median"])  # a difference of two times: may be <= 0 in the noise
        assert row["correct"] is True, key
        if row["async"]:
            assert math.isfinite(row["bg_slowdown_s"]["median"])
    assert positive(rows["limit_copy"]["stall_s"])
    for key in ("limit_write", "limit_write_direct"):
        assert positive(rows[key]["durable_s"]), key
    for key in ("limit_read", "limit_read_direct"):
        assert positive(rows[key]["load_s"]), key
    assert report["machine"]["cpus"] >= 1 and report["machine"]["filesystem"]
    assert os.listdir(tmp_path) == ["checkpoint.json"]  # scratch files removed


@pytest.mark.timeout(120)
def test_bench_fit_smoke(tmp_path: Path) -> None:
    out = tmp_path / "fit.json"
    proc = run_script("bench_fit.py", "--dir", str(tmp_path), "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| variant | fit s |" in proc.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert set(FIT_VARIANTS) <= set(rows)
    steps, every = report["config"]["steps"], report["config"]["every"]
    for key in FIT_VARIANTS:
        row = rows[key]
        assert "error" not in row, row
        assert positive(row["total_s"]), key
        assert positive(row["normal_step_s"]), key
        assert all(len(s) == steps for s in row["steps_s"]), key
        if key == "none":
            assert row["checkpoints"] == [0]
        else:
            assert row["checkpoints"] == [steps // every], key
            assert math.isfinite(row["stall_per_save_s"]["median"]), key
            assert isinstance(row["overhead_s"], float), key
    assert os.listdir(tmp_path) == ["fit.json"]


@pytest.mark.timeout(120)
def test_bench_preemption_check_smoke(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    proc = run_script("bench_preemption_check.py", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| step time | ours: checks |" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["check_us"]) == {"ours", "lightning"} and all(v > 0 for v in report["check_us"].values())
    assert [row["every_n_steps"] for row in report["rows"]] == [100, 20, 5, 1]


@pytest.mark.timeout(120)
def test_bench_cli_startup_smoke(tmp_path: Path) -> None:
    out = tmp_path / "cli.json"
    proc = run_script("bench_cli_startup.py", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| variant | start to exit s |" in proc.stdout and "| with Lightning / ours |" in proc.stdout
    variants = json.loads(out.read_text())["variants"]
    assert set(variants) == {"ours", "with_lightning_imported", "import_torch"}
    assert all(positive(v) for v in variants.values()), variants


@pytest.mark.timeout(120)
def test_bench_many_tensors_smoke(tmp_path: Path) -> None:
    out = tmp_path / "many.json"
    proc = run_script("bench_many_tensors.py", "--dir", str(tmp_path), "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| peer | save s |" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    for key in ("ours", "torch_save", "torch_save_fsync", "dcp"):
        assert positive(rows[key]["save_s"]) and positive(rows[key]["load_s"]), (key, rows[key])
        assert rows[key]["correct"] is True, key
    assert os.listdir(tmp_path) == ["many.json"]  # scratch files removed


@pytest.mark.timeout(180)
def test_bench_sharded_smoke(tmp_path: Path) -> None:
    out = tmp_path / "sharded.json"
    proc = run_script("bench_sharded.py", "--dir", str(tmp_path), "--json", str(out), timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| method | stall s | durable s |" in proc.stdout and "| ratio | value |" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    for method in ("dcp_save", "dcp_async_save", "ours_sync", "ours_async", "limit_write"):
        assert positive(rows[method]["durable_s"]), method
        assert math.isfinite(rows[method]["peak_extra_mib"]["median"]), method
    for method in ("dcp_load_cold", "ours_load_cold", "dcp_load_warm", "ours_load_warm"):
        assert positive(rows[method]["load_s"]), method
    assert os.listdir(tmp_path) == ["sharded.json"]  # scratch files removed


@pytest.mark.timeout(180)
def test_bench_resume_smoke(tmp_path: Path) -> None:
    out = tmp_path / "resume.json"
    proc = run_script("bench_resume.py", "--dir", str(tmp_path), "--json", str(out), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| variant | start to end of first step s |" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    for variant in ("none", "ModelCheckpoint", "CheckpointSaver", "ModelCheckpoint (FSDP2)", "CheckpointSaver (FSDP2)"):
        # each resumed at step 2, or the script fails
        assert positive(rows[variant]), variant
    assert os.listdir(tmp_path) == ["resume.json"]  # scratch files removed


@pytest.mark.timeout(180)
def test_bench_incremental_smoke(tmp_path: Path) -> None:
    out = tmp_path / "incremental.json"
    proc = run_script("bench_incremental.py", "--dir", str(tmp_path), "--json", str(out), timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| variant | written per save MiB | written / changed |" in proc.stdout
    report = json.loads(out.read_text())
    rows = report["rows"]
    for variant in ("incremental_sync", "full_sync", "incremental_async", "full_async", "dcp"):
        assert positive(rows[variant]["durable_s"]), variant
    # the deltas write what changed (and a header and objects.pt), the full saves everything
    assert rows["incremental_sync"]["written_over_changed"] < 1.5 < rows["full_sync"]["written_over_changed"]
    assert rows["incremental_async"]["stored_mib"]["median"] < rows["full_async"]["stored_mib"]["median"]
    assert os.listdir(tmp_path) == ["incremental.json"]  # scratch files removed
