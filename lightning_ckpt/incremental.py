"""Incremental saves: a tensor whose bytes equal those in the base checkpoint is referenced, not written again.

A **base** is a full checkpoint (every file its own) saved with ``incremental=True``: each piece's
entry in its manifest carries an ``xxh3_128`` digest of its bytes, computed from the very bytes
that were written (the staged snapshot, or the tensor while training waits). A later save of the
same folder, before the next full one, hashes each piece it is about to write; a piece whose key,
dtype, shape, chunk and byte length equal the base's, and whose 128-bit digest equals the one the
base recorded, is not written: the new manifest points at the base's file and byte range (with the
base's CRC32, which every load checks) as ``../<base>/<file>``. Nothing is guessed from
``requires_grad`` or version counters, which miss writes through ``.data`` or shared storage: every
byte is hashed at every save (about 14 GB/s here, the GIL released).

Chains have length one: a checkpoint references only its base, never another incremental one,
so deleting is simple (a base is kept while a kept checkpoint references it; see
:func:`lightning_ckpt.rotation.delete_checkpoints`) and one damaged file harms one base's
dependants only. Every ``full_every``-th save is a new full base.

Example:
    >>> import os, tempfile, torch
    >>> from lightning_ckpt.collective import finish_save, prepare_alone
    >>> folder, state = tempfile.mkdtemp(), IncrementalState(full_every=10)
    >>> frozen, trained = torch.ones(1024), torch.zeros(4)
    >>> def save(name):  # finish_save tells the state how the save ended
    ...     return finish_save(prepare_alone({"frozen": frozen, "trained": trained}, os.path.join(folder, name),
    ...                                      incremental=state))
    >>> _ = save("ba1"); _ = trained.add_(1); _ = save("ba2")
    >>> from lightning_ckpt.reader import read_manifest
    >>> m = read_manifest(*Storage.open(os.path.join(folder, "ba2")))
    >>> m.tensors["frozen"].file, m.tensors["trained"].file
    ('../ba1/shard-00000-of-00001.safetensors', 'shard-00000-of-00001.safetensors')
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import xxhash

from lightning_ckpt import layout
from lightning_ckpt.errors import CheckpointError
from lightning_ckpt.fastwrite import tensor_bytes
from lightning_ckpt.manifest import FileEntry, Manifest, TensorEntry
from lightning_ckpt.storage import Storage
from lightning_ckpt.writer import ShardPlan, plan_shard

__all__ = [
    "Base",
    "IncrementalState",
    "Split",
    "check_references",
    "digest_of",
    "references_in",
    "split_shard",
]

log = logging.getLogger("lightning_ckpt")

DIGEST_PREFIX = "xxh3_128:"
HASH_THREADS = 2  # memory-bound: a second thread adds ~20-40 % on this 2-core VM, more add nothing
_PARALLEL_FROM_BYTES = 64 * 1024 * 1024
_REFERENCE_RE = re.compile(rb'"\.\./([^/"\\]+)/')


def digest_of(tensor: torch.Tensor) -> str:
    """The ``xxh3_128`` digest of a CPU tensor's bytes, as manifests record it.

    Example:
        >>> zeros = digest_of(torch.zeros(2))
        >>> zeros == digest_of(torch.zeros(2)), zeros == digest_of(torch.ones(2)), zeros[:9]
        (True, False, 'xxh3_128:')
    """
    return DIGEST_PREFIX + xxhash.xxh3_128_hexdigest(tensor_bytes(tensor))


@dataclass(frozen=True)
class Base:
    """A committed full checkpoint that later saves of its folder may reference.

    Attributes:
        folder: the folder holding it (a path in its storage).
        name: its directory name.
        pieces: its stored pieces by key (each with its digest).
        files: its files by name.
    """

    folder: str
    name: str
    pieces: dict[str, TensorEntry]
    files: dict[str, FileEntry]

    @classmethod
    def of(cls, folder: str, manifest: Manifest) -> Base | None:
        """The base a committed manifest makes, or ``None`` (it references others, or records no digests)."""
        if manifest.references or not any(p.digest for p in manifest.tensors.values()):
            return None
        return cls(folder, manifest.name, dict(manifest.tensors), {f.name: f for f in manifest.files})

    def holds(self, entry: TensorEntry) -> bool:
        """Whether the base has a piece ``entry`` could equal: same key, dtype, sizes, chunk and length."""
        stored = self.pieces.get(entry.key)
        return (
            stored is not None
            and stored.digest is not None
            and stored.crc32 is not None
            and (stored.dtype, stored.shape, stored.nbytes, stored.chunk_of)
            == (entry.dtype, entry.shape, entry.nbytes, entry.chunk_of)
        )

    def match(self, entry: TensorEntry, digest: str) -> TensorEntry | None:
        """The entry referencing the base's copy of ``entry`` if its bytes (``digest``) are the same, else ``None``."""
        if not self.holds(entry):
            return None
        stored = self.pieces[entry.key]
        if digest != stored.digest:
            return None
        return TensorEntry(
            entry.key, entry.dtype, entry.shape, layout.reference_name(self.name, stored.file), stored.offset,
            stored.nbytes, entry.device, stored.crc32, entry.chunk_of, stored.digest,
        )  # fmt: skip

    def files_of(self, references: list[TensorEntry]) -> list[FileEntry]:
        """The manifest entries of the base files ``references`` point into, sorted by name."""
        return [self.file_entry(name) for name in sorted({r.file for r in references})]

    def file_entry(self, reference: str) -> FileEntry:
        """The manifest entry of a referenced base file (its size, checksum and writer, under its reference name)."""
        parsed = layout.parse_reference(reference)
        assert parsed is not None and parsed[0] == self.name
        own = self.files[parsed[1]]
        return FileEntry(reference, own.size, own.checksum, own.rank)


@dataclass
class Split:
    """A shard split into what is written and what is referenced.

    Attributes:
        plan: the pieces to write (the whole shard when nothing is referenced).
        digests: every piece's digest, by key.
        references: entries of the pieces not written (they point into the base).
        files: the base files they point into.
    """

    plan: ShardPlan
    digests: dict[str, str]
    references: list[TensorEntry]
    files: list[FileEntry]


def split_shard(plan: ShardPlan, base: Base | None) -> Split:
    """Hash every piece of ``plan``; leave out those whose bytes ``base`` already holds (none without a base).

    The pieces left are laid out again (:func:`~lightning_ckpt.writer.plan_shard`) under the same
    file name; the written pieces' digests go into the manifest, so this save can be a base later.
    """
    digests = dict(zip((e.key for e in plan.entries), _digests(plan.tensors, HASH_THREADS), strict=True))
    references: list[TensorEntry] = []
    for entry in plan.entries:
        found = base.match(entry, digests[entry.key]) if base is not None else None
        if found is not None:
            references.append(found)
    if not references:
        return Split(plan, digests, [], [])
    assert base is not None
    referenced = {r.key for r in references}
    return Split(_subset(plan, lambda key: key not in referenced), digests, references, base.files_of(references))


def _subset(plan: ShardPlan, keep: Callable[[str], bool]) -> ShardPlan:
    """``plan`` laid out again with the pieces whose key ``keep`` accepts (same file name)."""
    kept = {e.key: t for e, t in zip(plan.entries, plan.tensors, strict=True) if keep(e.key)}
    devices = {e.key: e.device for e in plan.entries}
    chunks = {e.key: e.chunk_of for e in plan.entries if e.chunk_of is not None}
    return plan_shard(kept, file=plan.file, devices=devices, chunks=chunks)


def _digests(tensors: list[torch.Tensor], threads: int) -> list[str]:
    """Each tensor's digest, largest first on ``threads`` threads (xxhash releases the GIL)."""
    if threads < 2 or len(tensors) < 2 or sum(t.nbytes for t in tensors) < _PARALLEL_FROM_BYTES:
        return [digest_of(t) for t in tensors]
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].nbytes)
    with ThreadPoolExecutor(threads, thread_name_prefix="lightning_ckpt-hash") as pool:
        found = dict(zip(order, pool.map(lambda i: digest_of(tensors[i]), order), strict=True))
    return [found[i] for i in range(len(tensors))]


class IncrementalState:
    """One rank's base and count of saves since the last full one (one per plugin).

    Every rank keeps its own and sees the same commits, so they agree without talking; a rank
    that disagrees still saves correctly (it writes what it does not reference), and the commit
    refuses a reference whose file is gone.
    """

    def __init__(self, full_every: int) -> None:
        self.full_every = full_every
        self.base: Base | None = None
        self.since_full = 0

    def plan(self, storage: Storage, path: str) -> Base | None:
        """The base the save to ``path`` may reference, or ``None``: a full save (and then a new base)."""
        base = self.base
        if base is None or self.since_full + 1 >= self.full_every:
            return None
        folder, name = storage.dirname(path.rstrip("/")), storage.basename(path)
        if base.name == name or base.folder.rstrip("/") != folder.rstrip("/"):
            return None  # another folder, or the base itself being replaced: write everything
        return base

    def committed(self, storage: Storage, path: str, ok: bool, *, full: bool) -> None:
        """Record the outcome of the save to ``path``, planned ``full`` (no base) or not: a full save that
        committed becomes the base (its manifest, with every rank's digests, is read once for it)."""
        if not ok:
            self.base, self.since_full = None, 0
            return
        if not full:  # planned against a base: never a base itself, even if nothing matched; nothing to read
            self.since_full += 1
            return
        from lightning_ckpt.reader import read_manifest  # reader imports the writers' modules

        manifest = read_manifest(storage, path)
        base = Base.of(storage.dirname(path.rstrip("/")), manifest)
        if base is not None:
            self.base, self.since_full = base, 0
        else:
            self.since_full += 1


def references_in(storage: Storage, folder: str) -> dict[str, frozenset[str]]:
    """Every checkpoint of ``folder`` whose manifest references others, with the names it references.

    Read from the raw manifests (no parse, no check that they are complete): a manifest that a
    newer version wrote, or one that no longer loads, still protects what it names. Checkpoints
    that reference nothing are left out.

    Example:
        >>> import tempfile
        >>> references_in(*Storage.open(tempfile.mkdtemp()))
        {}
    """
    found: dict[str, frozenset[str]] = {}
    try:
        names = storage.listdir(folder)
    except FileNotFoundError:
        return found
    for name in names:
        if layout.is_hidden_name(name) or name.endswith(layout.POINTER_SUFFIX):
            continue
        path = storage.join(folder, name)
        try:
            if storage.islink(path):
                continue
            raw = storage.read_bytes(storage.join(path, layout.MANIFEST_FILENAME))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            continue
        named = frozenset(m.decode() for m in _REFERENCE_RE.findall(raw)) - {name}
        if named:
            found[name] = named
    return found


def check_references(storage: Storage, ckpt_dir: str, manifest: Manifest) -> None:
    """Refuse to commit ``manifest`` (about to be published from ``ckpt_dir``) when a base file it
    references is gone or changed size. (Replacing a checkpoint that others reference is refused by
    :func:`lightning_ckpt.targets.check_target`, before anything is written.)

    Raises:
        CheckpointError: naming the file; nothing is committed, and the next save
            of an :class:`IncrementalState` is full.
    """
    for entry in manifest.referenced_files:
        path = storage.join(ckpt_dir, entry.name)
        try:
            size: int | None = storage.size(path)
        except (FileNotFoundError, NotADirectoryError):
            size = None
        if size != entry.size:
            raise CheckpointError(
                f"incremental save of {manifest.name!r}: {storage.url(path)}, a file of the base checkpoint it"
                f" references, is {'missing' if size is None else f'{size} bytes, not {entry.size}'}; nothing was"
                " committed and the next save writes everything"
            )
