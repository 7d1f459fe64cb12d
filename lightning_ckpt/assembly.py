"""The manifest of a collective save: every rank's entries, sent as rows, merged by the leader and checked.

Each rank reports the files and tensors it wrote at the ``written`` barrier as JSON-able rows
(:func:`entry_rows`); the leader turns every rank's rows back into entries and builds the one
manifest (:func:`assemble_manifest`), refusing entries that are not exactly the agreed plan.

Example:
    >>> from lightning_ckpt.manifest import FileEntry, TensorEntry
    >>> rows = entry_rows([FileEntry("shard-00000-of-00001.safetensors", 4104, "crc32:00000000", 0)],
    ...                   [TensorEntry("w", "float32", (2,), "shard-00000-of-00001.safetensors", 4096, 8, "cpu")])
    >>> manifest = assemble_manifest("ba3", {0: rows}, group=[0], keys=frozenset({"w"}),
    ...                              info={"epoch": 0, "global_step": 3, "weights_only": True}, metadata={})
    >>> manifest.world_size, list(manifest.tensors), manifest.metadata["writer_ranks"]
    (1, ['w'], [0])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_ckpt.checkpoint import library_versions
from lightning_ckpt.errors import PlanError
from lightning_ckpt.manifest import ChunkOf, FileEntry, Manifest, TensorEntry
from lightning_ckpt.plan import coverage_problem, paused_gc

__all__ = ["assemble_manifest", "entry_rows"]


def entry_rows(files: Sequence[FileEntry], tensors: Sequence[TensorEntry]) -> dict[str, Any]:
    """This rank's entries as JSON-able rows in field order (no ``dataclasses.asdict``: 100,000 tensors are cheap).

    Example:
        >>> entry_rows([], [])
        {'files': [], 'tensors': []}
    """
    with paused_gc():
        return {
            "files": [[f.name, f.size, f.checksum, f.rank] for f in files],
            "tensors": [
                [
                    t.key,
                    t.dtype,
                    list(t.shape),
                    t.file,
                    t.offset,
                    t.nbytes,
                    t.device,
                    t.crc32,
                    _chunk_row(t.chunk_of),
                    t.digest,
                ]
                for t in tensors
            ],
        }


def _chunk_row(chunk: ChunkOf | None) -> list[Any] | None:
    return None if chunk is None else [chunk.tensor, list(chunk.shape), list(chunk.offsets)]


def _chunk_of(row: list[Any] | None) -> ChunkOf | None:
    return None if row is None else ChunkOf(row[0], tuple(row[1]), tuple(row[2]))


def _entries(rows: Mapping[str, Any]) -> tuple[list[FileEntry], list[TensorEntry]]:
    """A rank's file and tensor entries from its :func:`entry_rows`."""
    with paused_gc():
        files = [FileEntry(*row) for row in rows["files"]]
        tensors = [
            TensorEntry(k, dt, tuple(shape), f, off, n, dev, crc, _chunk_of(chunk), digest)
            for k, dt, shape, f, off, n, dev, crc, chunk, digest in rows["tensors"]
        ]
    return files, tensors


def assemble_manifest(
    name: str,
    written: Mapping[int, Any],
    *,
    group: Sequence[int],
    keys: frozenset[str],
    info: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
) -> Manifest:
    """The manifest of checkpoint ``name`` from each ``group`` rank's rows in ``written``.

    Raises :class:`~lightning_ckpt.errors.PlanError` unless the tensors written are exactly the
    planned ``keys``. ``info`` holds ``epoch``, ``global_step`` and ``weights_only``.

    Example:
        >>> try:
        ...     assemble_manifest("ba1", {0: entry_rows([], [])}, group=[0], keys=frozenset({"w"}),
        ...                       info={"epoch": 0, "global_step": 1, "weights_only": True}, metadata=None)
        ... except PlanError as err:
        ...     print(str(err)[:60])
        the ranks wrote a different set of tensors than planned (mis
    """
    files: list[FileEntry] = []
    tensors: dict[str, TensorEntry] = {}
    for rank in group:
        rank_files, rank_tensors = _entries(written[rank])
        files += [f for f in rank_files if f not in files]  # a base file several ranks reference is listed once
        tensors.update((t.key, t) for t in rank_tensors)
    if set(tensors) != keys:  # the written entries must be exactly the agreed plan
        missing, extra = sorted(keys - set(tensors)), sorted(set(tensors) - keys)
        raise PlanError(f"the ranks wrote a different set of tensors than planned (missing {missing[:3]},"
                        f" unexpected {extra[:3]}); nothing was committed")  # fmt: skip
    manifest = Manifest(
        name=name,
        epoch=info["epoch"],
        global_step=info["global_step"],
        world_size=len(group),
        files=files,
        tensors=tensors,
        weights_only=info["weights_only"],
        versions=library_versions(),
        metadata={**dict(metadata or {}), "writer_ranks": list(group)},
    )
    _check_coverage(manifest)
    return manifest


def _check_coverage(manifest: Manifest) -> None:
    """Refuse to commit a sharded tensor whose written chunks do not hold each element exactly once."""
    for tensor in manifest.logical_tensors().values():
        if len(tensor.pieces) == 1 and tensor.pieces[0].chunk_of is None:
            continue
        problem = coverage_problem(tensor.shape, [(p.offsets, p.shape) for p in tensor.pieces])
        if problem:
            raise PlanError(f"tensor {tensor.key!r} as written: {problem}; nothing was committed")
