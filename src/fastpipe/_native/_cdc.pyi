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

def cut_range(buf: Buffer, start: int, stop: int, p: Params) -> array[int]:
    """Ends of the chunks of the chain that starts a chunk at ``start``, up to the first
    end at or past ``stop`` (empty when ``start == stop``).

    The chunks end where they would in a chunking of the whole buffer that had a cut at
    ``start``: the end of the buffer, not ``stop``, limits them. Segments of one buffer
    may be chunked so in parallel threads, speculatively, and joined by :func:`resync`.
    ValueError unless ``0 <= start <= stop <= len(buf)``.
    """

def resync(buf: Buffer, cut: int, ends: Buffer, p: Params) -> tuple[array[int], int]:
    """Walk the chain from the cut ``cut`` until it meets ``ends`` (a chain from
    :func:`cut_range`, an ``array('q')`` in order).

    Returns the cuts walked past ``cut`` and the index in ``ends`` of the last of them (or
    of ``cut`` itself when it is in ``ends``): every later entry of ``ends`` is a cut of
    the walked chain too. The index is -1 when the walk passed ``ends[-1]`` without
    meeting it; the walked cuts then end at the first one past ``ends[-1]``.
    ValueError unless ``0 <= cut <= len(buf)``.
    """
