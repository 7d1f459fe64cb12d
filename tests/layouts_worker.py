"""One rank of a 2-rank job (torchrun, gloo on CPU) that runs several ``trainer.fit`` phases in one launch.

Each phase is a JSON object on the command line: ``layout`` (``tp``: tensor parallel with
``parallelize_module``, ``net.2.weight`` as ``Shard(1)``; ``fsdp2``: ``fully_shard``, ``Shard(0)``;
``fsdp2-bf16-sgd``: FSDP2 with bf16 parameters and plain SGD, whose optimizer state is empty; ``fsdp1``:
``FSDPStrategy(state_dict_type="sharded")`` through a test-only subclass that puts FSDP on the CPU),
``folder``, ``epochs``, and optionally ``ckpt_path``, ``async_save`` (the saver's; default on),
``slow_writes_s`` (each rank waits that long before writing its shard) and ``dump_loaded`` (each rank
writes the full weights and optimizer state it holds when training starts, i.e. right after resuming).
Phases share the process group, which saves a launch per phase (the expensive part of a multi-process test).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lightning_ckpt import CheckpointSaver, ShardedCheckpointIO
from lightning_ckpt.demo import TinyRegressor, build_trainer
from tests.ddp_worker import ShardedRegressor


class TensorParallelRegressor(TinyRegressor):
    """TinyRegressor split over the ``tensor_parallel`` mesh: ``net.0`` column-wise (``Shard(0)``),
    ``net.2`` row-wise (weight ``Shard(1)``, bias replicated)."""

    def configure_model(self) -> None:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
        parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)  # type: ignore[arg-type]

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])


class FullyShardedRegressor(ShardedRegressor):
    """FSDP2 on the ``data_parallel`` mesh (``tests/ddp_worker.py``'s model), with AdamW."""

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])


class HybridShardedRegressor(FullyShardedRegressor):
    """HSDP: FSDP2 over the whole 2-D mesh of ``ModelParallelStrategy(2, 2)``, its first dimension replicating
    (``Replicate()``) and its second sharding (``Shard(0)``): ranks 0 and 2 hold the same chunks, as do 1 and 3."""

    def shard_mesh(self) -> Any:
        return self.device_mesh


class Bf16SgdRegressor(FullyShardedRegressor):
    """FSDP2 with bfloat16 parameters and plain SGD (no momentum: the optimizer has no state at all)."""

    def configure_model(self) -> None:
        self.net.to(torch.bfloat16)
        super().configure_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(torch.bfloat16)).float()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])


class CpuFSDPStrategy(FSDPStrategy):
    """FSDP1 on the CPU (test only): Lightning passes the device index (None on CPU) as ``device_id``."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            device_id=torch.device("cpu"),
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            **self.kwargs,
        )


class DumpLoaded(L.Callback):
    """Writes the full weights and optimizer state this rank holds as training starts (ModelParallelStrategy)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.tensor import DTensor

        state = pl_module.state_dict()
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}
        optimizer = trainer.optimizers[0]
        for name, param in pl_module.named_parameters():  # optimizer state by parameter name, gathered
            for field, value in optimizer.state.get(param, {}).items():
                value = value.full_tensor() if isinstance(value, DTensor) else value
                full[f"optimizer/{name}/{field}"] = value.detach().clone()
        torch.save(full, f"{self.prefix}.rank{trainer.global_rank}.pt")


def _strategy(layout: str) -> Any:
    if layout == "tp":
        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    if layout == "hsdp":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)
    if layout == "fsdp1":
        return CpuFSDPStrategy(state_dict_type="sharded", auto_wrap_policy={torch.nn.Linear})
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


MODELS = {"tp": TensorParallelRegressor, "fsdp2": FullyShardedRegressor, "fsdp2-bf16-sgd": Bf16SgdRegressor,
          "hsdp": HybridShardedRegressor,
          "fsdp1": TinyRegressor}  # fmt: skip


def _slow_writes(seconds: float) -> None:
    """Each rank waits ``seconds`` before writing its shard (on the writer thread of an async save), so
    training certainly changes the parameters while the save is in flight."""
    from lightning_ckpt import _faults

    _faults.install(lambda point, rank, writing: time.sleep(seconds) if point == "shard.before" else None)


def run_phase(phase: dict[str, Any]) -> None:
    L.seed_everything(0, verbose=False)
    if phase.get("slow_writes_s"):
        _slow_writes(phase["slow_writes_s"])
    saver = CheckpointSaver(folder=phase["folder"], save_interval="1ep", run_name=phase["layout"],
                            async_save=phase.get("async_save", True))  # fmt: skip
    callbacks: list[L.Callback] = [saver]
    if phase.get("dump_loaded"):
        callbacks.append(DumpLoaded(phase["dump_loaded"]))
    trainer = build_trainer(
        os.path.dirname(phase["folder"].rstrip("/")),
        max_epochs=phase["epochs"],
        callbacks=callbacks,
        plugins=[ShardedCheckpointIO()],
        strategy=_strategy(phase["layout"]),
        devices=int(os.environ["WORLD_SIZE"]),
        limit_val_batches=0,
    )
    model = MODELS[phase["layout"]]()
    try:
        trainer.fit(model, ckpt_path=phase.get("ckpt_path"))
        trainer.strategy.checkpoint_io.teardown()  # the last asynchronous save is committed
    except Exception as err:
        sys.stderr.write(f"FAILED rank={trainer.global_rank} phase={json.dumps(phase)}: {err}\n")
        sys.stderr.flush()
        raise


def main() -> int:
    for text in sys.argv[1:]:
        run_phase(json.loads(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
