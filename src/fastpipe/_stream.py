"""Stream stages over the file's contiguous prefix, in byte order, in one worker thread.

The reader waits on the download's watermark and preads ``[pos, watermark)`` into one
reusable page-aligned buffer, so memory stays flat however large the object is and
out-of-order parts cost nothing extra. Native stages release the GIL while they work.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

from ._exceptions import LocalIOError, StageFailed, StageTimeout
from ._file import Watermark, aligned_buffer
from ._report import StageReport
from .stages._base import ObjectInfo, StreamStage

#: Wait for at least this much new data before waking the stages (fewer, larger calls).
_MIN_STEP = 1 << 20


def describe_exception(exc: BaseException) -> str:
    """A one-line message for a stage's exception (its type when it is not ours)."""
    if isinstance(exc, StageFailed):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class StreamRunner:
    """Feeds stream stages in order; stops at the first failure (gating)."""

    def __init__(
        self,
        stages: Sequence[StreamStage],
        reports: Sequence[StageReport],
        info: ObjectInfo,
        path: str,
        watermark: Watermark,
        buffer_size: int,
    ) -> None:
        self.stages = list(stages)
        self.reports = list(reports)
        self.info = info
        self.path = path
        self.watermark = watermark
        self.buffer_size = buffer_size
        self.position = 0
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
        # The engine writes the stage's report from these (as for every other failure).
        self.failed_index = index
        self.error = exc

    def _timed(self, index: int, fn: object, *args: object) -> object:
        report = self.reports[index]
        stage = self.stages[index]
        start = time.perf_counter()
        try:
            return fn(*args)  # type: ignore[operator]
        finally:
            report.seconds += time.perf_counter() - start
            if stage.timeout is not None and report.seconds > stage.timeout:
                raise StageTimeout(f"stage {stage.name} ran past its timeout of {stage.timeout}s")

    def run(self) -> None:
        """Run every stream stage over the whole object (the worker thread's body)."""
        for i, stage in enumerate(self.stages):
            try:
                self._timed(i, stage.start, self.info)
            except BaseException as exc:  # noqa: BLE001 - a user stage may raise anything
                self._fail(i, exc)
                return
        size = self.watermark.size
        buffer = aligned_buffer(max(self.buffer_size, 4096))
        view = memoryview(buffer)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while self.position < size:
                if self._stop.is_set():
                    return
                available = self.watermark.wait(self.position, _MIN_STEP) - self.position
                if available <= 0:
                    if self.watermark.closed:
                        return
                    continue
                n = os.preadv(fd, [view[: min(available, self.buffer_size)]], self.position)
                if n <= 0:
                    raise LocalIOError(f"short read at offset {self.position} of {self.path}")
                chunk = view[:n].toreadonly()  # stages read, never write
                for i, stage in enumerate(self.stages):
                    try:
                        self._timed(i, stage.update, chunk)
                    except BaseException as exc:  # noqa: BLE001
                        self._fail(i, exc)
                        return
                try:
                    chunk.release()
                except BufferError:
                    pass  # a stage still holds a view of it; it goes with that view
                self.position += n
        finally:
            os.close(fd)
            view.release()
            try:
                buffer.close()
            except BufferError:
                pass  # a stage kept a view; the buffer is freed with it
        for i, stage in enumerate(self.stages):
            try:
                self.reports[i].result = self._timed(i, stage.finish)
                self.reports[i].status = "passed"
            except BaseException as exc:  # noqa: BLE001
                self._fail(i, exc)
                return
