"""The local GCS test infrastructure itself: gcp-storage-emulator, fixtures, and gcsfs against it.

Every request goes to 127.0.0.1. gcsfs is used the way the package uses it: through
``fsspec.core.url_to_fs(url, **storage_options)``.
"""

from __future__ import annotations

import http.client
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import pytest

if TYPE_CHECKING:
    from tests.gcs_server import GCSBucket


MIB = 2**20
_CREATED_IN_EARLIER_TEST: list[str] = []


def _fs(bucket: GCSBucket) -> Any:
    fs, _ = fsspec.core.url_to_fs(bucket.url, **bucket.storage_options)
    return fs


def _name(bucket: GCSBucket) -> str:
    return bucket.url.removeprefix("gs://")


def _buckets(fs: Any) -> list[str]:
    return sorted(name.rstrip("/") for name in fs.ls("", detail=False))  # gcsfs lists buckets as "name/"


# -- the server and fixtures ------------------------------------------------------------------------
def test_storage_options_shape() -> None:
    from tests.gcs_server import storage_options

    assert storage_options("http://127.0.0.1:9") == {
        "endpoint_url": "http://127.0.0.1:9",
        "token": "anon",
        "project": "test-project",
        "skip_instance_cache": True,
        "use_listings_cache": False,
    }


def test_fixture_uses_plain_gcsfs(gcs_bucket: GCSBucket) -> None:
    import gcsfs.core

    assert gcs_bucket.url.startswith("gs://test-bucket-")
    assert os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
    assert fsspec.get_filesystem_class("gs") is gcsfs.core.GCSFileSystem
    fs = _fs(gcs_bucket)
    assert type(fs) is gcsfs.core.GCSFileSystem
    assert fs._location == gcs_bucket.storage_options["endpoint_url"]  # never the real storage.googleapis.com


def test_mkdir_creates_a_bucket(gcs_bucket: GCSBucket) -> None:
    fs = _fs(gcs_bucket)
    fs.mkdir("another-bucket")
    assert _buckets(fs) == sorted(["another-bucket", _name(gcs_bucket)])
    fs.pipe_file("another-bucket/x", b"x")
    assert fs.cat_file("another-bucket/x") == b"x"


def test_small_round_trip(gcs_bucket: GCSBucket) -> None:
    fs = _fs(gcs_bucket)
    root = _name(gcs_bucket)
    path = f"{root}/dir/hello.txt"
    fs.pipe_file(path, b"hello gcs")
    assert fs.cat_file(path) == b"hello gcs"
    assert fs.cat_file(path, start=6, end=9) == b"gcs"
    assert fs.ls(root, detail=False) == [f"{root}/dir"]
    assert fs.ls(f"{root}/dir", detail=False) == [path]
    info = fs.info(path)
    assert info["type"] == "file" and info["size"] == 9 and info["name"] == path
    assert fs.size(path) == 9
    assert fs.exists(path) and not fs.exists(f"{root}/dir/missing.txt")
    assert fs.isdir(f"{root}/dir") and not fs.isdir(path)
    assert fs.isfile(path) and not fs.isfile(f"{root}/dir")
    with fs.open(f"{root}/dir/opened.txt", "wb") as f:
        f.write(b"via open")
    with fs.open(f"{root}/dir/opened.txt", "rb") as f:
        assert f.read() == b"via open"
    _CREATED_IN_EARLIER_TEST.append(root)


def test_rm_file_and_recursive_rm(gcs_bucket: GCSBucket) -> None:
    fs = _fs(gcs_bucket)
    root = _name(gcs_bucket)
    for key in ("keep.txt", "tree/a", "tree/sub/b", "tree/sub/c"):
        fs.pipe_file(f"{root}/{key}", key.encode())
    fs.rm_file(f"{root}/keep.txt")
    assert not fs.exists(f"{root}/keep.txt")
    fs.rm(f"{root}/tree", recursive=True)
    assert fs.find(root) == []
    assert not fs.exists(f"{root}/tree") and not fs.isdir(f"{root}/tree")


def test_resumable_round_trip_20mib(gcs_bucket: GCSBucket, tmp_path: Path) -> None:
    data = os.urandom(20 * MIB)
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(data)
    fs = _fs(gcs_bucket)
    remote = f"{_name(gcs_bucket)}/big/src.bin"
    fs.put_file(str(src), remote, chunksize=5 * MIB)  # >= 5 MiB: a resumable upload, here in 4 chunks
    assert fs.size(remote) == len(data)
    fs.get_file(remote, str(dst))  # gcsfs downloads in concurrent 16 MiB ranges
    assert dst.read_bytes() == data
    with fs.open(f"{_name(gcs_bucket)}/big/written.bin", "wb", block_size=5 * MIB) as f:
        f.write(data)
    assert fs.cat_file(f"{_name(gcs_bucket)}/big/written.bin") == data


def test_server_is_reset_between_tests(gcs_bucket: GCSBucket) -> None:
    fs = _fs(gcs_bucket)
    assert _buckets(fs) == [_name(gcs_bucket)]
    for earlier in _CREATED_IN_EARLIER_TEST:
        assert not fs.exists(earlier)


def test_standalone_server_starts_and_stops() -> None:
    from tests.gcs_server import GCSServer

    server = GCSServer()
    port = server.port
    try:
        server.create_bucket("standalone-bucket")
        server.reset()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/storage/v1/b?project=test-project")
        body = conn.getresponse().read()
        conn.close()
        assert b"standalone-bucket" not in body
    finally:
        server.stop()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    with pytest.raises(OSError):
        conn.request("GET", "/")
        conn.getresponse()
    conn.close()


# -- the package against it -------------------------------------------------------------------------
def test_sharded_checkpoint_round_trip(gcs_bucket: GCSBucket, tmp_path: Path) -> None:
    import torch

    from lightning_ckpt import ShardedCheckpointIO, latest

    io = ShardedCheckpointIO(storage_options=gcs_bucket.storage_options, cache_dir=str(tmp_path / "cache"))
    io.save_checkpoint({"state_dict": {"w": torch.arange(10.0)}, "global_step": 1}, f"{gcs_bucket.url}/run/ba1")
    assert latest(f"{gcs_bucket.url}/run", gcs_bucket.storage_options) == f"{gcs_bucket.url}/run/ba1"
    loaded = io.load_checkpoint(f"{gcs_bucket.url}/run/ba1")
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(10.0))
    assert loaded["global_step"] == 1
