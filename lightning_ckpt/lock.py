"""One run per checkpoint folder: a lock that a second run pointed at the same folder runs into.

* **Local folders**: an exclusive ``flock`` on ``<folder>/.lightning_ckpt.lock``, held by the
  run's global rank 0 until the fit ends. The kernel drops it when the process dies, however it
  dies, so a restart after ``SIGKILL`` is never refused.
* **Object stores** have no locks: the same name holds a *lease*, a small JSON object naming the
  owner (host, pid, run id) and refreshed every ``LEASE_REFRESH_S`` by a daemon thread. A lease
  blocks another run while it is fresh (younger than ``LEASE_STALE_S``), or while its owner
  process is alive on this host. A lease whose owner died on this host is taken over at once;
  one from a dead run elsewhere, once it is stale.

The lock file holds the owner's description, so the error a second run gets says who holds it.

Example:
    >>> import tempfile
    >>> from lightning_ckpt.storage import Storage
    >>> storage, folder = Storage.open(tempfile.mkdtemp())
    >>> lock = FolderLock.acquire(storage, folder, run_name="demo")
    >>> try:
    ...     FolderLock.acquire(storage, folder, run_name="other")
    ... except FolderInUseError as err:
    ...     print("refused:", "run 'demo'" in str(err))
    refused: True
    >>> lock.release()
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from lightning_ckpt.errors import FolderInUseError
from lightning_ckpt.layout import LOCK_FILENAME
from lightning_ckpt.storage import Storage
from lightning_ckpt.transfer import DEFAULT_POLICY, RetryPolicy, with_retries

__all__ = ["LEASE_REFRESH_S", "LEASE_STALE_S", "LOCK_FILENAME", "FolderLock"]

log = logging.getLogger("lightning_ckpt")

LEASE_REFRESH_S = 60.0
LEASE_STALE_S = 300.0


def _owner(run_name: str) -> dict[str, Any]:
    return {
        "run_name": run_name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": uuid.uuid4().hex,
        "acquired": time.time(),
        "refreshed": time.time(),
    }


def _describe(owner: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("acquired", 0))))
    return f"run {owner.get('run_name')!r} (host {owner.get('host')}, pid {owner.get('pid')}, since {started})"


def _refused(url: str, owner: dict[str, Any]) -> FolderInUseError:
    return FolderInUseError(
        f"folder {url!r} is in use by {_describe(owner)}. Two runs saving into one folder would overwrite"
        " and rotate each other's checkpoints. Stop the other run or choose another folder; pass"
        " CheckpointSaver(lock_folder=False) only if both runs must share it."
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """The held lock of one folder; :meth:`release` gives it back (idempotent)."""

    def __init__(
        self, storage: Storage, path: str, owner: dict[str, Any], fd: int | None, policy: RetryPolicy = DEFAULT_POLICY
    ) -> None:
        self.storage, self.path, self.owner, self._fd, self.policy = storage, path, owner, fd, policy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(
        cls, storage: Storage, folder: str, *, run_name: str, policy: RetryPolicy = DEFAULT_POLICY
    ) -> FolderLock:
        """Take ``folder``'s lock or raise :class:`FolderInUseError` naming its holder.

        ``policy`` retries transient object-store errors while the lease is read and written.
        """
        storage.makedirs(folder)
        path = storage.join(folder, LOCK_FILENAME)
        owner = _owner(run_name)
        if storage.is_local:
            return cls._acquire_local(storage, path, owner)
        return cls._acquire_lease(storage, path, owner, policy)

    @classmethod
    def _acquire_local(cls, storage: Storage, path: str, owner: dict[str, Any]) -> FolderLock:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_owner(os.pread(fd, 65536, 0))
            os.close(fd)
            raise _refused(storage.url(os.path.dirname(path)), holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        return cls(storage, path, owner, fd)

    @classmethod
    def _acquire_lease(cls, storage: Storage, path: str, owner: dict[str, Any], policy: RetryPolicy) -> FolderLock:
        lock = cls(storage, path, owner, None, policy)
        holder = lock._read()
        if holder and _lease_is_live(holder):
            raise _refused(storage.url(storage.dirname(path)), holder)
        if holder:
            log.info("Taking over the checkpoint folder lock of %s, which is no longer alive", _describe(holder))
        lock._write()
        time.sleep(0.05)  # two runs that wrote at once: the store keeps one, and the other steps back
        now_held = lock._read() or {}
        if now_held.get("token") != owner["token"]:
            raise _refused(storage.url(storage.dirname(path)), now_held)
        _HELD_TOKENS.add(owner["token"])
        lock._thread = threading.Thread(target=lock._refresh_loop, name="lightning_ckpt-lease", daemon=True)
        lock._thread.start()
        return lock

    def _read(self) -> dict[str, Any] | None:
        def read() -> dict[str, Any] | None:
            return _read_owner(self.storage.read_bytes(self.path)) if self.storage.exists(self.path) else None

        return with_retries(read, what=f"read of {self.storage.url(self.path)}", policy=self.policy)

    def _write(self) -> None:
        data = json.dumps(self.owner).encode()
        with_retries(lambda: self.storage.write_bytes_atomic(self.path, data),
                     what=f"write of {self.storage.url(self.path)}", policy=self.policy)  # fmt: skip

    def _refresh_loop(self) -> None:
        while not self._stop.wait(LEASE_REFRESH_S):
            self.owner["refreshed"] = time.time()
            try:
                self._write()
            except Exception as err:  # a later refresh may work; the lease only goes stale after LEASE_STALE_S
                log.warning("Could not refresh the folder lock %s: %s", self.storage.url(self.path), err)

    def release(self) -> None:
        """Give the lock back: unlock the local file, or delete the lease if it is still ours."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
            return
        if self._thread is None:
            return
        self._stop.set()
        self._thread = None
        _HELD_TOKENS.discard(self.owner["token"])
        with contextlib.suppress(Exception):
            if (self._read() or {}).get("token") == self.owner["token"]:
                self.storage.remove_file(self.path)

    def __repr__(self) -> str:
        return f"FolderLock({self.storage.url(self.path)!r})"


def _read_owner(raw: bytes) -> dict[str, Any]:
    try:
        owner = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _lease_is_live(owner: dict[str, Any]) -> bool:
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        if owner["pid"] == os.getpid():  # this process: live only while one of its savers holds it
            return owner.get("token") in _HELD_TOKENS
        return _pid_alive(owner["pid"])
    return time.time() - float(owner.get("refreshed", 0)) < LEASE_STALE_S


_HELD_TOKENS: set[str] = set()  # leases this process holds now
