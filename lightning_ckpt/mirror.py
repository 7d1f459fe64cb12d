"""The remote mirror: a remote folder's local caches, its uploaders, downloads, and pruning of local copies.

A checkpoint of a remote folder (``s3://...``) is committed in a local directory first (the
*uploads* cache, or the saver's ``local_folder``) and uploaded in the background by rank 0's
writer group; a remote checkpoint being loaded is copied once per node into the *downloads*
cache. :class:`RemoteMirror` owns those directories and this rank's :class:`~lightning_ckpt.upload.Uploader`
per remote folder. The upload settings have one owner, the plugin (:class:`MirrorSettings`); an
uploader built with other values is replaced after its queued uploads finish.

Example:
    >>> from types import SimpleNamespace
    >>> from lightning_ckpt.transfer import DEFAULT_POLICY
    >>> settings = SimpleNamespace(cache_dir="/local/nvme/ckpt-cache", storage_options={},
    ...                            num_concurrent_uploads=4, upload_timeout_s=3600.0, upload_retry=DEFAULT_POLICY,
    ...                            max_upload_backlog=4)
    >>> RemoteMirror(settings).cache_for("s3://bucket/runs/a", "uploads")
    '/local/nvme/ckpt-cache/uploads/4d896d9c6b21898f'
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from lightning_ckpt import layout
from lightning_ckpt.checkpoint import remove_checkpoint_dir
from lightning_ckpt.collective import SaveResult
from lightning_ckpt.discovery import Resolved
from lightning_ckpt.dist import Exchange
from lightning_ckpt.layout import cache_path
from lightning_ckpt.rotation import deletion_order
from lightning_ckpt.stats import SaveStats
from lightning_ckpt.storage import Storage
from lightning_ckpt.transfer import RetryPolicy, download_checkpoint, with_retries
from lightning_ckpt.upload import Uploader, UploadJob

__all__ = ["MirrorSettings", "RemoteMirror", "default_cache_dir", "prune_local_copies"]

log = logging.getLogger("lightning_ckpt")


def default_cache_dir() -> str:
    """``~/.cache/lightning_ckpt``: where remote folders are mirrored unless ``cache_dir`` says otherwise."""
    return os.path.join(os.path.expanduser("~"), ".cache", "lightning_ckpt")


class MirrorSettings(Protocol):
    """Where the settings live (:class:`~lightning_ckpt.ShardedCheckpointIO`): read at each use, never copied."""

    @property
    def cache_dir(self) -> str: ...
    @property
    def storage_options(self) -> Mapping[str, Any]: ...
    @property
    def num_concurrent_uploads(self) -> int: ...
    @property
    def upload_timeout_s(self) -> float: ...
    @property
    def upload_retry(self) -> RetryPolicy: ...
    @property
    def max_upload_backlog(self) -> int: ...


class RemoteMirror:
    """This rank's local side of remote folders: caches, uploaders, downloads."""

    def __init__(self, settings: MirrorSettings) -> None:
        self.settings = settings
        self._uploaders: dict[str, Uploader] = {}
        self._local_only: dict[str, list[str]] = {}  # node cache -> checkpoints committed there, never uploaded

    def cache_for(self, remote_folder_url: str, kind: str) -> str:
        """The local cache directory of a remote folder (``kind``: ``"uploads"`` or ``"downloads"``)."""
        return cache_path(self.settings.cache_dir, remote_folder_url, kind)

    def local_target(self, remote_storage: Storage, remote_target: str, local_folder: str | None) -> str:
        """Where a checkpoint of a remote folder is committed before its upload."""
        remote_folder = remote_storage.url(remote_storage.dirname(remote_target))
        local_root = local_folder or self.cache_for(remote_folder, "uploads")
        return os.path.join(local_root, remote_storage.basename(remote_target))

    def _upload_settings(self) -> tuple[int, float, RetryPolicy, int]:
        s = self.settings
        return s.num_concurrent_uploads, s.upload_timeout_s, s.upload_retry, s.max_upload_backlog

    def uploader(self, remote_folder_url: str) -> Uploader:
        """This rank's uploader for a remote folder, made on first use and remade when the settings changed."""
        current = self._uploaders.get(remote_folder_url)
        wanted = self._upload_settings()
        if (
            current is not None
            and (current.num_concurrent_uploads, current.upload_timeout_s, current.policy, current.max_backlog)
            == wanted
        ):
            return current
        storage, folder = Storage.open(remote_folder_url, self.settings.storage_options)
        uploads, timeout_s, policy, backlog = wanted
        fresh = Uploader(storage, folder, num_concurrent_uploads=uploads, upload_timeout_s=timeout_s, policy=policy,
                         max_backlog=backlog)  # fmt: skip
        self._uploaders[remote_folder_url] = fresh
        if current is not None:
            try:
                current.close()  # its queued uploads finish first: checkpoints reach the store in order
            finally:
                fresh.committed[:0] = current.committed  # local copies of those are still pruned
                fresh.skipped[:0] = current.skipped
        return fresh

    def submit_upload(
        self,
        local: SaveResult,
        remote_storage: Storage,
        remote_target: str,
        *,
        pointer: str | None,
        key: str,
        after_commit: Callable[[], None] | None,
        stats: SaveStats | None,
        on_uploaded: Callable[[SaveStats, bool], None],
        supersedes: Collection[str] = (),
    ) -> None:
        """Queue the upload of a locally committed checkpoint of a remote folder (on every rank of its group).

        ``supersedes``: checkpoints this one's retention drops; queued uploads of those are not started
        (:meth:`~lightning_ckpt.upload.Uploader.supersede`)."""
        remote_folder = remote_storage.url(remote_storage.dirname(remote_target))
        name = remote_storage.basename(remote_target)
        local_root = os.path.dirname(local.path)
        uploader = self.uploader(remote_folder)
        # never skip the upload of a base that a local incremental checkpoint reads from
        uploader.supersede(deletion_order(*Storage.open(local_root), supersedes)[0] if supersedes else ())
        if stats is not None:  # its log line and metrics describe the checkpoint in the store
            stats.path = remote_storage.url(remote_target)

        def committed_remotely() -> None:  # also run after a newer commit when this upload was skipped
            if after_commit is not None:
                after_commit()
            newest = uploader.committed[-1] if uploader.committed else name
            prune_local_copies(local_root, keep=newest, uploaded=[*uploader.committed, *uploader.skipped])

        uploader.submit(
            UploadJob(
                local_dir=local.path,
                name=name,
                files=local.files,
                commit=local.leader,
                members=local.group,
                exchange=Exchange.current(prefix=key, timeout_s=self.settings.upload_timeout_s),
                pointer=pointer,
                after_commit=committed_remotely,
                stats=stats,
                on_uploaded=on_uploaded,
            )
        )

    def keep_newest_local_copy(self, local: SaveResult) -> None:
        """A node cache whose writer group lacks rank 0 uploads nothing (every object of a remote checkpoint comes
        from rank 0's group, one plan); it keeps its newest committed copy for a local resume, nothing older."""
        if not local.leader:
            return
        root, name = os.path.split(local.path.rstrip("/"))
        earlier = self._local_only.setdefault(root, [])
        prune_local_copies(root, keep=name, uploaded=earlier)
        earlier[:] = [name]

    def download(self, resolved: Resolved) -> Resolved:
        """Copy a remote checkpoint into the local cache once per node (a file lock), then use the copy."""
        storage = resolved.storage
        folder_url = storage.url(storage.dirname(resolved.path))
        name = storage.basename(resolved.path)
        local = os.path.join(self.cache_for(folder_url, "downloads"), name)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        manifest_path = storage.join(resolved.path, layout.MANIFEST_FILENAME)
        remote_manifest = with_retries(
            lambda: storage.read_bytes(manifest_path), what=f"download of {storage.url(manifest_path)}",
            policy=self.settings.upload_retry,
        )  # fmt: skip
        with open(os.path.join(os.path.dirname(local), layout.cache_lock_filename(name)), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            local_manifest = os.path.join(local, layout.MANIFEST_FILENAME)
            if os.path.exists(local_manifest) and open(local_manifest, "rb").read() == remote_manifest:
                log.info("Using the local copy of %s", resolved.url)
                return Resolved(Storage.open(local)[0], local, "dir")
            parallel = self.settings.num_concurrent_uploads * 2
            download_checkpoint(storage, resolved.path, local, remote_manifest, parallel)
        return Resolved(Storage.open(local)[0], local, "dir")

    def wait(self) -> None:
        """Block until this rank's queued uploads are done (bounded by the upload timeout); raise their error."""
        for uploader in list(self._uploaders.values()):
            uploader.wait()

    def close(self) -> list[BaseException]:
        """Finish (bounded) and stop every uploader; return their unreported errors."""
        uploaders, self._uploaders = self._uploaders, {}
        errors: list[BaseException] = []
        for uploader in uploaders.values():
            try:
                uploader.close()
            except Exception as err:
                errors.append(err)
        return errors


def prune_local_copies(local_root: str, *, keep: str, uploaded: Sequence[str]) -> None:
    """Delete local copies of checkpoints already committed in the store, except ``keep`` (the newest) and
    the bases that the copies kept read from (the next incremental save references them locally)."""
    storage, root = Storage.open(local_root)
    present = [name for name in sorted(set(uploaded) - {keep}) if storage.exists(storage.join(root, name))]
    for name in deletion_order(storage, root, present)[0]:
        remove_checkpoint_dir(storage, storage.join(root, name))
