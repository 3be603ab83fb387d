"""Byte statistics of an object in one streaming pass, GIL released.

The plain-Python twin :mod:`fastpipe._native._scan_py` has the same interface and results.
"""

from typing import Any

from typing_extensions import Buffer

class Scanner:
    """Byte statistics over the bytes given to :meth:`update`, in order.

    Computes a 256-bin histogram, the Shannon entropy (bits per byte) of the whole object
    and the lowest and highest entropy of its fixed-size blocks (a final partial block
    counts), the longest run of one byte value, the count of ``b"\\n"``, and whether the
    bytes are strict UTF-8 (as Python's decoder reads it: no overlong forms, no surrogates,
    nothing above U+10FFFF) with the offset of the first invalid sequence.

    Runs and UTF-8 sequences that span two :meth:`update` calls are joined. One scanner is
    not thread-safe; separate scanners run in parallel since :meth:`update` releases the
    GIL.
    """

    def __init__(self, block_size: int = 1 << 20) -> None:
        """Start an empty object; ``block_size`` is the block of the block entropies."""

    @property
    def block_size(self) -> int:
        """Bytes per block of the block entropies."""

    @property
    def position(self) -> int:
        """Bytes consumed so far."""

    def update(self, buf: Buffer) -> None:
        """Consume the next bytes (bytes, bytearray, mmap, a C-contiguous memoryview of
        unsigned bytes; read-only buffers welcome). No copy is made."""

    def result(self) -> dict[str, Any]:
        """The statistics of the bytes so far (the scanner may go on after it).

        Keys: ``size``, ``entropy``, ``block_entropy_min``, ``block_entropy_max`` (None for
        an empty object), ``longest_run`` (``{"byte", "length", "offset"}``, earliest of
        the longest; byte and offset None when empty), ``lines`` (count of ``b"\\n"``),
        ``utf8_valid``, ``first_invalid_utf8`` (offset where the first invalid sequence
        starts, a truncated one at the end included; None when valid), ``histogram``
        (256 counts).
        """

def _set_fold_limit(limit: int) -> int:
    """Set how many bytes the 32-bit sub-histograms count before they are folded into the
    64-bit counts (at most and by default 2**32 - 1); return the old limit. For the tests
    only (a small limit exercises the fold), not thread-safe."""
