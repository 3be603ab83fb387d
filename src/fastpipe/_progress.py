"""When an object's progress events are sent: on a timer, and as its bytes cross milestones.

A timer alone (an event every 0.2 s) gives an object that downloads in half a second two
or three events, and the event "at 10%" may come after 70% of the bytes: the ETA read
there is not the one at 10%. So an event is also sent as the bytes in cross each
twentieth (5%) of the object. The counter's owner (the fetchers' sink, or the stream
reader of a local file) compares its count with :attr:`Milestones.next` once per receive
buffer, an integer compare, and calls :meth:`Milestones.crossed` on a crossing, which
sends the event there and then (the stream reader's worker thread sends it on the event
loop and waits), so the event holds the bytes at the crossing. A buffer that crosses
several milestones makes one event: an object gets at most ``STEPS - 1`` events beyond
the timer's, and a tiny object (all its bytes in one buffer) at most one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import anyio
import anyio.from_thread

#: Seconds between the timer's progress events.
PROGRESS_EVERY = 0.2
#: An event as the bytes cross each ``1 / STEPS`` of the object (the last one, all the
#: bytes, is the event that ends the phase).
STEPS = 20

_NEVER = sys.maxsize


class Milestones:
    """The next count at which a progress event is due; the timer that sends the others.

    ``base`` bytes were in before the counter started (a resumed download's parts): the
    milestones are fractions of the object, the count is what the counter adds to them.
    ``threaded``: the counter runs in a worker thread (it sends the event through anyio).
    """

    def __init__(self, total: int, base: int = 0, threaded: bool = False) -> None:
        self.total = total
        self.base = base
        self._threaded = threaded
        self._emit: Callable[[], None] | None = None  # while the timer runs
        self._error: Exception | None = None
        self._failed: anyio.Event | None = None
        #: The count at which the next event is due (compared on the hot path).
        self.next = self._after(0)

    @classmethod
    def never(cls) -> Milestones:
        """Milestones that are never crossed (nobody listens to progress)."""
        return cls(0)

    def _after(self, count: int) -> int:
        """The count of the first milestone past ``count`` (``_NEVER``: none left)."""
        total, done = self.total, self.base + count
        if total <= 0 or done >= total:
            return _NEVER
        step = done * STEPS // total + 1  # the first milestone above done
        point = -(-step * total // STEPS)  # ceil: at or past the fraction
        return point - self.base if point < total else _NEVER

    def crossed(self, count: int) -> None:
        """The counter reached ``count`` (at least :attr:`next`): send an event now."""
        self.next = self._after(count)
        if self._threaded:
            anyio.from_thread.run_sync(self._send)  # on the loop; the counter waits
        else:
            self._send()

    def _send(self) -> None:
        if self._emit is None or self._error is not None:
            return
        try:
            self._emit()
        except Exception as exc:  # noqa: BLE001 - the caller's callback may raise anything
            # Raised by the timer task: in the fetchers' sink it would pass for a broken
            # connection (and be retried), in the stream reader for a failed read.
            self._error = exc
            if self._failed is not None:
                self._failed.set()

    async def report(self, emit: Callable[[], None]) -> None:
        """Call ``emit`` now and every ``PROGRESS_EVERY`` seconds (the crossings call it
        meanwhile), until cancelled; raise what a crossing's ``emit`` raised."""
        self._failed = anyio.Event()
        self._emit = emit
        while True:
            emit()
            with anyio.move_on_after(PROGRESS_EVERY):
                await self._failed.wait()
            if self._error is not None:
                raise self._error
