"""The stage interface: stream stages see the bytes in order, file stages the local file.

A stage is a small object with a ``name``. It rejects an object by raising
:class:`fastpipe.StageFailed` (any other exception is reported as a failure too, with its
message). Its result is any JSON-serialisable value, usually a dict.
"""

from __future__ import annotations

import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

# Built from HEAD by the transport, which must not import the stages: defined there.
from .._objectinfo import ObjectInfo as ObjectInfo
from .._report import Kind


class Stage(ABC):
    """Common base of stream and file stages."""

    kind: ClassVar[Kind]
    #: Name used in reports and ``--stage`` specs.
    name: str = "stage"
    #: Seconds the stage may take in all before it fails (None: no limit).
    timeout: float | None = None

    def check_info(self, info: ObjectInfo) -> None:  # noqa: B027 - optional hook
        """Called before any byte is fetched; raise StageFailed to reject from metadata."""

    def verified(self, result: Any) -> str | None:
        """What a passed stage compared the bytes with, in a few words, or None.

        The report's ``verified`` field joins these, so that a PASSED report says whether
        the bytes were checked against anything (a stored or expected value) or only
        measured. The default is None: a stage that compares nothing verifies nothing.
        """
        return None

    def cost_key(self, info: ObjectInfo | None = None) -> str:
        """The identity the time model learns this stage's rate under.

        The stage's name, plus the options that change its cost per byte
        (``checksum:sha256``); ``info`` (from HEAD, None when unknown) lets a stage whose
        work depends on the object say which (``verify:crc32c``). The default is the name.
        """
        return self.name


class StreamStage(Stage):
    """A stage fed the object's bytes in order while they arrive.

    ``start(info)`` is called once before the first byte, ``update(view)`` with consecutive
    views of the object (a view is only valid during the call: copy what you keep), and
    ``finish()`` once after the last byte; it returns the result. The three run in one
    worker thread, never on the event loop.
    """

    kind: ClassVar[Kind] = Kind.STREAM

    def start(self, info: ObjectInfo) -> None:  # noqa: B027 - optional hook
        """Prepare for a new object."""

    @abstractmethod
    def update(self, view: memoryview) -> None:
        """Consume the next bytes of the object."""

    @abstractmethod
    def finish(self) -> Any:
        """Return the result after the last byte (raise StageFailed to reject)."""


class FileStage(Stage):
    """A stage run on the complete local file, after every stream stage passed.

    ``run`` is called in a worker thread; an ``async def run`` is awaited on the loop.
    """

    kind: ClassVar[Kind] = Kind.FILE
    #: True when ``run`` reads the file only through ``local.window``/``local.windows`` in
    #: increasing offsets and has no side effect before its last window. The engine then
    #: starts it while the download is still running (each window waits for its bytes),
    #: and hands it the last window only once every stream stage passed; if one fails, the
    #: window raises and the stage is reported skipped. Its ``timeout`` must be None.
    reads_in_order: ClassVar[bool] = False

    @abstractmethod
    def run(self, local: LocalFile) -> Any:
        """Examine the local file and return the result (raise StageFailed to reject)."""

    def cancel(self) -> None:  # noqa: B027 - optional hook
        """Called from another thread when a running ``run`` is called off.

        A timeout, the caller's cancel scope, Ctrl-C or SIGTERM in the CLI: undo the side
        effects now (kill child processes, remove temp files) and make ``run`` return or
        raise soon; it may also come just before ``run`` starts. A stage that overrides
        this hook is waited for after it; one that does not is abandoned in its thread
        (the engine goes on, the thread finishes on its own).
        """


@dataclass(frozen=True)
class LocalFile:
    """The downloaded (or local source) file as a file stage sees it.

    Memory stays flat in the file's size: map windows with :meth:`window` or
    :meth:`windows` rather than the whole file at once, since pages touched through a
    mapping count in the process's RSS.
    """

    path: str
    size: int
    info: ObjectInfo
    #: Set by the engine for a stage started before the download ended: blocks until the
    #: file holds ``[0, end)`` (see :attr:`FileStage.reads_in_order`).
    wait_until: Callable[[int], None] | None = field(default=None, repr=False, compare=False)

    @contextmanager
    def window(self, offset: int, length: int) -> Iterator[memoryview]:
        """Map ``[offset, offset + length)`` read-only and yield a view of it.

        The view must not outlive the ``with`` block; the mapping is dropped on exit.
        """
        length = max(0, min(length, self.size - offset))
        if self.wait_until is not None:
            self.wait_until(offset + length)
        if length == 0:
            yield memoryview(b"")
            return
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        fd = os.open(self.path, os.O_RDONLY)
        try:
            m = mmap.mmap(fd, length + (offset - start), access=mmap.ACCESS_READ, offset=start)
        finally:
            os.close(fd)
        view = memoryview(m)
        window = view[offset - start :].toreadonly()
        try:
            yield window
        finally:
            window.release()
            view.release()
            try:
                m.close()
            except BufferError:
                pass  # the caller kept a view of it: the mapping goes with that view

    def windows(self, window_size: int = 32 << 20) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(offset, view)`` over the whole file, one mapped window at a time."""
        for offset in range(0, self.size, window_size):
            with self.window(offset, window_size) as view:
                yield offset, view
