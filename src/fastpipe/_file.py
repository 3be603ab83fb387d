"""The local file: a 0600 temp file written with pwrite, the watermark, aligned buffers.

Where that file lives, what it is named and where it goes at the end is placement's job
(:mod:`fastpipe._placement`).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

from ._exceptions import LocalIOError

#: Where a split segment may start: a multiple of this (aligned writes).
_ALIGN = 64 * 1024


class TempFile:
    """A hidden 0600 temp file, sized to the object, written with pwrite.

    Allocation cuts the file to the object's size (a reused file that was longer keeps no
    tail) and preallocates it, so that a full disk shows before the first byte.
    """

    def __init__(self, fd: int, path: str, size: int) -> None:
        """Take over ``fd`` (open on ``path``), size it to ``size`` bytes; closes it on error."""
        self.size = size
        self.path = path
        self.fd = fd
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            if size:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
        except OSError as exc:
            self.remove()
            raise LocalIOError(f"cannot allocate {size} bytes for {path}: {exc.strerror}") from exc

    def pwrite(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (loops over short writes)."""
        written = os.pwrite(self.fd, data, offset)
        while written < len(data):  # short writes are rare: no slice on the usual path
            written += os.pwrite(self.fd, data[written:], offset + written)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """Close and delete the temp file (idempotent; never raises for a missing file)."""
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Watermark:
    """Tracks per-part progress and the contiguous prefix ``[0, value)`` written so far.

    The object is planned as uniform parts (``part_range``: what a resume journal records).
    Bytes are written by *segments*: segment ``i`` is part ``i`` at first; :meth:`split`
    hands the second half of a segment's bytes left to a new segment, so that a connection
    with nothing left to take relieves a slower one. ``done[seg]`` counts the bytes written
    contiguously from the segment's start; ``value`` follows the segments in byte order.

    Written by the event loop (``advance``, ``split``), read by the stream-stage thread
    (``wait``).
    """

    def __init__(self, size: int, part_size: int) -> None:
        self.size = size
        self.part_size = part_size
        self.parts = -(-size // part_size) if size else 0
        self.done = [0] * self.parts  # contiguous bytes written from each segment's start
        self._start = [i * part_size for i in range(self.parts)]
        self._end = [min((i + 1) * part_size, size) for i in range(self.parts)]
        self._part = list(range(self.parts))  # the part each segment lies in
        # The next segment in byte order (-1: none).
        self._next = [*range(1, self.parts), -1] if self.parts else []
        self._first_open = 0 if self.parts else -1
        self.value = 0
        self.closed = False
        self._cond = threading.Condition()
        self._waiting: list[int] = []  # targets of the readers blocked in wait()
        self._wake_at = 0  # the smallest of them (0: nobody waits)

    @property
    def segments(self) -> int:
        """How many segments there are (parts, then the halves split off)."""
        return len(self.done)

    def segment_range(self, seg: int) -> tuple[int, int]:
        """``(start, end)`` byte offsets of segment ``seg`` now (end exclusive; a split
        moves its end down)."""
        return self._start[seg], self._end[seg]

    def left(self, seg: int) -> int:
        """Bytes segment ``seg`` has still to write."""
        return self._end[seg] - self._start[seg] - self.done[seg]

    def split(self, seg: int, least: int) -> int | None:
        """Give the second half of segment ``seg``'s bytes left to a new segment (its id),
        when each half has ``least`` bytes or more; else None. The half stays in the same
        part; its start is rounded up to 64 KiB (aligned writes)."""
        left = self.left(seg)
        if left < 2 * max(1, least):
            return None
        mid = self._start[seg] + self.done[seg] + left // 2
        mid = min(-(-mid // _ALIGN) * _ALIGN, self._end[seg] - least)
        with self._cond:
            new = len(self.done)
            self.done.append(0)
            self._start.append(mid)
            self._end.append(self._end[seg])
            self._part.append(self._part[seg])
            self._next.append(self._next[seg])
            self._end[seg] = mid
            self._next[seg] = new
        return new

    def completed_parts(self) -> frozenset[int]:
        """Indices of the parts written in full (every segment of theirs)."""
        open_parts = {self._part[s] for s in range(len(self.done)) if self.left(s) > 0}
        return frozenset(range(self.parts)) - open_parts

    def preset(self, parts: set[int]) -> int:
        """Mark whole ``parts`` as already present (a resumed file, before any split);
        return their bytes."""
        total = 0
        for index in parts:
            start, end = self.part_range(index)
            self.done[index] = end - start
            total += end - start
        with self._cond:
            self._first_open = 0 if self.parts else -1
            self._move_up()
            self._cond.notify_all()
        return total

    def _move_up(self) -> None:
        """Advance ``value`` over the segments complete from ``_first_open`` on, in byte
        order (lock held)."""
        while self._first_open >= 0:
            seg = self._first_open
            self.value = self._start[seg] + self.done[seg]
            if self.value < self._end[seg]:
                break
            self._first_open = self._next[seg]

    def part_range(self, index: int) -> tuple[int, int]:
        """``(start, end)`` byte offsets of part ``index`` of the plan (end exclusive)."""
        start = index * self.part_size
        return start, min(start + self.part_size, self.size)

    def advance(self, seg: int, nbytes: int) -> None:
        """Record ``nbytes`` more written contiguously in segment ``seg``."""
        self.done[seg] += nbytes
        if seg != self._first_open:
            return
        with self._cond:
            self._move_up()
            # Wake readers only when one of them has what it waits for: a wake-up per
            # receive-buffer flush made waiting threads fight the event loop for the GIL.
            if self.value >= self._wake_at:
                self._cond.notify_all()

    def complete_all(self) -> None:
        """Mark the whole object as present (a local source, or a resumed complete file)."""
        with self._cond:
            self.value = self.size
            self._first_open = -1
            self._cond.notify_all()

    def close(self) -> None:
        """Wake the reader for good (download ended or was cancelled)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait(self, position: int, min_bytes: int, timeout: float = 0.5) -> int:
        """Block until at least ``min_bytes`` past ``position`` (or the end) are present,
        or the watermark is closed; return the watermark."""
        target = min(self.size, position + min_bytes)
        with self._cond:
            if self.value < target and not self.closed:
                self._waiting.append(target)
                self._wake_at = min(self._waiting)
                try:
                    self._cond.wait_for(lambda: self.value >= target or self.closed, timeout)
                finally:
                    self._waiting.remove(target)
                    self._wake_at = min(self._waiting, default=0)
            return self.value


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned anonymous buffer (reading into it costs less kernel time)."""
    return mmap.mmap(-1, size)
