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

    Written by the event loop (``advance``), read by the stream-stage thread (``wait``).
    """

    def __init__(self, size: int, part_size: int) -> None:
        self.size = size
        self.part_size = part_size
        self.parts = -(-size // part_size) if size else 0
        self.done = [0] * self.parts  # contiguous bytes written from each part's start
        self._first_open = 0
        self.value = 0
        self.closed = False
        self._cond = threading.Condition()
        self._waiting: list[int] = []  # targets of the readers blocked in wait()
        self._wake_at = 0  # the smallest of them (0: nobody waits)

    def completed_parts(self) -> frozenset[int]:
        """Indices of the parts written in full."""
        return frozenset(
            i
            for i in range(self.parts)
            if self.done[i] >= self.part_range(i)[1] - self.part_range(i)[0]
        )

    def preset(self, parts: set[int]) -> int:
        """Mark whole ``parts`` as already present (a resumed file); return their bytes."""
        total = 0
        for index in parts:
            start, end = self.part_range(index)
            self.done[index] = end - start
            total += end - start
        with self._cond:
            self._first_open = 0
            self._move_up()
            self._cond.notify_all()
        return total

    def _move_up(self) -> None:
        """Advance ``value`` over the parts complete from ``_first_open`` on (lock held)."""
        while self._first_open < self.parts:
            start, end = self.part_range(self._first_open)
            self.value = start + self.done[self._first_open]
            if self.value < end:
                break
            self._first_open += 1

    def part_range(self, index: int) -> tuple[int, int]:
        """``(start, end)`` byte offsets of part ``index`` (end exclusive)."""
        start = index * self.part_size
        return start, min(start + self.part_size, self.size)

    def advance(self, index: int, nbytes: int) -> None:
        """Record ``nbytes`` more written contiguously in part ``index``."""
        self.done[index] += nbytes
        if index != self._first_open:
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
            self._first_open = self.parts
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
