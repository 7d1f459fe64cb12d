"""A local Google Cloud Storage for tests: a ``gcp-storage-emulator`` subprocess and pytest fixtures.

Register with ``pytest_plugins = ["tests.gcs_server"]``. Everything listens on 127.0.0.1 only; needs
``gcsfs`` and ``gcp-storage-emulator`` (both pure Python wheels from PyPI).

Fixtures:
    ``gcs_server`` (session): a running :class:`GCSServer`, stopped at the end of the run.
    ``gcs_bucket``: wipes the server, creates a fresh bucket, yields ``GCSBucket(url, storage_options)``.

gcsfs (2026.x) makes ``gcsfs.GCSFileSystem`` an ``ExtendedGcsFileSystem`` unless the environment
variable ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` is false when gcsfs is imported. That class asks the
Storage Control gRPC API for every bucket's layout before reads and writes; against a plain HTTP
emulator the gRPC call fails only after its 60 s retry deadline, on every call (unknown layouts are
not cached). So while ``gcs_server`` is active the ``gs``/``gcs`` protocols map to the plain
``gcsfs.core.GCSFileSystem`` (the same HTTP JSON API code that ``ExtendedGcsFileSystem`` falls back to
for ordinary buckets), and the variable is set to false for subprocesses.

Unlike s3fs, gcsfs's retry count cannot be cut for tests: ``GCSFileSystem.retries`` is read when the
class body applies its ``retry_request`` decorator, so 5xx answers are retried 6 times with backoff.
The emulator answers 501 to the ``moveTo`` API, so ``fs.mv`` works only after ~30 s of those retries
(then gcsfs falls back to copy + delete).
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from tests.servers import HOST, LoopbackServer, free_port, http_request

__all__ = ["GCSBucket", "GCSServer", "free_port", "storage_options"]

PROJECT = "test-project"
_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_PROXY": HOST, "no_proxy": HOST}


def storage_options(endpoint_url: str) -> dict[str, Any]:
    """gcsfs ``storage_options`` for a local endpoint: anonymous, no instance or listings caches.

    Example:
        >>> storage_options("http://127.0.0.1:1")["endpoint_url"]
        'http://127.0.0.1:1'
    """
    return {
        "endpoint_url": endpoint_url,
        "token": "anon",
        "project": PROJECT,
        "skip_instance_cache": True,
        "use_listings_cache": False,
    }


class GCSServer(LoopbackServer):
    """``python -m gcp_storage_emulator start --in-memory`` in a subprocess on 127.0.0.1 and a free port."""

    name = "gcp-storage-emulator"

    def __init__(self, start_timeout_s: float = 20.0) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="gcs-emulator-")
        super().__init__(start_timeout_s)

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", "gcp_storage_emulator", "start", "--in-memory", "--quiet", "--host", HOST,
                "--port", str(port)]  # fmt: skip

    def env(self) -> dict[str, str]:
        return {**super().env(), **_ENV, "STORAGE_BASE": self._workdir.name}

    def cwd(self) -> str | None:
        return self._workdir.name

    def ready(self) -> bool:
        return http_request(self.port, "GET", "/", timeout=1.0)[0] == 200  # the health check answers "OK"

    def reset(self) -> None:
        """Wipe every bucket and object (the emulator's ``GET /wipe``)."""
        status, body = http_request(self.port, "GET", "/wipe")
        if status != 200:
            raise RuntimeError(f"emulator wipe failed: HTTP {status}: {body[:200]!r}")

    def create_bucket(self, name: str) -> None:
        """Create a bucket through the JSON API (``POST /storage/v1/b``)."""
        status, body = http_request(
            self.port, "POST", f"/storage/v1/b?project={PROJECT}", json.dumps({"name": name}).encode()
        )
        if status != 200:
            raise RuntimeError(f"bucket creation failed: HTTP {status}: {body[:200]!r}")

    def stop(self) -> None:
        super().stop()
        self._workdir.cleanup()


class GCSBucket(NamedTuple):
    """A fresh bucket: ``url`` like ``gs://test-bucket-1a2b3c4d5e6f`` and its gcsfs ``storage_options``."""

    url: str
    storage_options: dict[str, Any]


def _use_plain_gcsfs(mp: pytest.MonkeyPatch) -> None:
    """Map ``gs``/``gcs`` to ``gcsfs.core.GCSFileSystem`` (no gRPC bucket-layout lookups) until ``mp`` undoes it."""
    import gcsfs.core

    registry = importlib.import_module("fsspec.registry")._registry  # fsspec.registry is a read-only view
    for protocol in ("gs", "gcs"):
        mp.setitem(registry, protocol, gcsfs.core.GCSFileSystem)


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GCSServer]:
    """One emulator for the whole run; ``gs://`` uses the plain gcsfs HTTP filesystem meanwhile."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _ENV.items():
            mp.setenv(key, value)
        _use_plain_gcsfs(mp)
        server = GCSServer()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def gcs_bucket(gcs_server: GCSServer) -> GCSBucket:
    """An empty server with one new bucket: ``GCSBucket(url, storage_options)``."""
    gcs_server.reset()
    name = f"test-bucket-{uuid.uuid4().hex[:12]}"
    gcs_server.create_bucket(name)
    return GCSBucket(f"gs://{name}", storage_options(gcs_server.endpoint_url))
