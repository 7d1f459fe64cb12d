"""The benchmark's in-memory S3 (``benchmarks/_s3_sink.py``) against boto3 and s3fs, and ``transfer.get_file``'s
ranged-GET path (parallel ranges written at their offsets, retried per range, temp file removed on failure).

The sink serves benchmarks only; these tests pin that what boto3 and s3fs send round-trips byte for
byte (aws-chunked bodies with trailing checksums included), that ranges return the right slice, and
that multipart parts are assembled in part-number order whatever order they arrived in.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import zlib
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks._s3_sink import S3Sink
from lightning_ckpt import layout, transfer
from lightning_ckpt.storage import Storage
from lightning_ckpt.transfer import RetryPolicy
from tests.s3_server import CREDENTIALS, REGION, FaultProxy, storage_options

MIB = 2**20
ROOT = Path(__file__).resolve().parents[1]
FAST = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


@pytest.fixture(scope="module")
def sink() -> Iterator[S3Sink]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**CREDENTIALS, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}.items():
            mp.setenv(key, value)
        with S3Sink() as server:
            yield server


@pytest.fixture
def client(sink: S3Sink) -> Any:
    import boto3

    sink.reset()
    c = boto3.client("s3", endpoint_url=sink.endpoint_url, region_name=REGION)
    c.create_bucket(Bucket="b")
    return c


def _data(size: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed) % 251 for i in range(251)) * (size // 251) + b"t" * (size % 251)


def test_boto3_round_trips_put_object_and_multipart_upload_file(client: Any, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    client.put_object(Bucket="b", Key="small", Body=b"hello")  # aws-chunked with a trailing CRC32 by default
    assert client.get_object(Bucket="b", Key="small")["Body"].read() == b"hello"
    data = _data(21 * MIB + 7)
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(data)
    config = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB, max_concurrency=4)
    client.upload_file(str(src), "b", "dir/big", Config=config)
    head = client.head_object(Bucket="b", Key="dir/big")
    assert head["ContentLength"] == len(data) and head["ETag"].endswith('-5"')
    client.download_file("b", "dir/big", str(dst), Config=config)
    assert dst.read_bytes() == data
    listing = client.list_objects_v2(Bucket="b", Prefix="dir/")
    assert [(o["Key"], o["Size"]) for o in listing["Contents"]] == [("dir/big", len(data))]
    client.delete_object(Bucket="b", Key="dir/big")
    assert client.list_objects_v2(Bucket="b", Prefix="dir/")["KeyCount"] == 0


def test_ranged_gets_return_the_right_slice_with_206_and_content_range(client: Any) -> None:
    data = _data(3 * MIB + 5)
    client.put_object(Bucket="b", Key="k", Body=data)
    for spec, expected in (("bytes=0-0", data[:1]), ("bytes=1048570-2097160", data[1048570:2097161]),
                           ("bytes=3145000-", data[3145000:]), ("bytes=-9", data[-9:]),
                           ("bytes=5-99999999", data[5:])):  # fmt: skip
        response = client.get_object(Bucket="b", Key="k", Range=spec)
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert response["Body"].read() == expected, spec
        start = len(data) - len(expected) if spec.startswith("bytes=-") else int(spec[6:].split("-")[0])
        assert response["ContentRange"] == f"bytes {start}-{start + len(expected) - 1}/{len(data)}"


def test_multipart_parts_are_assembled_in_part_number_order_not_arrival_order(client: Any) -> None:
    parts = {1: _data(5 * MIB, 1), 2: _data(5 * MIB, 2), 3: b"tail"}
    upload_id = client.create_multipart_upload(Bucket="b", Key="mp")["UploadId"]
    etags = {n: client.upload_part(Bucket="b", Key="mp", UploadId=upload_id, PartNumber=n, Body=parts[n])["ETag"]
             for n in (3, 1, 2)}  # fmt: skip
    client.complete_multipart_upload(Bucket="b", Key="mp", UploadId=upload_id, MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": etags[n]} for n in (1, 2, 3)]})  # fmt: skip
    whole = parts[1] + parts[2] + parts[3]
    assert client.get_object(Bucket="b", Key="mp")["Body"].read() == whole
    got = client.get_object(Bucket="b", Key="mp", Range=f"bytes={5 * MIB - 2}-{5 * MIB + 1}")["Body"].read()
    assert got == whole[5 * MIB - 2 : 5 * MIB + 2]  # a range across two part buffers
    aborted = client.create_multipart_upload(Bucket="b", Key="ab")["UploadId"]
    client.abort_multipart_upload(Bucket="b", Key="ab", UploadId=aborted)
    with pytest.raises(Exception, match="NoSuchUpload"):
        client.upload_part(Bucket="b", Key="ab", UploadId=aborted, PartNumber=1, Body=b"x")


def test_a_signed_aws_chunked_body_with_trailers_is_decoded(client: Any, sink: S3Sink) -> None:
    payload = _data(300_000)
    chunks = [payload[:65536], payload[65536:200_000], payload[200_000:]]
    body = b"".join(b"%x;chunk-signature=%s\r\n%s\r\n" % (len(c), b"0" * 64, c) for c in chunks)
    crc = b64encode(zlib.crc32(payload).to_bytes(4, "big"))
    body += b"0;chunk-signature=" + b"0" * 64 + b"\r\nx-amz-checksum-crc32:" + crc + b"\r\n"
    body += b"x-amz-trailer-signature:" + b"0" * 64 + b"\r\n\r\n"
    conn = http.client.HTTPConnection("127.0.0.1", sink.port, timeout=10)
    headers = {"Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": str(len(payload)),
               "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"}  # fmt: skip
    conn.request("PUT", "/b/chunked", body=body, headers=headers)
    assert conn.getresponse().read() == b""
    conn.request("HEAD", "/b/chunked")  # same keep-alive connection: the body was consumed exactly
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200 and response.getheader("Content-Length") == str(len(payload))
    assert client.get_object(Bucket="b", Key="chunked")["Body"].read() == payload


def test_s3fs_put_info_exists_get_and_ranges(client: Any, sink: S3Sink, tmp_path: Path) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**{**storage_options(sink.endpoint_url)})
    data = _data(12 * MIB + 3)
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(data)
    fs.put_file(str(src), "b/s3fs/big", chunksize=5 * MIB, max_concurrency=3)
    assert fs.info("b/s3fs/big")["size"] == len(data)
    assert fs.exists("b/s3fs/big") and not fs.exists("b/s3fs/nope") and fs.isdir("b/s3fs")
    assert fs.ls("b/s3fs", detail=False) == ["b/s3fs/big"]
    fs.get_file("b/s3fs/big", str(dst), chunksize=4 * MIB, max_concurrency=3)  # concurrent ranged GETs
    assert dst.read_bytes() == data
    assert fs.cat_file("b/s3fs/big", start=7, end=5 * MIB + 9) == data[7 : 5 * MIB + 9]
    fs.rm("b/s3fs/big")
    assert not fs.exists("b/s3fs/big")


# -- transfer.get_file's ranged path ----------------------------------------------------------------
@pytest.fixture
def proxy(sink: S3Sink, client: Any) -> Iterator[FaultProxy]:
    with FaultProxy(sink.endpoint_url) as p:
        yield p


def _storage(endpoint_url: str) -> tuple[Storage, str]:
    return Storage.open("s3://b", storage_options(endpoint_url))


def _is_get(method: str, path: str) -> bool:
    return method == "GET" and "/b/big" in path


def test_get_file_downloads_a_large_object_as_ranged_gets_retried_per_range(
    client: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    size = 2 * transfer.PART_BYTES + 12345  # three ranges
    data = os.urandom(size)
    client.put_object(Bucket="b", Key="big", Body=data)
    storage, root = _storage(proxy.endpoint_url)
    proxy.fail_next(1, status=503, match=_is_get)
    dst = tmp_path / "out" / "big.bin"
    transfer.get_file(storage, f"{root}/big", str(dst), max_concurrency=2, policy=FAST)
    assert dst.read_bytes() == data
    assert proxy.count("GET", 503) == 1 and proxy.count("GET", 206) == 3  # one range retried, not the file
    assert proxy.count("HEAD") == 1 and os.listdir(dst.parent) == ["big.bin"]


def test_get_file_keeps_small_objects_on_the_filesystem_path(client: Any, proxy: FaultProxy, tmp_path: Path) -> None:
    client.put_object(Bucket="b", Key="big", Body=b"small")
    storage, root = _storage(proxy.endpoint_url)
    transfer.get_file(storage, f"{root}/big", str(tmp_path / "s.bin"), policy=FAST)
    assert (tmp_path / "s.bin").read_bytes() == b"small"
    assert proxy.count("GET", 206) == 0


def test_a_failed_ranged_download_leaves_no_temp_file_and_no_destination(
    client: Any, sink: S3Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.put_object(Bucket="b", Key="big", Body=os.urandom(3 * transfer.PART_BYTES))
    real = transfer._get_range
    calls: list[int] = []

    def second_range_denied(*args: Any) -> None:
        calls.append(args[5])
        if args[5] == transfer.PART_BYTES:
            raise PermissionError("denied")  # not transient: no retry
        real(*args)

    monkeypatch.setattr(transfer, "_get_range", second_range_denied)
    storage, root = _storage(sink.endpoint_url)
    with pytest.raises(PermissionError):
        transfer.get_file(storage, f"{root}/big", str(tmp_path / "big.bin"), max_concurrency=1, policy=FAST)
    assert os.listdir(tmp_path) == [] and calls.count(transfer.PART_BYTES) == 1
    assert not any(layout.is_hidden_name(n) for n in os.listdir(tmp_path))


@pytest.mark.timeout(120)
def test_bench_s3_transfer_smoke_against_the_sink(tmp_path: Path) -> None:
    out = tmp_path / "s3.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_s3_transfer.py"), "--smoke", "--json",
                          str(out), "--dir", str(tmp_path)], capture_output=True, text=True, timeout=110, env=env,
                         cwd=ROOT, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["server"] == "sink" and len(report["results"]) == 6
    for result in report["results"]:
        assert result["upload"]["median_s"] > 0 and result["download"]["median_s"] > 0, result


def test_recycled_buffers_never_leak_old_bytes_into_new_objects(client: Any) -> None:
    first, second, third = _data(MIB, 1), _data(MIB, 2), _data(MIB, 3)
    client.put_object(Bucket="b", Key="a", Body=first)
    client.delete_object(Bucket="b", Key="a")  # its buffer goes back to the sink's pool
    client.put_object(Bucket="b", Key="c", Body=second)  # same size: the recycled buffer, fully overwritten
    client.put_object(Bucket="b", Key="c", Body=third)  # an overwrite recycles the replaced object's buffer
    client.put_object(Bucket="b", Key="d", Body=second)
    assert client.get_object(Bucket="b", Key="c")["Body"].read() == third
    assert client.get_object(Bucket="b", Key="d")["Body"].read() == second
