"""Objects in flight: how they share the engine, and what that does to their time.

On a machine whose cores are the bottleneck (the stages and the S3 server on the same
two cores, say), the engine moves about the same bytes per second whatever the number of
objects in flight: its capacity. Each downloading object gets a part of it in proportion
to its weight, the connections it holds (``min(max_concurrency, parts)``): a 64 MiB object
of 8 parts beside 1 GiB objects of 16 gets a third of their pace. That is processor
sharing with weights:

- :class:`InFlight` keeps the objects in flight, the count and the integral of each one's
  share over time, so that a finished object says what capacity it saw
  (``bytes / share-seconds``) and its time-averaged count;
- :class:`SharingModel` learns, over the recent objects that shared the engine, the
  capacity, the seconds before the download (HEAD, temp file) and after it (the stages'
  last work, the commit), and the typical object (size and weight);
- :func:`shared_finish` runs the processor sharing forward: an object beside its
  neighbours' bytes left, each neighbour that ends replaced by a typical object (a
  closed loop, which is how ``map``, ``process_many`` and the worker feed the engine);
  the ETA runs it again with the neighbours of the moment, so it re-plans as they come
  and go.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

#: Objects remembered by the sharing model (the most recent).
SHARING_WINDOW = 32
#: Fewest objects that shared the engine before the model predicts with its capacity
#: (before: the shares of connections and slots).
MIN_SHARED = 3
#: Objects whose time-averaged count stays below this teach the lone model; above it,
#: the sharing model.
ALONE_BELOW = 1.25
#: Objects of about the size asked for (within a factor of 2) from which the neighbours
#: they saw are taken: one is enough (a size never seen beside others would get the
#: neighbours of other sizes, which differ: two 1 GiB objects fill the disk budget, so a
#: 1 GiB object has about one neighbour where a 64 MiB one has three).
MIN_ALIKE = 1
#: What a report's ``model["load"]`` carries for the model to learn (:func:`load_figures`).
LOAD_FIGURES = (
    "in_flight_avg", "share_seconds", "download_span", "stay_seconds", "weight", "ahead_bytes"
)
#: Steps of :func:`shared_finish` at most (each ends one object).
MAX_STEPS = 10_000


@dataclass
class Ticket:
    """One object's stay in flight.

    ``weight``: its connections while it downloads (0 after); ``done``: bytes it has
    downloaded so far; ``share``: the integral of its share of the engine so far
    (seconds), frozen when its download ends (``download_share``, ``download_span``).
    """

    started: float
    area: float
    size: int = 0
    weight: float = 1.0
    done: Callable[[], int] | None = None
    share: float = 0.0
    download_span: float | None = None
    #: Its place in the download order (None: downloads are not in turn); in turn, its
    #: ``weight`` is 0 until its download starts, ``connections`` what it will hold then.
    turn: int | None = None
    connections: float = 1.0

    @property
    def download_share(self) -> float | None:
        """Its share-seconds over its download (None while it runs): ``share`` stops
        growing once its weight is 0."""
        return None if self.download_span is None else self.share

    def left(self) -> int:
        """Bytes it has still to download."""
        done = self.done() if self.done is not None else 0
        return max(0, self.size - done)


@dataclass
class InFlight:
    """The objects in flight in one engine (its event loop only: no lock)."""

    clock: Callable[[], float] = time.perf_counter
    count: int = 0
    _area: float = 0.0
    _at: float = 0.0
    _tickets: list[Ticket] = field(default_factory=list)
    #: ``(size, weight, turn)`` of the objects admitted whose download is about to start
    #: (temp file, part plan): neighbours within a moment.
    _coming: list[tuple[int, float, int | None]] = field(default_factory=list)

    def _advance(self) -> float:
        now = self.clock()
        if self._at:
            dt = now - self._at
            self._area += self.count * dt
            total = sum(t.weight for t in self._tickets)
            if total > 0:
                for t in self._tickets:
                    t.share += dt * t.weight / total
        self._at = now
        return now

    def enter(
        self,
        size: int = 0,
        weight: float = 1.0,
        done: Callable[[], int] | None = None,
        turn: int | None = None,
    ) -> Ticket:
        """An object enters (counted from now on); with a ``turn``, it takes no share
        until :meth:`begin`."""
        now = self._advance()
        self.count += 1
        connections = max(0.0, weight)
        ticket = Ticket(now, self._area, size, 0.0 if turn is not None else connections, done)
        ticket.turn, ticket.connections = turn, connections
        self._tickets.append(ticket)
        return ticket

    def begin(self, ticket: Ticket) -> None:
        """Its download starts (its turn came): from now on it takes its share."""
        self._advance()
        if ticket.download_span is None:
            ticket.weight = ticket.connections

    def downloaded(self, ticket: Ticket) -> None:
        """Its download ended: its share so far is what it had of the engine's capacity;
        from now on it holds no connection (its weight is 0)."""
        now = self._advance()
        ticket.download_span = now - ticket.started
        ticket.weight = 0.0

    def average(self, ticket: Ticket) -> float:
        """The time-averaged count since ``ticket`` entered (the count now at first)."""
        now = self._advance()
        span = now - ticket.started
        if span <= 0:
            return float(max(1, self.count))
        return max(1.0, (self._area - ticket.area) / span)

    def leave(self, ticket: Ticket) -> float:
        """The object leaves; returns its time-averaged count (itself included)."""
        average = self.average(ticket)
        self.count -= 1
        if ticket in self._tickets:
            self._tickets.remove(ticket)
        return average

    def since_download(self, ticket: Ticket) -> float:
        """Seconds since its download ended (0 while it downloads)."""
        if ticket.download_span is None:
            return 0.0
        return max(0.0, self.clock() - ticket.started - ticket.download_span)

    def share_so_far(self, ticket: Ticket) -> float:
        """Its share of the engine integrated over its stay so far (seconds)."""
        self._advance()
        return ticket.share

    def neighbours(self, ticket: Ticket | None = None) -> tuple[tuple[int, float], ...]:
        """``(bytes left, weight)`` of every other object downloading or about to; for
        an object in turn, of the objects ahead of it whose download is not over."""
        if ticket is not None and ticket.turn is not None:
            mine = ticket.turn
            ahead = tuple(
                (t.left(), t.connections)
                for t in self._tickets
                if t.turn is not None and t.turn < mine and t.download_span is None
            )
            return ahead + tuple((s, w) for s, w, n in self._coming if n is not None and n < mine)
        return tuple(
            (t.left(), t.weight) for t in self._tickets if t is not ticket and t.weight > 0
        ) + tuple((s, w) for s, w, _ in self._coming)

    @contextmanager
    def coming(self, size: int, weight: float, turn: int | None = None) -> Iterator[None]:
        """An admitted object of ``size`` that will download with ``weight`` once the
        block (its temp file, its part plan) is through: a neighbour for the others
        (in turn: for the younger ones only)."""
        entry = (size, max(0.0, weight), turn)
        self._coming.append(entry)
        try:
            yield
        finally:
            self._coming.remove(entry)

    @contextmanager
    def stay(
        self,
        report: Any = None,
        size: int = 0,
        weight: float = 1.0,
        done: Callable[[], int] | None = None,
        turn: int | None = None,
    ) -> Iterator[Ticket]:
        """In flight for the block; at its end, what the sharing model learns goes into
        the report's ``model["load"]``: ``in_flight_avg``, ``share_seconds`` and
        ``download_span`` (its download), ``stay_seconds``."""
        ticket = self.enter(size, weight, done, turn)
        try:
            yield ticket
        finally:
            average = self.leave(ticket)
            described = getattr(report, "model", None)
            if described is not None:
                load = described.setdefault("load", {})
                load["in_flight_avg"] = average
                load["share_seconds"] = ticket.download_share
                load["download_span"] = ticket.download_span
                load["stay_seconds"] = self.clock() - ticket.started


@dataclass(frozen=True)
class Shared:
    """What the sharing model learned: the engine's ``capacity`` (bytes/s, all objects
    together), the ``overhead`` each download costs as if it were that many more bytes
    (its first requests, the parts ramping up), the seconds an object spends ``before``
    its download (after admission) and ``after`` it, the typical object
    (``typical_size``, ``typical_weight``) and on how many objects it rests."""

    capacity: float
    before: float
    after: float
    typical_size: float
    typical_weight: float
    objects: int
    overhead: float = 0.0
    #: Objects beside one, time-averaged (what a closed loop keeps up).
    others: float = 0.0
    #: Downloads in turn: the pace through the bytes ahead and its own, and the seconds
    #: it costs as bytes (None: no object in turn learned yet; see :meth:`in_turn`).
    turn_capacity: float | None = None
    turn_overhead: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "overhead_bytes": self.overhead,
            "before_seconds": self.before,
            "after_seconds": self.after,
            "typical_size": self.typical_size,
            "typical_weight": self.typical_weight,
            "others": self.others,
            "objects": self.objects,
            "turn_capacity": self.turn_capacity,
            "turn_overhead_bytes": self.turn_overhead,
        }

    def in_turn(self) -> Shared:
        """For an object in turn: the capacity and overhead learned from objects in turn
        (their bytes ahead and their own against the seconds to their download's end),
        which take in what the shares leave out: each turn's start and the next
        object's start at its tail. Itself when none was learned."""
        if self.turn_capacity is None:
            return self
        return replace(self, capacity=self.turn_capacity, overhead=self.turn_overhead)

    def finish(
        self,
        size: float,
        weight: float,
        neighbours: Sequence[tuple[float, float]],
        in_turn: bool = False,
    ) -> tuple[float, float]:
        """``(seconds, average count)`` of the download of ``size`` bytes from now (the
        caller adds the overhead when the download has not started), beside
        ``neighbours`` downloading and, up to the learned number of others, typical
        objects starting (a closed loop keeps the count up) once a new object could
        have reached its download (``before``). ``in_turn``: the ``neighbours`` are the
        objects ahead of it, whose bytes go through first, at the engine's capacity;
        the ones after it take only what it leaves idle."""
        if in_turn:
            ahead = sum(max(0.0, b) for b, _ in neighbours)
            return (ahead + max(0.0, size)) / self.capacity, 1.0 + len(neighbours)
        typical = (self.typical_size + self.overhead, self.typical_weight)
        return shared_finish(
            size, weight, neighbours, self.capacity, typical, self.others, self.before
        )


@dataclass(frozen=True)
class SharedPoint:
    """One finished object that shared the engine: its size and weight, the capacity it
    saw (bytes / share-seconds), its seconds before and after the download, the
    objects beside it (time-averaged count less one) and what each weighed on average
    from its point of view (the others' total weight over its download, per object:
    neighbours between downloads weigh nothing meanwhile)."""

    size: int
    weight: float
    capacity: float
    before: float
    after: float
    others: float = 0.0
    neighbour_weight: float = 0.0
    #: In turn: the bytes ahead of it when predicted (-1: not in turn) and the seconds
    #: from then to its download's end.
    ahead: float = -1.0
    span: float = 0.0


class SharingModel:
    """The recent objects that shared the engine; medians of what they saw (robust to
    the odd stall; the window follows a machine whose speed changes)."""

    def __init__(self) -> None:
        self.points: deque[SharedPoint] = deque(maxlen=SHARING_WINDOW)

    def add(self, point: SharedPoint) -> None:
        """One object, unless its figures are unusable."""
        values = (point.capacity, point.before, point.after, point.weight)
        if point.size > 0 and point.capacity > 0 and all(math.isfinite(v) for v in values):
            self.points.append(point)

    def fit(self, size: int | None = None) -> Shared | None:
        """The fit, or None before :data:`MIN_SHARED` objects.

        Each object's share-seconds (its share of the engine integrated over its
        download) against its size: the slope of a Theil-Sen line is the time per byte
        of the whole engine, its intercept the overhead (an object's first requests);
        with too narrow a spread of sizes, the median time per byte and no overhead.
        The neighbours' weight and count are what objects of about ``size`` (within a
        factor of 2; one is enough) saw: a long object sees its short neighbours come
        and go, with gaps, a short one sees the long ones downloading. The seconds before
        and after the download are those of objects of about ``size`` when there are
        :data:`MIN_SHARED` (a small object's stages lag further behind its download).
        """
        points = list(self.points)
        if len(points) < MIN_SHARED:
            return None
        alike = _alike(points, size, MIN_ALIKE)
        band = _alike(points, size, MIN_SHARED)
        capacity, overhead = _pace([(float(p.size), p.size / p.capacity) for p in points])
        turn_capacity, turn_overhead = _turn_line(points)
        return Shared(
            turn_capacity=turn_capacity,
            turn_overhead=turn_overhead,
            overhead=overhead,
            capacity=capacity,
            before=_before(points, band, size),
            after=max(0.0, statistics.median(p.after for p in band)),
            typical_size=statistics.mean(p.size for p in points),
            typical_weight=statistics.median(
                p.neighbour_weight if p.neighbour_weight > 0 else p.weight for p in alike
            ),
            objects=len(points),
            others=statistics.median(p.others for p in alike),
        )

    def to_list(self) -> list[list[float]]:
        return [
            [
                p.size, p.weight, p.capacity, p.before, p.after, p.others, p.neighbour_weight,
                p.ahead, p.span,
            ]
            for p in self.points
        ]

    @classmethod
    def from_list(cls, data: Any) -> SharingModel:
        """From :meth:`to_list` (rows of 7 from before downloads in turn, too)."""
        model = cls()
        for row in list(data or []):
            size, weight, capacity, before, after, others, nw, *turn = (float(v) for v in row)
            ahead, span = turn if len(turn) == 2 else (-1.0, 0.0)
            model.add(
                SharedPoint(
                    int(size), weight, capacity, before, after, others, max(0.0, nw), ahead, span
                )
            )
        return model


def _before(points: list[SharedPoint], band: list[SharedPoint], size: int | None) -> float:
    """The seconds before the download (HEAD, temp file) and after the stay (the temp
    file's removal, which frees its pages: longer for a larger object), for ``size``:
    a Theil-Sen line against the size once sizes spread (so that a size with few
    objects yet is not given the others' seconds), else the median of ``band``."""
    slope = None if size is None else theil_sen([(float(p.size), p.before) for p in points])
    if slope is None or size is None:
        return max(0.0, statistics.median(p.before for p in band))
    intercept = statistics.median(p.before - slope * p.size for p in points)
    return max(0.0, intercept + slope * size)


def _turn_line(points: list[SharedPoint]) -> tuple[float | None, float]:
    """``(capacity, overhead in bytes)`` of objects in turn: a Theil-Sen line of the
    seconds from their prediction to their download's end against the bytes ahead and
    their own (slope: time per byte; intercept: a download's start), or the median time
    per byte when the bytes do not spread; ``(None, 0)`` before :data:`MIN_SHARED`."""
    xy = [(p.ahead + p.size, p.span) for p in points if p.ahead >= 0 and p.span > 0]
    if len(xy) < MIN_SHARED:
        return None, 0.0
    return _pace(xy)


def _pace(xy: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``(bytes/s, overhead in bytes)`` of seconds ``y`` against bytes ``x``: the slope of
    a Theil-Sen line is the time per byte, its median intercept (at least 0) the
    overhead; with too narrow a spread of bytes, the median time per byte and none."""
    per_byte = theil_sen(xy)
    if per_byte is None or per_byte <= 0:
        return 1.0 / statistics.median(y / x for x, y in xy), 0.0
    start = max(0.0, statistics.median(y - per_byte * x for x, y in xy))
    return 1.0 / per_byte, start / per_byte


def _alike(points: list[SharedPoint], size: int | None, least: int) -> list[SharedPoint]:
    """The points of objects within a factor of 2 of ``size``, if there are ``least``."""
    if size is None:
        return points
    near = [p for p in points if size / 2 <= p.size <= size * 2]
    return near if len(near) >= max(1, least) else points


def shared_finish(
    size: float,
    weight: float,
    neighbours: Sequence[tuple[float, float]],
    capacity: float,
    typical: tuple[float, float] | None = None,
    keep: float = 0.0,
    delay: float = 0.0,
) -> tuple[float, float]:
    """Weighted processor sharing: ``(seconds, average count)`` until ``size`` bytes of an
    object of ``weight`` are through, beside ``neighbours`` (``(bytes left, weight)``), the
    engine moving ``capacity`` bytes/s split by weight.

    With a ``typical`` ``(size, weight)`` object, the others are kept up to ``keep``
    objects (a fraction: a lighter one), after ``delay`` seconds and whenever one ends
    then: a closed loop (a new object downloads only after its HEAD and temp file, so a
    short object may be through before any comes). Without, or above ``keep``, an
    object that ends is not replaced and the others' shares grow.
    """
    others = [[float(b), float(w), 1.0] for b, w in neighbours if b > 0 and w > 0]
    mine = float(size)
    weight = max(weight, 1e-9)
    elapsed = area = 0.0
    for _ in range(MAX_STEPS):
        if typical is not None and typical[0] > 0 and elapsed >= delay:
            _top_up(others, typical, keep)
        if mine <= 0:
            break
        total = weight + sum(w for _, w, _ in others)
        per_weight = capacity / total  # bytes/s per unit of weight
        dt = min([mine / weight, *(b / w for b, w, _ in others)]) / per_weight
        if elapsed < delay:  # no newcomer before then
            dt = min(dt, delay - elapsed)
        elapsed += dt
        area += (1 + sum(c for _, _, c in others)) * dt
        mine -= dt * per_weight * weight
        for other in others:
            other[0] -= dt * per_weight * other[1]
        others = [o for o in others if o[0] > 1e-6]
    if elapsed <= 0:
        return 0.0, float(1 + len(neighbours))
    return elapsed, area / elapsed


def _top_up(others: list[list[float]], typical: tuple[float, float], keep: float) -> None:
    """Add typical objects until the others count ``keep`` (the last one a fraction)."""
    count = sum(c for _, _, c in others)
    while keep - count >= 1.0:
        others.append([typical[0], typical[1], 1.0])
        count += 1.0
    part = keep - count
    if part > 0.05 and all(c >= 1.0 for _, _, c in others):
        others.append([typical[0], typical[1] * part, part])


def weight_of(parts: int, concurrency: int) -> float:
    """An object's weight: the connections it holds while downloading."""
    return float(max(1, min(parts, concurrency)))


def load_figures(described: Mapping[str, Any]) -> dict[str, float | None]:
    """The sharing figures of a report's ``model["load"]`` (None where absent)."""
    load = described.get("load", {}) or {}
    out: dict[str, float | None] = {}
    for key in LOAD_FIGURES:
        value = load.get(key)
        out[key] = None if value is None else float(value)
    return out


def theil_sen(points: Sequence[tuple[float, float]]) -> float | None:
    """The median slope over pairs of points whose x differ by a fifth or more (None when
    there are fewer than three points or no such pair)."""
    if len(points) < 3:
        return None
    slopes = [
        (y2 - y1) / (x2 - x1)
        for i, (x1, y1) in enumerate(points)
        for x2, y2 in points[i + 1 :]
        if abs(x2 - x1) >= 0.2 * max(x1, x2) and x1 != x2
    ]
    return statistics.median(slopes) if slopes else None
