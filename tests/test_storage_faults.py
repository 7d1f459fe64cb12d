"""Storage faults never lose committed data.

Every fault is real: a fault-injecting proxy in front of a real S3 server (500 InternalError,
503 SlowDown, connection resets, stalls past the client's read timeout, a store that stops
answering), real full filesystems (a 2 MiB tmpfs and a loop-mounted ext4 image, both filled up
by a real file while training runs), an fsspec store that runs out of space, and a read-only mount.

Each test checks what a user would: the one error and what it names, the bytes on storage, the
previous committed checkpoint (it loads, its checksums verify, ``latest`` points to it), and that
resuming afterwards equals an uninterrupted run bit for bit.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import fsspec
import lightning as L
import pytest
import torch
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

from lightning_ckpt import CheckpointError, CheckpointSaver, ShardedCheckpointIO, latest, layout, read_checkpoint
from lightning_ckpt.demo import TinyRegressor, build_trainer, state_of

from .s3_server import STALLED, FaultProxy, S3Bucket
from .test_storage import FAST_RETRY, _fit, _saver

Weights = Mapping[str, torch.Tensor]
CLIENT_TIMEOUTS = {"read_timeout": 1, "connect_timeout": 1}  # botocore Config arguments, through s3fs config_kwargs
# A stalled request ends at the 1 s read timeout: a fit that meets stalls stays well within this bound (4 tries
# x 1 s + backoff + training: about 12 s here); with botocore's default 60 s read timeout it could not.
FAILURE_BOUND_S = 30.0


# -- shared helpers --------------------------------------------------------------------------------
def _same(a: Weights, b: Weights) -> bool:
    """Bitwise equal tensors under the same keys."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, torch.Tensor]]:
    """Weights of one uninterrupted 3-epoch run at the end of each epoch: ``{epochs_done: weights}``."""

    class Record(L.Callback):
        def __init__(self) -> None:
            self.weights: dict[int, dict[str, torch.Tensor]] = {}

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.weights[trainer.current_epoch + 1] = state_of(pl_module)

    record = Record()
    L.seed_everything(0, verbose=False)
    root = tmp_path_factory.mktemp("reference")
    build_trainer(str(root), max_epochs=3, callbacks=[record], enable_checkpointing=False).fit(TinyRegressor())
    return record.weights


def _trainer(root: Path, epochs: int, io: ShardedCheckpointIO, *callbacks: L.Callback) -> tuple[Any, L.Trainer]:
    """A fresh seeded model and a quiet CPU trainer (for fits that are expected to raise)."""
    L.seed_everything(0, verbose=False)
    return TinyRegressor(), build_trainer(str(root), max_epochs=epochs, callbacks=list(callbacks), plugins=[io])


def _resume_only(root: Path, io: ShardedCheckpointIO, epochs: int, ckpt_path: str) -> tuple[Any, L.Trainer]:
    """Resume ``ckpt_path`` with no saver (the load is what is tested) and train up to ``epochs``."""
    L.seed_everything(0, verbose=False)
    model = TinyRegressor()
    trainer = build_trainer(str(root), max_epochs=epochs, plugins=[io], enable_checkpointing=False)
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


def _visible(folder: Path) -> list[str]:
    """What readers see in a local folder (hidden staging, lock and temporary names are skipped)."""
    return sorted(n for n in os.listdir(folder) if not layout.is_hidden_name(n))


def _assert_previous_intact(folder: Path, name: str, weights: Weights) -> None:
    """``name`` is committed, ``latest`` names it, it loads with checksums verified and holds ``weights``."""
    assert latest(folder) == str(folder / name)
    assert os.readlink(folder / "latest") == name
    assert (folder / "latest.symlink").read_bytes() == name.encode()
    loaded = read_checkpoint(str(folder / name))  # sizes and CRC32 checksums verified
    assert _same(loaded["state_dict"], weights)


# -- 1. S3 through a fault-injecting proxy ---------------------------------------------------------
def _is_put(method: str, path: str) -> bool:
    """The upload of a checkpoint's file (not setup's probe, the folder's lease or the pointer)."""
    return method == "PUT" and "/run/ep" in path


def _is_file_get(method: str, path: str) -> bool:
    """The download of a checkpoint's shard or ``objects.pt`` (the bulk transfers of a resume)."""
    return method == "GET" and ("/shard-" in path or f"/{layout.OBJECTS_FILENAME}" in path)


def _with_timeouts(bucket: S3Bucket) -> S3Bucket:
    """The same bucket with 1 s connect and read timeouts in ``storage_options``."""
    options = dict(bucket.storage_options)
    options["config_kwargs"] = {**options.get("config_kwargs", {}), **CLIENT_TIMEOUTS}
    return S3Bucket(bucket.url, options)


def _assert_same_bytes(local_dir: Path, remote_dir: str, options: Mapping[str, Any]) -> None:
    """Every file of the local checkpoint directory is in the store with the same bytes, and nothing else."""
    fs = fsspec.filesystem("s3", **options)
    remote = sorted(os.path.basename(p) for p in fs.ls(remote_dir, refresh=True))
    assert remote == sorted(os.listdir(local_dir))
    for name in remote:
        assert fs.cat_file(f"{remote_dir}/{name}") == (local_dir / name).read_bytes(), name


def test_upload_500_internal_errors_are_retried_and_the_checkpoint_lands(
    s3_bucket: S3Bucket, s3_bucket_via_proxy: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    fault_proxy.fail_next(3, status=500, match=_is_put)  # at most 3 on one file: FAST_RETRY makes 4 tries
    io = ShardedCheckpointIO(cache_dir=str(tmp_path / "cache"), upload_retry=FAST_RETRY)
    model, _ = _fit(tmp_path, _saver(s3_bucket_via_proxy, tmp_path, save_interval="8ba"), 1, io)
    assert fault_proxy.count(method="PUT", status=500) == 3
    remote = f"{s3_bucket.url}/run/ep0-ba8"
    assert latest(f"{s3_bucket.url}/run", s3_bucket.storage_options) == remote
    _assert_same_bytes(tmp_path / "local" / "ep0-ba8", remote, s3_bucket.storage_options)
    assert _same(read_checkpoint(remote, storage_options=s3_bucket.storage_options)["state_dict"], state_of(model))


def test_resume_downloads_retry_through_503s_and_resets_and_equal_an_uninterrupted_run(
    s3_bucket: S3Bucket,
    s3_bucket_via_proxy: S3Bucket,
    fault_proxy: FaultProxy,
    tmp_path: Path,
    reference: dict[int, dict[str, torch.Tensor]],
) -> None:
    io = ShardedCheckpointIO(cache_dir=str(tmp_path / "a" / "cache"))
    _fit(tmp_path / "a", _saver(s3_bucket, tmp_path / "a", save_interval="8ba"), 1, io)  # no faults
    url = f"{s3_bucket.url}/run/ep0-ba8"
    fault_proxy.fail_next(2, status=503, match=_is_file_get)
    fault_proxy.drop_next(1, match=_is_file_get)
    cache = tmp_path / "b" / "cache"  # a fresh machine: empty cache
    io2 = ShardedCheckpointIO(storage_options=s3_bucket_via_proxy.storage_options, cache_dir=str(cache))
    resumed, trainer = _resume_only(tmp_path / "b", io2, 2, url)
    assert fault_proxy.count(method="GET", status=503) == 2 and fault_proxy.count(method="GET", status=0) == 1
    assert io2.loaded_path == url and trainer.global_step == 16
    assert _same(state_of(resumed), reference[2])
    downloaded = next((cache / "downloads").iterdir()) / "ep0-ba8"
    _assert_same_bytes(downloaded, url, s3_bucket.storage_options)


def test_a_stall_past_the_read_timeout_is_retried_on_upload_and_on_download(
    s3_bucket: S3Bucket, s3_bucket_via_proxy: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    bucket = _with_timeouts(s3_bucket_via_proxy)
    start = time.monotonic()
    fault_proxy.stall_next(1, match=_is_put)  # never answered: only the client's timeout ends it
    io = ShardedCheckpointIO(cache_dir=str(tmp_path / "a" / "cache"), upload_retry=FAST_RETRY)
    model, _ = _fit(tmp_path / "a", _saver(bucket, tmp_path / "a", save_interval="8ba"), 1, io)
    url = f"{s3_bucket.url}/run/ep0-ba8"
    assert fault_proxy.count(method="PUT", status=STALLED) == 1
    _assert_same_bytes(tmp_path / "a" / "local" / "ep0-ba8", url, s3_bucket.storage_options)

    fault_proxy.stall_next(1, match=_is_file_get)
    io2 = ShardedCheckpointIO(storage_options=bucket.storage_options, cache_dir=str(tmp_path / "b" / "cache"))
    resumed, _ = _resume_only(tmp_path / "b", io2, 1, url)  # max_epochs reached: the weights are the checkpoint's
    assert fault_proxy.count(method="GET", status=STALLED) == 1
    assert _same(state_of(resumed), state_of(model))
    assert time.monotonic() - start < FAILURE_BOUND_S, "each stall ended at the 1 s read timeout, not later"


def test_a_store_that_stops_answering_gives_one_clear_error_in_bounded_time_and_loses_nothing(
    s3_bucket: S3Bucket,
    s3_bucket_via_proxy: S3Bucket,
    fault_proxy: FaultProxy,
    tmp_path: Path,
    reference: dict[int, dict[str, torch.Tensor]],
) -> None:
    bucket = _with_timeouts(s3_bucket_via_proxy)
    io = ShardedCheckpointIO(cache_dir=str(tmp_path / "a" / "cache"), upload_retry=FAST_RETRY)
    _fit(tmp_path / "a", _saver(bucket, tmp_path / "a", save_interval="8ba"), 1, io)  # ep0-ba8 in the store

    class StoreStopsAnswering(L.Callback):
        def on_train_start(self, *args: Any) -> None:  # after the resume downloaded ep0-ba8
            fault_proxy.stall(True)

    io2 = ShardedCheckpointIO(cache_dir=str(tmp_path / "b" / "cache"), upload_retry=FAST_RETRY)
    model, trainer = _trainer(tmp_path / "b", 2, io2, _saver(bucket, tmp_path / "b", save_interval="8ba"),
                              StoreStopsAnswering())  # fmt: skip
    start = time.monotonic()
    with pytest.raises(Exception) as info:  # the client's own error type, with a note naming the checkpoint
        trainer.fit(model, ckpt_path="last")
    elapsed = time.monotonic() - start
    fault_proxy.stall(False)
    assert type(info.value).__name__ == "ReadTimeoutError", repr(info.value)
    assert f"{bucket.url.removeprefix('s3://')}/run/ep1-ba16/" in str(info.value), "names the object it timed out on"
    notes = getattr(info.value, "__notes__", [])
    assert any(f"while uploading checkpoint ep1-ba16 to {bucket.url}/run" in note for note in notes), notes
    assert elapsed < FAILURE_BOUND_S
    io2.wait_for_uploads()  # reported once: nothing is raised again
    # Training state intact: the failure only cost the upload.
    assert trainer.global_step == 16
    assert _same(state_of(model), reference[2])
    local = tmp_path / "b" / "local" / "ep1-ba16"
    assert _same(read_checkpoint(str(local))["state_dict"], reference[2]), "the local committed copy is kept"
    # The store still holds the previous checkpoint, committed and pointed to; the new one is not committed.
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options)
    assert latest(f"{s3_bucket.url}/run", s3_bucket.storage_options) == f"{s3_bucket.url}/run/ep0-ba8"
    assert fs.cat_file(f"{s3_bucket.url}/run/latest.symlink") == b"ep0-ba8"
    assert not fs.exists(f"{s3_bucket.url}/run/ep1-ba16/{layout.MANIFEST_FILENAME}")
    previous = read_checkpoint(f"{s3_bucket.url}/run/ep0-ba8", storage_options=s3_bucket.storage_options)
    assert _same(previous["state_dict"], reference[1])


# -- 2a. A real filesystem fills up while training -------------------------------------------------
@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``mount(target, *mount_args)``: mount a filesystem for this test (root only), unmounted at teardown.

    Skips the test, with the reason, where mounting is not permitted.
    """
    mounted: list[Path] = []

    def do_mount(target: Path, *args: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a filesystem needs root")
        target.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.skip(f"`mount {' '.join(args)}` is not permitted here: {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield do_mount
    for target in reversed(mounted):
        _unmount(target)


def _unmount(target: Path) -> None:
    """Unmount ``target``; lazily if a checkpoint loaded from it is still memory-mapped."""
    if subprocess.run(["umount", str(target)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def _small_disk(kind: str, tmp_path: Path, mount: Callable[..., Path]) -> Path:
    """A freshly mounted small filesystem: a 2 MiB tmpfs, or an 8 MiB ext4 image on a loop device."""
    if kind == "tmpfs":
        return mount(tmp_path / "disk", "-t", "tmpfs", "-o", "size=2m", "tmpfs")
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed: the ext4 (O_DIRECT on a block device) variant needs it")
    image = tmp_path / "disk.ext4"
    with open(image, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    return mount(tmp_path / "disk", "-o", "loop", str(image))


def _fill(filler: Path, leave: int) -> None:
    """Write ``filler`` until the filesystem is full, then give back ``leave`` bytes.

    Writes are repeated after each fsync with smaller blocks: ext4 reserves space for delayed
    allocation pessimistically, so a write can fail before the disk is really full.
    """
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (256 * 1024, 4096, 1024, 1024):
            block = b"\0" * size
            while True:
                try:
                    os.write(fd, block)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    break
            os.fsync(fd)
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
        os.fsync(fd)
    finally:
        os.close(fd)


class FillDiskAtEpoch(L.Callback):
    """At the start of ``epoch`` (once the saves before it are committed), fill the disk but ``leave`` bytes."""

    def __init__(self, filler: Path, epoch: int, leave: int = 8192) -> None:
        self.filler, self.epoch, self.leave = filler, epoch, leave

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.strategy.checkpoint_io.wait_for_save()  # type: ignore[attr-defined]
            _fill(self.filler, self.leave)


@pytest.mark.parametrize(
    ("disk", "async_save", "direct_io", "epochs", "raised_at_step"),
    [
        ("tmpfs", False, True, 2, 16),  # synchronous: the failing save itself raises
        ("tmpfs", True, False, 3, 24),  # asynchronous, buffered writes: raised at the next save
        ("ext4", False, True, 2, 16),  # O_DIRECT through the bounce buffers, on a block device's filesystem
        ("ext4", True, True, 2, 16),  # O_DIRECT from the staging buffer: raised at fit end
    ],
    ids=["tmpfs-sync", "tmpfs-async-buffered", "ext4-sync-odirect", "ext4-async-odirect"],
)
def test_a_full_disk_fails_the_save_with_enospc_and_keeps_the_previous_checkpoint(
    tmp_path: Path,
    mount: Callable[..., Path],
    reference: dict[int, dict[str, torch.Tensor]],
    disk: str,
    async_save: bool,
    direct_io: bool,
    epochs: int,
    raised_at_step: int,
) -> None:
    root = _small_disk(disk, tmp_path, mount)
    folder, filler = root / "run", root / "filler"

    def saver() -> CheckpointSaver:
        return CheckpointSaver(folder=folder, save_interval="1ep", num_checkpoints_to_keep=1, async_save=async_save,
                               run_name="full")  # fmt: skip

    io = ShardedCheckpointIO(direct_io=direct_io)
    model, trainer = _trainer(tmp_path / "a", epochs, io, saver(), FillDiskAtEpoch(filler, epoch=1))
    with pytest.raises(OSError) as info:
        trainer.fit(model)
    assert info.value.errno == errno.ENOSPC, repr(info.value)
    notes = getattr(info.value, "__notes__", [])
    assert any(str(folder) in note and "ep1-ba16" in note for note in notes), notes
    io.wait_for_save()  # reported once: nothing is raised again
    assert trainer.global_step == raised_at_step
    assert shutil.disk_usage(root).free < 16384, "the disk really was full"
    # Nothing readers could mistake for a checkpoint; the previous one intact, not rotated away (keep=1).
    assert _visible(folder) == ["ep0-ba8", "latest", "latest.symlink"]
    _assert_previous_intact(folder, "ep0-ba8", reference[1])

    filler.unlink()  # the user frees space and restarts: the run goes on from the kept checkpoint
    io2 = ShardedCheckpointIO(direct_io=direct_io)
    resumed, _ = _fit(tmp_path / "b", saver(), epochs, io2, ckpt_path="last")
    assert io2.loaded_path == str(folder / "ep0-ba8")
    assert _same(state_of(resumed), reference[epochs])
    assert not [n for n in os.listdir(folder) if layout.is_partial_dirname(n)], "staging leftovers removed"
    newest = f"ep{epochs - 1}-ba{8 * epochs}"
    assert _visible(folder) == ["ep0-ba8", newest, "latest", "latest.symlink"], "keep=1 spares the one resumed from"
    _assert_previous_intact(folder, newest, reference[epochs])


# -- 2b. An object store that runs out of space ----------------------------------------------------
class FullMemoryFileSystem(MemoryFileSystem):
    """``fullmem://``: an in-memory object store with a byte quota; a write past it raises ENOSPC.

    Like a failed upload to an object store, a write that hits the quota leaves no object behind.
    """

    protocol = "fullmem"
    store: ClassVar[dict[str, Any]] = {}  # its own, apart from memory://
    pseudo_dirs: ClassVar[list[str]] = [""]
    capacity: ClassVar[int] = 1 << 40

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        return super()._strip_protocol(path.removeprefix("fullmem://") if isinstance(path, str) else path)

    @classmethod
    def used(cls) -> int:
        """Bytes stored now."""
        return sum(f.size for f in cls.store.values())

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if mode not in ("wb", "xb"):
            return super()._open(path, mode, **kwargs)
        path = self._strip_protocol(path)
        if mode == "xb" and path in self.store:
            raise FileExistsError(path)
        file = _QuotaFile(self, path)
        file.commit()
        if kwargs.get("data"):
            file.write(kwargs["data"])
            file.seek(0)
        return file


class _QuotaFile(MemoryFile):
    def write(self, data: Any) -> int:
        fs = self.fs
        others = sum(f.size for p, f in fs.store.items() if p != self.path)
        if others + self.tell() + memoryview(data).nbytes > fs.capacity:
            fs.store.pop(self.path, None)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), fs.unstrip_protocol(self.path))
        return super().write(data)


fsspec.register_implementation("fullmem", FullMemoryFileSystem, clobber=True)


@pytest.fixture
def full_store() -> Iterator[type[FullMemoryFileSystem]]:
    """An empty ``fullmem://`` store without a quota (set ``capacity`` to impose one)."""
    FullMemoryFileSystem.store.clear()
    FullMemoryFileSystem.pseudo_dirs[:] = [""]
    FullMemoryFileSystem.capacity = 1 << 40
    yield FullMemoryFileSystem
    FullMemoryFileSystem.store.clear()


class FillStoreAtEpoch(L.Callback):
    """At the start of ``epoch`` (once earlier checkpoints are committed in the store), leave ``leave`` bytes free."""

    def __init__(self, store: type[FullMemoryFileSystem], epoch: int, leave: int = 1024) -> None:
        self.store, self.epoch, self.leave = store, epoch, leave

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.strategy.checkpoint_io.wait_for_uploads()  # type: ignore[attr-defined]
            self.store.capacity = self.store.used() + self.leave


def test_a_full_object_store_fails_the_upload_with_enospc_and_loses_nothing(
    full_store: type[FullMemoryFileSystem], tmp_path: Path, reference: dict[int, dict[str, torch.Tensor]]
) -> None:
    folder = f"fullmem:///bucket-{uuid.uuid4().hex[:8]}/run"  # as fsspec spells it

    def saver() -> CheckpointSaver:
        return CheckpointSaver(folder=folder, local_folder=str(tmp_path / "local"), save_interval="1ep",
                               num_checkpoints_to_keep=1, run_name="full")  # fmt: skip

    io = ShardedCheckpointIO(cache_dir=str(tmp_path / "cache"), upload_retry=FAST_RETRY)
    model, trainer = _trainer(tmp_path / "a", 2, io, saver(), FillStoreAtEpoch(full_store, epoch=1))
    with pytest.raises(OSError) as info:  # raised at fit end, where the last upload is awaited
        trainer.fit(model)
    assert info.value.errno == errno.ENOSPC, repr(info.value)
    notes = getattr(info.value, "__notes__", [])
    assert any(f"while uploading checkpoint ep1-ba16 to {folder}" in note for note in notes), notes
    io.wait_for_uploads()  # reported once: nothing is raised again
    assert _same(read_checkpoint(str(tmp_path / "local" / "ep1-ba16"))["state_dict"], reference[2]), "kept locally"
    # In the store: the previous checkpoint, committed, pointed to, loadable; the new one not committed.
    assert latest(folder) == f"{folder}/ep0-ba8"
    assert fsspec.filesystem("fullmem").cat_file(f"{folder}/latest.symlink") == b"ep0-ba8"
    assert _same(read_checkpoint(f"{folder}/ep0-ba8")["state_dict"], reference[1])

    full_store.capacity = 1 << 40  # space freed: a restart uploads what only the local disk has, then resumes it
    io2 = ShardedCheckpointIO(cache_dir=str(tmp_path / "cache2"), upload_retry=FAST_RETRY)
    resumed, _ = _fit(tmp_path / "b", saver(), 2, io2, ckpt_path="last")
    assert io2.loaded_path == f"{folder}/ep1-ba16"
    assert fsspec.filesystem("fullmem").cat_file(f"{folder}/latest.symlink") == b"ep1-ba16", "pointer moved too"
    assert _same(state_of(resumed), reference[2])
    assert _same(read_checkpoint(f"{folder}/ep1-ba16")["state_dict"], reference[2])


def test_a_plugin_save_straight_into_a_full_store_raises_enospc_and_keeps_the_previous(
    full_store: type[FullMemoryFileSystem],
) -> None:
    folder = f"fullmem:///bucket-{uuid.uuid4().hex[:8]}/run"  # as fsspec spells it
    weights = {step: torch.arange(4096.0) * step for step in (1, 2)}
    io = ShardedCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": weights[1]}, "global_step": 1}, f"{folder}/ba1")
    full_store.capacity = full_store.used() + 1024
    with pytest.raises(OSError) as info:
        io.save_checkpoint({"state_dict": {"w": weights[2]}, "global_step": 2}, f"{folder}/ba2")
    assert info.value.errno == errno.ENOSPC and "/ba2/" in str(info.value), repr(info.value)
    assert latest(folder) == f"{folder}/ba1"
    assert not fsspec.filesystem("fullmem").exists(f"{folder}/ba2/{layout.MANIFEST_FILENAME}")
    assert torch.equal(read_checkpoint(f"{folder}/ba1")["state_dict"]["w"], weights[1])


# -- 3. A read-only folder -------------------------------------------------------------------------
@pytest.fixture
def make_read_only() -> Iterator[Callable[[Path], None]]:
    """``make_read_only(path)``: as root, bind-mount ``path`` read-only onto itself (chmod does not stop
    root); otherwise ``chmod 0o555``. Undone at teardown."""
    undo: list[Callable[[], None]] = []

    def read_only(path: Path) -> None:
        if os.geteuid() != 0:
            modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
            for p in modes:
                p.chmod(0o555)

            def restore() -> None:
                for p, mode in modes.items():
                    p.chmod(mode)

            undo.append(restore)
            return
        for args in (["--bind", str(path), str(path)], ["-o", "remount,bind,ro", str(path)]):
            result = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                pytest.skip(f"a read-only bind mount is not permitted here: {result.stderr.strip()}")
            if "--bind" in args:
                undo.append(lambda: _unmount(path))

    yield read_only
    for step in reversed(undo):
        step()


def test_a_read_only_folder_fails_before_training_and_still_resumes_into_another_folder(
    tmp_path: Path, make_read_only: Callable[[Path], None], reference: dict[int, dict[str, torch.Tensor]]
) -> None:
    old = tmp_path / "old"
    _fit(tmp_path / "a", CheckpointSaver(folder=old, save_interval="1ep", run_name="ro"), 1, ShardedCheckpointIO())
    make_read_only(old)
    before = {p.name: p.read_bytes() for p in (old / "ep0-ba8").iterdir()}

    model, trainer = _trainer(tmp_path / "b", 2, ShardedCheckpointIO(),
                              CheckpointSaver(folder=old, save_interval="1ep", run_name="ro"))  # fmt: skip
    initial = state_of(model)
    with pytest.raises(CheckpointError, match=rf"^folder={str(old)!r} is not writable") as info:
        trainer.fit(model, ckpt_path="last")
    assert "Read-only file system" in str(info.value) or "Permission denied" in str(info.value)
    assert trainer.global_step == 0 and _same(state_of(model), initial), "failed before training and loading"

    new = tmp_path / "new"  # the read-only folder still serves as ckpt_path while saving elsewhere
    io = ShardedCheckpointIO()
    resumed, trainer = _fit(tmp_path / "c", CheckpointSaver(folder=new, save_interval="1ep", run_name="ro"), 2, io,
                            ckpt_path=str(old))  # fmt: skip
    assert io.loaded_path == str(old / "ep0-ba8") and trainer.global_step == 16
    assert _same(state_of(resumed), reference[2])
    assert _visible(new) == ["ep1-ba16", "latest", "latest.symlink"]
    assert {p.name: p.read_bytes() for p in (old / "ep0-ba8").iterdir()} == before
