"""Kill anywhere: SIGKILL one rank, or every rank, at each point of a save; then resume with ``"last"``.

Real processes throughout: torchrun starts two gloo ranks of a Lightning DDP fit; the process
kills itself with ``SIGKILL`` at the named point of the second save (the hook of
:mod:`tests.faults`, which runs each rank's worker), so no cleanup code runs. A fresh torchrun then resumes with
``ckpt_path="last"`` and must end bitwise equal to an uninterrupted run, with every committed
checkpoint intact and nothing of the interrupted save left behind.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import NamedTuple

import fsspec
import pytest
import torch

from lightning_ckpt import latest, read_checkpoint
from lightning_ckpt.layout import MANIFEST_FILENAME, is_hidden_name

from .faults import ENV_VAR, RUNNER
from .s3_server import S3Bucket
from .test_distributed import ROOT, WORKER, _torchrun

RANKS = 2  # 4 steps per epoch, a save at the end of each of 3 epochs: ep0-ba4, ep1-ba8, ep2-ba12


def _run(*args: str, kill_at: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    env.pop(ENV_VAR, None)
    if kill_at:
        env[ENV_VAR] = kill_at
    command = _torchrun(RANKS, *args)
    command.insert(command.index(WORKER), RUNNER)  # each rank runs the worker with the fault hook installed
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("uninterrupted")
    result = _run("--folder", str(root / "ckpts"), "--save-weights", str(root / "w.pt"))
    assert result.returncode == 0, result.stderr[-3000:]
    return _weights(root / "w.pt")


class Listing(NamedTuple):
    committed: dict[str, bytes]  # name -> manifest bytes
    leftovers: list[str]  # hidden staging/trash directories and named directories without a manifest


def _list(fs: fsspec.AbstractFileSystem, folder: str) -> Listing:
    committed, leftovers = {}, []
    for entry in fs.ls(folder, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] != "directory" or entry.get("islink"):
            continue
        manifest = f"{folder}/{name}/{MANIFEST_FILENAME}"
        if is_hidden_name(name) or not fs.exists(manifest):
            leftovers.append(name)
        else:
            committed[name] = fs.cat_file(manifest)
    return Listing(committed, sorted(leftovers))


class Case(NamedTuple):
    kill_at: str
    newest_after_kill: str | None  # None: depends on how far the background upload got
    keep: int = -1
    s3: bool = False


CASES = {
    "one-rank-before-its-shard": Case("shard.before@1#2", "ep0-ba4"),
    "all-ranks-before-their-shards": Case("shard.before#2", "ep0-ba4"),
    "one-rank-halfway-through-its-shard": Case("shard.half@1#2", "ep0-ba4"),
    "all-ranks-halfway-through-their-shards": Case("shard.half#2", "ep0-ba4"),
    "after-the-barrier-before-the-manifest": Case("commit.before_manifest@0#2", "ep0-ba4"),
    "between-the-manifest-and-the-pointer": Case("commit.before_pointer@0#2", "ep1-ba8"),
    "during-rotation": Case("rotation.during@0#1", "ep1-ba8", keep=1),
    "one-rank-during-upload": Case("upload.during@1#2", None, s3=True),
    "all-ranks-during-upload": Case("upload.during#2", None, s3=True),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_kill_then_resume_last_equals_uninterrupted_and_loses_nothing(
    case: Case, uninterrupted: dict[str, torch.Tensor], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # A surviving rank gives up waiting for a killed one after 10 s (torchrun would SIGKILL it after 30 s).
    args = ["--keep", str(case.keep), "--barrier-timeout", "10"]
    if case.s3:
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        folder = f"{bucket.url}/run"
        fs = fsspec.filesystem("s3", **bucket.storage_options)
        args += [
            "--folder",
            folder,
            "--s3-endpoint",
            bucket.storage_options["client_kwargs"]["endpoint_url"],
            "--local-folder",
            str(tmp_path / "local"),
        ]
        args += ["--cache-dir", str(tmp_path / "cache")]
        options = bucket.storage_options
    else:
        folder = str(tmp_path / "ckpts")
        fs = fsspec.filesystem("file")
        args += ["--folder", folder]
        options = {}

    killed = _run(*args, kill_at=case.kill_at)
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]

    # Readers see only committed checkpoints, and every one of them verifies (sizes and checksums).
    before = _list(fs, folder)
    newest = latest(folder, options)
    if case.newest_after_kill is not None:
        assert newest is not None and newest.endswith("/" + case.newest_after_kill)
    for name in before.committed:
        assert read_checkpoint(f"{folder}/{name}", storage_options=options)["global_step"] > 0
    if case.kill_at.startswith(("shard.", "commit.before_manifest")) and "@1" not in case.kill_at:
        # No surviving committer cleaned up (with rank 1 killed, rank 0 removes the staging on timeout).
        assert before.leftovers, "the interrupted save left its staging directory (ignored by readers)"

    resumed = _run(*args, "--resume", "--save-weights", str(tmp_path / "w.pt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _equal(_weights(tmp_path / "w.pt"), uninterrupted), "the resumed run ends bitwise equal"

    after = _list(fs, folder)
    assert after.leftovers == [], "the next run of the folder removed what the killed save left"
    kept = before.committed if case.keep == -1 else {}
    for name, manifest in kept.items():
        assert after.committed.get(name) == manifest, f"committed checkpoint {name} untouched"
    # With keep=1 the checkpoint the run resumed from is kept too: rotation never deletes it.
    expected = ["ep0-ba4", "ep1-ba8", "ep2-ba12"] if case.keep == -1 else [case.newest_after_kill, "ep2-ba12"]
    assert sorted(after.committed) == expected
    if case.s3:
        assert not _list(fsspec.filesystem("file"), str(tmp_path / "local")).leftovers
