# cython: language_level=3
"""Byte statistics in one fused pass (docstrings live in ``_scan.pyi``).

One loop over the bytes updates, per byte, a 4-way split histogram of the current block
(four tables break the store-to-load chain when a byte value repeats), the run-length
state and the UTF-8 decoder state. Eight bytes are examined at a time: when they are all
ASCII the UTF-8 decoder is skipped, and a XOR with the word shifted by one byte tells at
once whether the run of one byte value continues through all eight (all zero), or whether
every byte starts a new run (no zero byte), so that only a word holding a short run falls
back to the byte loop. Block entropies come from the block histogram at each block end.
"""

cimport cython
from libc.math cimport log2
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy, memset

import sys

cdef bint _LITTLE_ENDIAN = sys.byteorder == "little"

cdef uint64_t _ONES = 0x0101010101010101ULL
cdef uint64_t _HIGHS = 0x8080808080808080ULL


cdef struct _Run:
    int byte
    int64_t length
    int64_t start
    int best_byte
    int64_t best_len
    int64_t best_start


cdef struct _Utf8:
    int need
    uint8_t lo
    uint8_t hi
    int64_t start
    int64_t first_invalid


cdef struct _State:
    char lead[64]             # keeps the histogram off the previous object's lines
    uint64_t sub[1024]        # histogram of the current block, 4 ways of 256 bins
    uint64_t hist[256]        # histogram of the completed blocks
    int64_t pos               # bytes consumed
    int64_t block_size
    int64_t block_fill        # bytes of the current block consumed
    int64_t blocks            # completed blocks
    double block_min
    double block_max
    _Run run                  # run.byte is -1 before the first byte
    _Utf8 utf8                # utf8.first_invalid is -1 while valid so far
    char pad[64]              # keeps the hot fields off the next object's cache lines


cdef inline void _utf8_byte(_Utf8* u, uint8_t b, int64_t off) noexcept nogil:
    """Advance the strict UTF-8 decoder by one byte at object offset ``off``."""
    if u.need == 0:
        if b < 0x80:
            return
        u.start = off
        u.lo = 0x80
        u.hi = 0xBF
        if 0xC2 <= b <= 0xDF:
            u.need = 1
        elif b == 0xE0:
            u.need = 2
            u.lo = 0xA0                           # no overlong 3-byte forms
        elif b == 0xED:
            u.need = 2
            u.hi = 0x9F                           # no surrogates
        elif 0xE1 <= b <= 0xEF:
            u.need = 2
        elif b == 0xF0:
            u.need = 3
            u.lo = 0x90                           # no overlong 4-byte forms
        elif 0xF1 <= b <= 0xF3:
            u.need = 3
        elif b == 0xF4:
            u.need = 3
            u.hi = 0x8F                           # nothing above U+10FFFF
        else:                                     # 80..C1, F5..FF cannot lead
            u.first_invalid = off
    elif u.lo <= b <= u.hi:
        u.need -= 1
        u.lo = 0x80
        u.hi = 0xBF
    else:
        u.first_invalid = u.start


cdef inline void _close_run(_Run* r) noexcept nogil:
    if r.length > r.best_len:
        r.best_len = r.length
        r.best_byte = r.byte
        r.best_start = r.start


cdef inline void _run_byte(_Run* r, int b, int64_t off) noexcept nogil:
    """Advance the run-length state by one byte at object offset ``off``."""
    if b == r.byte:
        r.length += 1
    else:
        _close_run(r)
        r.byte = b
        r.length = 1
        r.start = off


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _scan_span(_State* st, const uint8_t* buf, Py_ssize_t n) noexcept nogil:
    """Scan ``n`` bytes that all belong to the current block.

    The run and UTF-8 states live in locals during the loop (the compiler keeps them in
    registers, and no store lands near another scanner's memory).
    """
    cdef uint64_t* sub = st.sub
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t k
    cdef uint64_t w, x
    cdef int64_t base = st.pos
    cdef _Run r = st.run
    cdef _Utf8 u = st.utf8
    cdef bint utf8 = u.first_invalid < 0
    if r.length == 0 and n > 0:               # very first byte of the object
        sub[buf[0]] += 1
        _run_byte(&r, buf[0], base)
        _utf8_byte(&u, buf[0], base)
        i = 1
        utf8 = u.first_invalid < 0
    while i + 8 <= n:
        sub[buf[i]] += 1
        sub[256 + buf[i + 1]] += 1
        sub[512 + buf[i + 2]] += 1
        sub[768 + buf[i + 3]] += 1
        sub[buf[i + 4]] += 1
        sub[256 + buf[i + 5]] += 1
        sub[512 + buf[i + 6]] += 1
        sub[768 + buf[i + 7]] += 1
        memcpy(&w, buf + i, 8)
        if _LITTLE_ENDIAN:
            # byte k of x is buf[i+k] ^ buf[i+k-1]: zero where the run goes on
            x = w ^ ((w << 8) | <uint64_t>r.byte)
            if x == 0:
                r.length += 8
            elif ((x - _ONES) & ~x & _HIGHS) == 0:
                # every byte differs from the one before: only the last run survives
                _close_run(&r)
                r.byte = buf[i + 7]
                r.length = 1
                r.start = base + i + 7
            else:
                for k in range(8):
                    _run_byte(&r, buf[i + k], base + i + k)
        else:
            for k in range(8):
                _run_byte(&r, buf[i + k], base + i + k)
        if utf8 and (u.need != 0 or (w & _HIGHS) != 0):
            for k in range(8):
                _utf8_byte(&u, buf[i + k], base + i + k)
                if u.first_invalid >= 0:
                    utf8 = False
                    break
        i += 8
    while i < n:
        sub[buf[i]] += 1
        _run_byte(&r, buf[i], base + i)
        if utf8:
            _utf8_byte(&u, buf[i], base + i)
            utf8 = u.first_invalid < 0
        i += 1
    st.run = r
    st.utf8 = u
    st.pos += n
    st.block_fill += n


cdef double _entropy(const uint64_t* counts, int64_t total) noexcept nogil:
    """Shannon entropy in bits per byte of a 256-bin histogram holding ``total`` bytes."""
    cdef double acc = 0.0
    cdef double c
    cdef int b
    if total <= 0:
        return 0.0
    for b in range(256):
        if counts[b]:
            c = <double>counts[b]
            acc += c * log2(c)
    return log2(<double>total) - acc / <double>total


cdef void _block_counts(const _State* st, uint64_t* out) noexcept nogil:
    cdef int b
    for b in range(256):
        out[b] = st.sub[b] + st.sub[256 + b] + st.sub[512 + b] + st.sub[768 + b]


cdef void _close_block(_State* st) noexcept nogil:
    cdef uint64_t counts[256]
    cdef double e
    cdef int b
    _block_counts(st, counts)
    e = _entropy(counts, st.block_fill)
    if st.blocks == 0 or e < st.block_min:
        st.block_min = e
    if st.blocks == 0 or e > st.block_max:
        st.block_max = e
    st.blocks += 1
    for b in range(256):
        st.hist[b] += counts[b]
    memset(st.sub, 0, sizeof(st.sub))
    st.block_fill = 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _scan(_State* st, const uint8_t* buf, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t off = 0
    cdef Py_ssize_t take
    while off < n:
        take = n - off
        if take > st.block_size - st.block_fill:
            take = <Py_ssize_t>(st.block_size - st.block_fill)
        _scan_span(st, buf + off, take)
        off += take
        if st.block_fill == st.block_size:
            _close_block(st)


cdef class Scanner:
    cdef _State st

    def __cinit__(self, Py_ssize_t block_size=1 << 20):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        memset(&self.st, 0, sizeof(_State))
        self.st.block_size = block_size
        self.st.run.byte = -1
        self.st.run.best_byte = -1
        self.st.utf8.first_invalid = -1

    @property
    def block_size(self) -> int:
        return self.st.block_size

    @property
    def position(self) -> int:
        return self.st.pos

    @cython.boundscheck(False)
    @cython.wraparound(False)
    def update(self, const uint8_t[::1] buf not None) -> None:
        cdef Py_ssize_t n = buf.shape[0]
        if n == 0:
            return
        with nogil:
            _scan(&self.st, &buf[0], n)

    def result(self) -> dict:
        cdef uint64_t counts[256]
        cdef uint64_t total[256]
        cdef int b
        cdef double e
        cdef object block_min = None
        cdef object block_max = None
        cdef _State* st = &self.st
        _block_counts(st, counts)
        for b in range(256):
            total[b] = st.hist[b] + counts[b]
        if st.blocks:
            block_min = st.block_min
            block_max = st.block_max
        if st.block_fill:
            e = _entropy(counts, st.block_fill)
            if block_min is None or e < block_min:
                block_min = e
            if block_max is None or e > block_max:
                block_max = e
        cdef _Run r = st.run
        _close_run(&r)
        best_len, best_byte, best_start = r.best_len, r.best_byte, r.best_start
        first_invalid = st.utf8.first_invalid
        if first_invalid < 0 and st.utf8.need:
            first_invalid = st.utf8.start       # truncated sequence at the end
        return {
            "size": st.pos,
            "entropy": _entropy(total, st.pos) if st.pos else None,
            "block_entropy_min": block_min,
            "block_entropy_max": block_max,
            "longest_run": {
                "byte": best_byte if best_len else None,
                "length": best_len,
                "offset": best_start if best_len else None,
            },
            "lines": total[10],
            "utf8_valid": first_invalid < 0,
            "first_invalid_utf8": first_invalid if first_invalid >= 0 else None,
            "histogram": [total[b] for b in range(256)],
        }
