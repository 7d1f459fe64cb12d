"""A local server in a subprocess on 127.0.0.1 and a free port: start, readiness poll, log, stop.

The S3 (moto) and GCS (gcp-storage-emulator) fixtures subclass :class:`LoopbackServer` with their
command line and readiness check; everything else about the process lives here once.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import tempfile
import time
from typing import IO

__all__ = ["HOST", "LoopbackServer", "free_port", "http_request"]

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http_request(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    """One plain HTTP request to 127.0.0.1:``port``; returns ``(status, body)``."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class LoopbackServer:
    """Base class: subclasses give ``name``, :meth:`command`, :meth:`ready`, and optionally ``env``/``cwd``.

    Args:
        start_timeout_s: how long to wait for the server to answer.
    """

    name = "server"

    def __init__(self, start_timeout_s: float = 20.0) -> None:
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._start(start_timeout_s)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the server answers (called while polling after start)."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {**os.environ, "NO_PROXY": HOST, "no_proxy": HOST}

    def cwd(self) -> str | None:
        return None

    def _start(self, timeout_s: float) -> None:
        self._log = tempfile.TemporaryFile(prefix=f"{self.name}-")
        for _ in range(3):  # the free port may be taken between probing and binding
            self.port = free_port()
            self._process = subprocess.Popen(
                self.command(self.port),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.cwd(),
            )
            if self._wait_until_up(timeout_s):
                return
            self._terminate()
        raise RuntimeError(f"{self.name} did not start:\n{self.log_tail()}")

    def _wait_until_up(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                if self.ready():
                    return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def log_tail(self, limit: int = 4000) -> str:
        """The end of the server's combined stdout/stderr, for error messages."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-limit:]

    def _terminate(self, timeout_s: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers) and wait for it to exit."""
        self._terminate()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
