"""Rank-aware saving with real processes: torchrun, Lightning DDP, gloo on CPU. No patched ranks."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from lightning_ckpt import latest, read_checkpoint
from lightning_ckpt.lock import LOCK_FILENAME

from .s3_server import S3Bucket

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
ROOT = str(Path(__file__).resolve().parents[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(nproc: int, *args: str, nnodes: int = 1, node_rank: int = 0, port: int | None = None) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1:
        launcher += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--master_addr=127.0.0.1"]
    launcher += [f"--master_port={port or _free_port()}", WORKER, "--devices", str(nproc), "--num-nodes", str(nnodes)]
    return launcher + list(args)


def run_ddp(nproc: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        _torchrun(nproc, *args), capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def run_two_nodes(
    *args: str, timeout: float = 180, env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Two torchrun launchers on 127.0.0.1, one process each, like two single-GPU nodes.

    ``{node}`` in an argument becomes the launcher's node rank (for per-node local paths).
    """
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
    port = _free_port()
    procs = [
        subprocess.Popen(
            _torchrun(1, *(a.replace("{node}", str(n)) for a in args), nnodes=2, node_rank=n, port=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in (0, 1)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _committed(folder: Path) -> list[str]:
    return sorted(
        n for n in os.listdir(folder) if not (folder / n).is_symlink() and (folder / n / "manifest.json").exists()
    )


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def full_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """An uninterrupted 3-epoch DDP run that saves every epoch; returns (ranks, its directory)."""
    ranks = int(request.param)
    root = tmp_path_factory.mktemp(f"full{ranks}")
    _ok(
        run_ddp(
            ranks,
            "--folder",
            str(root / "ckpts"),
            "--hook-log",
            str(root / "hooks"),
            "--save-weights",
            str(root / "w.pt"),
        )
    )
    return ranks, root


def test_every_rank_writes_its_own_balanced_shard(full_run: tuple[int, Path]) -> None:
    ranks, root = full_run
    steps_per_epoch = {2: 4, 3: 3}[ranks]
    final = root / "ckpts" / f"ep2-ba{3 * steps_per_epoch}"
    manifest = json.loads((final / "manifest.json").read_text())
    shards = {f["name"]: f for f in manifest["files"] if f["name"].startswith("shard-")}
    assert sorted(shards) == [f"shard-{i:05d}-of-{ranks:05d}.safetensors" for i in range(ranks)]
    assert sorted(f["rank"] for f in shards.values()) == list(range(ranks)), "each rank wrote one shard"
    assert [f["rank"] for f in manifest["files"] if f["name"] == "objects.pt"] == [0]
    chunks = [chunk for tensor in manifest["tensors"] for chunk in tensor["chunks"]]  # DDP: one per tensor
    assert len(chunks) == len(manifest["tensors"])
    data = [sum(c["nbytes"] for c in chunks if c["file"] == name) for name in sorted(shards)]
    largest = max(c["nbytes"] for c in chunks)
    assert max(data) - min(data) <= largest, f"shards balanced by bytes: {data}"
    assert manifest["world_size"] == ranks and manifest["metadata"]["writer_ranks"] == list(range(ranks))
    assert _equal(read_checkpoint(str(final))["state_dict"], torch.load(root / "w.pt"))


def test_hooks_run_in_order_on_the_documented_ranks(full_run: tuple[int, Path]) -> None:
    ranks, root = full_run
    saves = _committed(root / "ckpts")
    logs = {r: (root / f"hooks.rank{r}.log").read_text().split("\n")[:-1] for r in range(ranks)}
    assert [line.rsplit(" ", 1)[0] for line in logs[0]] == [
        f"{phase} {name} {committed}"
        for name in saves
        for phase, committed in (("pre_commit", False), ("post_commit", True))
    ]
    for r in range(1, ranks):  # pre_commit on every rank, before the commit; post_commit on rank 0 only
        assert [line.rsplit(" ", 1)[0] for line in logs[r]] == [f"pre_commit {name} False" for name in saves]


def test_sigkill_of_one_rank_then_resume_equals_uninterrupted(full_run: tuple[int, Path], tmp_path: Path) -> None:
    ranks, root = full_run
    steps_per_epoch = {2: 4, 3: 3}[ranks]
    kill_at = steps_per_epoch + 2  # mid epoch 1: the newest committed checkpoint is the end of epoch 0
    folder = tmp_path / "ckpts"
    killed = run_ddp(ranks, "--folder", str(folder), "--kill-rank", str(ranks - 1), "--kill-at", str(kill_at))
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    assert latest(folder) == str(folder / f"ep0-ba{steps_per_epoch}")
    resumed = run_ddp(ranks, "--folder", str(folder), "--resume", "--save-weights", str(tmp_path / "w.pt"))
    _ok(resumed)
    assert _equal(torch.load(tmp_path / "w.pt"), torch.load(root / "w.pt"))


@pytest.mark.parametrize(("saved_by", "loaded_by"), [(2, 1), (2, 3), (1, 2)])
def test_checkpoint_written_by_n_ranks_loads_into_m_ranks(tmp_path: Path, saved_by: int, loaded_by: int) -> None:
    _ok(run_ddp(saved_by, "--folder", str(tmp_path / "a"), "--epochs", "1"))
    (ckpt,) = _committed(tmp_path / "a")
    assert len(json.loads((tmp_path / "a" / ckpt / "manifest.json").read_text())["files"]) == saved_by + 1
    loaded = run_ddp(
        loaded_by, "--folder", str(tmp_path / "b"), "--epochs", "2", "--ckpt-path", str(tmp_path / "a" / ckpt),
        "--dump-loaded", str(tmp_path / "loaded"),
    )  # fmt: skip
    _ok(loaded)
    expected = read_checkpoint(str(tmp_path / "a" / ckpt))["state_dict"]
    for rank in range(loaded_by):
        assert _equal(torch.load(tmp_path / f"loaded.rank{rank}.pt"), expected), f"rank {rank}"


def test_two_nodes_with_separate_local_folders_resume_after_a_node_dies(tmp_path: Path) -> None:
    folder = str(tmp_path / "node{node_rank}" / "ckpts")
    baseline = run_ddp(2, "--folder", str(tmp_path / "single" / "ckpts"), "--save-weights", str(tmp_path / "full.pt"))
    _ok(baseline)
    killed = run_two_nodes("--folder", folder, "--kill-rank", "1", "--kill-at", "6")
    assert all(r.returncode != 0 for r in killed)
    for node in (0, 1):  # each node's own disk holds a complete checkpoint: one shard, written by its own rank
        node_folder = tmp_path / f"node{node}" / "ckpts"
        assert _committed(node_folder) == ["ep0-ba4"]
        manifest = json.loads((node_folder / "ep0-ba4" / "manifest.json").read_text())
        assert {f["rank"] for f in manifest["files"]} == {node} and manifest["world_size"] == 1
    resumed = run_two_nodes("--folder", folder, "--resume", "--save-weights", str(tmp_path / "resumed.pt"))
    for result in resumed:
        _ok(result)
    assert _equal(torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "full.pt"))


def test_rank_in_names_gives_each_rank_its_own_checkpoints_pointer_and_rotation(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    args = [
        "--folder",
        str(folder),
        "--filename",
        "ep{epoch}-rank{rank}",
        "--latest",
        "latest-rank{rank}",
        "--keep",
        "1",
    ]
    _ok(run_ddp(2, *args))
    assert _committed(folder) == ["ep2-rank0", "ep2-rank1"], "rotation kept each rank's newest, nobody else's"
    for rank in (0, 1):
        assert os.readlink(folder / f"latest-rank{rank}") == f"ep2-rank{rank}"
        manifest = json.loads((folder / f"ep2-rank{rank}" / "manifest.json").read_text())
        assert {f["rank"] for f in manifest["files"]} == {rank}, "each rank wrote a complete checkpoint alone"
    resumed = run_ddp(2, *args, "--epochs", "4", "--resume", "--dump-loaded", str(tmp_path / "loaded"))
    _ok(resumed)
    for rank in (0, 1):
        expected = read_checkpoint(str(folder / f"ep2-rank{rank}"))["state_dict"]
        assert _equal(torch.load(tmp_path / f"loaded.rank{rank}.pt"), expected)
    # each rank's resumed-from checkpoint is protected from rotation for the rest of that run
    assert _committed(folder) == ["ep2-rank0", "ep2-rank1", "ep3-rank0", "ep3-rank1"]


def test_ddp_spawn_saves_collectively_and_resumes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    base = [sys.executable, WORKER, "--spawn", "--devices", "2", "--folder", str(tmp_path / "ckpts")]
    first = subprocess.run([*base, "--epochs", "1"], capture_output=True, text=True, timeout=180, env=env, check=False)
    _ok(first)
    files = json.loads((tmp_path / "ckpts" / "ep0-ba4" / "manifest.json").read_text())["files"]
    assert sorted(f["rank"] for f in files if f["name"].startswith("shard-")) == [0, 1]
    second = subprocess.run(
        [*base, "--epochs", "2", "--resume", "--save-weights", str(tmp_path / "w.pt")],
        capture_output=True, text=True, timeout=180, env=env, check=False,
    )  # fmt: skip
    _ok(second)
    assert _committed(tmp_path / "ckpts") == ["ep0-ba4", "ep1-ba8"]
    assert _equal(torch.load(tmp_path / "w.pt"), read_checkpoint(str(tmp_path / "ckpts" / "ep1-ba8"))["state_dict"])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".temp")], "spawn's weight hand-off was cleaned up"


def test_two_nodes_sharing_only_s3_resume_on_empty_disks(tmp_path: Path, s3_bucket: S3Bucket) -> None:
    endpoint = s3_bucket.storage_options["client_kwargs"]["endpoint_url"]
    folder = f"{s3_bucket.url}/run"

    def node_args(run: str) -> list[str]:
        local = str(tmp_path / run / "node{node}")
        return [
            "--s3-endpoint",
            endpoint,
            "--folder",
            folder,
            "--local-folder",
            f"{local}/ckpts",
            "--cache-dir",
            f"{local}/cache",
        ]

    _ok(run_ddp(2, "--folder", str(tmp_path / "single" / "ckpts"), "--save-weights", str(tmp_path / "full.pt")))
    killed = run_two_nodes(*node_args("first"), "--kill-rank", "1", "--kill-at", "6")
    assert all(r.returncode != 0 for r in killed)
    newest = latest(folder, s3_bucket.storage_options)
    assert newest is not None and newest.endswith("/run/ep0-ba4"), "the epoch-0 checkpoint reached the bucket"
    resumed = run_two_nodes(*node_args("fresh"), "--resume", "--save-weights", str(tmp_path / "resumed.pt"))
    for result in resumed:
        _ok(result)
    for node in (0, 1):  # each fresh node downloaded what it needed into its own empty cache
        assert list((tmp_path / "fresh" / f"node{node}" / "cache" / "downloads").glob("*/ep0-ba4/manifest.json"))
    assert _equal(torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "full.pt"))
    newest = latest(folder, s3_bucket.storage_options)
    assert newest is not None and newest.endswith("/run/ep2-ba12")


def _failure_lines(
    results: Sequence[subprocess.CompletedProcess[str]] | subprocess.CompletedProcess[str],
) -> dict[int, str]:
    text = results.stderr if isinstance(results, subprocess.CompletedProcess) else "".join(r.stderr for r in results)
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"FAILED rank=(\d+) at=[\d.]+: .*", text)}


def test_a_rank_failing_inside_its_shard_write_fails_every_rank_and_commits_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    result = run_ddp(2, "--folder", str(folder), "--fail-write-rank", "1", "--fail-at", "8", "--barrier-timeout", "30")
    assert result.returncode != 0
    failures = _failure_lines(result)
    assert set(failures) == {0, 1}, result.stderr[-3000:]
    for line in failures.values():
        assert "checkpoint written failed on rank(s) [1]" in line and "File too large" in line
    assert _committed(folder) == ["ep0-ba4"] and latest(folder) == str(folder / "ep0-ba4")
    left = sorted(n for n in os.listdir(folder) if n != LOCK_FILENAME)  # the run's (released) folder lock stays
    assert left == ["ep0-ba4", "latest", "latest.symlink"], "the failed save left nothing behind"
    assert read_checkpoint(str(folder / "ep0-ba4"))["global_step"] == 4


def test_a_rank_that_never_arrives_times_out_on_every_rank(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    result = run_ddp(
        2, "--folder", str(folder), "--hook-log", str(tmp_path / "hooks"), "--stall-rank", "1",
        "--stall-name", "ep1-ba8", "--stall-s", "15", "--barrier-timeout", "2",
    )  # fmt: skip
    assert result.returncode != 0
    failures = _failure_lines(result)
    assert "rank(s) 1 did not arrive within 2 s" in failures[0], result.stderr[-3000:]
    pre_commit_at = float((tmp_path / "hooks.rank0.log").read_text().split("\n")[-2].split()[-1])
    failed_at = float(re.search(r"at=([\d.]+)", failures[0]).group(1))  # type: ignore[union-attr]
    assert 2 <= failed_at - pre_commit_at < 10, "rank 0 gave up after the barrier timeout, not the stall"
    assert _committed(folder) == ["ep0-ba4"] and latest(folder) == str(folder / "ep0-ba4")


def test_callable_interval_is_decided_on_rank_zero(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    _ok(run_ddp(2, "--folder", str(folder), "--epochs", "2", "--interval", "rank0-callable"))
    assert _committed(folder) == ["ep0-ba4", "ep1-ba8"]
    files = json.loads((folder / "ep1-ba8" / "manifest.json").read_text())["files"]
    assert {f["rank"] for f in files} == {0, 1}


def test_time_interval_ranks_agree_only_at_steps_rank_zero_names(tmp_path: Path) -> None:
    """Clock-based saves: rank 0 decides and names the next step to ask; every rank saves the same checkpoints."""
    folder = tmp_path / "ckpts"
    _ok(run_ddp(2, "--folder", str(folder), "--epochs", "10", "--interval", "0.05s", "--latest", "latest"))
    committed = _committed(folder)
    assert committed, "a 0.05 s interval over a 40-step run saves at least once"
    for name in committed:
        files = json.loads((folder / name / "manifest.json").read_text())["files"]
        assert {f["rank"] for f in files} == {0, 1}, f"{name} was written by both ranks together"
