"""The local S3 test infrastructure itself: moto server, fixtures, and the fault-injecting proxy.

Every request goes to 127.0.0.1. Behaviour of the client stack these tests pin down:
botocore sends ``Expect: 100-continue`` and an ``x-amz-checksum-crc32`` header on every PUT, and
aiohttp silently re-sends an idempotent request (GET, HEAD, PUT) once when its connection is dropped,
so one dropped connection is invisible to s3fs callers while two surface as ``ConnectionClosedError``.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import pytest

if TYPE_CHECKING:  # imported lazily at run time, so pytest loads the plugin (with assert rewriting) first
    from tests.s3_server import FaultProxy, S3Bucket, S3Server


MIB = 2**20
_CREATED_IN_EARLIER_TEST: list[str] = []


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _request(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One plain HTTP request (moto does not check signatures), answered as (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", _port(url), timeout=10)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _fs(bucket: S3Bucket) -> Any:
    return fsspec.filesystem("s3", **bucket.storage_options)


def _bucket_name(bucket: S3Bucket) -> str:
    return bucket.url.removeprefix("s3://")


def _round_trip_20mib(bucket: S3Bucket, tmp_path: Path) -> None:
    data = os.urandom(20 * MIB)
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(data)
    fs = _fs(bucket)
    remote = f"{_bucket_name(bucket)}/big/src.bin"
    fs.put_file(str(src), remote, chunksize=5 * MIB, max_concurrency=4)
    assert fs.size(remote) == len(data)
    fs.get_file(remote, str(dst))
    assert dst.read_bytes() == data


# -- the server and fixtures ------------------------------------------------------------------------
def test_storage_options_shape() -> None:
    from tests.s3_server import storage_options

    options = storage_options("http://127.0.0.1:9")
    assert options["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"}
    assert options["config_kwargs"]["retries"]["total_max_attempts"] == 1
    assert options["skip_instance_cache"] is True and options["use_listings_cache"] is False


def test_fixture_sets_credentials_and_single_try(s3_bucket: S3Bucket) -> None:
    import s3fs

    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    assert s3fs.S3FileSystem.retries == 1
    assert s3_bucket.url.startswith("s3://test-bucket-")


def test_small_round_trip(s3_bucket: S3Bucket) -> None:
    fs = _fs(s3_bucket)
    path = f"{_bucket_name(s3_bucket)}/dir/hello.txt"
    fs.pipe_file(path, b"hello s3")
    assert fs.cat_file(path) == b"hello s3"
    _CREATED_IN_EARLIER_TEST.append(_bucket_name(s3_bucket))


def test_multipart_round_trip(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    _round_trip_20mib(s3_bucket, tmp_path)


def test_server_is_reset_between_tests(s3_bucket: S3Bucket) -> None:
    fs = _fs(s3_bucket)
    assert fs.ls("", detail=False) == [_bucket_name(s3_bucket)]
    for earlier in _CREATED_IN_EARLIER_TEST:
        assert not fs.exists(earlier)


def test_standalone_server_starts_and_stops() -> None:
    from tests.s3_server import S3Server

    server = S3Server()
    try:
        status, _ = _request(server.endpoint_url, "PUT", "/standalone-bucket")
        assert status == 200
        server.reset()
        status, body = _request(server.endpoint_url, "GET", "/")
        assert status == 200 and b"standalone-bucket" not in body
    finally:
        server.stop()
    with pytest.raises(OSError):
        _request(server.endpoint_url, "GET", "/")


# -- the proxy without faults -----------------------------------------------------------------------
def test_proxy_round_trip_without_faults(
    s3_bucket_via_proxy: S3Bucket, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    _round_trip_20mib(s3_bucket_via_proxy, tmp_path)
    assert fault_proxy.count("PUT") == 4  # 5 MiB parts; each PUT came with Expect: 100-continue
    assert fault_proxy.count("POST") == 2  # create and complete the multipart upload
    assert all(r.status == 200 for r in fault_proxy.requests)


def test_proxy_forwards_chunked_bodies(s3_bucket: S3Bucket, fault_proxy: FaultProxy) -> None:
    path = f"/{_bucket_name(s3_bucket)}/chunked.bin"
    conn = http.client.HTTPConnection("127.0.0.1", _port(fault_proxy.endpoint_url), timeout=10)
    try:
        conn.request("PUT", path, body=iter([b"abc", b"d" * 100_000, b"xyz"]), encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
    finally:
        conn.close()
    assert _fs(s3_bucket).cat_file(path.lstrip("/")) == b"abc" + b"d" * 100_000 + b"xyz"


def test_proxy_answers_expect_100_continue(s3_bucket: S3Bucket, fault_proxy: FaultProxy) -> None:
    path = f"/{_bucket_name(s3_bucket)}/expect.bin"
    with socket.create_connection(("127.0.0.1", _port(fault_proxy.endpoint_url)), timeout=10) as sock:
        head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        sock.sendall(head.encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"hello")
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
    assert _fs(s3_bucket).cat_file(path.lstrip("/")) == b"hello"


def test_proxy_keeps_connections_alive(s3_bucket: S3Bucket, fault_proxy: FaultProxy) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", _port(fault_proxy.endpoint_url), timeout=10)
    try:
        for _ in range(3):
            conn.request("HEAD", f"/{_bucket_name(s3_bucket)}")
            response = conn.getresponse()
            response.read()
            assert response.status == 200 and not response.will_close
    finally:
        conn.close()


# -- faults -----------------------------------------------------------------------------------------
def test_fail_next_fails_exactly_n_requests(s3_bucket: S3Bucket, fault_proxy: FaultProxy) -> None:
    fault_proxy.fail_next(2, 503)
    path = f"/{_bucket_name(s3_bucket)}"
    first, second, third = (_request(fault_proxy.endpoint_url, "GET", path) for _ in range(3))
    assert first[0] == second[0] == 503 and b"<Code>SlowDown</Code>" in first[1]
    assert third[0] == 200
    assert [r.status for r in fault_proxy.requests] == [503, 503, 200]


def test_fail_next_through_s3fs(s3_bucket_via_proxy: S3Bucket, fault_proxy: FaultProxy) -> None:
    fs = _fs(s3_bucket_via_proxy)
    path = f"{_bucket_name(s3_bucket_via_proxy)}/a.txt"
    fs.pipe_file(path, b"payload")
    fault_proxy.fail_next(2, 503)
    for _ in range(2):
        with pytest.raises(OSError, match="Service Unavailable"):
            fs.cat_file(path)
    assert fs.cat_file(path) == b"payload"
    assert fault_proxy.count(status=503) == 2  # neither botocore nor s3fs retried


def test_fail_next_500_and_match(s3_bucket_via_proxy: S3Bucket, fault_proxy: FaultProxy) -> None:
    fs = _fs(s3_bucket_via_proxy)
    path = f"{_bucket_name(s3_bucket_via_proxy)}/manifest.json"
    fault_proxy.fail_next(1, 500, match=lambda method, p: method == "PUT" and "manifest.json" in p)
    fs.pipe_file(f"{_bucket_name(s3_bucket_via_proxy)}/other.bin", b"unaffected")
    with pytest.raises(OSError, match="internal error"):
        fs.pipe_file(path, b"{}")
    fs.pipe_file(path, b"{}")
    assert fs.cat_file(path) == b"{}"
    assert [r.status for r in fault_proxy.requests if r.method == "PUT"] == [200, 500, 200]


def test_drop_next_drops_the_connection(s3_bucket: S3Bucket, fault_proxy: FaultProxy) -> None:
    fault_proxy.drop_next(1)
    path = f"/{_bucket_name(s3_bucket)}"
    with pytest.raises(http.client.RemoteDisconnected):
        _request(fault_proxy.endpoint_url, "GET", path)
    assert _request(fault_proxy.endpoint_url, "GET", path)[0] == 200
    assert [r.status for r in fault_proxy.requests] == [0, 200]


def test_drop_next_through_s3fs(s3_bucket_via_proxy: S3Bucket, fault_proxy: FaultProxy) -> None:
    from botocore.exceptions import ConnectionClosedError

    fs = _fs(s3_bucket_via_proxy)
    path = f"{_bucket_name(s3_bucket_via_proxy)}/a.txt"
    fault_proxy.drop_next(1)
    fs.pipe_file(path, b"payload")  # aiohttp re-sent the idempotent PUT once by itself
    assert [r.status for r in fault_proxy.requests] == [0, 200]
    fault_proxy.drop_next(2)
    with pytest.raises(ConnectionClosedError):
        fs.cat_file(path)
    assert fs.cat_file(path) == b"payload"


def test_delay_next_slows_one_request(s3_bucket: S3Bucket, fault_proxy: FaultProxy) -> None:
    fault_proxy.delay_next(1, 0.5)
    path = f"/{_bucket_name(s3_bucket)}"
    timings = []
    for _ in range(2):
        start = time.monotonic()
        assert _request(fault_proxy.endpoint_url, "GET", path)[0] == 200
        timings.append(time.monotonic() - start)
    assert timings[0] >= 0.5 > timings[1]


def test_outage_until_turned_off(s3_bucket_via_proxy: S3Bucket, fault_proxy: FaultProxy) -> None:
    fs = _fs(s3_bucket_via_proxy)
    path = f"{_bucket_name(s3_bucket_via_proxy)}/a.txt"
    fs.pipe_file(path, b"payload")
    fault_proxy.outage(True)
    for _ in range(3):
        with pytest.raises(OSError):
            fs.cat_file(path)
        assert _request(fault_proxy.endpoint_url, "GET", f"/{path}")[0] == 503
    fault_proxy.outage(False)
    assert fs.cat_file(path) == b"payload"


def test_stop_closes_idle_connections(s3_server: S3Server) -> None:
    from tests.s3_server import FaultProxy

    proxy = FaultProxy(s3_server.endpoint_url)
    conn = http.client.HTTPConnection("127.0.0.1", _port(proxy.endpoint_url), timeout=10)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        proxy.stop()
        assert not proxy._thread.is_alive()
        with pytest.raises(OSError):
            conn.request("GET", "/")
            conn.getresponse()
    finally:
        conn.close()
