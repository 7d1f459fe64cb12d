"""Every sharded layout the package saves, in one 2-rank launch (torchrun, gloo, CPU): tensor parallel,
FSDP2 with bf16 parameters and plain SGD, FSDP2 saving asynchronously, FSDP1 in sharded mode, and loads
across layouts (TP ``Shard(1)`` into FSDP2 ``Shard(0)``; a format-v1 checkpoint of plain tensors into
FSDP2); and HSDP in a 4-rank launch.

Each "resumed" run starts from the uninterrupted run's epoch-1 checkpoint (``ckpt_path=<dir>``) and must end
bitwise where the uninterrupted run ended: every parameter, optimizer value, loop counter (read back whole
in one process). The kill-a-rank path is in ``test_sharded.py``; here the layouts are what varies.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_ckpt import read_checkpoint

from .test_distributed import ROOT, _free_port, _ok
from .test_save_plan import _flatten

WORKER = str(Path(__file__).with_name("layouts_worker.py"))
V1 = Path(__file__).with_name("data") / "format_v1"


def launch(nproc: int, *phases: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    command += [f"--master_port={_free_port()}", WORKER, *phases]
    _ok(subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False))


def phase(root: Path, layout: str, name: str, epochs: int = 3, **extra: Any) -> str:
    return json.dumps({"layout": layout, "folder": str(root / name / "ckpts"), "epochs": epochs, **extra})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("layouts")
    v1 = shutil.copytree(V1 / "ckpts", root / "v1-source", symlinks=True)

    launch(
        2,
        phase(root, "tp", "tp"),
        phase(root, "tp", "tp-resumed", ckpt_path=str(root / "tp/ckpts/ep1-ba16")),
        phase(
            root, "fsdp2", "tp-to-fsdp2", 2, ckpt_path=str(root / "tp/ckpts/ep0-ba8"), dump_loaded=str(root / "tp2f")
        ),
        phase(root, "fsdp2", "v1-to-fsdp2", 2, ckpt_path=str(v1 / "ep0-ba8"), dump_loaded=str(root / "v1f")),
        phase(root, "fsdp2-bf16-sgd", "bf16"),
        phase(root, "fsdp2-bf16-sgd", "bf16-resumed", ckpt_path=str(root / "bf16/ckpts/ep1-ba8")),
        phase(root, "fsdp2", "fsdp2", async_save=False),
        phase(root, "fsdp2", "fsdp2-async", async_save=True, slow_writes_s=0.5),
        phase(root, "fsdp1", "fsdp1"),
        phase(root, "fsdp1", "fsdp1-resumed", ckpt_path=str(root / "fsdp1/ckpts/ep1-ba8")),
    )
    return root


def assert_same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Every leaf equal (tensors bitwise, dtype included) but the saver's own records (they name their folder)."""
    fa = {k: v for k, v in _flatten(a).items() if not k.startswith("callbacks/CheckpointSaver")}
    fb = {k: v for k, v in _flatten(b).items() if not k.startswith("callbacks/CheckpointSaver")}
    assert fa.keys() == fb.keys() and any(k.startswith("state_dict/") for k in fa)
    for key in fa:
        if isinstance(fa[key], torch.Tensor):
            assert fa[key].dtype == fb[key].dtype and torch.equal(fa[key], fb[key]), key
        else:
            assert fa[key] == fb[key], key


def ended(root: Path, run: str, name: str) -> dict[str, Any]:
    return read_checkpoint(str(root / run / "ckpts" / name), weights_only=False)


def chunks(root: Path, run: str, name: str) -> dict[str, list[tuple[list[int], list[int], str]]]:
    manifest = json.loads((root / run / "ckpts" / name / "manifest.json").read_text())
    return {t["key"]: [(c["offsets"], c["sizes"], c["file"]) for c in t["chunks"]] for t in manifest["tensors"]}


def loaded_equals(dump: dict[str, torch.Tensor], checkpoint: dict[str, Any]) -> list[str]:
    """Keys of ``dump`` (weights, ``optimizer/<name>/<field>``) that differ from ``checkpoint``; all must be there."""
    weights = checkpoint["state_dict"]
    [optimizer] = checkpoint["optimizer_states"]
    expected = dict(weights)
    for key, fields in optimizer["state"].items():
        name = list(weights)[key] if isinstance(key, int) else key  # by index: parameter order (no buffers here)
        expected.update({f"optimizer/{name}/{field}": value for field, value in fields.items()})
    assert dump.keys() == expected.keys()
    return [k for k in expected if not (dump[k].dtype == expected[k].dtype and torch.equal(dump[k], expected[k]))]


SHARD0, SHARD1 = "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"


def test_tensor_parallel_writes_column_and_row_chunks_and_resumes_bitwise(runs: Path) -> None:
    layout = chunks(runs, "tp", "ep0-ba8")
    assert layout["state_dict/net.0.weight"] == [([0, 0], [16, 16], SHARD0), ([16, 0], [16, 16], SHARD1)]  # Shard(0)
    assert layout["state_dict/net.2.weight"] == [([0, 0], [1, 16], SHARD0), ([0, 16], [1, 16], SHARD1)]  # Shard(1)
    assert layout["optimizer_states/0/state/net.2.weight/exp_avg_sq"] == layout["state_dict/net.2.weight"]
    assert len(layout["state_dict/net.2.bias"]) == 1, "a replicated value is written once"
    assert_same_run(ended(runs, "tp-resumed", "ep2-ba24"), ended(runs, "tp", "ep2-ba24"))


def test_a_tensor_parallel_checkpoint_loads_into_fsdp2(runs: Path) -> None:
    """TP ``Shard(1)`` of ``net.2.weight`` (and ``Shard(0)`` of ``net.0``) into FSDP2 ``Shard(0)`` on both ranks:
    weights and AdamW state, gathered whole, equal the checkpoint."""
    source = ended(runs, "tp", "ep0-ba8")
    for rank in (0, 1):
        assert loaded_equals(torch.load(runs / f"tp2f.rank{rank}.pt"), source) == []


def test_a_format_v1_checkpoint_of_plain_tensors_loads_into_fsdp2(runs: Path) -> None:
    """A 0.1 checkpoint (plain tensors, as DDP and single-device runs write) into a model sharded by FSDP2."""
    expected = torch.load(V1 / "expected.pt", weights_only=False)
    for rank in (0, 1):
        assert loaded_equals(torch.load(runs / f"v1f.rank{rank}.pt"), expected) == []


def test_bf16_parameters_and_an_optimizer_without_state_resume_bitwise(runs: Path) -> None:
    manifest = json.loads((runs / "bf16/ckpts/ep0-ba4/manifest.json").read_text())
    assert {t["key"]: t["dtype"] for t in manifest["tensors"]} == {
        f"state_dict/net.{i}.{kind}": "bfloat16" for i in (0, 2) for kind in ("weight", "bias")
    }, "plain SGD: no optimizer tensors"
    # net.2.weight is [1, 32]: FSDP2's Shard(0) leaves rank 1 an empty shard, which writes nothing.
    assert chunks(runs, "bf16", "ep0-ba4")["state_dict/net.2.weight"] == [([0, 0], [1, 32], SHARD0)]
    resumed, uninterrupted = ended(runs, "bf16-resumed", "ep2-ba12"), ended(runs, "bf16", "ep2-ba12")
    assert uninterrupted["optimizer_states"][0]["state"] == {}
    assert_same_run(resumed, uninterrupted)


def test_asynchronous_sharded_saves_are_point_in_time_snapshots(runs: Path) -> None:
    """Training goes on (and changes every parameter and AdamW value in place) while the chunks of an
    asynchronous save wait 0.5 s to be written; each checkpoint still holds the values of its step, as a
    synchronous run's does."""
    for name in ("ep0-ba4", "ep1-ba8", "ep2-ba12"):
        assert_same_run(ended(runs, "fsdp2-async", name), ended(runs, "fsdp2", name))


def test_fsdp1_sharded_state_writes_each_ranks_chunks_and_resumes_bitwise(runs: Path) -> None:
    layout = chunks(runs, "fsdp1", "ep0-ba4")
    assert layout["state_dict/net.0.weight"] == [([0, 0], [16, 16], SHARD0), ([16, 0], [16, 16], SHARD1)]
    assert layout["optimizer_states/0/state/net.0.weight/exp_avg"] == layout["state_dict/net.0.weight"]
    assert_same_run(ended(runs, "fsdp1-resumed", "ep2-ba12"), ended(runs, "fsdp1", "ep2-ba12"))


def test_hsdp_replicas_are_written_once_balanced_across_all_ranks_and_resume_bitwise(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """4 ranks, ``ModelParallelStrategy(2, 2)`` with FSDP2 over the 2-D mesh: every chunk is held by two
    ranks and written by one of them; all four write, balanced by bytes."""
    root = tmp_path_factory.mktemp("hsdp")
    launch(
        4, phase(root, "hsdp", "hsdp"), phase(root, "hsdp", "hsdp-resumed", ckpt_path=str(root / "hsdp/ckpts/ep1-ba8"))
    )
    manifest = json.loads((root / "hsdp/ckpts/ep0-ba4/manifest.json").read_text())
    written: dict[str, int] = {}
    for tensor in manifest["tensors"]:
        numel = [math.prod(c["sizes"]) for c in tensor["chunks"]]
        assert sum(numel) == math.prod(tensor["shape"]), f"{tensor['key']}: covered exactly once"
        for chunk in tensor["chunks"]:
            written[chunk["file"]] = written.get(chunk["file"], 0) + chunk["nbytes"]
    assert sorted(written) == [f"shard-{r:05d}-of-00004.safetensors" for r in range(4)], "every rank writes"
    largest = max(c["nbytes"] for t in manifest["tensors"] for c in t["chunks"])
    assert max(written.values()) - min(written.values()) <= largest, written
    assert_same_run(ended(root, "hsdp-resumed", "ep2-ba12"), ended(root, "hsdp", "ep2-ba12"))
