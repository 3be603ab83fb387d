"""Stream stages over the file's contiguous prefix, in byte order, in one worker thread.

The reader waits on the download's watermark and preads ``[pos, watermark)`` into one
reusable page-aligned buffer, so memory stays flat however large the object is and
out-of-order parts cost nothing extra. Native stages release the GIL while they work.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from functools import partial

from ._exceptions import LocalIOError, StageTimeout
from ._file import aligned_buffer
from ._job import Job
from ._progress import Milestones
from ._report import Status
from .stages._base import StreamStage

#: Wait for at least this much new data before waking the stages (fewer, larger calls).
_MIN_STEP = 1 << 20


class StreamRunner:
    """Feeds stream stages in order; stops at the first failure (gating)."""

    def __init__(self, job: Job, buffer_size: int) -> None:
        self.stages: list[StreamStage] = []
        for i in job.stream_indices:
            stage = job.stages[i]
            assert isinstance(stage, StreamStage)
            self.stages.append(stage)
        self.reports = [job.report.stages[i] for i in job.stream_indices]
        self.info = job.info
        self.path = job.path
        self.watermark = job.watermark
        self.buffer_size = buffer_size
        self.position = 0
        #: When a progress event is due (a local file's pass sets them, when listened to).
        self.milestones = Milestones.never()
        self.failed_index: int | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ask the reader to return as soon as it can (download failed or cancelled)."""
        self._stop.set()
        self.watermark.close()

    @property
    def failed(self) -> bool:
        return self.failed_index is not None

    def _fail(self, index: int, exc: BaseException) -> None:
        # The one pass writes the stage's report from these (as for every other failure);
        # ``index`` counts stream stages only.
        self.failed_index = index
        self.error = exc

    def _timed(self, index: int, fn: Callable[..., object], *args: object) -> object:
        report = self.reports[index]
        stage = self.stages[index]
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            report.seconds += time.perf_counter() - start
            if stage.timeout is not None and report.seconds > stage.timeout:
                raise StageTimeout(f"stage {stage.name} ran past its timeout of {stage.timeout}s")

    def _each(self, call: Callable[[int, StreamStage], object]) -> bool:
        """``call`` each stage in order; False (the failure noted) at the first that raises."""
        for i, stage in enumerate(self.stages):
            try:
                call(i, stage)
            except BaseException as exc:  # noqa: BLE001 - a user stage may raise anything
                self._fail(i, exc)
                return False
        return True

    def _start(self, index: int, stage: StreamStage) -> None:
        self._timed(index, stage.start, self.info)

    def _update(self, chunk: memoryview, index: int, stage: StreamStage) -> None:
        self._timed(index, stage.update, chunk)

    def _finish(self, index: int, stage: StreamStage) -> None:
        self.reports[index].result = self._timed(index, stage.finish)
        self.reports[index].status = Status.PASSED

    def run(self) -> None:
        """Run every stream stage over the whole object (the worker thread's body)."""
        if self._each(self._start) and self._read_all():
            self._each(self._finish)

    def _read_all(self) -> bool:
        """Feed every byte to the stages in order. False: stopped, or a stage failed."""
        size = self.watermark.size
        buffer = aligned_buffer(max(self.buffer_size, 4096))
        view = memoryview(buffer)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        milestones = self.milestones
        try:
            while self.position < size:
                n = self._read_next(fd, view)
                if n is None:
                    return False
                chunk = view[:n].toreadonly()  # stages read, never write
                if not self._each(partial(self._update, chunk)):
                    return False
                try:
                    chunk.release()
                except BufferError:
                    pass  # a stage still holds a view of it; it goes with that view
                self.position += n
                if self.position >= milestones.next:
                    milestones.crossed(self.position)
        finally:
            os.close(fd)
            view.release()
            try:
                buffer.close()
            except BufferError:
                pass  # a stage kept a view; the buffer is freed with it
        return True

    def _read_next(self, fd: int, view: memoryview) -> int | None:
        """Read the next new bytes at ``position`` into ``view``: their count, or None when
        the reader is stopped (or the download ended short)."""
        while not self._stop.is_set():
            available = self.watermark.wait(self.position, _MIN_STEP) - self.position
            if available <= 0:
                if self.watermark.closed:
                    return None
                continue
            n = os.preadv(fd, [view[: min(available, self.buffer_size)]], self.position)
            if n <= 0:
                raise LocalIOError(f"short read at offset {self.position} of {self.path}")
            return n
        return None
