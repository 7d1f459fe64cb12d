"""Moving files between local disk and an object store: multipart-parallel, retried, bounded.

``put_file`` / ``get_file`` move one file with ``max_concurrency`` parts in flight (s3fs and
gcsfs take ``chunksize`` and ``max_concurrency``; other fsspec filesystems move the file whole).
Transient failures (5xx, throttling, timeouts, dropped connections) are retried with exponential
backoff and jitter; anything else (bad credentials, missing bucket) fails at once. Sleeping and
the clock are injectable so retry behaviour is tested without waiting.

Example:
    >>> import os, tempfile
    >>> from lightning_ckpt.storage import Storage
    >>> src = os.path.join(tempfile.mkdtemp(), "a.bin"); _ = open(src, "wb").write(b"x" * 10)
    >>> storage, remote = Storage.open("memory://transfer-doc/a.bin")
    >>> put_file(storage, src, remote)
    >>> dst = src + ".back"; get_file(storage, remote, dst); open(dst, "rb").read()
    b'xxxxxxxxxx'
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from lightning_ckpt import layout
from lightning_ckpt.commit import ManifestLastCommit
from lightning_ckpt.errors import ConfigError
from lightning_ckpt.manifest import Manifest
from lightning_ckpt.storage import Storage

__all__ = [
    "DEFAULT_POLICY",
    "RANGED_GET_MIN_BYTES",
    "RetryPolicy",
    "download_checkpoint",
    "get_file",
    "is_transient",
    "put_file",
    "with_retries",
]

log = logging.getLogger("lightning_ckpt")

T = TypeVar("T")
PART_BYTES = 8 * 1024 * 1024  # many parts in flight: what wins on object stores
_POOL_CONNECTIONS = 128  # the boto3 client's connection pool, unless config_kwargs sets max_pool_connections
_TRANSIENT_CODES = {"500", "502", "503", "504", "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}  # fmt: skip
_TRANSIENT_TEXT = ("SlowDown", "503", "Service Unavailable", "Please reduce your request rate")
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT}


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a transient failure.

    Attributes:
        attempts: total tries (>= 1).
        initial_backoff_s: wait before the second try; doubles each time, with +-25% jitter.
        max_backoff_s: cap on one wait.
        deadline_s: give up once this much time has passed since the first try.

    Example:
        >>> from lightning_ckpt import RetryPolicy, ShardedCheckpointIO
        >>> policy = RetryPolicy(attempts=4, initial_backoff_s=1.0, max_backoff_s=30.0)
        >>> io = ShardedCheckpointIO(upload_retry=policy)  # uploads, manifest downloads, the folder lease
        >>> io.upload_retry.attempts, [policy.initial_backoff_s * 2**n for n in range(policy.attempts - 1)]
        (4, [1.0, 2.0, 4.0])
    """

    attempts: int = 8
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 20.0
    deadline_s: float = 3600.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError("attempts", self.attempts, "8", "It must be an int >= 1 (1: no retries)")
        for argument, value, example in (
            ("initial_backoff_s", self.initial_backoff_s, "0.5"),
            ("max_backoff_s", self.max_backoff_s, "20.0"),
            ("deadline_s", self.deadline_s, "3600.0"),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(argument, value, example, "It must be a finite number of seconds >= 0")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ConfigError("max_backoff_s", self.max_backoff_s, repr(max(20.0, float(self.initial_backoff_s))),
                              f"It must be >= initial_backoff_s={self.initial_backoff_s!r}")  # fmt: skip

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based).

        Example:
            >>> RetryPolicy(initial_backoff_s=1, max_backoff_s=5).backoff(10, random.Random(0)) <= 6.25
            True
        """
        base = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
        return base * rng.uniform(0.75, 1.25)


DEFAULT_POLICY = RetryPolicy()


def is_transient(error: BaseException) -> bool:
    """Whether retrying ``error`` may help: server errors, throttling, timeouts, dropped connections.

    Example:
        >>> is_transient(ConnectionResetError()), is_transient(PermissionError("denied"))
        (True, False)
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _TRANSIENT_CODES or status.startswith("5"):
                return True
        name = type(current).__name__
        if name in {"ServerDisconnectedError", "ClientOSError", "ClientPayloadError", "ReadTimeoutError",
                    "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError", "IncompleteReadError",
                    "ResponseStreamingError", "ServerTimeoutError"}:  # fmt: skip
            return True
        text = str(current)
        if any(
            marker in text for marker in ("SlowDown", "503", "Service Unavailable", "Please reduce your request rate")
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def with_retries(
    action: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy = DEFAULT_POLICY,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """Run ``action``, retrying transient failures per ``policy``; the last error keeps its type."""
    rng = rng or random.Random()
    start = clock()
    for attempt in range(1, policy.attempts + 1):
        try:
            return action()
        except Exception as err:
            if not is_transient(err) or attempt == policy.attempts:
                raise
            wait = policy.backoff(attempt, rng)
            if clock() - start + wait > policy.deadline_s:
                raise
            log.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(err).__name__, err, attempt,
                        policy.attempts - 1, wait)  # fmt: skip
            sleep(wait)
    raise AssertionError("unreachable")


def _transfer_options(storage: Storage, size: int, max_concurrency: int) -> dict[str, Any]:
    if storage.protocol in ("s3", "s3a", "gs", "gcs"):
        return {"chunksize": max(PART_BYTES, -(-size // 10_000)), "max_concurrency": max_concurrency}
    return {}


def _boto3_client(storage: Storage) -> Any | None:
    """A boto3 S3 client with the same credentials and endpoint as the s3fs filesystem, if boto3 is installed.

    boto3's transfer manager moves parts on OS threads; s3fs does every part's work on one event-loop
    thread, which on small machines makes it the slower uploader (see benchmarks/README.md).
    """
    settings = storage.settings("anon", "key", "secret", "token", "config_kwargs", "client_kwargs")
    if storage.protocol not in ("s3", "s3a") or settings.get("anon", False):
        return None
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return None
    if "boto3" not in storage.clients:
        config = dict(settings.get("config_kwargs") or {})
        # one connection per part in flight (urllib3 discards, with a warning, what overflows botocore's 10);
        # download_checkpoint runs several ranged downloads at once on this one client
        config.setdefault("max_pool_connections", _POOL_CONNECTIONS)
        session = boto3.session.Session(
            aws_access_key_id=settings.get("key"),
            aws_secret_access_key=settings.get("secret"),
            aws_session_token=settings.get("token"),
        )
        storage.clients["boto3"] = session.client(
            "s3", config=Config(**config), **dict(settings.get("client_kwargs") or {})
        )
    return storage.clients["boto3"]


def _put(storage: Storage, local_path: str, remote_path: str, max_concurrency: int) -> None:
    client = _boto3_client(storage)
    if client is None:
        options = _transfer_options(storage, os.path.getsize(local_path), max_concurrency)
        storage.put_file(local_path, remote_path, **options)
        return
    from boto3.s3.transfer import TransferConfig

    bucket, _, key = remote_path.lstrip("/").partition("/")
    part = max(PART_BYTES, -(-os.path.getsize(local_path) // 10_000))
    config = TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=max_concurrency)
    client.upload_file(local_path, bucket, key, Config=config)


def put_file(
    storage: Storage,
    local_path: str,
    remote_path: str,
    *,
    max_concurrency: int = 16,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> None:
    """Upload one local file to ``remote_path``, parts in parallel, retrying transient failures."""
    with_retries(
        lambda: _put(storage, local_path, remote_path, max_concurrency), what=f"upload of {local_path}", policy=policy
    )


RANGED_GET_MIN_BYTES = 2 * PART_BYTES + 1  # S3 objects above this download as parallel ranged GETs
_READ_BYTES = 1024 * 1024  # one read from a ranged GET's body, written at its offset


def _ranges(size: int, part: int) -> list[tuple[int, int]]:
    """``(start, end)`` byte ranges (end exclusive) of at most ``part`` bytes covering ``size`` bytes.

    Example:
        >>> _ranges(10, 4)
        [(0, 4), (4, 8), (8, 10)]
    """
    return [(start, min(size, start + part)) for start in range(0, size, part)]


def _get_range(client: Any, bucket: str, key: str, etag: str, fd: int, start: int, end: int) -> None:
    """GET bytes ``start``..``end`` (exclusive) of the object and ``os.pwrite`` them at their offset in ``fd``.

    ``If-Match`` pins every range to the version the HEAD saw: an object overwritten mid-download
    fails (412, not retried) instead of mixing two versions.
    """
    extra = {"IfMatch": etag} if etag else {}
    body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **extra)["Body"]
    try:
        offset = start
        while offset < end:
            block = body.read(min(_READ_BYTES, end - offset))
            if not block:
                raise ConnectionResetError(f"ranged GET of {key} ended at byte {offset}, expected {end}")
            written = 0
            while written < len(block):  # pwrite may write less than asked
                written += os.pwrite(fd, memoryview(block)[written:], offset + written)
            offset += len(block)
    finally:
        body.close()


def _get_ranged(
    client: Any, bucket: str, key: str, size: int, etag: str, tmp: str, max_concurrency: int, policy: RetryPolicy
) -> None:
    """Download ``size`` bytes into ``tmp`` as parallel ranged GETs, each retried on its own per ``policy``."""
    part = max(PART_BYTES, -(-size // 10_000))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.ftruncate(fd, size)

        def one(span: tuple[int, int]) -> None:
            with_retries(lambda: _get_range(client, bucket, key, etag, fd, *span),
                         what=f"download of bytes {span[0]}-{span[1] - 1} of s3://{bucket}/{key}",
                         policy=policy)  # fmt: skip

        spans = _ranges(size, part)
        with ThreadPoolExecutor(max_workers=max(1, min(max_concurrency, len(spans)))) as pool:
            futures = [pool.submit(one, span) for span in spans]
            try:
                for future in futures:
                    future.result()
            except BaseException:  # the first failure propagates: ranges not started yet never start
                for future in futures:
                    future.cancel()
                raise
    finally:
        os.close(fd)


def get_file(
    storage: Storage,
    remote_path: str,
    local_path: str,
    *,
    max_concurrency: int = 16,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> None:
    """Download one file to a hidden temporary name next to ``local_path``, then rename it into place.

    On S3 with boto3 installed, an object larger than ``RANGED_GET_MIN_BYTES`` (two parts) is
    fetched as ``PART_BYTES`` ranged GETs, ``max_concurrency`` at a time on OS threads, each
    written at its offset with ``os.pwrite`` (faster than s3fs's ``get_file`` and boto3's
    ``download_file``: ``benchmarks/bench_s3_transfer.py``); smaller objects and other stores use the
    filesystem's own ``get_file``. Transient failures are retried per ``policy`` (per range on
    the ranged path); on any failure the temporary file is removed.
    """
    directory = os.path.dirname(local_path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, layout.temp_filename(os.path.basename(local_path), f"dl{os.getpid()}"))
    what = f"download of {remote_path}"
    try:
        client = _boto3_client(storage)
        if client is not None:
            bucket, _, key = remote_path.lstrip("/").partition("/")
            head = with_retries(lambda: client.head_object(Bucket=bucket, Key=key), what=what, policy=policy)
            size, etag = int(head["ContentLength"]), str(head.get("ETag") or "")
            if size >= RANGED_GET_MIN_BYTES:
                _get_ranged(client, bucket, key, size, etag, tmp, max_concurrency, policy)
                os.replace(tmp, local_path)
                return
        with_retries(lambda: storage.get_file(remote_path, tmp), what=what, policy=policy)
        os.replace(tmp, local_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download_checkpoint(
    storage: Storage, remote_dir: str, local_dir: str, manifest_bytes: bytes, workers: int = 8
) -> None:
    """Download every file a manifest lists, in parallel, then write the manifest last (:class:`ManifestLastCommit`)."""
    manifest = Manifest.from_json(
        manifest_bytes, source=storage.url(storage.join(remote_dir, layout.MANIFEST_FILENAME))
    )
    os.makedirs(local_dir, exist_ok=True)
    commit = ManifestLastCommit(Storage.open(local_dir)[0])
    commit.uncommit(local_dir)  # an outdated copy never looks committed while its files are overwritten
    start = time.monotonic()
    size_mb = manifest.total_bytes / 1e6
    log.info("Downloading %s (%d files, %.1f MB)", storage.url(remote_dir), len(manifest.files), size_mb)
    for f in manifest.referenced_files:  # an incremental checkpoint's base files go into their own sibling
        os.makedirs(os.path.dirname(os.path.normpath(os.path.join(local_dir, f.name))), exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(manifest.files)))) as pool:
        futures = [
            pool.submit(get_file, storage, storage.join(remote_dir, f.name), os.path.join(local_dir, f.name))
            for f in manifest.files
        ]
        for done, future in enumerate(futures, 1):
            future.result()
            log.info("Downloaded %d/%d files of %s", done, len(futures), manifest.name)
    commit.write_manifest(local_dir, manifest_bytes)
    elapsed = time.monotonic() - start
    log.info("Downloaded %s in %.2f s (%.1f MB/s)", manifest.name, elapsed, size_mb / max(elapsed, 1e-9))
