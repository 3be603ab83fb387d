"""Plain-Python twin of :mod:`fastpipe._native._cdc`, and the tables both use.

FastCDC 2020 as fastcdc-rs ``v2020`` and pyfastcdc define it, normalization level 1.
The gear hash of the byte at position ``i`` is ``h(i) = (h(i-1) << 1) + GEAR[buf[i]]``
modulo 2**64, restarted at 0 for every chunk at ``min_size`` (rounded down to even) past
the chunk's start. A chunk starting at ``s`` with ``r = len - s`` bytes left ends:

- at the end of the data when ``r <= min_size``;
- else at ``s + p`` for the first position ``p`` (relative to ``s``, from the hash start
  up to ``end = min(r, max_size)`` rounded down to even) whose hash has no bit of
  ``mask_s`` when ``p`` is before ``min(avg_size, r)`` (rounded down to even), or no bit
  of ``mask_l`` after it; the byte at ``p`` starts the next chunk;
- else at ``s + min(r, max_size)``.

Where a chunk ends depends only on where it starts (and on the data and its length), so
two chains of chunks that share one cut share all the cuts after it. That makes the
parallel form exact (speculative segments with resynchronisation): :func:`cut_range` chunks
each segment of the buffer as if a chunk started at the segment's start, in parallel; the
true chain, known up to the end of one segment, is walked on by :func:`resync` until it
reaches a cut of the next segment's chain, usually within a chunk or two, and adopts the
rest of that chain. In stretches where the cuts repeat with a fixed period (long runs of
one byte, cut at ``max_size``) the two chains may not meet before the segment ends, and the
walk continues, sequentially, into the next segment.

This module is the oracle of the tests (slow: about a microsecond a byte);
``FASTPIPE_NO_EXTENSIONS=1`` makes fastpipe use it, for debugging only.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Sequence
from typing import Any, NamedTuple

_U64 = (1 << 64) - 1

#: Gear table of the 2020 reference (fastcdc-rs v2020, pyfastcdc with seed 0): entry ``b``
#: is the first 8 bytes, big-endian, of the MD5 of 64 bytes all equal to ``b``.
GEAR: tuple[int, ...] = tuple(
    int.from_bytes(hashlib.md5(bytes([b]) * 64).digest()[:8], "big") for b in range(256)
)

#: Cut masks of the 2020 reference by bit count (``round(log2(avg_size)) -+ 1`` at
#: normalization level 1). These constants are data of the algorithm, spread over the
#: high bits as the paper recommends; they must match the reference bit for bit.
MASKS: dict[int, int] = {
    7: 0x0000_0000_1803_5100,
    8: 0x0000_0018_0003_5300,
    9: 0x0000_0190_0035_3000,
    10: 0x0000_5900_0353_0000,
    11: 0x0000_D900_0353_0000,
    12: 0x0000_D901_0353_0000,
    13: 0x0000_D903_0353_0000,
    14: 0x0000_D903_1353_0000,
    15: 0x0000_D90F_0353_0000,
    16: 0x0000_D903_0353_7000,
    17: 0x0000_D907_0353_7000,
    18: 0x0000_D907_0753_7000,
    19: 0x0000_D917_0753_7000,
    20: 0x0000_D917_4753_7000,
    21: 0x0000_D917_6753_7000,
    22: 0x0000_D937_6753_7000,
    23: 0x0000_D937_7753_7000,
}

AVG_SIZE_RANGE = (256, 4 << 20)
MIN_SIZE_RANGE = (64, 1 << 20)
MAX_SIZE_RANGE = (1024, 16 << 20)


class Params(NamedTuple):
    """Validated chunking parameters and the masks they select."""

    min_size: int
    avg_size: int
    max_size: int
    mask_s: int
    mask_l: int


def params(avg_size: int, min_size: int | None = None, max_size: int | None = None) -> Params:
    """Validate sizes as the reference does (defaults: ``avg/4`` and ``avg*4``).

    Raises ValueError naming the size out of range.
    """
    if min_size is None:
        min_size = avg_size // 4
    if max_size is None:
        max_size = avg_size * 4
    for name, value, (low, high) in (
        ("avg_size", avg_size, AVG_SIZE_RANGE),
        ("min_size", min_size, MIN_SIZE_RANGE),
        ("max_size", max_size, MAX_SIZE_RANGE),
    ):
        if not low <= value <= high:
            raise ValueError(f"{name} {value} is out of range [{low}, {high}]")
    if not min_size <= avg_size <= max_size:
        raise ValueError(
            f"sizes must satisfy min_size <= avg_size <= max_size, "
            f"got {min_size}, {avg_size}, {max_size}"
        )
    bits = math.floor(math.log2(avg_size) + 0.5)
    return Params(min_size, avg_size, max_size, MASKS[bits + 1], MASKS[bits - 1])


def _bytes(buf: Any) -> bytes:
    return memoryview(buf).cast("B").tobytes()


def _limits(p: Params, remaining: int) -> tuple[int, int, int]:
    """Hash start, start of the large-mask zone and end (relative, all even)."""
    center = p.avg_size
    if remaining > p.max_size:
        remaining = p.max_size
    elif remaining < center:
        center = remaining
    return p.min_size // 2 * 2, center // 2 * 2, remaining // 2 * 2


def _cut_one(data: bytes, s: int, p: Params) -> int:
    remaining = len(data) - s
    if remaining <= p.min_size:
        return remaining
    start, mid, end = _limits(p, remaining)
    h = 0
    for i in range(start, end):
        h = ((h << 1) + GEAR[data[s + i]]) & _U64
        if not h & (p.mask_s if i < mid else p.mask_l):
            return i
    return min(remaining, p.max_size)


def cut_sequential(buf: Any, p: Params) -> array[int]:
    """Chunk end offsets of the whole buffer, the reference's way."""
    data = _bytes(buf)
    return _chain(data, 0, len(data), p)


def _chain(data: bytes, start: int, stop: int, p: Params) -> array[int]:
    ends: array[int] = array("q")
    s = start
    while s < stop:
        s += _cut_one(data, s, p)
        ends.append(s)
    return ends


def cut_range(buf: Any, start: int, stop: int, p: Params) -> array[int]:
    """Ends of the chunks of the chain that starts a chunk at ``start``, up to the first
    end at or past ``stop`` (empty when ``start == stop``).

    The chunks end where they would in a chunking of the whole buffer that had a cut at
    ``start``: the end of the buffer, not ``stop``, limits them.
    """
    data = _bytes(buf)
    if not 0 <= start <= stop <= len(data):
        raise ValueError(f"range [{start}, {stop}) is outside the buffer of {len(data)}")
    return _chain(data, start, stop, p)


def resync(buf: Any, cut: int, ends: Sequence[int], p: Params) -> tuple[array[int], int]:
    """Walk the chain from the cut ``cut`` until it meets ``ends`` (a chain from
    :func:`cut_range`, in order).

    Returns the cuts walked past ``cut`` and the index in ``ends`` of the last of them (or
    of ``cut`` itself when it is in ``ends``): every later entry of ``ends`` is a cut of
    the walked chain too. The index is -1 when the walk passed ``ends[-1]`` without
    meeting it; the walked cuts then end at the first one past ``ends[-1]``.
    """
    data = _bytes(buf)
    if not 0 <= cut <= len(data):
        raise ValueError(f"cut {cut} is outside the buffer of {len(data)}")
    walked: array[int] = array("q")
    j = 0
    while True:
        while j < len(ends) and ends[j] < cut:
            j += 1
        if j == len(ends):
            return walked, -1
        if ends[j] == cut:
            return walked, j
        if cut == len(data):  # only when ``ends`` is not a chain of this buffer
            return walked, -1
        cut += _cut_one(data, cut, p)
        walked.append(cut)
