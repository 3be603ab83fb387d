"""Plain-Python twin of :mod:`fastpipe._native._scan`: the oracle of the tests.

Slow (about a microsecond a byte) and written for obviousness: one statistic at a time,
byte by byte. ``FASTPIPE_NO_EXTENSIONS=1`` makes fastpipe use it, for debugging only.
"""

from __future__ import annotations

import math
from typing import Any

# Accepted range of the first continuation byte and the number of continuation bytes, per
# lead byte (strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF).
_LEADS: dict[int, tuple[int, int, int]] = {}
for _b in range(0xC2, 0xE0):
    _LEADS[_b] = (1, 0x80, 0xBF)
for _b in range(0xE0, 0xF0):
    _LEADS[_b] = (2, 0xA0 if _b == 0xE0 else 0x80, 0x9F if _b == 0xED else 0xBF)
for _b in range(0xF0, 0xF5):
    _LEADS[_b] = (3, 0x90 if _b == 0xF0 else 0x80, 0x8F if _b == 0xF4 else 0xBF)


def _entropy(counts: list[int], total: int) -> float:
    """Shannon entropy in bits per byte, computed as the native module does."""
    if total <= 0:
        return 0.0
    acc = 0.0
    for c in counts:
        if c:
            acc += c * math.log2(c)
    return math.log2(total) - acc / total


class Scanner:
    """Same interface and results as the native ``Scanner``."""

    def __init__(self, block_size: int = 1 << 20) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.position = 0
        self._hist = [0] * 256
        self._block = [0] * 256
        self._block_fill = 0
        self._block_entropies: list[float] = []
        self._run_byte = -1
        self._run_len = 0
        self._run_start = 0
        self._best = (0, -1, 0)  # length, byte, offset
        self._need = 0
        self._lo = 0x80
        self._hi = 0xBF
        self._seq_start = 0
        self._first_invalid: int | None = None

    def update(self, buf: Any) -> None:
        for b in memoryview(buf).cast("B").tobytes():
            off = self.position
            self._hist[b] += 1
            self._block[b] += 1
            self._block_fill += 1
            if self._block_fill == self.block_size:
                self._block_entropies.append(_entropy(self._block, self._block_fill))
                self._block = [0] * 256
                self._block_fill = 0
            if b == self._run_byte:
                self._run_len += 1
            else:
                if self._run_len > self._best[0]:
                    self._best = (self._run_len, self._run_byte, self._run_start)
                self._run_byte, self._run_len, self._run_start = b, 1, off
            if self._first_invalid is None:
                self._utf8(b, off)
            self.position += 1

    def _utf8(self, b: int, off: int) -> None:
        if self._need == 0:
            if b < 0x80:
                return
            if b not in _LEADS:
                self._first_invalid = off
                return
            self._need, self._lo, self._hi = _LEADS[b]
            self._seq_start = off
        elif self._lo <= b <= self._hi:
            self._need -= 1
            self._lo, self._hi = 0x80, 0xBF
        else:
            self._first_invalid = self._seq_start

    def result(self) -> dict[str, Any]:
        entropies = list(self._block_entropies)
        if self._block_fill:
            entropies.append(_entropy(self._block, self._block_fill))
        best = self._best
        if self._run_len > best[0]:
            best = (self._run_len, self._run_byte, self._run_start)
        first_invalid = self._first_invalid
        if first_invalid is None and self._need:
            first_invalid = self._seq_start
        return {
            "size": self.position,
            "entropy": _entropy(self._hist, self.position) if self.position else None,
            "block_entropy_min": min(entropies) if entropies else None,
            "block_entropy_max": max(entropies) if entropies else None,
            "longest_run": {
                "byte": best[1] if best[0] else None,
                "length": best[0],
                "offset": best[2] if best[0] else None,
            },
            "lines": self._hist[10],
            "utf8_valid": first_invalid is None,
            "first_invalid_utf8": first_invalid,
            "histogram": list(self._hist),
        }
