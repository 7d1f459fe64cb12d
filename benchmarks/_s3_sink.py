"""A minimal in-memory S3-compatible server on 127.0.0.1 whose per-byte cost is as small as possible.

Benchmarks only (never imported by the package): against it, the client side of an upload or
download is what a benchmark measures, unlike ``moto_server``, which parses and hashes every
byte in one Python process. It runs in a subprocess (:class:`S3Sink`, same interface as
``tests/s3_server.py``'s ``S3Server``) so it never competes with the client for the GIL.

Design: ``ThreadingHTTPServer`` with HTTP/1.1 keep-alive and one thread per connection. Request
bodies are read with ``readinto`` straight into one preallocated ``bytearray`` per object or part
(the object's final storage: no further copy); a completed multipart upload keeps its part buffers
as a list, and a GET sends ``memoryview`` slices of them with ``sendall``. Nothing is hashed, no
signature is checked, ETags are random.

Supported (path-style addressing, as botocore uses for an IP endpoint): ListBuckets, CreateBucket,
HeadBucket, DeleteBucket, ListObjectsV2 (prefix, delimiter, max-keys, continuation), PutObject,
HeadObject, GetObject (whole, ``Range: bytes=a-b``, ``bytes=a-``, ``bytes=-n``: 206 with
Content-Range), DeleteObject, DeleteObjects, CopyObject (whole object), CreateMultipartUpload,
UploadPart, CompleteMultipartUpload (parts assembled in the order the request lists them),
AbortMultipartUpload. Bodies may be plain (Content-Length), HTTP-chunked, and/or ``aws-chunked``
(botocore's default flexible checksums over plain HTTP: ``STREAMING-UNSIGNED-PAYLOAD-TRAILER``
with a trailing ``x-amz-checksum-crc32``, or signed ``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``
chunks); aws-chunked bodies are decoded, chunk signatures and trailers are read and ignored.

Usage::

    with S3Sink() as sink:          # a subprocess on a free port
        boto3.client("s3", endpoint_url=sink.endpoint_url, ...)

    python benchmarks/_s3_sink.py --port 9000   # serve in the foreground
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.servers import HOST, LoopbackServer, http_request  # noqa: E402

__all__ = ["S3Sink", "SinkStore", "serve"]

_XML_HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'
_NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_PART = re.compile(rb"<Part>.*?<PartNumber>\s*(\d+)\s*</PartNumber>.*?</Part>", re.S)
_KEY = re.compile(rb"<Key>(.*?)</Key>", re.S)
_SEND_BLOCK = 16 * 2**20  # bytes handed to one sendall


class _BufferPool:
    """Body buffers for reuse, by exact size, up to ``limit_bytes`` in all.

    A fresh ``bytearray(n)`` costs a zero fill and a page fault per 4 KiB (and, in a VM that hands
    freed memory back to its host, much more); a benchmark that uploads and deletes the same sizes
    over and over gets the same buffers back instead, so the sink's cost per byte stays one ``recv_into``.
    """

    def __init__(self, limit_bytes: int = 4 * 2**30) -> None:
        self.lock = threading.Lock()
        self.free: dict[int, list[bytearray]] = {}
        self.limit_bytes, self.held = limit_bytes, 0

    def take(self, size: int) -> bytearray:
        """A buffer of exactly ``size`` bytes (old contents: the caller overwrites all of it)."""
        with self.lock:
            stack = self.free.get(size)
            if stack:
                self.held -= size
                return stack.pop()
        return bytearray(size)

    def give(self, buffers: list[bytearray]) -> None:
        with self.lock:
            for buffer in buffers:
                if buffer and self.held + len(buffer) <= self.limit_bytes:
                    self.free.setdefault(len(buffer), []).append(buffer)
                    self.held += len(buffer)

    def clear(self) -> None:
        with self.lock:
            self.free.clear()
            self.held = 0


POOL = _BufferPool()


class _Object:
    """An object's bytes as a list of buffers (one per part) and their start offsets.

    ``readers`` counts GETs in flight; a deleted or replaced object's buffers go back to :data:`POOL`
    only once none reads them (both under the store's lock).
    """

    __slots__ = ("buffers", "dead", "etag", "last_modified", "parts", "readers", "size", "starts")

    def __init__(self, parts: list[bytearray], etag: str) -> None:
        self.buffers = parts
        self.readers, self.dead = 0, False
        self.parts = [memoryview(p) for p in parts]
        self.starts: list[int] = []
        offset = 0
        for part in self.parts:
            self.starts.append(offset)
            offset += len(part)
        self.size = offset
        self.etag = etag
        self.last_modified = formatdate(usegmt=True)

    def slices(self, start: int, end: int) -> Iterator[memoryview]:
        """Views of bytes ``start`` to ``end`` (exclusive), no copy."""
        index = max(0, bisect.bisect_right(self.starts, start) - 1)
        while start < end and index < len(self.parts):
            part, base = self.parts[index], self.starts[index]
            lo, hi = start - base, min(len(part), end - base)
            if lo < hi:
                yield part[lo:hi]
                start = base + hi
            index += 1


class SinkStore:
    """Buckets, objects and multipart uploads in memory, guarded by one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buckets: dict[str, dict[str, _Object]] = {}
        self.uploads: dict[str, tuple[str, str, dict[int, bytearray]]] = {}  # id -> (bucket, key, parts)

    def reset(self) -> None:
        with self.lock:
            self.buckets.clear()
            self.uploads.clear()
        POOL.clear()

    def retire(self, obj: _Object | None) -> None:
        """``obj`` was deleted or replaced: recycle its buffers now or when its last reader ends (lock held)."""
        if obj is not None:
            obj.dead = True
            if obj.readers == 0:
                POOL.give(obj.buffers)
                obj.buffers = []


def _etag(parts: int = 0) -> str:
    return f'"{uuid.uuid4().hex}{f"-{parts}" if parts else ""}"'


def _error_xml(code: str, message: str, resource: str = "") -> bytes:
    return (
        f"{_XML_HEAD}<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>"
    ).encode()


class _HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _read_exact_into(stream: IO[bytes], view: memoryview) -> None:
    """Fill ``view`` from ``stream`` (``readinto`` loops: a socket returns what has arrived)."""
    filled, size = 0, len(view)
    while filled < size:
        n = stream.readinto(view[filled:])  # type: ignore[attr-defined]
        if not n:
            raise ConnectionError("client closed the connection mid-body")
        filled += n


def _read_all(stream: IO[bytes], length: int) -> bytearray:
    buffer = POOL.take(length)
    if length:
        _read_exact_into(stream, memoryview(buffer))
    return buffer


def _dechunk_http(stream: IO[bytes]) -> bytearray:
    """A ``Transfer-Encoding: chunked`` body, trailers dropped (slow path: clients here rarely use it)."""
    out = bytearray()
    while True:
        size = int(stream.readline().split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while stream.readline().strip():
                pass
            return out
        out += _read_all(stream, size)
        stream.readline()


def _decode_aws_chunked(stream: IO[bytes], decoded_length: int | None) -> bytearray:
    """An ``aws-chunked`` body: ``hex-size[;chunk-signature=..]\\r\\n data \\r\\n``..., ``0``, trailers, blank line."""
    if decoded_length is None:
        out = bytearray()
        while True:
            size = int(stream.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                break
            out += _read_all(stream, size)
            stream.readline()
    else:
        out = POOL.take(decoded_length)
        view, pos = memoryview(out), 0
        while True:
            line = stream.readline()
            if not line:
                raise ConnectionError("client closed the connection mid-body")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                break
            if pos + size > decoded_length:
                raise _HTTPError(400, "IncompleteBody", "aws-chunked body longer than x-amz-decoded-content-length")
            _read_exact_into(stream, view[pos : pos + size])
            pos += size
            stream.readline()  # the CRLF after the chunk data
        if pos != decoded_length:
            raise _HTTPError(400, "IncompleteBody", f"aws-chunked body has {pos} bytes, expected {decoded_length}")
    while True:  # trailers (x-amz-checksum-*, x-amz-trailer-signature) end with an empty line
        line = stream.readline()
        if not line or not line.strip():
            break
    return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _SinkHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a log line per request would cost more than the request."""

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytearray:
        """The request body, decoded to the object's bytes (see the module docstring)."""
        headers = self.headers
        aws_chunked = "aws-chunked" in headers.get("Content-Encoding", "") or headers.get(
            "x-amz-content-sha256", ""
        ).startswith("STREAMING-")
        decoded = headers.get("x-amz-decoded-content-length")
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            raw = _dechunk_http(self.rfile)
            if not aws_chunked:
                return raw
            import io

            return _decode_aws_chunked(io.BytesIO(raw), int(decoded) if decoded else None)
        if aws_chunked:
            return _decode_aws_chunked(self.rfile, int(decoded) if decoded else None)
        return _read_all(self.rfile, int(headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        lines = [f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}"]
        extra = {"Content-Type": "application/xml", "Content-Length": str(len(body)), **(headers or {})}
        lines += [f"{k}: {v}" for k, v in extra.items()]
        lines.append(f"x-amz-request-id: {uuid.uuid4().hex[:16]}")
        self.wfile.write(
            ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if self.command == "HEAD" else body)
        )

    def _xml(self, inner: str, status: int = 200) -> None:
        self._send(status, (_XML_HEAD + inner).encode())

    def _route(self) -> tuple[str, str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        bucket, _, key = path.lstrip("/").partition("/")
        return bucket, key, parse_qs(parts.query, keep_blank_values=True)

    def _dispatch(self) -> None:
        body = self._body() if self.command in ("PUT", "POST") else bytearray()
        try:
            bucket, key, query = self._route()
            if bucket == "_sink" and key == "reset":
                self.server.store.reset()
                self._send(200)
                return
            handler = getattr(self, f"_{self.command.lower()}_{'object' if key else 'bucket' if bucket else 'root'}")
            handler(bucket, key, query, body)
        except _HTTPError as err:
            self._send(err.status, _error_xml(err.code, err.message, self.path))

    def do_GET(self) -> None:
        self._dispatch()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _objects(self, bucket: str) -> dict[str, _Object]:
        objects = self.server.store.buckets.get(bucket)
        if objects is None:
            raise _HTTPError(404, "NoSuchBucket", "The specified bucket does not exist")
        return objects

    def _object(self, bucket: str, key: str) -> _Object:
        obj = self._objects(bucket).get(key)
        if obj is None:
            raise _HTTPError(404, "NoSuchKey", "The specified key does not exist.")
        return obj

    # -- service and buckets ---------------------------------------------------------------------
    def _get_root(self, bucket: str, key: str, query: dict[str, list[str]], body: bytearray) -> None:
        names = sorted(self.server.store.buckets)
        date = "<CreationDate>2026-01-01T00:00:00.000Z</CreationDate>"
        items = "".join(f"<Bucket><Name>{escape(n)}</Name>{date}</Bucket>" for n in names)
        self._xml(f"<ListAllMyBucketsResult {_NS}><Owner><ID>sink</ID></Owner><Buckets>{items}</Buckets>"
                  "</ListAllMyBucketsResult>")  # fmt: skip

    _head_root = _get_root

    def _put_bucket(self, bucket: str, key: str, query: dict[str, list[str]], body: bytearray) -> None:
        store = self.server.store
        with store.lock:
            store.buckets.setdefault(bucket, {})
        self._send(200, headers={"Location": f"/{bucket}"})

    def _head_bucket(self, bucket: str, key: str, query: dict[str, list[str]], body: bytearray) -> None:
        self._objects(bucket)
        self._send(200, headers={"x-amz-bucket-region": "us-east-1"})

    def _delete_bucket(self, bucket: str, key: str, query: dict[str, list[str]], body: bytearray) -> None:
        store = self.server.store
        with store.lock:
            if self._objects(bucket):
                raise _HTTPError(409, "BucketNotEmpty", "The bucket you tried to delete is not empty")
            del store.buckets[bucket]
        self._send(204)

    def _get_bucket(self, bucket: str, key: str, query: dict[str, list[str]], body: bytearray) -> None:
        objects = self._objects(bucket)
        if "location" in query:
            self._xml(f"<LocationConstraint {_NS}></LocationConstraint>")
            return
        if "uploads" in query or "versioning" in query or "versions" in query:
            raise _HTTPError(501, "NotImplemented", f"the sink does not implement {self.path}")
        first = lambda name, default="": query.get(name, [default])[0]  # noqa: E731
        prefix, delimiter = first("prefix"), first("delimiter")
        max_keys = int(first("max-keys", "1000"))
        after = first("continuation-token") or first("start-after") or first("marker")
        with self.server.store.lock:
            keys = sorted(k for k in objects if k.startswith(prefix) and k > after)
            snapshot = {k: objects[k] for k in keys}
        contents: list[str] = []
        prefixes: list[str] = []
        last, truncated = "", False
        for k in keys:
            if len(contents) + len(prefixes) >= max_keys:
                truncated = True
                break
            if delimiter and delimiter in k[len(prefix) :]:
                common = k[: len(prefix) + k[len(prefix) :].index(delimiter) + len(delimiter)]
                if prefixes and prefixes[-1] == common:
                    last = k
                    continue
                prefixes.append(common)
            else:
                obj = snapshot[k]
                contents.append(
                    f"<Contents><Key>{escape(k)}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
                    f"<ETag>{escape(obj.etag)}</ETag><Size>{obj.size}</Size><StorageClass>STANDARD</StorageClass>"
                    "</Contents>"
                )
            last = k
        v2 = first("list-type") == "2"
        token = ""
        if truncated:
            token = (f"<NextContinuationToken>{escape(last)}</NextContinuationToken>" if v2
                     else f"<NextMarker>{escape(last)}</NextMarker>")  # fmt: skip
        common_xml = "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes)
        count = f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>" if v2 else ""
        self._xml(
            f"<ListBucketResult {_NS}><Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
            f"<Delimiter>{escape(delimiter)}</Delimiter><MaxKeys>{max_keys}</MaxKeys>{count}"
            f"<IsTruncated>{str(truncated).lower()}</IsTruncated>{token}{''.join(contents)}{common_xml}"
            "</ListBucketResult>"
        )

    def _post_bucket(self, bucket: str, key: str, query: dict[str, list[str]], body: bytearray) -> None:
        if "delete" not in query:
            raise _HTTPError(501, "NotImplemented", f"the sink does not implement POST {self.path}")
        objects = self._objects(bucket)
        keys = [unescape_xml(k.decode()) for k in _KEY.findall(bytes(body))]
        with self.server.store.lock:
            for k in keys:
                self.server.store.retire(objects.pop(k, None))
        deleted = "".join(f"<Deleted><Key>{escape(k)}</Key></Deleted>" for k in keys)
        self._xml(f"<DeleteResult {_NS}>{deleted}</DeleteResult>")

    # -- objects -------------------------------------------------------------------------------
    def _object_headers(self, obj: _Object) -> dict[str, str]:
        return {"ETag": obj.etag, "Last-Modified": obj.last_modified, "Accept-Ranges": "bytes",
                "Content-Type": "binary/octet-stream"}  # fmt: skip

    def _head_object(self, bucket: str, key: str, query: dict[str, list[str]], body: bytearray) -> None:
        obj = self._object(bucket, key)
        self._send(200, headers={**self._object_headers(obj), "Content-Length": str(obj.size)})

    def _get_object(self, bucket: str, key: str, query: dict[str, list[str]], body: bytearray) -> None:
        store = self.server.store
        with store.lock:
            obj = self._object(bucket, key)
            obj.readers += 1
        try:
            self._send_object(obj)
        finally:
            with store.lock:
                obj.readers -= 1
                if obj.dead:
                    store.retire(obj)

    def _send_object(self, obj: _Object) -> None:
        start, end, status = 0, obj.size, 200
        headers = self._object_headers(obj)
        spec = self.headers.get("Range")
        if spec:
            match = _RANGE.match(spec.strip())
            if match is None or match.groups() == ("", ""):
                raise _HTTPError(400, "InvalidArgument", f"unsupported Range {spec!r}")
            first, last = match.groups()
            if first:
                start, end = int(first), min(obj.size, int(last) + 1) if last else obj.size
            else:
                start, end = max(0, obj.size - int(last)), obj.size
            if start >= obj.size:
                raise _HTTPError(416, "InvalidRange", "The requested range is not satisfiable")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{obj.size}"
        headers["Content-Length"] = str(end - start)
        self._send(status, headers=headers)
        for view in obj.slices(start, end):
            for offset in range(0, len(view), _SEND_BLOCK):
                self.wfile.write(view[offset : offset + _SEND_BLOCK])

    def _put_object(self, bucket: str, key: str, query: dict[str, list[str]], body: bytearray) -> None:
        store = self.server.store
        if "uploadId" in query:
            upload_id, number = query["uploadId"][0], int(query["partNumber"][0])
            etag = _etag()
            with store.lock:
                upload = store.uploads.get(upload_id)
                if upload is None:
                    raise _HTTPError(404, "NoSuchUpload", "The specified upload does not exist.")
                old = upload[2].get(number)
                upload[2][number] = body
            if old is not None:
                POOL.give([old])
            self._send(200, headers={"ETag": etag})
            return
        objects = self._objects(bucket)
        source = self.headers.get("x-amz-copy-source")
        if source:
            src_bucket, _, src_key = unquote(source.split("?", 1)[0]).lstrip("/").partition("/")
            src = self._object(src_bucket, src_key)
            obj = _Object([bytearray(v) for v in src.slices(0, src.size)], _etag())
            with store.lock:
                store.retire(objects.get(key))
                objects[key] = obj
            self._xml(f"<CopyObjectResult><ETag>{escape(obj.etag)}</ETag>"
                      "<LastModified>2026-01-01T00:00:00.000Z</LastModified></CopyObjectResult>")  # fmt: skip
            return
        obj = _Object([body], _etag())
        with store.lock:
            store.retire(objects.get(key))
            objects[key] = obj
        self._send(200, headers={"ETag": obj.etag})

    def _post_object(self, bucket: str, key: str, query: dict[str, list[str]], body: bytearray) -> None:
        store = self.server.store
        objects = self._objects(bucket)
        if "uploads" in query:
            upload_id = uuid.uuid4().hex
            with store.lock:
                store.uploads[upload_id] = (bucket, key, {})
            self._xml(f"<InitiateMultipartUploadResult {_NS}><Bucket>{escape(bucket)}</Bucket><Key>{escape(key)}"
                      f"</Key><UploadId>{upload_id}</UploadId></InitiateMultipartUploadResult>")  # fmt: skip
            return
        if "uploadId" not in query:
            raise _HTTPError(501, "NotImplemented", f"the sink does not implement POST {self.path}")
        upload_id = query["uploadId"][0]
        numbers = [int(n) for n in _PART.findall(bytes(body))]
        with store.lock:
            upload = store.uploads.get(upload_id)
            if upload is None:
                raise _HTTPError(404, "NoSuchUpload", "The specified upload does not exist.")
            parts = upload[2]
            missing = [n for n in numbers if n not in parts]
            if missing or not numbers:
                raise _HTTPError(400, "InvalidPart", f"parts {missing} were not uploaded")
            if numbers != sorted(set(numbers)):
                raise _HTTPError(400, "InvalidPartOrder", "The list of parts was not in ascending order.")
            obj = _Object([parts.pop(n) for n in numbers], _etag(len(numbers)))
            store.retire(objects.get(key))
            objects[key] = obj
            del store.uploads[upload_id]
            POOL.give(list(parts.values()))  # uploaded but not listed
        self._xml(f"<CompleteMultipartUploadResult {_NS}><Location>/{escape(bucket)}/{escape(key)}</Location>"
                  f"<Bucket>{escape(bucket)}</Bucket><Key>{escape(key)}</Key><ETag>{escape(obj.etag)}</ETag>"
                  "</CompleteMultipartUploadResult>")  # fmt: skip

    def _delete_object(self, bucket: str, key: str, query: dict[str, list[str]], body: bytearray) -> None:
        store = self.server.store
        objects = self._objects(bucket)
        with store.lock:
            if "uploadId" in query:
                upload = store.uploads.pop(query["uploadId"][0], None)
                if upload is None:
                    raise _HTTPError(404, "NoSuchUpload", "The specified upload does not exist.")
                POOL.give(list(upload[2].values()))
            else:
                store.retire(objects.pop(key, None))
        self._send(204)


def unescape_xml(text: str) -> str:
    """Undo the five XML entities (keys in a DeleteObjects body)."""
    for entity, char in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'"), ("&amp;", "&")):
        text = text.replace(entity, char)
    return text


class _SinkHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int]) -> None:
        self.store = SinkStore()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet for clients that hang up mid-response (s3fs closes a whole-object GET it only peeked at)."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def serve(port: int, host: str = HOST) -> None:
    """Serve forever in this process (the subprocess entry point)."""
    server = _SinkHTTPServer((host, port))
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


class S3Sink(LoopbackServer):
    """The sink in a subprocess on 127.0.0.1 and a free port; started on construction, like ``S3Server``.

    Example:
        >>> with S3Sink() as sink:  # doctest: +SKIP
        ...     sink.endpoint_url
        'http://127.0.0.1:...'
    """

    name = "s3_sink"

    def __init__(self, start_timeout_s: float = 20.0) -> None:
        self._start_timeout_s = start_timeout_s
        super().__init__(start_timeout_s)

    def command(self, port: int) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--port", str(port)]

    def ready(self) -> bool:
        status, _ = http_request(self.port, "GET", "/", timeout=1.0)
        return status == 200

    def start(self) -> S3Sink:
        """Start the subprocess if it is not running (construction already starts it)."""
        if self._process is None or self._process.poll() is not None:
            self._start(self._start_timeout_s)
        return self

    def reset(self) -> None:
        """Drop every bucket, object and upload."""
        status, _ = http_request(self.port, "POST", "/_sink/reset")
        if status != 200:
            raise RuntimeError(f"sink reset failed: HTTP {status}")

    def __enter__(self) -> S3Sink:
        return self


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default=HOST)
    args = parser.parse_args(argv)
    serve(args.port, args.host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
