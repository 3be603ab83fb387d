# cython: language_level=3
"""FastCDC 2020 kernels, GIL released (docstrings live in ``_cdc.pyi``).

The algorithm, its tables and the reasoning behind the parallel form (speculative
segments, resynchronised) are described in the plain-Python twin
:mod:`fastpipe._native._cdc_py`, which holds the tables both use.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp

from array import array

from ._cdc_py import GEAR as _GEAR_TABLE

cdef uint64_t GEAR[256]
cdef uint64_t GEAR_LS[256]          # GEAR[b] << 1: hashes two bytes a step

for _b in range(256):
    GEAR[_b] = _GEAR_TABLE[_b]
    GEAR_LS[_b] = GEAR[_b] << 1


cdef struct _Params:
    Py_ssize_t min_size
    Py_ssize_t avg_size
    Py_ssize_t max_size
    uint64_t mask_s
    uint64_t mask_l


cdef struct _Vec:
    int64_t* data
    Py_ssize_t len
    Py_ssize_t cap
    bint failed


cdef inline void _push(_Vec* v, int64_t x) noexcept nogil:
    cdef Py_ssize_t cap
    cdef int64_t* grown
    if v.len == v.cap:
        cap = v.cap * 2 if v.cap else 1024
        grown = <int64_t*>realloc(v.data, cap * sizeof(int64_t))
        if grown == NULL:
            v.failed = True
            return
        v.data = grown
        v.cap = cap
    v.data[v.len] = x
    v.len += 1


cdef object _to_array(_Vec* v):
    """Move a vector into an ``array('q')`` and free it."""
    try:
        if v.failed:
            raise MemoryError("out of memory while chunking")
        out = array("q")
        if v.len:
            out.frombytes(PyBytes_FromStringAndSize(<char*>v.data, v.len * sizeof(int64_t)))
        return out
    finally:
        free(v.data)
        v.data = NULL


cdef _Params _unpack(object p) except *:
    cdef _Params c
    c.min_size, c.avg_size, c.max_size, c.mask_s, c.mask_l = p
    if c.min_size < 2 or c.avg_size < c.min_size or c.max_size < c.avg_size:
        raise ValueError(f"inconsistent chunking parameters {p!r}")
    return c


cdef inline void _limits(const _Params* p, Py_ssize_t remaining, Py_ssize_t* start,
                         Py_ssize_t* mid, Py_ssize_t* end) noexcept nogil:
    cdef Py_ssize_t center = p.avg_size
    if remaining > p.max_size:
        remaining = p.max_size
    elif remaining < center:
        center = remaining
    start[0] = p.min_size & ~(<Py_ssize_t>1)
    mid[0] = center & ~(<Py_ssize_t>1)
    end[0] = remaining & ~(<Py_ssize_t>1)


cdef Py_ssize_t _cut_run(const uint8_t* buf, Py_ssize_t start, Py_ssize_t mid,
                        Py_ssize_t end, uint64_t mask_s, uint64_t mask_l) noexcept nogil:
    """Where :func:`_cut_one`'s search of ``[start, end)`` stops when those bytes are one
    byte repeated (``end`` if no hash matches), or -1 when the bytes it reads are not.

    Runs of one byte (zeros in sparse files) are common and hash slowly to a forced cut
    at ``max_size``: the hash of a run is the same from 64 bytes on, so it is computed
    once, and checking that the bytes are equal runs at memory speed."""
    cdef uint64_t g = GEAR[buf[start]]
    cdef uint64_t h = 0
    cdef Py_ssize_t i = start
    cdef Py_ssize_t found = end
    while i < end and i < start + 64:
        h = (h << 1) + g
        if (h & (mask_s if i < mid else mask_l)) == 0:
            found = i
            break
        i += 1
    if found == end and i < end:  # h is now (h << 1) + g == h: the same at every i
        if i < mid and (h & mask_s) == 0:
            found = i
        elif (h & mask_l) == 0:
            found = i if i >= mid else mid
    # bytes [start, found] decide the cut at found; [start, end) a cut at neither
    if memcmp(buf + start, buf + start + 1, (found if found < end else end - 1) - start):
        return -1
    return found


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _cut_one(const uint8_t* buf, Py_ssize_t remaining,
                         const _Params* p) noexcept nogil:
    """Length of the chunk starting at ``buf`` (two bytes per step, as the reference)."""
    cdef Py_ssize_t start, mid, end, i
    cdef uint64_t h = 0
    cdef uint64_t mask_s = p.mask_s
    cdef uint64_t mask_l = p.mask_l
    cdef uint64_t mask_s_ls = mask_s << 1
    cdef uint64_t mask_l_ls = mask_l << 1
    if remaining <= p.min_size:
        return remaining
    _limits(p, remaining, &start, &mid, &end)
    if end - start >= 128 and buf[start] == buf[start + 1] and buf[start] == buf[end - 1]:
        i = _cut_run(buf, start, mid, end, mask_s, mask_l)
        if i >= 0:
            return i if i < end else (remaining if remaining < p.max_size else p.max_size)
    i = start
    while i < mid:
        h = (h << 2) + GEAR_LS[buf[i]]
        if (h & mask_s_ls) == 0:
            return i
        h = h + GEAR[buf[i + 1]]
        if (h & mask_s) == 0:
            return i + 1
        i += 2
    while i < end:
        h = (h << 2) + GEAR_LS[buf[i]]
        if (h & mask_l_ls) == 0:
            return i
        h = h + GEAR[buf[i + 1]]
        if (h & mask_l) == 0:
            return i + 1
        i += 2
    return remaining if remaining < p.max_size else p.max_size


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _chain(const uint8_t* buf, Py_ssize_t n, Py_ssize_t start, Py_ssize_t stop,
                 const _Params* p, _Vec* out) noexcept nogil:
    """Ends of the chain of chunks from a cut at ``start`` up to the first end >= ``stop``."""
    cdef Py_ssize_t s = start
    while s < stop:
        s += _cut_one(buf + s, n - s, p)
        _push(out, s)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _resync(const uint8_t* buf, Py_ssize_t n, Py_ssize_t cut, const int64_t* ends,
                        Py_ssize_t count, const _Params* p, _Vec* walked) noexcept nogil:
    """Walk the chain on from ``cut`` until it meets ``ends``: the index met, or -1."""
    cdef Py_ssize_t j = 0
    while True:
        while j < count and ends[j] < cut:
            j += 1
        if j == count:
            return -1
        if ends[j] == cut:
            return j
        if cut == n:  # only when ``ends`` is not a chain of this buffer
            return -1
        cut += _cut_one(buf + cut, n - cut, p)
        _push(walked, cut)


cdef inline void _init(_Vec* v) noexcept nogil:
    v.data = NULL
    v.len = v.cap = 0
    v.failed = False


@cython.boundscheck(False)
@cython.wraparound(False)
def cut_sequential(const uint8_t[::1] buf not None, p):
    cdef _Params c = _unpack(p)
    cdef _Vec out
    cdef Py_ssize_t n = buf.shape[0]
    _init(&out)
    if n:
        with nogil:
            _chain(&buf[0], n, 0, n, &c, &out)
    return _to_array(&out)


@cython.boundscheck(False)
@cython.wraparound(False)
def cut_range(const uint8_t[::1] buf not None, Py_ssize_t start, Py_ssize_t stop, p):
    cdef _Params c = _unpack(p)
    cdef _Vec out
    cdef Py_ssize_t n = buf.shape[0]
    if not 0 <= start <= stop <= n:
        raise ValueError(f"range [{start}, {stop}) is outside the buffer of {n}")
    _init(&out)
    if start < stop:
        with nogil:
            _chain(&buf[0], n, start, stop, &c, &out)
    return _to_array(&out)


@cython.boundscheck(False)
@cython.wraparound(False)
def resync(const uint8_t[::1] buf not None, Py_ssize_t cut, const int64_t[::1] ends not None, p):
    cdef _Params c = _unpack(p)
    cdef _Vec walked
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t count = ends.shape[0]
    cdef Py_ssize_t met = -1
    cdef const uint8_t* data = &buf[0] if n else NULL
    if not 0 <= cut <= n:
        raise ValueError(f"cut {cut} is outside the buffer of {n}")
    _init(&walked)
    if count:
        with nogil:
            met = _resync(data, n, cut, &ends[0], count, &c, &walked)
    return _to_array(&walked), met
