"""FastCDC 2020 kernels (fastcdc-rs v2020 / pyfastcdc cut points), GIL released.

``p`` is a :class:`fastpipe._native._cdc_py.Params` from ``params(avg, min, max)``.
Buffers are any C-contiguous buffer of bytes (bytes, bytearray, mmap, memoryview; read-only
welcome) and are not copied. Offsets are returned as ``array('q')``. The plain-Python twin
:mod:`fastpipe._native._cdc_py` has the same functions and describes the algorithm.
"""

from array import array

from typing_extensions import Buffer

from ._cdc_py import Params

def cut_sequential(buf: Buffer, p: Params) -> array[int]:
    """Chunk end offsets of the whole buffer, computed as the reference does (two bytes
    of gear hash a step, skipping the first ``min_size`` bytes of each chunk)."""

def find_candidates(buf: Buffer, start: int, end: int, p: Params) -> array[int]:
    """Positions ``i`` in ``[start, end)`` where the gear hash of the 64 bytes ending at
    ``i`` has no bit of ``p.mask_s`` (entry ``i << 2 | 1``) or of ``p.mask_l`` (``| 2``).

    Segments of one buffer may be searched in parallel threads; their lists concatenated
    in order feed :func:`pick_cuts`. About one entry per ``avg_size / 2`` bytes.
    """

def pick_cuts(buf: Buffer, candidates: Buffer, p: Params) -> array[int]:
    """Chunk end offsets of the whole buffer from the candidates of all of it (an
    ``array('q')`` in order): the same offsets as :func:`cut_sequential`."""
