# cython: language_level=3
"""Byte statistics in one fused pass (docstrings live in ``_scan.pyi``).

The word loops read eight bytes at a time (sixteen once UTF-8 is settled).

Histogram: each byte, loaded on its own (cheaper than shifting it out of the word), bumps
one of four interleaved 32-bit histograms of the current block; four tables break the
store-to-load chain when a byte value repeats, and 32-bit counts keep them small. They are
folded into 64-bit counts at each block end, or sooner, before a count could overflow. The
line count is the histogram's bin 10.

Runs: a XOR of the word with itself shifted by one byte is zero exactly where a byte
repeats the one before it. A zero XOR continues the run through all eight bytes; any other
word is summed up by lookups in the ``_RUN_*`` tables, indexed by its eight "a run starts
here" bits: where its first and last runs start, and its longest run lying wholly inside.
No per-byte loop, and no branch that random or text data mispredicts.

UTF-8: a word of ASCII bytes outside a multi-byte sequence is skipped with one test; any
other word goes through a branch-free automaton (``_UTF8_NEXT``), eight shifts. When it
meets an invalid sequence the byte decoder replays that word to find where, and validation
stops (only the first invalid offset is reported). The byte decoder also serves the head
and tail bytes of a buffer and big-endian machines.

Block entropies come from the block histogram at each block end.
"""

cimport cython
from libc.math cimport log2
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

import sys

cdef bint _LITTLE_ENDIAN = sys.byteorder == "little"

# Bytes the 32-bit sub-histograms may count before they are folded into 64-bit counts (a
# bin can never exceed it). Lowered by the tests through _set_fold_limit.
cdef int64_t _fold_limit = 0xFFFFFFFF

# Per mask of run starts in a word (bit k: byte k differs from the byte before it): the
# index of the first start (8 when none), of the last start, and the length and start index
# of the longest run that both starts and ends inside the word (the earliest of the longest;
# length 0 when there is none). One byte each, so that each is a single load.
cdef uint8_t _RUN_FIRST[256]
cdef uint8_t _RUN_LAST[256]
cdef uint8_t _RUN_INNER_LEN[256]
cdef uint8_t _RUN_INNER_AT[256]


cdef void _fill_run_table() noexcept:
    cdef int mask, k, first, last, prev, best_len, best_at
    for mask in range(256):
        first = -1
        last = 0
        prev = -1
        best_len = 0
        best_at = 0
        for k in range(8):
            if mask & (1 << k):
                if first < 0:
                    first = k
                if prev >= 0 and k - prev > best_len:
                    best_len = k - prev
                    best_at = prev
                prev = k
                last = k
        _RUN_FIRST[mask] = first if first >= 0 else 8
        _RUN_LAST[mask] = last
        _RUN_INNER_LEN[mask] = best_len
        _RUN_INNER_AT[mask] = best_at


_fill_run_table()

# Strict UTF-8 as a shift-based automaton: a state is a bit offset (a multiple of 6), and
# the state after byte b is (_UTF8_NEXT[b] >> state) & 63, so that a word of bytes is eight
# shifts with no branch. The states and the decoder state (need, lo, hi) each stands for:
cdef enum:
    _U_ACCEPT = 0             # need 0: a sequence may start
    _U_TAIL1 = 6              # need 1, 80..BF
    _U_TAIL2 = 12             # need 2, 80..BF
    _U_TAIL3 = 18             # need 3, 80..BF
    _U_E0 = 24                # need 2, A0..BF (after E0: no overlong 3-byte forms)
    _U_ED = 30                # need 2, 80..9F (after ED: no surrogates)
    _U_F0 = 36                # need 3, 90..BF (after F0: no overlong 4-byte forms)
    _U_F4 = 42                # need 3, 80..8F (after F4: nothing above U+10FFFF)
    _U_ERROR = 48             # an invalid sequence was seen

cdef uint64_t _UTF8_NEXT[256]


cdef void _fill_utf8_table() noexcept:
    cdef int b, state, to
    for b in range(256):
        _UTF8_NEXT[b] = <uint64_t>_U_ERROR << _U_ERROR
        for state in range(0, _U_ERROR, 6):
            to = _U_ERROR
            if state == _U_ACCEPT:
                if b < 0x80:
                    to = _U_ACCEPT
                elif 0xC2 <= b <= 0xDF:
                    to = _U_TAIL1
                elif b == 0xE0:
                    to = _U_E0
                elif b == 0xED:
                    to = _U_ED
                elif 0xE1 <= b <= 0xEF:
                    to = _U_TAIL2
                elif b == 0xF0:
                    to = _U_F0
                elif 0xF1 <= b <= 0xF3:
                    to = _U_TAIL3
                elif b == 0xF4:
                    to = _U_F4
            elif state == _U_TAIL1 and 0x80 <= b <= 0xBF:
                to = _U_ACCEPT
            elif (state == _U_TAIL2 and 0x80 <= b <= 0xBF or state == _U_E0 and 0xA0 <= b <= 0xBF
                  or state == _U_ED and 0x80 <= b <= 0x9F):
                to = _U_TAIL1
            elif (state == _U_TAIL3 and 0x80 <= b <= 0xBF or state == _U_F0 and 0x90 <= b <= 0xBF
                  or state == _U_F4 and 0x80 <= b <= 0x8F):
                to = _U_TAIL2
            _UTF8_NEXT[b] |= <uint64_t>to << state


_fill_utf8_table()


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
    uint32_t sub[1024]        # histogram of the current block since the last fold, 4 ways
    uint64_t folded[256]      # histogram of the current block up to the last fold
    uint64_t hist[256]        # histogram of the completed blocks
    int64_t pos               # bytes consumed
    int64_t block_size
    int64_t block_fill        # bytes of the current block consumed
    int64_t sub_fill          # bytes counted in sub since the last fold
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


cdef inline uint64_t _utf8_state(const _Utf8* u) noexcept nogil:
    """The automaton state of a decoder state that is valid so far."""
    if u.need == 0:
        return _U_ACCEPT
    if u.need == 1:
        return _U_TAIL1
    if u.need == 2:
        return _U_E0 if u.lo == 0xA0 else _U_ED if u.hi == 0x9F else _U_TAIL2
    return _U_F0 if u.lo == 0x90 else _U_F4 if u.hi == 0x8F else _U_TAIL3


cdef inline void _utf8_set_state(_Utf8* u, uint64_t state, int64_t start) noexcept nogil:
    """Set the decoder to a valid automaton state, in a sequence begun at ``start``."""
    u.start = start
    u.lo = 0x80
    u.hi = 0xBF
    if state == _U_ACCEPT:
        u.need = 0
    elif state == _U_TAIL1:
        u.need = 1
    elif state == _U_TAIL2 or state == _U_E0 or state == _U_ED:
        u.need = 2
        if state == _U_E0:
            u.lo = 0xA0
        elif state == _U_ED:
            u.hi = 0x9F
    else:
        u.need = 3
        if state == _U_F0:
            u.lo = 0x90
        elif state == _U_F4:
            u.hi = 0x8F


cdef inline uint64_t _utf8_word(uint64_t state, const uint8_t* word) noexcept nogil:
    state = (_UTF8_NEXT[word[0]] >> state) & 63
    state = (_UTF8_NEXT[word[1]] >> state) & 63
    state = (_UTF8_NEXT[word[2]] >> state) & 63
    state = (_UTF8_NEXT[word[3]] >> state) & 63
    state = (_UTF8_NEXT[word[4]] >> state) & 63
    state = (_UTF8_NEXT[word[5]] >> state) & 63
    state = (_UTF8_NEXT[word[6]] >> state) & 63
    return (_UTF8_NEXT[word[7]] >> state) & 63


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


cdef inline void _runs_word(
    _Run* r, uint64_t* byte, int64_t* start, int64_t* best_len,
    uint64_t w, const uint8_t* word, int64_t pos,
) noexcept nogil:
    """Advance the run state by the 8 bytes ``w`` (little-endian) read at ``word``, object
    offset ``pos``.

    The current run (``byte``, ``start``: it goes on up to ``pos``) and the longest
    length are the caller's locals; a new longest run is written to ``r`` (rare, and
    keeping it in registers would crowd out the histogram's).
    """
    cdef uint64_t x
    cdef int64_t length
    cdef unsigned int mask, k
    # byte k of x is byte k of w XOR the byte before it: zero where the run goes on
    x = w ^ ((w << 8) | byte[0])
    if x == 0:                                    # the run goes on through all eight bytes
        return
    x = (x | ((x & 0x7F7F7F7F7F7F7F7FULL) + 0x7F7F7F7F7F7F7F7FULL)) & 0x8080808080808080ULL
    mask = (x * 0x0002040810204081ULL) >> 56     # bit 8k+7 of x to bit k
    length = pos + _RUN_FIRST[mask] - start[0]
    if length > best_len[0]:                      # the run from before ends
        best_len[0] = length
        r.best_byte = <int>byte[0]
        r.best_start = start[0]
    length = _RUN_INNER_LEN[mask]
    if length > best_len[0]:                      # a run inside the word
        k = _RUN_INNER_AT[mask]
        best_len[0] = length
        r.best_byte = word[k]
        r.best_start = pos + k
    byte[0] = word[7]                             # the last run goes on into the next word
    start[0] = pos + _RUN_LAST[mask]


cdef inline void _count_word(uint32_t* sub, const uint8_t* word) noexcept nogil:
    sub[word[0]] += 1
    sub[256 + word[1]] += 1
    sub[512 + word[2]] += 1
    sub[768 + word[3]] += 1
    sub[word[4]] += 1
    sub[256 + word[5]] += 1
    sub[512 + word[6]] += 1
    sub[768 + word[7]] += 1


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _scan_span(_State* st, const uint8_t* buf, Py_ssize_t n) noexcept nogil:
    """Scan ``n`` bytes that all belong to the current block.

    The current run, the longest length and the automaton state live in locals during the
    word loops (registers, and no store lands near another scanner's memory). One word
    loop runs while the bytes are valid UTF-8 so far, a leaner one after.
    """
    cdef uint32_t* sub = st.sub
    cdef const uint8_t* p = buf
    cdef const uint8_t* end = buf + n
    cdef uint64_t w, state, lead, seq
    cdef int64_t base = st.pos
    cdef int64_t seq_start
    cdef int k
    cdef _Run* r = &st.run
    cdef uint64_t run_byte
    cdef int64_t run_start, best_len
    cdef _Utf8* u = &st.utf8
    if r.length == 0 and n > 0:               # very first byte of the object
        sub[p[0]] += 1
        _run_byte(r, p[0], base)
        if u.first_invalid < 0:
            _utf8_byte(u, p[0], base)
        p += 1
    if _LITTLE_ENDIAN and end - p >= 8:
        run_byte = r.byte
        run_start = r.start
        best_len = r.best_len
        if u.first_invalid < 0:
            state = _utf8_state(u)
            seq_start = u.start
            while end - p >= 8:
                memcpy(&w, p, 8)
                _count_word(sub, p)
                _runs_word(r, &run_byte, &run_start, &best_len, w, p, base + (p - buf))
                if state != _U_ACCEPT or (w & 0x8080808080808080ULL) != 0:
                    seq = _utf8_word(state, p)
                    if seq == _U_ERROR:       # find where, byte by byte; then stop validating
                        _utf8_set_state(u, state, seq_start)
                        for k in range(8):
                            _utf8_byte(u, p[k], base + (p - buf) + k)
                            if u.first_invalid >= 0:
                                break
                        p += 8
                        break
                    if seq != _U_ACCEPT:      # a sequence goes on: it began at its lead byte,
                        lead = w & (w << 1) & 0x8080808080808080ULL     # the last >= C0
                        seq_start = base + (p - buf) + _RUN_LAST[(lead * 0x0002040810204081ULL) >> 56]
                    state = seq
                p += 8
            if u.first_invalid < 0:
                _utf8_set_state(u, state, seq_start)
        while end - p >= 16:
            _count_word(sub, p)
            _count_word(sub, p + 8)
            memcpy(&w, p, 8)
            _runs_word(r, &run_byte, &run_start, &best_len, w, p, base + (p - buf))
            memcpy(&w, p + 8, 8)
            _runs_word(r, &run_byte, &run_start, &best_len, w, p + 8, base + (p - buf) + 8)
            p += 16
        while end - p >= 8:
            memcpy(&w, p, 8)
            _count_word(sub, p)
            _runs_word(r, &run_byte, &run_start, &best_len, w, p, base + (p - buf))
            p += 8
        r.byte = <int>run_byte
        r.start = run_start
        r.length = base + (p - buf) - run_start
        r.best_len = best_len
    while p < end:
        sub[p[0]] += 1
        _run_byte(r, p[0], base + (p - buf))
        if u.first_invalid < 0:
            _utf8_byte(u, p[0], base + (p - buf))
        p += 1
    st.pos += n
    st.block_fill += n
    st.sub_fill += n


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


cdef void _fold(_State* st) noexcept nogil:
    """Move the 32-bit sub-histograms into the 64-bit counts of the current block."""
    cdef int b
    for b in range(256):
        st.folded[b] += (<uint64_t>st.sub[b] + st.sub[256 + b]
                         + st.sub[512 + b] + st.sub[768 + b])
    memset(st.sub, 0, sizeof(st.sub))
    st.sub_fill = 0


cdef void _block_counts(const _State* st, uint64_t* out) noexcept nogil:
    cdef int b
    for b in range(256):
        out[b] = (st.folded[b] + st.sub[b] + st.sub[256 + b]
                  + st.sub[512 + b] + st.sub[768 + b])


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
    memset(st.folded, 0, sizeof(st.folded))
    st.block_fill = 0
    st.sub_fill = 0


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _scan(_State* st, const uint8_t* buf, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t off = 0
    cdef Py_ssize_t take
    while off < n:
        take = n - off
        if take > st.block_size - st.block_fill:
            take = <Py_ssize_t>(st.block_size - st.block_fill)
        if take > _fold_limit - st.sub_fill:
            if st.sub_fill:
                _fold(st)
            if take > _fold_limit:
                take = <Py_ssize_t>_fold_limit
        _scan_span(st, buf + off, take)
        off += take
        if st.block_fill == st.block_size:
            _close_block(st)


def _set_fold_limit(int64_t limit) -> int:
    """Set how many bytes the 32-bit sub-histograms count before a fold; return the old
    limit. For the tests only (a small limit exercises the fold): not thread-safe."""
    global _fold_limit
    if not 1 <= limit <= 0xFFFFFFFF:
        raise ValueError(f"fold limit must be within [1, 2**32 - 1], got {limit}")
    old = _fold_limit
    _fold_limit = limit
    return old


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
