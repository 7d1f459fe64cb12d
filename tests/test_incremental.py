"""Incremental checkpoints: unchanged bytes are referenced from the base, never written again, never lost.

A real ``Trainer`` fits :class:`tests.incremental_worker.Adapted` (a frozen base, a BatchNorm, a
trained head) with ``CheckpointSaver(incremental=True, full_every=3, num_checkpoints_to_keep=2)``,
saving every 2 steps: ba2 (full), ba4, ba6 (deltas of ba2), ba8 (full), ba10, ba12 (deltas of ba8).
Kill points run the worker in a fresh process that SIGKILLs itself mid-save or mid-rotation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import lightning as L
import pytest
import torch

from lightning_ckpt import CheckpointSaver, ShardedCheckpointIO, latest, read_checkpoint
from lightning_ckpt.cli import main
from lightning_ckpt.errors import CheckpointError, ConfigError

from .faults import ENV_VAR, RUNNER
from .incremental_worker import fit, full_state
from .s3_server import S3Bucket
from .servers import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "incremental_worker.py")
FROZEN = {"state_dict/base.0.weight", "state_dict/base.0.bias", "state_dict/base.1.weight", "state_dict/base.1.bias"}


def _same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested state (tensors by dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for key in a:
            _same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


def _same_run(resumed: dict[str, Any], expected: dict[str, Any]) -> None:
    """Bitwise equal state. Of the saver's state, the run id is each run's own, and the kept list may
    also hold the checkpoint resumed from (rotation protects it)."""

    def trim(state: dict[str, Any]) -> dict[str, Any]:
        return {**state, "saver": {k: v for k, v in state["saver"].items() if k not in ("saved", "run_id")}}

    _same(trim(resumed), trim(expected))
    assert {r["name"] for r in expected["saver"]["saved"]} <= {r["name"] for r in resumed["saver"]["saved"]}


def _manifest(folder: Path, name: str) -> dict[str, Any]:
    return json.loads((folder / name / "manifest.json").read_text())


def _files_of_each_tensor(manifest: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["chunks"][0]["file"] for t in manifest["tensors"]}


def _committed(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and (p / "manifest.json").exists()
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("uninterrupted") / "ckpts"
    trainer, model = fit(str(folder))
    return folder, full_state(trainer, model)


def test_deltas_write_only_what_changed_and_reference_the_base(uninterrupted: tuple[Path, dict[str, Any]]) -> None:
    folder, _ = uninterrupted
    # keep 2: ba10 and ba12, plus ba8, the base they read from (retention dropped it; references keep it)
    assert _committed(folder) == ["ba10", "ba12", "ba8"]
    base = _manifest(folder, "ba8")
    assert base["format_version"] == 2, "a full save stays readable by older versions"
    assert all(p["name"] in ("shard-00000-of-00001.safetensors", "objects.pt") for p in base["files"])
    for name in ("ba10", "ba12"):
        delta = _manifest(folder, name)
        assert delta["format_version"] == 3
        files = _files_of_each_tensor(delta)
        referenced = {k for k, f in files.items() if f.startswith("../")}
        assert referenced == FROZEN, "exactly the frozen weights are referenced; everything that moved is written"
        assert {files[k] for k in referenced} == {"../ba8/shard-00000-of-00001.safetensors"}
        own = (folder / name / "shard-00000-of-00001.safetensors").stat().st_size
        frozen_bytes = sum(t["chunks"][0]["nbytes"] for t in delta["tensors"] if t["key"] in FROZEN)
        changed = sum(t["chunks"][0]["nbytes"] for t in delta["tensors"] if t["key"] not in FROZEN)
        assert own <= changed + 8192 < frozen_bytes, "the delta's shard holds the changed tensors and a header"


def test_resume_from_a_delta_equals_the_uninterrupted_run(
    uninterrupted: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    _, expected = uninterrupted
    folder = tmp_path / "ckpts"
    fit(str(folder), steps=6)  # ba2 (full), ba4, ba6: the run stops after a delta
    assert _files_of_each_tensor(_manifest(folder, "ba6"))["state_dict/base.0.weight"].startswith("../ba2/")
    trainer, model = fit(str(folder), resume=True)  # ckpt_path="last": ba6, a delta
    _same_run(full_state(trainer, model), expected)
    assert _committed(folder) == ["ba10", "ba12", "ba2", "ba6", "ba8"], "ba6 resumed from (kept), and its base"


def test_a_change_through_data_is_written_not_referenced(tmp_path: Path) -> None:
    """A write that bypasses autograd's version counter (``.data``) still shows: every byte is hashed."""

    class Nudge(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
            if trainer.global_step == 5:
                module.base[0].weight.data[0, 0] += 1.0

    folder = tmp_path / "ckpts"
    fit(str(folder), steps=6, keep=-1, callbacks=[Nudge()])
    # ba4 referenced base.0.weight; by ba6 it moved, through .data (no autograd version bump)
    assert _files_of_each_tensor(_manifest(folder, "ba4"))["state_dict/base.0.weight"].startswith("../ba2/")
    files = _files_of_each_tensor(_manifest(folder, "ba6"))
    assert files["state_dict/base.0.weight"] == "shard-00000-of-00001.safetensors"
    assert files["state_dict/base.1.weight"] == "../ba2/shard-00000-of-00001.safetensors"
    loaded = read_checkpoint(str(folder / "ba6"))["state_dict"]
    base = read_checkpoint(str(folder / "ba2"))["state_dict"]
    assert loaded["base.0.weight"][0, 0] == base["base.0.weight"][0, 0] + 1.0
    assert main(["verify", str(folder / "ba6")]) == 0


def test_a_missing_base_file_refuses_the_commit_and_the_next_save_is_full(tmp_path: Path) -> None:
    io = ShardedCheckpointIO(incremental=True)
    folder = tmp_path / "ckpts"
    frozen, trained = torch.randn(1000), torch.zeros(4)

    def save(name: str) -> None:
        io.save_collective({"frozen": frozen, "trained": trained.add_(1), "global_step": 1}, str(folder / name))

    save("ba1")
    shard = folder / "ba1" / "shard-00000-of-00001.safetensors"
    kept = shard.read_bytes()
    shard.unlink()  # someone deleted the base's data behind the saver's back
    with pytest.raises(CheckpointError, match=r"a file of the base checkpoint it references, is missing"):
        save("ba2")
    assert not (folder / "ba2").exists(), "nothing was committed"
    shard.write_bytes(kept)
    save("ba3")
    assert _manifest(folder, "ba3")["format_version"] == 2, "after a failure the next save writes everything"


def test_a_delta_whose_base_was_deleted_by_hand_names_the_base_and_is_never_picked(tmp_path: Path) -> None:
    io = ShardedCheckpointIO(incremental=True)
    folder = tmp_path / "ckpts"
    frozen = torch.randn(1000)
    io.save_collective({"frozen": frozen, "global_step": 1}, str(folder / "ba1"))
    io.save_collective({"frozen": frozen, "global_step": 2}, str(folder / "ba2"))
    shutil.rmtree(folder / "ba1")  # outside lightning-ckpt: rotation and prune would have kept it
    with pytest.raises(CheckpointError, match=r"is missing .*it belongs to 'ba1', the checkpoint this incremental one"):
        read_checkpoint(str(folder / "ba2"))
    assert latest(str(folder)) is None, '"last" never resumes from a delta without its base'


def test_replacing_a_referenced_checkpoint_is_refused(tmp_path: Path) -> None:
    io = ShardedCheckpointIO(incremental=True)
    folder = tmp_path / "ckpts"
    frozen = torch.randn(1000)
    io.save_collective({"frozen": frozen, "step": torch.ones(1)}, str(folder / "ba1"))
    io.save_collective({"frozen": frozen, "step": torch.ones(1) * 2}, str(folder / "ba2"))
    assert _manifest(folder, "ba2")["format_version"] == 3
    plain = ShardedCheckpointIO()
    with pytest.raises(CheckpointError, match=r"cannot replace checkpoint 'ba1'.*\['ba2'\] read tensors from its"):
        plain.save_collective({"frozen": frozen, "step": torch.ones(1) * 3}, str(folder / "ba1"))
    assert sorted(os.listdir(folder)) == ["ba1", "ba2"], "refused before anything was written"
    _same(read_checkpoint(str(folder / "ba2"))["frozen"], frozen)


def test_prune_keeps_a_base_while_a_kept_checkpoint_references_it(tmp_path: Path) -> None:
    io = ShardedCheckpointIO(incremental=True, full_every=3)
    folder = tmp_path / "ckpts"
    frozen = torch.randn(1000)
    for step in range(1, 6):  # ba1 full, ba2 ba3 deltas, ba4 full, ba5 delta
        io.save_collective(
            {"frozen": frozen, "global_step": step, "t": torch.full((2,), step)}, str(folder / f"ba{step}")
        )
    assert [_manifest(folder, f"ba{s}")["format_version"] for s in range(1, 6)] == [2, 3, 3, 2, 3]
    assert main(["prune", str(folder), "--keep", "3", "--dry-run"]) == 0
    assert main(["prune", str(folder), "--keep", "1"]) == 0
    assert _committed(folder) == ["ba4", "ba5"], "ba5 (kept) reads from ba4; ba1-ba3 went, deltas first"
    for name in ("ba4", "ba5"):
        assert main(["verify", str(folder / name)]) == 0
    assert main(["prune", str(folder), "--keep", "0"]) == 0
    assert _committed(folder) == ["ba4", "ba5"], "the newest is never pruned, nor what it reads"


def test_full_every_is_checked_and_defaults_off() -> None:
    with pytest.raises(ConfigError, match=r"full_every=0 is not valid"):
        CheckpointSaver("/tmp/x", incremental=True, full_every=0)
    with pytest.raises(ConfigError, match=r"incremental='yes' is not valid"):
        ShardedCheckpointIO(incremental="yes")  # type: ignore[arg-type]
    assert ShardedCheckpointIO().incremental is False


# -- kill points ---------------------------------------------------------------------------------


def _run(folder: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(ENV_VAR, None)
    if kill_at:
        env[ENV_VAR] = kill_at
    command = [sys.executable, RUNNER, WORKER, "--folder", str(folder), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, check=False)


KILLS = {
    # the 5th save (ba10, a delta of ba8): halfway through its shard, and after the barrier
    "halfway-through-a-delta": ("shard.half#5", "ba8"),
    "before-a-delta-s-manifest": ("commit.before_manifest#5", "ba8"),
    # rotation after ba10: ba6 (a delta) goes first, then its base ba2; kill inside either deletion
    "rotating-a-delta-whose-base-goes-next": ("rotation.during#2", "ba10"),
    "rotating-a-base-no-one-references-any-more": ("rotation.during#3", "ba10"),
}


@pytest.fixture(scope="module")
def uninterrupted_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run in a process like the killed ones (same threads, so the same float sums)."""
    root = tmp_path_factory.mktemp("uninterrupted_process")
    done = _run(root / "ckpts", "--state", str(root / "state.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(torch.load(root / "state.pt", weights_only=False))


@pytest.mark.parametrize("kill_at,newest", list(KILLS.values()), ids=list(KILLS))
def test_kill_then_resume_equals_uninterrupted_and_every_checkpoint_loads(
    kill_at: str, newest: str, uninterrupted_process: dict[str, Any], tmp_path: Path
) -> None:
    expected = uninterrupted_process
    folder = tmp_path / "ckpts"
    killed = _run(folder, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    found = latest(str(folder))
    assert found is not None and found.endswith("/" + newest)
    for name in _committed(folder):  # every committed checkpoint loads, references and all
        assert main(["verify", str(folder / name)]) == 0
        assert read_checkpoint(str(folder / name))["global_step"] > 0
    resumed = _run(folder, "--resume", "--state", str(tmp_path / "state.pt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(torch.load(tmp_path / "state.pt", weights_only=False), expected)
    assert _committed(folder) == ["ba10", "ba12", "ba8"]
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".ba")], "no leftovers"
    shutil.rmtree(folder)


def test_ls_inspect_cp_and_consolidate_handle_a_delta(
    uninterrupted: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = uninterrupted
    assert main(["ls", str(folder)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "+ba8" in rows["ba12"] and "+ba" not in rows["ba8"], "WRITTEN names the base a delta reads from"
    assert main(["inspect", str(folder / "ba12")]) == 0
    assert "read from ba8" in capsys.readouterr().out

    # cp: a self-contained full copy (base files copied in), which loads with the base gone
    copy = tmp_path / "copies" / "ba12"
    assert main(["cp", str(folder / "ba12"), str(copy)]) == 0
    manifest = _manifest(copy.parent, "ba12")
    assert manifest["format_version"] == 2 and not any(f["name"].startswith("../") for f in manifest["files"])
    assert "base-ba8-shard-00000-of-00001.safetensors" in os.listdir(copy)
    _same(read_checkpoint(str(copy)), read_checkpoint(str(folder / "ba12")))

    # consolidate: one standard Lightning .ckpt, every tensor equal
    out = tmp_path / "ba12.ckpt"
    assert main(["consolidate", str(folder / "ba12"), str(out)]) == 0
    _same(
        torch.load(out, weights_only=False)["state_dict"],
        read_checkpoint(str(folder / "ba12"))["state_dict"],
    )


def test_s3_folder_uploads_each_base_once_and_resumes_on_an_empty_disk(
    s3_bucket: S3Bucket, uninterrupted: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Deltas upload only their own files; the store rotates by the same rule; a fresh machine resumes."""
    _, expected = uninterrupted
    folder = f"{s3_bucket.url}/run"
    options = s3_bucket.storage_options
    first = ShardedCheckpointIO(cache_dir=str(tmp_path / "cache1"))
    fit(folder, storage_options=options, local_folder=str(tmp_path / "local"), plugins=[first])
    fs = fsspec.filesystem("s3", **options)
    listed = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, refresh=True))
    assert listed == ["ba10", "ba12", "ba8", "latest.symlink"], "the base stays while ba10 and ba12 read from it"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{folder}/ba12")) == [
        "manifest.json", "objects.pt", "shard-00000-of-00001.safetensors",
    ]  # fmt: skip
    own = fs.size(f"{folder}/ba12/shard-00000-of-00001.safetensors")
    assert own < fs.size(f"{folder}/ba8/shard-00000-of-00001.safetensors") / 4, "only what changed went up"
    assert main(["--storage-options", json.dumps(options), "verify", f"{folder}/ba12"]) == 0
    local = sorted(os.listdir(tmp_path / "local"))
    assert "ba8" in local and "ba12" in local, "the local copy of the base stays for the next delta"

    _same(read_checkpoint(f"{folder}/ba12", storage_options=options)["state_dict"], expected["model"])

    # a fresh machine: an empty cache, only the bucket; "last" is ba12, a delta, downloaded with its base's file
    io = ShardedCheckpointIO(cache_dir=str(tmp_path / "cache2"))
    trainer, model = fit(folder, resume=True, storage_options=options, local_folder=str(tmp_path / "l2"),
                         plugins=[io], overwrite=True)  # fmt: skip
    assert io.loaded_path == f"{folder}/ba12"
    _same_run(full_state(trainer, model), expected)


def test_two_ddp_ranks_reference_both_base_shards_and_a_delta_loads_into_one_process(
    uninterrupted: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Under DDP the replicated tensors are split across the ranks by bytes, in the base as in each delta:
    each rank references the base chunks of the tensors it is assigned, in whichever rank's file they are."""
    folder = tmp_path / "ckpts"
    port = str(free_port())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               WORKER, "--folder", str(folder), "--devices", "2", "--state", str(tmp_path / "state.pt")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    delta = _manifest(folder, "ba12")
    assert {f["name"] for f in delta["files"] if f["name"].startswith("../")} == {
        "../ba8/shard-00000-of-00002.safetensors", "../ba8/shard-00001-of-00002.safetensors",
    }  # fmt: skip
    assert {k for k, f in _files_of_each_tensor(delta).items() if f.startswith("../")} == FROZEN
    expected = torch.load(tmp_path / "state.pt", weights_only=False)
    trainer, model = fit(str(folder), resume=True)  # one process, from the two ranks' delta; nothing left to run
    _same_run(full_state(trainer, model), expected)


def test_model_checkpoint_with_an_incremental_plugin_keeps_bases_its_rotation_would_break(tmp_path: Path) -> None:
    """Lightning's own ``ModelCheckpoint`` rotates through ``remove_checkpoint``: a base that a kept delta
    reads from stays until the last such delta is removed, then goes too."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from .incremental_worker import Adapted

    folder = tmp_path / "mc"
    io = ShardedCheckpointIO(incremental=True, full_every=3)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=12, max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, plugins=[io], default_root_dir=str(tmp_path),
        callbacks=[ModelCheckpoint(dirpath=str(folder), every_n_train_steps=2, save_top_k=2, monitor="step",
                                   mode="max", filename="s{step}", auto_insert_metric_name=False)],
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(16, 64, generator=g), torch.randn(16, 1, generator=g))
    trainer.fit(Adapted(), torch.utils.data.DataLoader(data, batch_size=8))
    # saves at steps 2 (full), 4, 6, 8 (full), 10, 12; top 2 by step: 10 and 12, which read from step 8's base
    assert _committed(folder) == ["s10.ckpt", "s12.ckpt", "s8.ckpt"]
    assert {f["name"] for f in _manifest(folder, "s12.ckpt")["files"] if f["name"].startswith("../")} == {
        "../s8.ckpt/shard-00000-of-00001.safetensors"
    }
    for name in _committed(folder):
        assert main(["verify", str(folder / name)]) == 0
    _same(read_checkpoint(str(folder / "s12.ckpt"))["state_dict"], {
        k: v for k, v in trainer.lightning_module.state_dict().items()
    })  # fmt: skip
