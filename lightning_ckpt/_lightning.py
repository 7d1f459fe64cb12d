"""Every use of Lightning internals lives here, so a Lightning upgrade touches one file.

What it reaches into, and why:

==========================================================  ==========================================
``trainer._checkpoint_connector.dump_checkpoint``           build each rank's checkpoint dict exactly as
                                                            ``Trainer.save_checkpoint`` does (hooks run)
``_CheckpointConnector._parse_ckpt_path`` (wrapped once)    make ``ckpt_path="last"`` see the newest
                                                            committed checkpoint of a ``CheckpointSaver``
``trainer.fit_loop.epoch_loop.batch_progress``              ``{batch_in_epoch}``
``trainer._checkpoint_connector._loaded_checkpoint``       the step being resumed from, in ``on_fit_start``
                                                            (before the loops are restored)
``strategy.restore_checkpoint_after_setup``                 whether the restore comes after ``on_fit_start``
``strategy.load_checkpoint`` (wrapped per FSDP/ModelParallel  load this format in place into the sharded model
instance), ``strategy.model``/``optimizers``/``broadcast``  and optimizers (those strategies skip CheckpointIO)
``trainer.strategy.checkpoint_io`` (public setter)          load our format when the trainer still has
                                                            the stock ``TorchCheckpointIO``
``trainer.optimizers``, ``optimizer.state``, strategy types  which dumped tensors DDP replicates
``lightning.pytorch.core.saving.pl_load`` (wrapped once)   ``Model.load_from_checkpoint(dir)`` reads this
                                                            format (Lightning opens it as one file)
==========================================================  ==========================================

Example:
    >>> import lightning as L
    >>> trainer = L.Trainer(logger=False, enable_progress_bar=False)
    >>> rank_info(trainer)
    RankInfo(rank=0, local_rank=0, node_rank=0, world_size=1, local_world_size=1)
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_ckpt.layout import Progress, RankInfo

__all__ = [
    "InPlace",
    "InPlaceWeights",
    "is_our_checkpoint",
    "install_sharded_loader",
    "restores_after_fit_start",
    "replicated_test",
    "preemption_exit",
    "LastCheckpointProvider",
    "default_run_name",
    "dump_checkpoint",
    "install_directory_loader",
    "install_last_resolver",
    "log_save_metrics",
    "progress",
    "rank_info",
    "resume_step",
    "use_checkpoint_io",
]

T = TypeVar("T")


class LastCheckpointProvider(Protocol):
    """A callback that knows its newest committed checkpoint (``CheckpointSaver``)."""

    def newest_committed(self, trainer: Trainer) -> tuple[str, float] | None:
        """``(path, created_time)`` of the newest committed checkpoint, or ``None``."""

    def resume_last(self, trainer: Trainer, path: str) -> None:
        """``ckpt_path="last"`` resolved to ``path``, this provider's: it prepares that load."""


def rank_info(trainer: Trainer) -> RankInfo:
    """The trainer's place in the job."""
    local_world_size = int(getattr(trainer.strategy, "num_processes", 1) or 1)
    return RankInfo(
        rank=trainer.global_rank,
        local_rank=trainer.local_rank,
        node_rank=trainer.node_rank,
        world_size=trainer.world_size,
        local_world_size=local_world_size,
    )


def progress(trainer: Trainer) -> Progress:
    """Epoch, optimizer step, batches done in this epoch, and logged scalar metrics."""
    metrics: dict[str, float] = {}
    for key, value in trainer.callback_metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            metrics[key] = float(value.item())
        elif isinstance(value, (int, float)):
            metrics[key] = float(value)
    batch_in_epoch = int(getattr(trainer.fit_loop.epoch_loop.batch_progress.current, "processed", 0))
    return Progress(
        epoch=trainer.current_epoch, batch=trainer.global_step, batch_in_epoch=batch_in_epoch, metrics=metrics
    )


def log_save_metrics(trainer: Trainer, events: list[tuple[str, Any]]) -> bool:
    """Send the metrics of finished saves and uploads (``(kind, SaveStats)``) to the trainer's loggers, each at
    the step its checkpoint holds; returns whether there was any."""
    for kind, stats in events:
        if stats.step is None:
            continue
        metrics = stats.metrics(upload=kind == "upload")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=stats.step)
    return bool(events)


def preemption_exit() -> BaseException:
    """The exception that ends a preempted fit the way Lightning ends one on ``SIGTERM`` (a ``SystemExit``)."""
    return SIGTERMException()


def resume_step(trainer: Trainer) -> int:
    """The global step training starts from: the loaded checkpoint's, valid already in ``on_fit_start``."""
    loaded = trainer._checkpoint_connector._loaded_checkpoint
    if loaded:
        return int(loaded.get("global_step", trainer.global_step))
    return trainer.global_step


def dump_checkpoint(trainer: Trainer, weights_only: bool) -> dict[str, Any]:
    """This rank's checkpoint dict, built the way ``Trainer.save_checkpoint`` builds it."""
    return trainer._checkpoint_connector.dump_checkpoint(weights_only)


def use_checkpoint_io(trainer: Trainer, make: Callable[[], CheckpointIO], kind: type) -> Any:
    """The trainer's checkpoint IO if it is of type ``kind``; otherwise one made by ``make``.

    When the trainer still has the stock ``TorchCheckpointIO``, the new one also replaces it, so
    ``ckpt_path=`` loads our format (it reads legacy ``.ckpt`` files too). A custom IO is left alone.
    """
    current = trainer.strategy.checkpoint_io
    if isinstance(current, kind):
        return current
    ours = make()
    if type(current) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = ours
    return ours


def default_run_name() -> str:
    """A run name that is the same every time the same command is run in the same directory.

    Example:
        >>> default_run_name() == default_run_name()
        True
    """
    script = os.path.splitext(os.path.basename(sys.argv[0] or "python"))[0] or "python"
    digest = hashlib.sha1("\0".join([os.getcwd(), *sys.argv]).encode()).hexdigest()[:8]
    return f"{script}-{digest}"


def _providers(trainer: Trainer) -> list[LastCheckpointProvider]:
    return [cb for cb in trainer.checkpoint_callbacks if hasattr(cb, "newest_committed")]  # type: ignore[misc]


def _newest_model_checkpoint_last(trainer: Trainer) -> tuple[str, float] | None:
    """``(path, modification time)`` of the newest "last" checkpoint of the trainer's ``ModelCheckpoint``
    callbacks (what Lightning itself resumes from for ``ckpt_path="last"``), or ``None``."""
    from lightning.fabric.utilities.cloud_io import get_filesystem
    from lightning.pytorch.callbacks import ModelCheckpoint

    found: list[tuple[str, float]] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and not hasattr(callback, "newest_committed"):
            for path in callback._find_last_checkpoints(trainer):
                if not get_filesystem(path).exists(path):
                    continue
                modified = get_filesystem(path).modified(path)
                found.append((str(path), modified.timestamp() if hasattr(modified, "timestamp") else float(modified)))
    return max(found, key=lambda item: item[1]) if found else None


def _check_best(trainer: Trainer, fn: str) -> None:
    """``ckpt_path="best"`` with a ``CheckpointSaver`` that kept no best checkpoint: say why, naming it
    (Lightning's own message blames ``ModelCheckpoint``)."""
    saver: Any = trainer.checkpoint_callback
    if saver is None or not hasattr(saver, "newest_committed") or saver.best_model_path:
        return
    monitor = getattr(saver, "monitor", None)
    if monitor is None:
        why = "it has no monitor; pass CheckpointSaver(monitor='val_loss') to keep the best checkpoint"
    else:
        why = (
            f"no save of this run found the metric {monitor!r} logged (log it with self.log({monitor!r}, ...)"
            " before the saves, e.g. in validation_step)"
        )
    raise ValueError(
        f'.{fn}(ckpt_path="best"): CheckpointSaver keeps no best checkpoint: {why}; or pass a checkpoint path,'
        ' or ckpt_path="last"'
    )


def install_last_resolver() -> None:
    """Teach ``ckpt_path="last"`` about ``CheckpointSaver`` (idempotent; other callbacks unaffected).

    Lightning 2.x only asks ``ModelCheckpoint`` for ``"last"``. The wrapper asks every callback
    with ``newest_committed`` first; when a ``ModelCheckpoint`` saved a "last" checkpoint too, the
    newer of the two wins, with a warning naming both. When no ``CheckpointSaver`` has a committed
    checkpoint it defers to Lightning (which warns and starts fresh when nothing is found either).
    """
    original = _CheckpointConnector._parse_ckpt_path
    if getattr(original, "_lightning_ckpt", False):
        return

    @functools.wraps(original)
    def parse(self: _CheckpointConnector, state_fn: Any, ckpt_path: Any, *args: Any, **kwargs: Any) -> Any:
        if ckpt_path == "best":
            _check_best(self.trainer, state_fn.value)
        providers = _providers(self.trainer) if ckpt_path == "last" else []
        if providers:
            answers = [(p, p.newest_committed(self.trainer)) for p in providers]
            found = [(p, c) for p, c in answers if c is not None]
            if found:
                provider, ours = max(found, key=lambda item: item[1][1])
                theirs = _newest_model_checkpoint_last(self.trainer)
                if theirs is None or theirs[1] <= ours[1]:
                    provider.resume_last(self.trainer, ours[0])  # it plans the load (fallback, rank agreement)
                if theirs is None:
                    return ours[0]
                newest, older = (theirs, ours) if theirs[1] > ours[1] else (ours, theirs)
                rank_zero_warn(
                    f'ckpt_path="last": both CheckpointSaver ({ours[0]}) and ModelCheckpoint ({theirs[0]}) saved a'
                    f" last checkpoint; resuming from the newer, {newest[0]}, not {older[0]}. Pass that path as"
                    " ckpt_path to choose explicitly, or keep one of the two callbacks."
                )
                return newest[0]
            others = [cb for cb in self.trainer.checkpoint_callbacks if not hasattr(cb, "newest_committed")]
            if not others:
                rank_zero_warn(
                    f'.{state_fn.value}(ckpt_path="last") found no committed checkpoint in the CheckpointSaver'
                    " folder; starting from scratch."
                )
                return None
        return original(self, state_fn, ckpt_path, *args, **kwargs)

    parse._lightning_ckpt = True  # type: ignore[attr-defined]
    _CheckpointConnector._parse_ckpt_path = parse  # type: ignore[method-assign]


def replicated_test(trainer: Trainer) -> Callable[[str, torch.Tensor], bool] | None:
    """Which tensors of this rank's checkpoint dict are identical on every rank by construction, or ``None``.

    Only under DDP (any start method): it starts every rank from rank 0's parameters and applies the
    same all-reduced gradients, so the LightningModule's parameters and the per-parameter state of
    ``torch.optim`` optimizers are equal on every rank. A dumped tensor is one of them when it
    shares storage with one (matched by identity, never by name). Buffers (BatchNorm statistics)
    are not: each rank updates its own from its own batches. Call it right after
    :func:`dump_checkpoint`, while the dumped tensors still share storage with the live ones.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or "deepspeed" in type(strategy).__name__.lower():
        return None
    params = list(trainer.lightning_module.parameters())
    storages = {p.untyped_storage().data_ptr() for p in params}
    for optimizer in trainer.optimizers:
        for param in params:
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor):
                    storages.add(value.untyped_storage().data_ptr())
    storages.discard(0)  # empty tensors have no storage to match

    def is_replicated(key: str, tensor: torch.Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() in storages

    return is_replicated


def restores_after_fit_start(trainer: Trainer) -> bool:
    """Whether the strategy restores the checkpoint after ``on_fit_start`` (FSDP, ModelParallel), not before."""
    return bool(trainer.strategy.restore_checkpoint_after_setup)


class _InPlaceLoader(Protocol):
    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None, *, into: Any = None
    ) -> dict[str, Any]: ...


def install_sharded_loader(trainer: Trainer, io: _InPlaceLoader) -> None:
    """Make this trainer's FSDP/ModelParallel strategy load this format in place (idempotent per strategy).

    Those strategies load checkpoints themselves, never through a ``CheckpointIO``. The wrapper of
    ``strategy.load_checkpoint`` (on this instance only) hands a path of ours (a checkpoint directory,
    a folder of checkpoints, a pointer, a URL) to ``io.load_checkpoint(path, into=(model, optimizers,
    strict))``, which fills the sharded model and optimizers and returns the rest of the checkpoint, as
    Lightning's loader does; anything else (a DCP directory with ``meta.pt``, a ``.ckpt`` file) goes to
    Lightning's own loader, so a run can switch to this package mid-way.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        _install_weights_loader(strategy, io)
        return
    original = strategy.load_checkpoint
    if getattr(original, "_lightning_ckpt", False):
        return

    @functools.wraps(original)
    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = strategy.broadcast(checkpoint_path)  # as Lightning's: every rank loads rank 0's path
        if not is_our_checkpoint(os.fspath(path), getattr(io, "storage_options", None)):
            return original(checkpoint_path, weights_only)
        module = strategy.lightning_module
        strict = module.strict_loading if module is not None else True
        into = InPlace(strategy.model, list(strategy.optimizers), strict)
        return io.load_checkpoint(os.fspath(path), weights_only=weights_only, into=into)

    load_checkpoint._lightning_ckpt = True  # type: ignore[attr-defined]
    strategy.load_checkpoint = load_checkpoint  # type: ignore[method-assign]


def _install_weights_loader(strategy: Any, io: _InPlaceLoader) -> None:
    """Any other strategy (one device, DDP): a checkpoint of ours is read with the weights straight into the
    model's own tensors (:func:`~lightning_ckpt.inplace.load_weights_in_place`): a cold resume touches no
    fresh memory for them and Lightning's ``load_state_dict`` copies nothing. Only while nothing can change the
    checkpoint's ``state_dict`` between the load and Lightning's ``load_state_dict``: a LightningModule that
    overrides ``on_load_checkpoint`` (which may rename, drop or transform weights) gets the whole dict as before.
    """
    original = strategy.load_checkpoint
    if getattr(original, "_lightning_ckpt", False):
        return

    @functools.wraps(original)
    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        module = strategy.lightning_module
        if (
            module is None
            or is_overridden("on_load_checkpoint", module, LightningModule)
            or strategy.checkpoint_io is not io
            or not is_our_checkpoint(os.fspath(checkpoint_path), getattr(io, "storage_options", None))
        ):
            return original(checkpoint_path, weights_only)
        into = InPlaceWeights(module, module.strict_loading)
        logging.getLogger("lightning_ckpt").debug("Reading the weights of %s into the model in place", checkpoint_path)
        return io.load_checkpoint(os.fspath(checkpoint_path), weights_only=weights_only, into=into)

    load_checkpoint._lightning_ckpt = True  # type: ignore[attr-defined]
    strategy.load_checkpoint = load_checkpoint


class InPlaceWeights(NamedTuple):
    """Where a plain (not sharded) model's weights are read in place; the rest of the checkpoint is returned whole."""

    module: Any
    strict: bool


class InPlace(NamedTuple):
    """Where a sharded load puts the state: the (sharded) model, its optimizers, and Lightning's ``strict_loading``."""

    module: Any
    optimizers: list[Any]
    strict: bool


def is_our_checkpoint(path: str, storage_options: Any = None) -> bool:
    """A checkpoint path of this format; not a DCP directory (``meta.pt``, ``.metadata``) or a single file."""
    from lightning_ckpt.locations import is_url
    from lightning_ckpt.storage import Storage

    if path.startswith(("http://", "https://")):
        return False
    if not is_url(path):
        if not _names_checkpoint_directory(path):
            return False
        return not any(os.path.exists(os.path.join(path, name)) for name in ("meta.pt", ".metadata"))
    try:
        storage, target = Storage.open(path, storage_options)
        return not any(storage.exists(storage.join(target, name)) for name in ("meta.pt", ".metadata"))
    except Exception:  # credentials, protocol, network: let Lightning's own loader report it
        return False


def _names_checkpoint_directory(path: str) -> bool:
    """Whether ``path`` is a directory (or a ``latest.symlink`` pointer): this package's, never ``torch.load``'s."""
    from lightning_ckpt.layout import POINTER_SUFFIX
    from lightning_ckpt.locations import is_url
    from lightning_ckpt.storage import Storage

    if path.startswith(("http://", "https://")):
        return False
    if not is_url(path):
        return os.path.isdir(path) or (path.endswith(POINTER_SUFFIX) and os.path.isfile(path))
    try:
        storage, target = Storage.open(path)
        return storage.isdir(target) or (path.endswith(POINTER_SUFFIX) and storage.isfile(target))
    except Exception:  # credentials, protocol, network: let Lightning's own loader report it
        return False


def install_directory_loader() -> None:
    """Make ``Model.load_from_checkpoint(path)`` load a checkpoint directory of this format (idempotent).

    Lightning opens ``path`` as one file (``IsADirectoryError``); the wrapper hands directories,
    folders of checkpoints and ``latest.symlink`` pointers to :func:`lightning_ckpt.read_checkpoint`
    (same ``map_location`` and ``weights_only``) and everything else to Lightning. It is installed
    when a ``ShardedCheckpointIO`` saves or loads; a process that never does can call it, use
    ``lightning_ckpt.read_checkpoint``, or ``lightning-ckpt consolidate`` the directory into one file.
    """
    from lightning.pytorch.core import saving

    original = saving.pl_load
    if getattr(original, "_lightning_ckpt", False):
        return

    @functools.wraps(original)
    def load(path_or_url: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        if isinstance(path_or_url, (str, os.PathLike)) and _names_checkpoint_directory(os.fspath(path_or_url)):
            from lightning_ckpt.reader import read_checkpoint

            return read_checkpoint(os.fspath(path_or_url), map_location=map_location, weights_only=weights_only)
        return original(path_or_url, map_location=map_location, weights_only=weights_only)

    load._lightning_ckpt = True  # type: ignore[attr-defined]
    saving.pl_load = load
