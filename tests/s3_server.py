"""A local S3 for tests: a ``moto_server`` subprocess, a fault-injecting proxy, and pytest fixtures.

Register with ``pytest_plugins = ["tests.s3_server"]``. Everything listens on 127.0.0.1 only.

Fixtures:
    ``s3_server`` (session): a running :class:`S3Server`, stopped at the end of the run.
    ``s3_bucket``: wipes the server, creates a fresh bucket, yields ``S3Bucket(url, storage_options)``.
    ``fault_proxy``: a :class:`FaultProxy` in front of the session server, stopped after the test
    (it answers 503s, drops connections, delays, or stalls requests that never get an answer).
    ``s3_bucket_via_proxy``: like ``s3_bucket`` but the storage options point at ``fault_proxy``.

While ``s3_bucket`` / ``s3_bucket_via_proxy`` are active, botocore does one attempt per request and
s3fs's own retry loop is cut to one try (``S3FileSystem.retries`` is a class attribute, not an
``__init__`` argument, so it is patched), so a retry seen in a test is the caller's own.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, NamedTuple

import pytest

from tests.servers import HOST, LoopbackServer, free_port, http_request

__all__ = [
    "STALLED",
    "FaultProxy",
    "ProxyRequest",
    "S3Bucket",
    "S3Server",
    "error_body",
    "free_port",
    "storage_options",
]

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}
_IO_CHUNK = 1024 * 1024
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
_ERROR_CODES = {500: "InternalError", 503: "SlowDown"}
_ERROR_MESSAGES = {
    "InternalError": "We encountered an internal error. Please try again.",
    "SlowDown": "Please reduce your request rate.",
}

Matcher = Callable[[str, str], bool]


def storage_options(endpoint_url: str) -> dict[str, Any]:
    """s3fs ``storage_options`` for a local endpoint: test credentials, no botocore retries, no caches.

    Example:
        >>> storage_options("http://127.0.0.1:1")["client_kwargs"]["endpoint_url"]
        'http://127.0.0.1:1'
    """
    return {
        "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": REGION},
        "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}},
        "skip_instance_cache": True,
        "use_listings_cache": False,
    }


def error_body(code: str, message: str | None = None) -> bytes:
    """An S3-style XML error document.

    Example:
        >>> b"<Code>SlowDown</Code>" in error_body("SlowDown")
        True
    """
    text = message or _ERROR_MESSAGES.get(code, code)
    request_id = uuid.uuid4().hex[:16].upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{text}</Message><RequestId>{request_id}</RequestId></Error>"
    ).encode()


def _moto_command() -> list[str]:
    """``moto_server`` next to this interpreter, else on PATH, else ``python -m moto.server``."""
    beside = Path(sys.executable).with_name("moto_server")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("moto_server")
    return [found] if found else [sys.executable, "-m", "moto.server"]


class S3Server(LoopbackServer):
    """``moto_server`` in a subprocess on 127.0.0.1 and a free port."""

    name = "moto_server"

    def command(self, port: int) -> list[str]:
        return [*_moto_command(), "-H", HOST, "-p", str(port)]

    def env(self) -> dict[str, str]:
        return {**super().env(), **CREDENTIALS}

    def ready(self) -> bool:
        http_request(self.port, "GET", "/moto-api/", timeout=1.0)
        return True

    def reset(self) -> None:
        """Wipe every bucket and object (``POST /moto-api/reset``)."""
        status, _ = http_request(self.port, "POST", "/moto-api/reset")
        if status != 200:
            raise RuntimeError(f"moto reset failed: HTTP {status}")


STALLED = -1  # ProxyRequest.status of a request the proxy never answered (FaultProxy.stall_next / stall)


class ProxyRequest(NamedTuple):
    """One request seen by :class:`FaultProxy`; ``status`` is 0 for a dropped connection, ``STALLED`` (-1)
    for one that was never answered (recorded when the stall begins)."""

    method: str
    path: str
    status: int


@dataclass
class _Fault:
    kind: str  # "fail", "drop", "delay" or "stall"
    remaining: int
    status: int = 503
    body: bytes = b""
    seconds: float = 0.0
    match: Matcher | None = None
    release: threading.Event | None = None  # "stall": set when the stalled requests may give up


def _matches(match: Matcher | None, method: str, path: str) -> bool:
    return match is None or match(method, path)


def _read_exact(stream: IO[bytes], size: int) -> Iterator[bytes]:
    while size > 0:
        block = stream.read(min(_IO_CHUNK, size))
        if not block:
            raise ConnectionError("client closed the connection mid-body")
        size -= len(block)
        yield block


def _read_chunked(stream: IO[bytes]) -> Iterator[bytes]:
    """De-chunk a ``Transfer-Encoding: chunked`` body (trailers are read and dropped)."""
    while True:
        size = int(stream.readline().split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while stream.readline().strip():
                pass
            return
        yield from _read_exact(stream, size)
        stream.readline()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyHTTPServer
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the proxy records requests in :attr:`FaultProxy.requests` instead."""

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = do_GET

    def _body(self) -> Iterator[bytes] | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return _read_chunked(self.rfile)
        length = int(self.headers.get("Content-Length") or 0)
        return _read_exact(self.rfile, length) if length else None

    def _proxy(self) -> None:
        owner = self.server.owner
        fault = owner._take_fault(self.command, self.path)
        body = self._body()
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.seconds)
        if fault is not None and fault.kind == "stall":
            for _ in body or ():  # the whole request arrives; no answer ever leaves
                pass
            owner._record(self.command, self.path, STALLED)
            assert fault.release is not None
            fault.release.wait()
            self.close_connection = True
            return
        if fault is not None and fault.kind in ("fail", "drop"):
            for _ in body or ():
                pass
            if fault.kind == "drop":
                self.close_connection = True
                owner._record(self.command, self.path, 0)
                return
            self._send_error(fault.status, fault.body)
            return
        self._forward(body)

    def _send_error(self, status: int, body: bytes) -> None:
        self.server.owner._record(self.command, self.path, status)  # before the client can see the answer
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _upstream_headers(self, chunked: bool) -> dict[str, str]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        return headers

    def _forward(self, body: Iterator[bytes] | None) -> None:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        conn = http.client.HTTPConnection(HOST, self.server.owner.upstream_port, timeout=120)
        try:
            try:
                headers = self._upstream_headers(chunked)
                conn.request(self.command, self.path, body=body, headers=headers, encode_chunked=chunked)
                response = conn.getresponse()
            except OSError:
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self._send_error(502, error_body("InternalError", "proxy could not reach the upstream server"))
                return
            try:
                self._relay(response)
            except OSError:
                self.close_connection = True
        finally:
            conn.close()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        length = response.getheader("Content-Length")
        has_body = self.command != "HEAD" and response.status not in (204, 304) and response.status >= 200
        rechunk = has_body and length is None
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP:
                self.send_header(key, value)
        if rechunk:
            self.send_header("Transfer-Encoding", "chunked")
        self.server.owner._record(self.command, self.path, response.status)  # before the client can see it
        self.end_headers()
        while has_body and (block := response.read(_IO_CHUNK)):
            self.wfile.write(b"%x\r\n%b\r\n" % (len(block), block) if rechunk else block)
        if rechunk:
            self.wfile.write(b"0\r\n\r\n")


class _ProxyHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: FaultProxy) -> None:
        self.owner = owner
        super().__init__((HOST, 0), _ProxyHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.owner._track(request)
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet for clients that hang up (tests drop connections on purpose); loud for anything else."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.owner._untrack(request)
        super().shutdown_request(request)


class FaultProxy:
    """A threaded HTTP reverse proxy on 127.0.0.1 that injects faults into a programmable plan.

    Faults are consumed in the order they were planned, each by the next request it matches;
    ``match(method, path)`` (path includes the query string) aims a fault at some requests only.

    Args:
        upstream_url: the server to forward to, e.g. ``S3Server.endpoint_url``.
    """

    def __init__(self, upstream_url: str) -> None:
        host_port = upstream_url.split("://", 1)[-1].rstrip("/")
        self.upstream_port = int(host_port.rsplit(":", 1)[1])
        self.requests: list[ProxyRequest] = []
        self._faults: list[_Fault] = []
        self._outage: _Fault | None = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server = _ProxyHTTPServer(self)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self._server.server_address[1]}"

    # -- planning faults -------------------------------------------------------------------------
    def fail_next(self, n: int, status: int = 503, body: bytes | None = None, match: Matcher | None = None) -> None:
        """Answer the next ``n`` matching requests with ``status`` and an S3 XML error (SlowDown for 503)."""
        code = _ERROR_CODES.get(status, "InternalError")
        self._plan(_Fault("fail", n, status, body if body is not None else error_body(code), match=match))

    def drop_next(self, n: int, match: Matcher | None = None) -> None:
        """Read the next ``n`` matching requests, then close the connection without answering."""
        self._plan(_Fault("drop", n, match=match))

    def delay_next(self, n: int, seconds: float, match: Matcher | None = None) -> None:
        """Sleep ``seconds`` before forwarding each of the next ``n`` matching requests."""
        self._plan(_Fault("delay", n, seconds=seconds, match=match))

    def stall_next(self, n: int, match: Matcher | None = None) -> None:
        """Read the next ``n`` matching requests and never answer them (until :meth:`stop`), like a hung server."""
        self._plan(_Fault("stall", n, match=match, release=self._stopped))

    def outage(self, on: bool, status: int = 503, match: Matcher | None = None) -> None:
        """While on, every matching request gets ``status`` (before any planned fault)."""
        code = _ERROR_CODES.get(status, "InternalError")
        with self._lock:
            self._release_stalled()
            self._outage = _Fault("fail", -1, status, error_body(code), match=match) if on else None

    def stall(self, on: bool, match: Matcher | None = None) -> None:
        """While on, every matching request is read and never answered (a store that stops responding);
        it replaces an :meth:`outage`, as an outage replaces it.

        Turning it off lets the stalled requests' connections close unanswered; later requests pass.
        """
        with self._lock:
            self._release_stalled()
            if on:
                self._outage = _Fault("stall", -1, match=match, release=threading.Event())
            elif self._outage is not None and self._outage.kind == "stall":
                self._outage = None

    def _release_stalled(self) -> None:
        """Let the requests held by the current :meth:`stall` go (call with the lock held)."""
        if self._outage is not None and self._outage.release is not None:
            self._outage.release.set()

    def clear(self) -> None:
        """Drop every planned fault and end any outage or stall."""
        with self._lock:
            self._release_stalled()
            self._outage = None
            self._faults.clear()

    def count(self, method: str | None = None, status: int | None = None) -> int:
        """How many requests (of ``method``, with ``status``) the proxy has seen."""
        with self._lock:
            return sum(
                1 for r in self.requests if (method is None or r.method == method) and status in (None, r.status)
            )

    def _plan(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("n must be >= 1")
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            if self._outage is not None and _matches(self._outage.match, method, path):
                return self._outage
            for fault in self._faults:
                if _matches(fault.match, method, path):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append(ProxyRequest(method, path, status))

    # -- connection bookkeeping ------------------------------------------------------------------
    def _track(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def stop(self) -> None:
        """Release stalled requests, stop accepting, cut open client connections, and join the serving thread."""
        self._stopped.set()
        self.clear()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class S3Bucket(NamedTuple):
    """A fresh bucket: ``url`` like ``s3://test-bucket-1a2b3c4d5e6f`` and its s3fs ``storage_options``."""

    url: str
    storage_options: dict[str, Any]


def _create_bucket(endpoint_url: str, name: str | None = None) -> str:
    import boto3

    name = name or f"test-bucket-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=name)
    client.close()
    return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto server for the whole run, with AWS test credentials in the environment."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**CREDENTIALS, "NO_PROXY": HOST, "no_proxy": HOST}.items():
            mp.setenv(key, value)
        server = S3Server()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def _s3fs_single_try(monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)


@pytest.fixture
def s3_bucket(s3_server: S3Server, _s3fs_single_try: None) -> S3Bucket:
    """An empty server with one new bucket: ``S3Bucket(url, storage_options)``."""
    s3_server.reset()
    name = _create_bucket(s3_server.endpoint_url)
    return S3Bucket(f"s3://{name}", storage_options(s3_server.endpoint_url))


@pytest.fixture
def fault_proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the session server, stopped after the test."""
    proxy = FaultProxy(s3_server.endpoint_url)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def s3_bucket_via_proxy(s3_bucket: S3Bucket, fault_proxy: FaultProxy) -> S3Bucket:
    """Like ``s3_bucket`` (bucket made directly, so ``fault_proxy.requests`` starts empty), but through the proxy."""
    return S3Bucket(s3_bucket.url, storage_options(fault_proxy.endpoint_url))
