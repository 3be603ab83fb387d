"""The engine's shared budgets: one mechanism for every object it processes at once.

Every :meth:`Engine.process` call (and so ``process_many``, ``map`` and the queue worker,
which are built on it) takes from the same :class:`Budgets`:

- ``max_objects``: objects in progress at once (taken when a call starts);
- ``disk_budget``: bytes of temp files at once, taken after HEAD by the object's size and
  given back when its temp file is gone (committed or removed). Admission is a strict
  FIFO queue: a large object at the head is not overtaken by small ones behind it;
- ``max_connections``: ranged GETs in flight across objects (a fetcher holds one slot per
  part it fetches, its retries included; the queue is FIFO, so each object downloading
  gets its turn);
- ``file_stage_slots``: heavy (file) stages running at once;
- ``download_order``: "admission" (the default) has objects download in turn
  (:class:`Turns`): an object's download starts once every object admitted before it is
  in its tail (its last part handed out, a connection idle) or stalled. Each download
  then runs at about the pace of one alone, and an object's time depends on the objects
  ahead of it, known when it is admitted, not on the ones that come after (with
  "shared", every admitted object downloads at once and its pace changes with each
  neighbour that comes or goes). "pass" is in turn too, but an object's download starts
  once the one before has passed all its bytes through its stream stages and its early
  file stage: one object's pass has the machine at a time.

The time an object waits for ``max_objects`` and ``disk_budget`` is its report's
``queued_seconds``. The download of the next object overlaps the file stages of the one
before as a consequence: connections are given back as soon as the bytes are in.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import anyio

from ._config import Config, format_size
from ._exceptions import BudgetExceeded
from ._sharing import InFlight

logger = logging.getLogger(__name__)

#: Share of the temp folder's free space that the default disk budget takes.
DISK_SHARE = 0.9


def default_disk_budget(folder: str | os.PathLike[str] | None = None) -> int:
    """90% of the free space where ``folder`` is (its nearest existing parent: a ``dest``
    may name a file not written yet; default the temp folder), at least 1 byte, and at
    most the kernel's writeback threshold (:func:`writeback_threshold`). When the space
    cannot be read, no limit but that one (a full disk is still a LocalIOError)."""
    path = os.path.abspath(os.fspath(folder or tempfile.gettempdir()))
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        budget = max(1, int(shutil.disk_usage(path).free * DISK_SHARE))
    except OSError:
        budget = 1 << 62
    threshold = writeback_threshold()
    return min(budget, threshold) if threshold else budget


def writeback_threshold(vmstat: str = "/proc/vmstat") -> int | None:
    """Bytes of dirty page cache past which the kernel starts writing back to disk
    (``nr_dirty_background_threshold``, Linux), or None when it cannot be read.

    Temp files are written, read by the stages and removed: while the engine holds less
    than this, their bytes never reach the disk. Past it, the kernel writes back bytes
    about to be removed, and every object in flight slows down (three 1 GiB objects at
    once on a 24 GiB machine: 1 GiB written back, 4.4-5.1 s instead of about 3.3 s). The
    default disk budget stays below it, so that an object waits to be admitted (a wait
    the time model knows) rather than slowing the others down unpredictably.
    """
    try:
        with open(vmstat, encoding="ascii") as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == "nr_dirty_background_threshold":
                    pages = int(value)
                    return pages * os.sysconf("SC_PAGE_SIZE") if pages > 0 else None
    except (OSError, ValueError):
        return None
    return None


def default_file_stage_slots() -> int:
    """The CPU count this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class _Waiter:
    size: int
    event: anyio.Event
    granted: bool = False


class DiskBudget:
    """Bytes of temp files at once; FIFO admission by size (no overtaking).

    A ``strict`` budget (given by the caller) refuses an object larger than itself; the
    default one (a guess from the free space) admits it alone instead, so that the
    destination's own checks still say what is wrong with a full or odd folder.
    """

    def __init__(self, capacity: int, strict: bool = True) -> None:
        self.capacity = capacity
        self.strict = strict
        self.used = 0
        self._queue: deque[_Waiter] = deque()

    async def acquire(self, size: int, what: str) -> int:
        """Wait until ``size`` bytes fit, in arrival order; return the bytes taken.
        :class:`BudgetExceeded` when a strict budget is smaller than ``size``."""
        if size > self.capacity:
            if not self.strict:
                size = self.capacity  # alone: it waits until nothing else holds disk
            else:
                raise BudgetExceeded(
                    f"{what}: object of {size} bytes ({format_size(size)}) is larger than "
                    f"the disk budget of {self.capacity} bytes ({format_size(self.capacity)})"
                )
        if not self._queue and self.used + size <= self.capacity:
            self.used += size
            return size
        waiter = _Waiter(size, anyio.Event())
        self._queue.append(waiter)
        logger.debug(
            "%s: waiting for %s of disk budget (%s of %s in use, %d waiting)",
            what,
            format_size(size),
            format_size(self.used),
            format_size(self.capacity),
            len(self._queue),
        )
        try:
            await waiter.event.wait()
            return size
        except BaseException:
            if waiter.granted:
                self.release(size)
            else:
                self._queue.remove(waiter)
                self._grant()  # the head may have changed
            raise

    def release(self, size: int) -> None:
        """Give ``size`` bytes back and admit the waiters at the head that now fit."""
        self.used -= size
        self._grant()

    def _grant(self) -> None:
        while self._queue and self.used + self._queue[0].size <= self.capacity:
            waiter = self._queue.popleft()
            self.used += waiter.size
            waiter.granted = True
            waiter.event.set()


@dataclass
class DiskHold:
    """Bytes of the disk budget one object holds (given back when its temp file is gone)."""

    disk: DiskBudget
    size: int = 0

    async def take(self, size: int, what: str) -> float:
        """Take ``size`` bytes of the disk budget (FIFO; may wait); returns the seconds
        waited."""
        started = time.perf_counter()
        self.size = await self.disk.acquire(size, what)
        return time.perf_counter() - started


#: Seconds without a byte after which an object ahead no longer holds the next one's
#: download back: a stalled GET (a server or link that stopped answering) waits for its
#: read timeout and retries without stopping everything behind it.
STALLED_AFTER = 1.0


@dataclass
class Turn:
    """One object's place in the download order (see :class:`Turns`)."""

    turns: Turns
    number: int
    #: Set once its download is in its tail or over: the next object may start.
    _tail: anyio.Event = field(default_factory=anyio.Event)
    #: Bytes its download has brought so far (set when the download starts).
    _progress: Callable[[], int] = field(default=lambda: 0)

    #: Its download is over: from then on, it holds the next one for CPU work only
    #: (order "pass"), which always ends, and is never taken for stalled.
    _downloaded: bool = False

    def watch(self, progress: Callable[[], int]) -> None:
        """Its download started: ``progress`` says the bytes it has brought so far."""
        self._progress = progress

    def parts_out(self) -> None:
        """Its last part is handed out and a connection is idle: its tail, when the
        next object may start (order "admission")."""
        if not self.turns.at_pass:
            self.tail()

    def download_over(self) -> None:
        """Its download is over (done, failed or cancelled)."""
        self._downloaded = True
        if not self.turns.at_pass:
            self.tail()

    def pass_over(self) -> None:
        """Its stream stages and early file stage have read all its bytes (order
        "pass": the next object may start)."""
        self.tail()

    async def wait(self) -> float:
        """Wait until every older object's download is in its tail or over (or brought
        no byte for :data:`STALLED_AFTER` seconds); returns the seconds waited."""
        started = time.perf_counter()
        for turn in self.turns.ahead(self):
            await turn._passed()
        return time.perf_counter() - started

    async def _passed(self) -> None:
        """Until its tail, or until it brings no byte for :data:`STALLED_AFTER` s."""
        seen = self._progress()
        while not self._tail.is_set():
            with anyio.move_on_after(STALLED_AFTER):
                await self._tail.wait()
            now = self._progress()
            if now == seen and not self._tail.is_set() and not self._downloaded:
                logger.debug("turn %d: no byte for %.1f s, the next one starts", self.number,
                             STALLED_AFTER)
                return
            seen = now

    def tail(self) -> None:
        """The next object may start (:meth:`parts_out`, :meth:`download_over`,
        :meth:`pass_over`, or the turn's block ended)."""
        if not self._tail.is_set():
            self._tail.set()
            self.turns.passed(self)


class Turns:
    """Downloads in admission order, overlapping only at their tails.

    An object takes its turn when it is admitted. Its download waits (:meth:`Turn.wait`)
    until every older object's download has handed out its last part and a fetcher of
    it has found none left (:meth:`Turn.tail`): the connections that go idle then are
    taken up by the next object. The download of the next object still overlaps the
    file stages of the one before.
    """

    def __init__(self, at_pass: bool = False) -> None:
        #: Order "pass": the next download waits for the pass over the bytes (True), or
        #: for the tail of the download only ("admission").
        self.at_pass = at_pass
        self._next = 0
        #: Turns taken whose download is not yet in its tail, oldest first.
        self._open: dict[int, Turn] = {}

    @contextmanager
    def take(self) -> Iterator[Turn]:
        """The next turn, for the block (its tail is reached at the block's end at the
        latest, whatever ends it: a younger object never waits on one gone)."""
        turn = Turn(self, self._next)
        self._next += 1
        self._open[turn.number] = turn
        try:
            yield turn
        finally:
            turn.tail()

    def ahead(self, turn: Turn) -> list[Turn]:
        """The older turns not yet in their tail."""
        return [t for n, t in self._open.items() if n < turn.number]

    def passed(self, turn: Turn) -> None:
        """``turn`` is in its tail: it holds nobody back any more."""
        self._open.pop(turn.number, None)


class Budgets:
    """The limits one engine shares between all the objects it processes at once."""

    def __init__(self, config: Config, folder: str | os.PathLike[str] | None = None) -> None:
        """``folder``: where the temp files go, for the default disk budget (None: the
        system temp folder)."""
        self.max_objects = config.max_objects
        self.max_connections = config.max_connections
        self.file_stage_slots = config.file_stage_slots or default_file_stage_slots()
        self.disk_budget = config.disk_budget or default_disk_budget(folder)
        self._objects = anyio.Semaphore(self.max_objects)
        self._connections = anyio.Semaphore(self.max_connections)
        self._file_stages = anyio.Semaphore(self.file_stage_slots)
        self.disk = DiskBudget(self.disk_budget, strict=config.disk_budget is not None)
        #: Objects admitted and not yet ended, over time (what the time model shares).
        self.in_flight = InFlight()
        #: The download order (None: objects download at once, sharing the connections).
        order = config.download_order
        self.turns = None if order == "shared" else Turns(at_pass=order == "pass")

    @property
    def admitted(self) -> int:
        """Objects holding an object slot now."""
        return self.max_objects - int(self._objects.value)

    @asynccontextmanager
    async def object_slot(self, what: str) -> AsyncIterator[float]:
        """Hold one of ``max_objects`` for the block; yields the seconds waited."""
        started = time.perf_counter()
        if self._objects.value == 0:
            logger.debug("%s: waiting for an object slot (max_objects %d)", what, self.max_objects)
        async with self._objects:
            yield time.perf_counter() - started

    @asynccontextmanager
    async def disk_hold(self) -> AsyncIterator[DiskHold]:
        """One object's hold on the disk budget for the block: it takes its size after
        HEAD (:meth:`DiskHold.take`) and gives it back at the end of the block, where its
        temp file is gone (committed or removed)."""
        hold = DiskHold(self.disk)
        try:
            yield hold
        finally:
            self.disk.release(hold.size)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[None]:
        """One part's ranged GET in flight (FIFO across objects)."""
        async with self._connections:
            yield

    @asynccontextmanager
    async def file_stage(self, what: str) -> AsyncIterator[None]:
        """One heavy stage running."""
        if self._file_stages.value == 0:
            logger.debug("%s: waiting for a file stage slot", what)
        async with self._file_stages:
            yield
