"""The storage and commit contract: every storage type and every commit type, on every backend.

Like fsspec's ``tests/abstract``: the same tests run on local disk, ``memory://``, the S3 server and
the GCS emulator (servers shared per session; each test gets a fresh bucket). Each asserts bytes on
storage. :class:`RenameCommit` needs an atomic rename, so only local disk pairs with it
(:data:`EVERY_COMMIT` lists the pairs; none is generated only to be skipped).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lightning_ckpt import layout
from lightning_ckpt.checkpoint import write_objects
from lightning_ckpt.commit import (
    Commit,
    ManifestLastCommit,
    RenameCommit,
    TargetExistsError,
    read_pointer,
    remove_leftovers,
    update_latest,
)
from lightning_ckpt.discovery import latest, list_committed
from lightning_ckpt.manifest import Manifest
from lightning_ckpt.storage import FsspecStorage, LocalStorage, Storage


@pytest.fixture(params=["local", "memory", "s3", "gcs"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A folder URL and its storage_options, for each storage the contract runs against."""
    if request.param == "local":
        yield str(tmp_path / "folder"), {}
    elif request.param == "memory":
        yield f"memory://contract-{os.getpid()}-{uuid.uuid4().hex[:8]}", {}
    else:
        bucket = request.getfixturevalue(f"{request.param}_bucket")
        yield f"{bucket.url}/run", bucket.storage_options


@pytest.fixture
def store(backend: tuple[str, dict[str, Any]]) -> tuple[Storage, str]:
    """The storage of ``backend`` and its (existing, empty) root folder."""
    storage, root = Storage.open(*backend)
    storage.makedirs(root)
    return storage, root


@pytest.fixture(params=["manifest-last", "rename"])
def commit(request: pytest.FixtureRequest, store: tuple[Storage, str]) -> Commit:
    """The commit type under test, on ``store``'s storage (only pairs in :data:`EVERY_COMMIT`)."""
    storage = store[0]
    return RenameCommit(storage) if request.param == "rename" else ManifestLastCommit(storage)


_PAIRS = [("local", "rename"), ("local", "manifest-last"), ("memory", "manifest-last"), ("s3", "manifest-last"),
          ("gcs", "manifest-last")]  # fmt: skip
EVERY_COMMIT = pytest.mark.parametrize(
    ("backend", "commit"), _PAIRS, indirect=True, ids=[f"{b}-{c}" for b, c in _PAIRS]
)
"""Every commit type on every storage it applies to (a rename needs local disk)."""


def _manifest(storage: Storage, staged: str, name: str, step: int) -> Manifest:
    entry = write_objects(storage, staged, {"global_step": step}, rank=0)
    return Manifest(name=name, epoch=0, global_step=step, world_size=1, files=[entry], tensors={})


def test_storage_type_is_chosen_once_by_open(store: tuple[Storage, str]) -> None:
    storage, _ = store
    assert isinstance(storage, LocalStorage if storage.protocol == "file" else FsspecStorage)
    assert storage.is_local == isinstance(storage, LocalStorage)
    with pytest.raises(AttributeError):
        storage.is_local = True  # type: ignore[misc]


def test_write_read_query_list_and_remove_files(store: tuple[Storage, str]) -> None:
    storage, root = store
    path = storage.join(root, "a.bin")
    storage.write_bytes_atomic(path, b"first")
    storage.write_bytes_atomic(path, b"second!")  # replaced whole
    assert storage.read_bytes(path) == b"second!"
    with storage.open_read(path) as f:
        f.seek(3)
        assert f.read() == b"ond!"
    assert (storage.exists(path), storage.isfile(path), storage.isdir(path), storage.size(path)) == (
        True, True, False, 7,
    )  # fmt: skip
    with storage.open_write(storage.join(root, "b.bin")) as f:
        f.write(b"streamed")
    storage.makedirs(storage.join(root, "sub"))
    storage.write_bytes_atomic(storage.join(root, "sub", "c"), b"c")
    assert storage.listdir(root) == ["a.bin", "b.bin", "sub"], "no temporary names left behind"
    assert storage.isdir(storage.join(root, "sub")) and storage.basename(storage.join(root, "sub")) == "sub"
    assert storage.dirname(storage.join(root, "sub")).rstrip("/") == root.rstrip("/")
    assert storage.listdir(storage.join(root, "missing")) == []
    storage.remove_file(path)
    storage.remove_file(path)  # a missing file is fine
    storage.remove_tree(storage.join(root, "sub"))
    storage.remove_tree(storage.join(root, "missing"))
    assert storage.listdir(root) == ["b.bin"] and not storage.exists(path)
    assert storage.read_bytes(storage.join(root, "b.bin")) == b"streamed"


def test_put_and_get_file_copy_bytes_between_this_machine_and_the_storage(
    store: tuple[Storage, str], tmp_path: Path
) -> None:
    storage, root = store
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    storage.put_file(str(src), storage.join(root, "x.bin"))
    assert storage.read_bytes(storage.join(root, "x.bin")) == src.read_bytes()
    storage.get_file(storage.join(root, "x.bin"), str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_read_range_returns_just_those_bytes(store: tuple[Storage, str], tmp_path: Path) -> None:
    """A ranged read (a ranged GET on an object store): what sharded loads fetch, one chunk at a time."""
    storage, root = store
    data = os.urandom(10_000)
    src = tmp_path / "r.bin"
    src.write_bytes(data)
    storage.put_file(str(src), storage.join(root, "r.bin"))
    path = storage.join(root, "r.bin")
    assert storage.read_range(path, 4096, 100) == data[4096:4196]
    assert storage.read_range(path, 0, 1) == data[:1] and storage.read_range(path, 9_990, 100) == data[9_990:]
    assert storage.read_range(path, 123, 0) == b""
    into = bytearray(100)
    assert storage.read_range_into(path, 4096, memoryview(into)) == 100 and into == data[4096:4196]
    assert storage.read_range_into(path, 9_990, memoryview(into)) == 10 and into[:10] == data[9_990:]


def test_pointer_write_and_read(store: tuple[Storage, str]) -> None:
    storage, root = store
    update_latest(storage, root, "ba1", "latest")
    Commit.for_storage(storage).point_latest(root, "ba2", "latest")
    pointer = storage.join(root, "latest.symlink")
    assert storage.read_bytes(pointer) == b"ba2" and read_pointer(storage, pointer) == "ba2"
    if storage.is_local:
        assert os.readlink(os.path.join(root, "latest")) == "ba2", "and a symlink where there are links"


@EVERY_COMMIT
def test_a_commit_is_visible_only_after_its_manifest(
    backend: tuple[str, dict[str, Any]], store: tuple[Storage, str], commit: Commit
) -> None:
    storage, root = store
    staged = commit.stage(root, "ba1")
    manifest = _manifest(storage, staged, "ba1", 1)
    assert list_committed(storage, root) == [] and latest(*backend) is None
    assert not storage.exists(storage.join(root, "ba1", layout.MANIFEST_FILENAME))
    final = commit.commit(root, "ba1", staged, manifest)
    assert final.rstrip("/") == storage.join(root, "ba1").rstrip("/")
    assert [name for name, _ in list_committed(storage, root)] == ["ba1"]
    newest = latest(*backend)
    assert newest is not None and newest.endswith("/ba1")
    written = Manifest.from_json(storage.read_bytes(storage.join(final, layout.MANIFEST_FILENAME)), source="m")
    assert written.global_step == 1 and storage.listdir(final) == ["manifest.json", "objects.pt"]
    assert [n for n in storage.listdir(root) if layout.is_hidden_name(n)] == [], "no staging left"


@EVERY_COMMIT
def test_a_commit_replaces_an_older_checkpoint_whole(store: tuple[Storage, str], commit: Commit) -> None:
    storage, root = store
    staged = commit.stage(root, "ba1")
    commit.commit(root, "ba1", staged, _manifest(storage, staged, "ba1", 1))
    staged = commit.stage(root, "ba1")
    if isinstance(commit, ManifestLastCommit):
        assert list_committed(storage, root) == [], "un-committed before its files are overwritten"
    else:
        assert [m.global_step for _, m in list_committed(storage, root)] == [1], "the old one stays until the rename"
    commit.commit(root, "ba1", staged, _manifest(storage, staged, "ba1", 2))
    assert [(n, m.global_step) for n, m in list_committed(storage, root)] == [("ba1", 2)]
    assert [n for n in storage.listdir(root) if layout.is_hidden_name(n)] == [], "nothing of the old one is left"


@EVERY_COMMIT
def test_a_commit_is_refused_over_a_foreign_directory(store: tuple[Storage, str], commit: Commit) -> None:
    storage, root = store
    storage.makedirs(storage.join(root, "ba1"))
    storage.write_bytes_atomic(storage.join(root, "ba1", "notes.txt"), b"mine")
    with pytest.raises(TargetExistsError, match=r"already exists and is not a lightning-ckpt checkpoint.*'notes.txt'"):
        commit.stage(root, "ba1")
    assert storage.listdir(storage.join(root, "ba1")) == ["notes.txt"]
    assert storage.read_bytes(storage.join(root, "ba1", "notes.txt")) == b"mine"
    assert storage.listdir(root) == ["ba1"], "nothing was written"


def test_the_rename_commit_is_atomic_a_killed_save_leaves_only_hidden_staging(tmp_path: Path) -> None:
    storage, root = Storage.open(str(tmp_path / "folder"))
    commit = RenameCommit(storage)
    staged = commit.stage(root, "ba1")
    _manifest(storage, staged, "ba1", 1)  # the files are written; the process dies before the commit
    assert storage.listdir(root) == [os.path.basename(staged)] and layout.is_partial_dirname(storage.listdir(root)[0])
    assert list_committed(storage, root) == [] and not os.path.exists(os.path.join(root, "ba1"))
    commit.abort(staged)  # what the leader does when a rank failed before the commit
    assert storage.listdir(root) == []


@EVERY_COMMIT
def test_listing_skips_hidden_names_and_leftovers_are_removed(store: tuple[Storage, str], commit: Commit) -> None:
    storage, root = store
    staged = commit.stage(root, "ba1")
    commit.commit(root, "ba1", staged, _manifest(storage, staged, "ba1", 1))
    hidden = storage.join(root, ".ba2.trash-dead")
    storage.makedirs(hidden)
    storage.write_bytes_atomic(storage.join(hidden, "objects.pt"), b"x")
    half = storage.join(root, "ba3")  # an upload or deletion killed half-way: files, no manifest
    storage.makedirs(half)
    storage.write_bytes_atomic(storage.join(half, "objects.pt"), b"x")
    assert [name for name, _ in list_committed(storage, root)] == ["ba1"]
    removed = remove_leftovers(storage, root)
    trash = [".ba2.trash-dead"] if storage.is_local else []  # only a rename leaves trash
    assert removed == [*trash, "ba3"]
    assert storage.listdir(root) == sorted({"ba1", ".ba2.trash-dead"} - set(trash))
