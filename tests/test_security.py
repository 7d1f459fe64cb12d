"""Security: loading never runs pickled code by default, tensors are never unpickled, credentials
never leak, and names read from storage never lead outside the checkpoint folder.

Everything here is what a user (or an attacker who controls a checkpoint) can do with the public
API, against real parts: a real ``Trainer``, real files, and a real S3 server on 127.0.0.1.
Monkeypatching appears only as an observation tool (recording what reaches the unpickler).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import lightning as L
import pytest
import torch

from lightning_ckpt import (
    CheckpointError,
    CheckpointSaver,
    ConfigError,
    CorruptCheckpointError,
    RetryPolicy,
    ShardedCheckpointIO,
    latest,
    read_checkpoint,
)
from lightning_ckpt.collective import save_checkpoint_dir
from lightning_ckpt.demo import TinyRegressor, build_trainer
from lightning_ckpt.storage import Storage

from .s3_server import FaultProxy, S3Bucket

SHARD = "shard-00000-of-00001.safetensors"
FAST_RETRY = RetryPolicy(attempts=2, initial_backoff_s=0.05, max_backoff_s=0.1)


# -- helpers -------------------------------------------------------------------------------------
def _crc(data: bytes) -> str:
    return f"crc32:{zlib.crc32(data):08x}"


def _edit_manifest(ckpt: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    edit(manifest)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _replace_file(ckpt: Path, name: str, data: bytes) -> None:
    """Replace one file of a committed checkpoint and update its size and checksum in the manifest."""
    (ckpt / name).write_bytes(data)

    def update(manifest: dict[str, Any]) -> None:
        entry = next(f for f in manifest["files"] if f["name"] == name)
        entry["size"], entry["checksum"] = len(data), _crc(data)

    _edit_manifest(ckpt, update)


def _fit(root: Path, *, ckpt_path: str | None = None, steps: int = 8, **kwargs: Any) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = build_trainer(str(root), max_steps=steps, max_epochs=-1, **kwargs)
    trainer.fit(TinyRegressor(), ckpt_path=ckpt_path)
    return trainer


# -- loading never executes pickled code by default -----------------------------------------------
class _RunsCode:
    """Unpickling this runs code (it creates ``marker``), as a malicious checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.fixture
def malicious_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A committed checkpoint of a real fit whose ``objects.pt`` runs code when unpickled; the
    manifest's size and checksum are updated, so the pickle is the only thing wrong with it."""
    _fit(tmp_path / "train", callbacks=[CheckpointSaver(folder=tmp_path / "ckpts", save_interval="8ba", run_name="r")])
    ckpt = tmp_path / "ckpts" / "ep0-ba8"
    marker = tmp_path / "code-ran"
    skeleton = torch.load(ckpt / "objects.pt", weights_only=True)
    skeleton["hyper_parameters"]["note"] = _RunsCode(marker)
    buffer = io.BytesIO()
    torch.save(skeleton, buffer)
    _replace_file(ckpt, "objects.pt", buffer.getvalue())
    assert latest(tmp_path / "ckpts") == str(ckpt), "it verifies: sizes and checksums match the manifest"
    return ckpt, marker


def _refuses(load: Callable[[], object], ckpt: Path, marker: Path) -> None:
    with pytest.raises(pickle.UnpicklingError) as info:
        load()
    message = str(info.value)
    assert str(ckpt / "objects.pt") in message, "the error names the file"
    assert "weights_only=False" in message, "the error tells how to opt out"
    assert not marker.exists(), "the pickled code did not run"


def test_read_checkpoint_refuses_to_run_pickled_code(malicious_checkpoint: tuple[Path, Path]) -> None:
    ckpt, marker = malicious_checkpoint
    _refuses(lambda: read_checkpoint(str(ckpt)), ckpt, marker)
    _refuses(lambda: read_checkpoint(str(ckpt), weights_only=None), ckpt, marker)


def test_checkpoint_io_refuses_to_run_pickled_code(malicious_checkpoint: tuple[Path, Path]) -> None:
    ckpt, marker = malicious_checkpoint
    _refuses(lambda: ShardedCheckpointIO().load_checkpoint(ckpt), ckpt, marker)
    _refuses(lambda: ShardedCheckpointIO().load_checkpoint(ckpt.parent / "latest"), ckpt, marker)


@pytest.mark.parametrize("ckpt_path", ["dir", "last"])
def test_trainer_fit_refuses_to_run_pickled_code(
    malicious_checkpoint: tuple[Path, Path], tmp_path: Path, ckpt_path: str
) -> None:
    ckpt, marker = malicious_checkpoint
    saver = CheckpointSaver(folder=ckpt.parent, save_interval="8ba", run_name="r")
    path = str(ckpt) if ckpt_path == "dir" else "last"
    _refuses(lambda: _fit(tmp_path / "resume", ckpt_path=path, callbacks=[saver]), ckpt, marker)


def test_weights_only_false_is_the_explicit_opt_out(malicious_checkpoint: tuple[Path, Path]) -> None:
    """The same checkpoint loads when the user opts out: proof that the refusals above are real."""
    ckpt, marker = malicious_checkpoint
    loaded = read_checkpoint(str(ckpt), weights_only=False)
    assert marker.exists(), "with weights_only=False the pickled code ran"
    assert loaded["global_step"] == 8


def test_a_legacy_ckpt_file_is_refused_too(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {"w": torch.ones(2)}, "evil": _RunsCode(marker)}, tmp_path / "old.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        ShardedCheckpointIO().load_checkpoint(tmp_path / "old.ckpt")
    assert not marker.exists()


# -- tensor data is never unpickled ---------------------------------------------------------------
@pytest.mark.parametrize("weights_only", [None, False])
def test_tensor_bytes_are_raw_and_never_reach_an_unpickler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_only: bool | None
) -> None:
    weights = torch.arange(4096, dtype=torch.float32) * 1.5 + 7.0  # a byte pattern that appears nowhere else
    ckpt = Path(save_checkpoint_dir({"state_dict": {"w": weights}, "global_step": 1}, tmp_path / "c"))
    raw = (ckpt / SHARD).read_bytes()
    assert not raw.startswith((b"\x80", b"PK")), "no pickle protocol header, not a torch.save zip archive"
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    begin, end = header["state_dict/w"]["data_offsets"]
    assert raw[8 + header_len + begin : 8 + header_len + end] == weights.numpy().tobytes(), "raw tensor bytes"

    seen: list[bytes] = []  # observation only: what each call of torch.load was given
    real_load = torch.load

    def observed_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(f.getvalue() if isinstance(f, io.BytesIO) else Path(f).read_bytes())
        return real_load(f, *args, **kwargs)

    def no_pickle(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the pickle module itself is never used to read a checkpoint")

    monkeypatch.setattr(torch, "load", observed_load)
    if weights_only is None:  # the safe default unpickles with torch's own restricted unpickler
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(pickle, name, no_pickle)
    loaded = read_checkpoint(str(ckpt), weights_only=weights_only)
    assert torch.equal(loaded["state_dict"]["w"], weights)
    assert seen == [(ckpt / "objects.pt").read_bytes()], "only objects.pt is ever unpickled"
    assert weights.numpy().tobytes()[:64] not in seen[0], "and it holds no tensor data"


# -- names from storage never lead outside the checkpoint folder ----------------------------------
class _OpenedPaths:
    """Records every file opened by Python code (``open``, ``os.open``) under ``root`` while active."""

    active: _OpenedPaths | None = None
    installed = False

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.paths: list[str] = []

    @classmethod
    def _hook(cls, event: str, args: tuple[Any, ...]) -> None:
        current = cls.active
        if current is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(current.root):
                current.paths.append(path)

    @contextlib.contextmanager
    def watch(self) -> Iterator[_OpenedPaths]:
        if not _OpenedPaths.installed:  # an audit hook cannot be removed: install one gated hook per process
            sys.addaudithook(_OpenedPaths._hook)
            _OpenedPaths.installed = True
        _OpenedPaths.active = self
        try:
            yield self
        finally:
            _OpenedPaths.active = None


def _committed(folder: Path, name: str = "c", step: int = 3) -> Path:
    return Path(save_checkpoint_dir({"w": torch.arange(1000.0), "global_step": step}, folder / name))


def _rename_file(index: int, new_name: str) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        old = manifest["files"][index]["name"]
        manifest["files"][index]["name"] = new_name
        for chunk in (chunk for tensor in manifest["tensors"] for chunk in tensor["chunks"]):
            if chunk["file"] == old:
                chunk["file"] = new_name
        if manifest.get("objects_file") == old:
            manifest["objects_file"] = new_name

    return edit


def _tensor_file(name: str) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["tensors"][0]["chunks"][0]["file"] = name

    return edit


def _objects_file(name: str) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["objects_file"] = name

    return edit


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        pytest.param(_rename_file(0, "../x"), "file name '../x'", id="file-dotdot-slash"),
        pytest.param(_rename_file(0, "/etc/passwd"), "file name '/etc/passwd'", id="file-absolute"),
        pytest.param(_rename_file(0, "a/b"), "file name 'a/b'", id="file-subdirectory"),
        pytest.param(_rename_file(0, ".."), "file name '..'", id="file-dotdot"),
        pytest.param(_rename_file(0, "."), "file name '.'", id="file-dot"),
        pytest.param(_rename_file(0, ""), "file name ''", id="file-empty"),
        pytest.param(_rename_file(1, "..\\x"), "file name '..\\\\x'", id="file-backslash"),
        pytest.param(_rename_file(1, "x\0y"), "file name 'x\\x00y'", id="file-nul"),
        pytest.param(_tensor_file("../c2/" + SHARD), "names unlisted file '../c2/", id="tensor-file-unlisted"),
        pytest.param(_tensor_file("other.safetensors"), "names unlisted file 'other", id="tensor-file-unlisted-plain"),
        pytest.param(_objects_file("../c2/objects.pt"), "objects file '../c2/objects.pt'", id="objects-file-unlisted"),
    ],
)
def test_manifest_names_outside_the_checkpoint_are_rejected_before_anything_is_read(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], complaint: str
) -> None:
    ckpt = _committed(tmp_path)
    _committed(tmp_path, "c2")  # what "../c2/..." names: a real checkpoint's files, which must not be read
    (tmp_path / "x").write_bytes((ckpt / SHARD).read_bytes())  # what "../x" names, with the right size
    _edit_manifest(ckpt, edit)
    for load in (lambda: read_checkpoint(str(ckpt)), lambda: ShardedCheckpointIO().load_checkpoint(ckpt)):
        with _OpenedPaths(tmp_path).watch() as opened, pytest.raises(CorruptCheckpointError) as info:
            load()
        assert str(ckpt / "manifest.json") in str(info.value) and complaint in str(info.value)
        assert opened.paths == [str(ckpt / "manifest.json")], "only the manifest was read"


@pytest.mark.parametrize("pointer", ["../other", "/abs", "a/../../b", "..", "other/..", "ep0/../../other"])
def test_a_pointer_cannot_lead_out_of_its_folder(tmp_path: Path, pointer: str) -> None:
    folder = tmp_path / "run"
    _committed(folder, "ep0")
    for target in (tmp_path / "other", tmp_path / "b"):  # where the pointers lead: real checkpoints
        _committed(target.parent, target.name)
    text = str(tmp_path / "other") if pointer == "/abs" else pointer
    (folder / "latest.symlink").write_text(text)
    io_ = ShardedCheckpointIO()
    for ckpt_path in (folder / "latest.symlink", folder / "latest"):  # "latest": only the pointer file exists
        with _OpenedPaths(tmp_path).watch() as opened, pytest.raises(CorruptCheckpointError) as info:
            io_.load_checkpoint(ckpt_path)
        assert f"{folder / 'latest.symlink'}: pointer holds {text!r}" in str(info.value)
        assert opened.paths == [str(folder / "latest.symlink")], "nothing but the pointer was read"
    assert io_.loaded_path is None


# -- the same in an object store ------------------------------------------------------------------
def test_a_remote_pointer_cannot_lead_out_of_its_folder(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    options = s3_bucket.storage_options
    ckpt = {"w": torch.ones(3), "global_step": 1}
    save_checkpoint_dir(ckpt, f"{s3_bucket.url}/run/ep0-ba1", storage_options=options)
    save_checkpoint_dir(ckpt, f"{s3_bucket.url}/other", storage_options=options)  # a real checkpoint out there
    fs = fsspec.filesystem("s3", **options)
    fs.pipe_file(f"{s3_bucket.url}/run/latest.symlink", b"../other")
    cache = tmp_path / "cache"
    for ckpt_path in ("latest.symlink", "latest"):
        with pytest.raises(CorruptCheckpointError, match=r"run/latest\.symlink: pointer holds '\.\./other'"):
            ShardedCheckpointIO(storage_options=options, cache_dir=str(cache)).load_checkpoint(
                f"{s3_bucket.url}/run/{ckpt_path}"
            )
    assert not cache.exists(), "nothing was downloaded"


@pytest.mark.parametrize("bad_name", ["../x", "/etc/passwd", "a/b", "..", "../../other-run/x"])
def test_a_remote_manifest_cannot_name_files_outside_its_checkpoint(
    s3_bucket: S3Bucket, tmp_path: Path, bad_name: str
) -> None:
    options = s3_bucket.storage_options
    url = save_checkpoint_dir({"w": torch.ones(3), "global_step": 1}, f"{s3_bucket.url}/run/ep0-ba1",
                              storage_options=options)  # fmt: skip
    fs = fsspec.filesystem("s3", **options)
    manifest = json.loads(fs.cat_file(f"{url}/manifest.json"))
    shard = next(f for f in manifest["files"] if f["name"] == SHARD)
    fs.pipe_file(f"{s3_bucket.url}/run/x", fs.cat_file(f"{url}/{SHARD}"))  # what "../x" names, same bytes
    shard["name"] = bad_name
    for tensor in manifest["tensors"]:
        tensor["chunks"][0]["file"] = bad_name
    fs.pipe_file(f"{url}/manifest.json", json.dumps(manifest).encode())
    cache = tmp_path / "cache"
    with pytest.raises(CorruptCheckpointError, match=rf"{url}/manifest\.json: file name .* is neither a plain name"):
        ShardedCheckpointIO(storage_options=options, cache_dir=str(cache)).load_checkpoint(url)
    written = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert all(p.endswith("ep0-ba1.lock") for p in written), f"nothing but the download lock was written: {written}"


# -- credentials never leak ------------------------------------------------------------------------
SECRETS = {
    "key": "SECRET-KEY-do-not-log-1234",
    "secret": "SECRET-SECRET-do-not-log-5678",
    "token": "SECRET-TOKEN-do-not-log-9012",
}
# botocore's own DEBUG logs of each request carry the access key id (in the Authorization header) and the
# session token (X-Amz-Security-Token): lightning_ckpt.redact scrubs registered credentials from every
# log record, so not even those records may hold one.


def _with_secrets(bucket: S3Bucket) -> dict[str, Any]:
    """The bucket's storage options with distinctive credentials (the local S3 accepts any)."""
    return {**bucket.storage_options, **SECRETS}


@pytest.fixture
def every_log_record(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG, including those that do not propagate to the root logger."""
    names = ["", *sorted(logging.root.manager.loggerDict)]
    loggers = [logging.getLogger(name) for name in names]
    saved = [(lg, lg.level) for lg in loggers]
    detached = [lg for lg in loggers if not lg.propagate]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    for lg in detached:
        lg.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    try:
        yield caplog
    finally:
        for lg, level in saved:
            lg.setLevel(level)
        for lg in detached:
            lg.removeHandler(caplog.handler)


def _exception_text(err: BaseException) -> str:
    """Everything an exception tells: messages, args, notes, along the whole cause/context chain."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current), repr(current.args), *getattr(current, "__notes__", [])]
        parts += [repr(getattr(current, name, "")) for name in ("value", "response", "kwargs")]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def _leaks(text: str) -> list[str]:
    return [name for name, value in SECRETS.items() if value in text]


def _files_holding_secrets(root: Path, fs: Any, bucket_url: str) -> list[str]:
    found = [str(p) for p in root.rglob("*") if p.is_file() and _leaks(p.read_bytes().decode("latin-1"))]
    for path in fs.find(bucket_url):
        if _leaks(fs.cat_file(path).decode("latin-1")):
            found.append(f"s3://{path}")
    return found


def test_credentials_never_appear_in_logs_reprs_files_or_errors(
    s3_bucket_via_proxy: S3Bucket,
    fault_proxy: FaultProxy,
    tmp_path: Path,
    every_log_record: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    recwarn: pytest.WarningsRecorder,
) -> None:
    bucket = s3_bucket_via_proxy
    options = _with_secrets(bucket)
    folder = f"{bucket.url}/run"

    def saver(root: Path, **kwargs: Any) -> CheckpointSaver:
        return CheckpointSaver(folder=folder, storage_options=options, local_folder=str(root / "local"),
                               save_interval="4ba", run_name="secret-run", **kwargs)  # fmt: skip

    # A fit that saves and uploads, then a resume on another "machine" that downloads.
    first = saver(tmp_path / "m1")
    io1 = ShardedCheckpointIO(cache_dir=str(tmp_path / "m1" / "cache"), upload_retry=FAST_RETRY)
    _fit(tmp_path / "m1", callbacks=[first], plugins=[io1])
    second = saver(tmp_path / "m2")
    io2 = ShardedCheckpointIO(cache_dir=str(tmp_path / "m2" / "cache"), upload_retry=FAST_RETRY)
    _fit(tmp_path / "m2", ckpt_path="last", steps=12, callbacks=[second], plugins=[io2])
    assert io2.loaded_path == f"{folder}/ep0-ba8", "resumed from the bucket"
    uploader = io2.mirror.uploader(folder)
    uploader.close()
    storage = uploader.storage
    objects: list[object] = [first, second, io1, io2, uploader, storage, storage.fs, *storage.clients.values(),
                             *Storage.open(folder, options)]  # fmt: skip

    errors: list[BaseException] = []
    # An outage while training: the upload error is raised at fit end or teardown.
    third = saver(tmp_path / "m3", overwrite=True)
    io3 = ShardedCheckpointIO(cache_dir=str(tmp_path / "m3" / "cache"), upload_retry=FAST_RETRY)

    class Outage(L.Callback):
        def on_train_start(self, *args: Any) -> None:
            fault_proxy.outage(True)

    with pytest.raises(Exception) as outage:
        _fit(tmp_path / "m3", steps=4, callbacks=[third, Outage()], plugins=[io3])
    fault_proxy.outage(False)
    assert any("while uploading checkpoint" in note for note in getattr(outage.value, "__notes__", []))
    errors.append(outage.value)
    # A bucket that does not exist, and storage_options of the wrong type or with a misspelt option.
    with pytest.raises(CheckpointError, match="is not writable") as unwritable:
        _fit(tmp_path / "m4", callbacks=[CheckpointSaver(folder="s3://no-such-bucket/run", storage_options=options,
                                                          run_name="x")])  # fmt: skip
    errors.append(unwritable.value)
    for make in (
        lambda: CheckpointSaver(folder=folder, storage_options=f"key={SECRETS['key']}"),
        lambda: CheckpointSaver(folder=folder, storage_options={**options, "secret_key": SECRETS["secret"]}),
        lambda: ShardedCheckpointIO(storage_options=[("secret", SECRETS["secret"])]),
        lambda: latest(folder, {**options, "aws_secret_access_key": SECRETS["secret"]}),
    ):
        with pytest.raises(ConfigError) as bad:
            make()
        errors.append(bad.value)

    leaks = {f"error {type(e).__name__}: {_exception_text(e)[:300]}": _leaks(_exception_text(e)) for e in errors}
    leaks.update({f"repr of {type(o).__name__}": _leaks(repr(o) + str(o)) for o in objects})
    captured = capsys.readouterr()
    leaks["stdout/stderr"] = _leaks(captured.out + captured.err)
    leaks["warnings"] = _leaks("\n".join(str(w.message) for w in recwarn))
    records = every_log_record.records
    leaky = [f"{r.name}: {r.getMessage()[:200]}" for r in records if _leaks(r.getMessage())]
    assert leaky == [], "no log record holds a credential, not even botocore's request logs"
    assert any("<redacted>" in r.getMessage() for r in records if r.name.startswith("botocore")), "scrubbed, not absent"
    clean_fs = fsspec.filesystem("s3", **bucket.storage_options)
    leaks.update({f"file {path}": ["?"] for path in _files_holding_secrets(tmp_path, clean_fs, bucket.url)})
    assert {where: which for where, which in leaks.items() if which} == {}
    assert {"lightning_ckpt", "s3fs", "botocore.endpoint"} <= {r.name for r in records}, "DEBUG records captured"
