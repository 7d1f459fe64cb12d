"""CRC32 of large buffers: a fast implementation, and pieces checksummed in parallel, then combined.

:func:`crc32` is ``zlib_ng.crc32`` (the ``zlib-ng`` package: carry-less multiply instructions, about
21 GB/s on one core of the development machine) and falls back to the standard library's
``zlib.crc32`` (about 3-4 GB/s) where ``zlib-ng`` is not installed; both compute the same CRC and
release the GIL. A CRC is a chain: the
pieces of a file cannot simply be checksummed separately. They can be combined afterwards:
CRC32 is affine over GF(2), so ``crc(A + B) = Z(len(B)) * crc(A) xor crc(B)``, where ``Z(n)`` is the
linear operator that feeds ``n`` zero bytes through the CRC register. :func:`crc32_combine` builds
``Z(n)`` as a 32x32 bit matrix by repeated squaring (a few thousand integer operations), so
verifying a 1 GiB shard on two cores takes half the time of one.

Example:
    >>> import zlib
    >>> a, b = b"lightning", b"-ckpt"
    >>> crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b) == crc32(a + b)
    True
    >>> parallel_crc32(memoryview(a + b), workers=2, min_piece=1) == zlib.crc32(a + b)
    True
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

try:
    from zlib_ng import zlib_ng as _fast_zlib

    crc32: Callable[..., int] = _fast_zlib.crc32
    _native_combine: Callable[[int, int, int], int] | None = _fast_zlib.crc32_combine
except ImportError:  # pragma: no cover - zlib-ng is a dependency, but a plain zlib still works
    crc32 = zlib.crc32
    _native_combine = None

__all__ = ["checksum_string", "crc32", "crc32_combine", "parallel_crc32"]

_REFLECTED_POLY = 0xEDB88320
_PIECE = 64 * 1024 * 1024


def _apply(matrix: tuple[int, ...], vector: int) -> int:
    """``matrix`` (32 columns, column i = image of bit i) applied to a 32-bit ``vector``."""
    result, column = 0, 0
    while vector:
        if vector & 1:
            result ^= matrix[column]
        vector >>= 1
        column += 1
    return result


def _compose(outer: tuple[int, ...], inner: tuple[int, ...]) -> tuple[int, ...]:
    """The operator ``outer after inner``."""
    return tuple(_apply(outer, column) for column in inner)


@functools.cache
def _zero_bits(count_log2: int) -> tuple[int, ...]:
    """The operator that shifts ``2**count_log2`` zero bits through the (reflected) CRC register."""
    if count_log2 == 0:  # one bit: shift right, fold the polynomial in when the low bit falls out
        return (_REFLECTED_POLY, *(1 << (i - 1) for i in range(1, 32)))
    half = _zero_bits(count_log2 - 1)
    return _compose(half, half)


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """The CRC32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``.

    Example:
        >>> import zlib
        >>> crc32_combine(zlib.crc32(b"abc"), zlib.crc32(b""), 0) == zlib.crc32(b"abc")
        True
    """
    if _native_combine is not None:  # zlib-ng's: about 0.6 us, so one combine per tensor is cheap
        return _native_combine(crc_a, crc_b, length_b)
    bits, power = length_b * 8, 0
    while bits:
        if bits & 1:
            crc_a = _apply(_zero_bits(power), crc_a)
        bits >>= 1
        power += 1
    return crc_a ^ crc_b


def _crc_chain(view: memoryview) -> int:
    crc = 0
    for start in range(0, len(view), _PIECE):
        crc = crc32(view[start : start + _PIECE], crc)
    return crc


def parallel_crc32(view: memoryview, *, workers: int | None = None, min_piece: int = _PIECE) -> int:
    """CRC32 of ``view`` computed by ``workers`` threads (default: the usable cores, at most 8).

    Pieces smaller than ``min_piece`` are not worth a thread: small buffers are checksummed inline.
    """
    workers = workers or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    count = max(1, min(workers, len(view) // max(1, min_piece)))
    if count == 1:
        return _crc_chain(view)
    step = -(-len(view) // count)
    pieces = [view[start : start + step] for start in range(0, len(view), step)]
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="lightning_ckpt-crc") as pool:
        crcs = list(pool.map(_crc_chain, pieces))
    crc = crcs[0]
    for piece, piece_crc in zip(pieces[1:], crcs[1:], strict=True):
        crc = crc32_combine(crc, piece_crc, len(piece))
    return crc


def checksum_string(crc: int) -> str:
    """A CRC32 in the manifest's format.

    Example:
        >>> checksum_string(0x352441C2)
        'crc32:352441c2'
    """
    return f"crc32:{crc:08x}"
