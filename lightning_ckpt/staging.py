"""Host staging buffers: the point-in-time snapshot of a shard, reused across saves.

An asynchronous save blocks training only while it copies the shard's tensors into a
:class:`StagingBuffer`. The buffer holds the shard's whole file image (header, then the tensor
bytes at their file offsets), so the background writer sends it to disk in large aligned writes
with no further copy. It is allocated once and kept: copying into memory that is already faulted
in runs at memory bandwidth (13-17 GB/s on a 2-core VM), while filling fresh memory pays a page
fault per 4 KiB (1.4-2.5 GB/s). The buffer only grows when a later shard is larger.

* CPU tensors are copied with ``Tensor.copy_`` (multi-threaded by torch); the snapshot is complete
  when :meth:`StagingBuffer.stage` returns.
* CUDA tensors are copied into **pinned** memory on a side stream. The training stream is made to
  wait for that copy (an event, no host synchronisation), so the optimizer's next kernels cannot
  modify a parameter before it is copied; :meth:`StagedShard.ready` blocks the writer until the copy
  has landed.

The image starts on a 4096-byte boundary and its capacity is rounded up to 4096 bytes, as
``O_DIRECT`` writes require (see :mod:`lightning_ckpt.writer`).

Example:
    >>> import torch
    >>> from lightning_ckpt.writer import plan_shard
    >>> w = torch.arange(4, dtype=torch.float32)
    >>> buffer = StagingBuffer()
    >>> staged = buffer.stage(plan_shard({"w": w}, file="shard-00000-of-00001.safetensors"))
    >>> _ = w.add_(100)  # training goes on; the snapshot does not move
    >>> staged.plan.tensors[0]
    tensor([0., 1., 2., 3.])
    >>> staged.image.data_ptr() % 4096, buffer.capacity >= staged.plan.total_size
    (0, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from lightning_ckpt.writer import ALIGNMENT, ShardPlan

__all__ = ["StagedShard", "StagingBuffer", "round_up"]

_GROWTH_ROUNDING = 2 * 1024 * 1024


def round_up(n: int, multiple: int = ALIGNMENT) -> int:
    """``n`` rounded up to a multiple of ``multiple``.

    Example:
        >>> round_up(1), round_up(4096), round_up(4097)
        (4096, 4096, 8192)
    """
    return -(-n // multiple) * multiple


@dataclass
class StagedShard:
    """A shard whose bytes are a snapshot in a staging buffer.

    Attributes:
        plan: the shard plan, its tensors now views into ``image``.
        image: the shard's file bytes (``plan.total_size`` of them) at an aligned address; the
            underlying buffer extends to a multiple of 4096 bytes past the end.
        padded: ``image`` extended to the next multiple of 4096 bytes (for ``O_DIRECT``).
    """

    plan: ShardPlan
    image: torch.Tensor
    padded: torch.Tensor
    _ready: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def ready(self) -> None:
        """Block until device-to-host copies have landed (no-op for CPU tensors)."""
        for wait in self._ready:
            wait()
        self._ready.clear()


class StagingBuffer:
    """One reusable, 4096-aligned host buffer (pinned when staging CUDA tensors).

    Only one staged shard may be alive per buffer: the caller finishes writing a staged shard
    before staging the next one (``ShardedCheckpointIO`` keeps one save in flight).
    """

    def __init__(self) -> None:
        self._raw: torch.Tensor | None = None
        self._pinned = False
        self._aligned: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        """Bytes the buffer can hold without growing."""
        return 0 if self._aligned is None else self._aligned.numel()

    @property
    def pinned(self) -> bool:
        """Whether the buffer is page-locked (CUDA pinned) memory."""
        return self._pinned

    def release(self) -> None:
        """Free the buffer (it is allocated again by the next :meth:`stage`)."""
        self._raw = self._aligned = None

    def _ensure(self, nbytes: int, pinned: bool) -> torch.Tensor:
        needed = round_up(max(nbytes, 1))
        if self._aligned is None or self.capacity < needed or (pinned and not self._pinned):
            self.release()
            size = round_up(needed, _GROWTH_ROUNDING)
            raw = torch.empty(size + ALIGNMENT, dtype=torch.uint8, pin_memory=pinned)
            shift = (-raw.data_ptr()) % ALIGNMENT
            self._raw, self._pinned = raw, pinned
            self._aligned = raw[shift : shift + size]
        assert self._aligned is not None
        return self._aligned

    def stage(self, plan: ShardPlan) -> StagedShard:
        """Copy the header and every tensor of ``plan`` into the buffer; return the staged shard."""
        on_cuda = any(t.device.type == "cuda" for t in plan.tensors)
        buffer = self._ensure(plan.total_size, pinned=on_cuda)
        image = buffer[: plan.total_size]
        header_size = len(plan.header)
        image[:header_size].copy_(torch.frombuffer(bytearray(plan.header), dtype=torch.uint8))
        views: list[torch.Tensor] = []
        cuda_copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for entry, tensor in zip(plan.entries, plan.tensors, strict=True):
            view = image[entry.offset : entry.offset + entry.nbytes].view(tensor.dtype).view(tensor.shape)
            if tensor.device.type == "cuda":
                cuda_copies.append((view, tensor))
            elif entry.nbytes:
                view.copy_(tensor.detach())
            views.append(view)
        staged = StagedShard(
            plan=replace(plan, tensors=views),
            image=image,
            padded=buffer[: round_up(plan.total_size)],
        )
        if cuda_copies:
            staged._ready.append(_copy_on_side_stream(cuda_copies))
        return staged


def _copy_on_side_stream(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
    """Start device-to-host copies on a side stream; return a function that waits for them.

    The side stream first waits for the work already queued on each source tensor's stream (the
    step that produced it); each of those streams then waits for the copy before running anything
    queued later, so training cannot overwrite a tensor before it is staged. Nothing blocks the host.
    """
    done: list[torch.cuda.Event] = []
    by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for dst, src in copies:
        by_device.setdefault(src.device, []).append((dst, src))
    for device, pairs in by_device.items():
        with torch.cuda.device(device):
            training = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(training)
            with torch.cuda.stream(side):
                for dst, src in pairs:
                    dst.copy_(src.detach(), non_blocking=True)
                    src.record_stream(side)
            event = torch.cuda.Event()
            event.record(side)
            training.wait_event(event)
            done.append(event)

    def wait() -> None:
        for event in done:
            event.synchronize()

    return wait
