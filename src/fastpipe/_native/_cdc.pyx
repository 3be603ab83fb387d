# cython: language_level=3
"""FastCDC 2020 kernels, GIL released (docstrings live in ``_cdc.pyi``).

The algorithm, its tables and the reasoning behind the parallel form are described in
the plain-Python twin :mod:`fastpipe._native._cdc_py`, which holds the tables both use.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc, realloc

from array import array

from ._cdc_py import GEAR as _GEAR_TABLE
from ._cdc_py import WARMUP as _WARMUP_PY

cdef uint64_t GEAR[256]
cdef uint64_t GEAR_LS[256]          # GEAR[b] << 1: hashes two bytes a step
cdef Py_ssize_t WARMUP = _WARMUP_PY

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


cdef void _cut_sequential(const uint8_t* buf, Py_ssize_t n, const _Params* p,
                          _Vec* out) noexcept nogil:
    cdef Py_ssize_t s = 0
    while s < n:
        s += _cut_one(buf + s, n - s, p)
        _push(out, s)


cdef inline void _mark(_Vec* out, uint64_t h, uint64_t mask_s, uint64_t mask_l,
                       Py_ssize_t i) noexcept nogil:
    cdef int64_t flags = (1 if (h & mask_s) == 0 else 0) | (2 if (h & mask_l) == 0 else 0)
    if flags:
        _push(out, (<int64_t>i << 2) | flags)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _find_candidates(const uint8_t* buf, Py_ssize_t start, Py_ssize_t end,
                           uint64_t mask_s, uint64_t mask_l, _Vec* out) noexcept nogil:
    """Mark ``[start, end)``; two bytes a step as the sequential kernel (the first half
    step gives twice the hash, tested against the masks shifted left once)."""
    cdef uint64_t h = 0
    cdef uint64_t both = mask_s & mask_l   # a hash with any of these bits matches neither
    cdef uint64_t both_ls = both << 1
    cdef uint64_t mask_s_ls = mask_s << 1
    cdef uint64_t mask_l_ls = mask_l << 1
    cdef Py_ssize_t i = start - 64 if start > 64 else 0
    while i < start:
        h = (h << 1) + GEAR[buf[i]]
        i += 1
    if (end - i) & 1:
        h = (h << 1) + GEAR[buf[i]]
        if (h & both) == 0:
            _mark(out, h, mask_s, mask_l, i)
        i += 1
    while i < end:
        h = (h << 2) + GEAR_LS[buf[i]]
        if (h & both_ls) == 0:
            _mark(out, h, mask_s_ls, mask_l_ls, i)
        h = h + GEAR[buf[i + 1]]
        if (h & both) == 0:
            _mark(out, h, mask_s, mask_l, i + 1)
        i += 2


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _pick_cuts(const uint8_t* buf, Py_ssize_t n, const int64_t* cand, Py_ssize_t nc,
                     const _Params* p, _Vec* out) noexcept nogil:
    cdef Py_ssize_t s = 0
    cdef Py_ssize_t ci = 0
    cdef Py_ssize_t remaining, start, mid, end, warm_end, cut, i, rel
    cdef uint64_t h
    while s < n:
        remaining = n - s
        if remaining <= p.min_size:
            cut = remaining
        else:
            _limits(p, remaining, &start, &mid, &end)
            cut = -1
            h = 0
            warm_end = start + WARMUP if start + WARMUP < end else end
            i = start
            while i < warm_end:
                h = (h << 1) + GEAR[buf[s + i]]
                if (h & (p.mask_s if i < mid else p.mask_l)) == 0:
                    cut = i
                    break
                i += 1
            if cut < 0:
                while ci < nc and (cand[ci] >> 2) < s + warm_end:
                    ci += 1
                while ci < nc and (cand[ci] >> 2) < s + end:
                    rel = <Py_ssize_t>(cand[ci] >> 2) - s
                    if cand[ci] & (1 if rel < mid else 2):
                        cut = rel
                        break
                    ci += 1
            if cut < 0:
                cut = remaining if remaining < p.max_size else p.max_size
        s += cut
        _push(out, s)


@cython.boundscheck(False)
@cython.wraparound(False)
def cut_sequential(const uint8_t[::1] buf not None, p):
    cdef _Params c = _unpack(p)
    cdef _Vec out
    cdef Py_ssize_t n = buf.shape[0]
    out.data = NULL
    out.len = out.cap = 0
    out.failed = False
    if n:
        with nogil:
            _cut_sequential(&buf[0], n, &c, &out)
    return _to_array(&out)


@cython.boundscheck(False)
@cython.wraparound(False)
def find_candidates(const uint8_t[::1] buf not None, Py_ssize_t start, Py_ssize_t end, p):
    cdef _Params c = _unpack(p)
    cdef _Vec out
    if start < 0 or end > buf.shape[0] or start > end:
        raise ValueError(f"segment [{start}, {end}) is outside the buffer of {buf.shape[0]}")
    out.data = NULL
    out.len = out.cap = 0
    out.failed = False
    if end > start:
        with nogil:
            _find_candidates(&buf[0], start, end, c.mask_s, c.mask_l, &out)
    return _to_array(&out)


@cython.boundscheck(False)
@cython.wraparound(False)
def pick_cuts(const uint8_t[::1] buf not None, const int64_t[::1] candidates not None, p):
    cdef _Params c = _unpack(p)
    cdef _Vec out
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t nc = candidates.shape[0]
    cdef const int64_t* cand = &candidates[0] if nc else NULL
    out.data = NULL
    out.len = out.cap = 0
    out.failed = False
    if n:
        with nogil:
            _pick_cuts(&buf[0], n, cand, nc, &c, &out)
    return _to_array(&out)
