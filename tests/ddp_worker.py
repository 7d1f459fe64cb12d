"""One rank of a real multi-process Lightning DDP run (gloo on CPU), launched by torchrun in the tests.

Faults are real: SIGKILL of a rank, a file-size limit (RLIMIT_FSIZE) that makes one rank's shard
write fail with EFBIG, and a rank that stalls before the barrier.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from lightning_ckpt import CheckpointSaver, ShardedCheckpointIO, WriterHook
from lightning_ckpt.demo import TinyRegressor, build_trainer, state_of


class KillRank(L.Callback):
    """SIGKILLs one rank at a step; with ``after_uploads`` only once that rank's uploads are in the store."""

    def __init__(self, rank: int, step: int, after_uploads: bool = False) -> None:
        self.rank, self.step, self.after_uploads = rank, step, after_uploads

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            io = trainer.strategy.checkpoint_io
            assert isinstance(io, ShardedCheckpointIO)
            io.wait_for_save()  # the save in flight commits first: which checkpoint survives is then certain
            if self.after_uploads:
                io.wait_for_uploads()
            os.kill(os.getpid(), signal.SIGKILL)


class LimitFileSize(L.Callback):
    """From ``step`` on, this rank cannot write files larger than 1 KiB (writes fail with EFBIG)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))


class DumpLoaded(L.Callback):
    """Writes each rank's weights as training starts (i.e. right after resuming)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(full_state_of(pl_module), f"{self.prefix}.rank{trainer.global_rank}.pt")


def full_state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state_of``, with sharded (DTensor) values gathered into full tensors (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state_of(model).items()}


class BatchNormRegressor(TinyRegressor):
    """TinyRegressor with BatchNorm and a buffer its forward updates: buffers differ between DDP ranks
    (each rank updates them from its own half-batch), parameters and Adam state do not; StepLR adds
    scheduler state."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        width = self.hparams["width"]
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(), torch.nn.Linear(width, 1)
        )
        self.register_buffer("input_sum", torch.zeros(16, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.input_sum += x.detach().sum(dim=0).double()
        return self.net(x)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 3, gamma=0.5)}


class ShardedRegressor(TinyRegressor):
    """TinyRegressor whose ``configure_model`` shards its layers with FSDP2 (``fully_shard``) on the
    ``data_parallel`` mesh of ``ModelParallelStrategy``: its state dict holds ``DTensor`` shards."""

    def shard_mesh(self) -> Any:
        """The mesh ``fully_shard`` shards over (HSDP passes the whole 2-D mesh)."""
        return self.device_mesh["data_parallel"]

    freeze_first = False  # --freeze-first: the first layer frozen (requires_grad=False), as a fine-tuned base

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if self.freeze_first:
            self.net[0].requires_grad_(False)
        mesh = self.shard_mesh()
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


class DumpState(L.Callback):
    """Writes this rank's whole checkpoint dict (parameters, buffers, optimizer, scheduler, loops, callbacks)
    at every save (``<prefix>.rank<r>.step<s>.pt``, the values being saved) and at the end of training
    (``<prefix>.rank<r>.final.pt``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: Any) -> None:
        torch.save(state_of(pl_module), f"{self.prefix}.rank{trainer.global_rank}.step{trainer.global_step}.pt")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        torch.save(state, f"{self.prefix}.rank{trainer.global_rank}.final.pt")


class MarkSteps(L.Callback):
    """Publishes this rank's pid and newest finished step (files ``<prefix>.rank<r>.pid`` / ``.step``);
    sleeps ``step_s`` per step so a test can signal the process in the middle of training."""

    def __init__(self, prefix: str, step_s: float) -> None:
        self.prefix, self.step_s = prefix, step_s

    def _write(self, suffix: str, text: str, rank: int) -> None:
        path = f"{self.prefix}.rank{rank}.{suffix}"
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write("pid", str(os.getpid()), trainer.global_rank)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._write("step", str(trainer.global_step), trainer.global_rank)
        time.sleep(self.step_s)


class RecordingHook(WriterHook):
    """Appends 'phase name manifest-exists' lines to a per-rank log; optionally stalls one rank."""

    def __init__(self, log_prefix: str, stall_rank: int | None, stall_name: str | None, stall_s: float) -> None:
        self.log_prefix, self.stall_rank, self.stall_name, self.stall_s = log_prefix, stall_rank, stall_name, stall_s

    def _record(self, phase: str, path: str, rank: int) -> None:
        committed = os.path.exists(os.path.join(path, "manifest.json"))
        with open(f"{self.log_prefix}.rank{rank}.log", "a") as f:
            f.write(f"{phase} {os.path.basename(path)} {committed} {time.time():.3f}\n")

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        self._record("pre_commit", path, kwargs["rank"])
        if kwargs["rank"] == self.stall_rank and os.path.basename(path) == self.stall_name:
            time.sleep(self.stall_s)

    def post_commit(self, path: str, **kwargs: Any) -> None:
        self._record("post_commit", path, kwargs["rank"])


def _sum_in_rank_order(process_group: Any, bucket: Any) -> torch.futures.Future[torch.Tensor]:
    """DDP gradient averaging whose float order is fixed: gather every rank's gradients, add them by rank.

    Gloo's all-reduce over 3+ ranks may add in another order in a process's first step than
    later, so a resumed run (whose first step is a later step of the uninterrupted run) could
    differ in the last bit for reasons that have nothing to do with the checkpoint.
    """
    import torch.distributed as dist

    grads = bucket.buffer()
    parts = [torch.empty_like(grads) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, grads, group=process_group)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(total.div_(len(parts)))
    return done


class _OrderedGradientSum(DDPStrategy):
    """DDP that averages gradients with :func:`_sum_in_rank_order` (Lightning registers hooks on CUDA only)."""

    def _register_ddp_hooks(self) -> None:
        # A lambda: DDP checks the hook's annotations, which are strings in this module.
        self.model.register_comm_hook(None, lambda group, bucket: _sum_in_rank_order(group, bucket))  # type: ignore[union-attr]


def _strategy(args: argparse.Namespace) -> Any:
    if args.model == "fsdp2":
        sharded = not args.full_state_dict
        return ModelParallelStrategy(
            data_parallel_size=args.devices, tensor_parallel_size=1, save_distributed_checkpoint=sharded
        )
    if args.devices * args.num_nodes > 1 or "LOCAL_RANK" in os.environ:
        start = "spawn" if args.spawn else "popen"
        return _OrderedGradientSum(start_method=start)
    return "auto"  # one plain process: no process group


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--folder", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--spawn", action="store_true", help="Lightning's ddp_spawn instead of torchrun's processes")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--interval", default="1ep")
    p.add_argument("--filename", default="ep{epoch}-ba{batch}")
    p.add_argument("--latest", default="latest")
    p.add_argument("--keep", type=int, default=-1)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--ckpt-path", default=None)
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--fail-write-rank", type=int, default=None)
    p.add_argument("--fail-at", type=int, default=None)
    p.add_argument("--stall-rank", type=int, default=None)
    p.add_argument("--stall-s", type=float, default=0.0)
    p.add_argument("--stall-name", default=None)
    p.add_argument("--barrier-timeout", type=float, default=60.0)
    p.add_argument("--hook-log", default=None)
    p.add_argument("--dump-loaded", default=None)
    p.add_argument("--save-weights", default=None)
    p.add_argument("--s3-endpoint", default=None, help="folder is an s3:// URL on this S3 server")
    p.add_argument("--local-folder", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--mark-steps", default=None, help="publish pid and step under this prefix")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--model", choices=["tiny", "batchnorm", "fsdp2"], default="tiny")
    p.add_argument("--full-state-dict", action="store_true", help="fsdp2: rank 0 gathers the full state dict")
    p.add_argument("--dump-state", default=None, help="DumpState under this prefix")
    p.add_argument("--no-validation", action="store_true", help="no validation (DDP's eval forward syncs buffers)")
    p.add_argument("--incremental", action="store_true", help="CheckpointSaver(incremental=True)")
    p.add_argument("--freeze-first", action="store_true", help="fsdp2: the first layer frozen")
    args = p.parse_args()

    L.seed_everything(0, verbose=False)
    callbacks: list[L.Callback] = []
    if args.kill_rank is not None:
        callbacks.append(KillRank(args.kill_rank, args.kill_at, after_uploads=args.s3_endpoint is not None))
    if args.fail_write_rank is not None:
        callbacks.append(LimitFileSize(args.fail_write_rank, args.fail_at))
    if args.dump_loaded:
        callbacks.append(DumpLoaded(args.dump_loaded))
    if args.mark_steps:
        callbacks.append(MarkSteps(args.mark_steps, args.step_sleep))
    if args.dump_state:
        callbacks.append(DumpState(args.dump_state))
    interval: Any = args.interval
    if interval == "rank0-callable":  # only rank 0 ever says yes: ranks must follow rank 0's decision

        def interval(trainer: L.Trainer, event: str) -> bool:
            return trainer.global_rank == 0 and event == "epoch_end"

    options = {}
    if args.s3_endpoint:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.s3_server import storage_options

        options = storage_options(args.s3_endpoint)
    saver = CheckpointSaver(
        folder=args.folder,
        storage_options=options,
        local_folder=args.local_folder,
        filename=args.filename,
        latest_filename=args.latest,
        save_interval=interval,
        num_checkpoints_to_keep=args.keep,
        run_name="ddp",
        incremental=args.incremental,
    )
    callbacks.append(saver)
    hooks = [RecordingHook(args.hook_log, args.stall_rank, args.stall_name, args.stall_s)] if args.hook_log else []
    io = ShardedCheckpointIO(barrier_timeout_s=args.barrier_timeout, writer_hooks=hooks, cache_dir=args.cache_dir)
    trainer = build_trainer(
        args.local_folder or os.path.dirname(args.folder.rstrip("/")),
        max_epochs=args.epochs,
        callbacks=callbacks,
        plugins=[io],
        # DDP with a gradient sum in a fixed float order (see _sum_in_rank_order), so the
        # uninterrupted and resumed runs are comparable bit for bit with 3 ranks too.
        strategy=_strategy(args),
        devices=args.devices,
        num_nodes=args.num_nodes,
        **({"limit_val_batches": 0} if args.no_validation else {}),
    )
    ShardedRegressor.freeze_first = args.freeze_first
    model = {"tiny": TinyRegressor, "batchnorm": BatchNormRegressor, "fsdp2": ShardedRegressor}[args.model]()
    try:
        trainer.fit(model, ckpt_path=args.ckpt_path or ("last" if args.resume else None))
    except Exception as err:
        # One write of the whole line: ranks share stderr, and print() writes the newline separately.
        sys.stderr.write(f"FAILED rank={trainer.global_rank} at={time.time():.3f}: {err}\n")
        sys.stderr.flush()
        raise
    if args.save_weights and trainer.global_rank == 0:  # with ddp_spawn: the main process, weights sent back
        torch.save(state_of(model), args.save_weights)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.faults import install_from_env

    install_from_env()  # LIGHTNING_CKPT_KILL_AT: the SIGKILL points of the fault tests (tests/faults.py)
    sys.exit(main())
