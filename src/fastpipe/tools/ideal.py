"""The spread the queue alone makes: the predictability bench's objects through an ideal
engine.

With several objects in flight, an object's time from its call holds its wait for the
work admitted before it, and in a closed loop of mixed sizes (each caller sends its next
object when its last one ends) that work differs from one object to the next. How much
of the spread of the end-to-end time is the queue's, and how much the engine's? This
module replays the bench's calls (the same sizes in the same order, the same warm-up,
the same number in flight) through an engine whose every phase takes exactly the run's
median for the object's size (the seconds before the download and after it; the
download at the pace the engine learned through the queue), objects admitted in arrival
order within the disk budget and the object slots, downloads one after another in
admission order (``download_order`` "admission"). Nothing in it varies, so whatever
spread its times show comes from the queue: it is the floor of the p90/p50 an engine
that keeps to that order can reach for that sequence of calls.
"""

from __future__ import annotations

import heapq
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Phases", "ideal_times", "phases_by_size"]


@dataclass(frozen=True)
class Phases:
    """Seconds of one object's phases once admitted: before its download (HEAD, temp
    file), its own download (its turn's wait left out), after it (the stages' lag, the
    temp file's removal)."""

    before: float
    download: float
    after: float


def phases_by_size(
    runs: Sequence[Mapping[str, Any]], pace: float | None = None
) -> dict[int, Phases]:
    """Each size's median phases over the bench's records (``seconds``, ``queued``,
    ``download_seconds``, ``download_span``, ``stay_seconds``); sizes without those
    figures are left out. With a ``pace`` (bytes/s), the download is the size at that
    pace instead: objects in turn overlap their downloads' ends, so each one's own
    seconds add up to more than the queue took, and the pace the engine learned through
    the queue (:meth:`fastpipe._sharing.Shared.in_turn`) is what sets the waits."""
    by_size: dict[int, list[Phases]] = {}
    for r in runs:
        stay, span, download = r.get("stay_seconds"), r.get("download_span"), r.get(
            "download_seconds"
        )
        if stay is None or span is None or download is None:
            continue
        before = r["seconds"] - (r.get("queued") or 0.0) - stay
        if pace is not None and pace > 0:
            download = r["size"] / pace
        phases = Phases(max(0.0, before), max(0.0, download), max(0.0, stay - span))
        by_size.setdefault(int(r["size"]), []).append(phases)
    return {
        size: Phases(
            statistics.median(p.before for p in seen),
            statistics.median(p.download for p in seen),
            statistics.median(p.after for p in seen),
        )
        for size, seen in by_size.items()
    }


def ideal_times(
    order: Sequence[int],
    warm: Sequence[int],
    in_flight: int,
    phases: Mapping[int, Phases],
    disk_budget: int,
    max_objects: int,
) -> list[float]:
    """Seconds from call to end of each object of ``order`` through the ideal engine.

    The ``warm`` objects are called at once first (unrecorded, as in the bench); when
    the last of them ends, ``in_flight`` callers each call the next size of ``order``
    and call again the moment their object ends. An object is admitted when it is first
    in line, a slot of ``max_objects`` is free and its size fits in what is left of
    ``disk_budget`` (held until it ends; an object larger than the whole budget goes in
    alone). Its download starts ``before`` seconds later, or when the download admitted
    before it ends, if later; it ends ``after`` seconds after its download.
    """
    calls: deque[int] = deque(order)
    times: list[float] = [0.0] * len(order)
    waiting: deque[tuple[float, int, int]] = deque()  # (called at, size, index; -1: warm)
    ends: list[tuple[float, int, int, int]] = []  # heap: (end, tie-break, size, index)
    held = admitted = tie = 0
    free_at = 0.0  # when the download admitted last ends
    warm_left = len(warm)
    now = 0.0

    def call(callers: int) -> None:  # that many callers send their next object now
        for _ in range(min(callers, len(calls))):
            index = len(order) - len(calls)
            waiting.append((now, calls.popleft(), index))

    waiting.extend((0.0, size, -1) for size in warm)
    if not warm:
        call(in_flight)
    while True:
        while waiting and admitted < max_objects and (
            held + waiting[0][1] <= disk_budget or admitted == 0
        ):
            called, size, index = waiting.popleft()
            phase = phases[size]
            start = max(now + phase.before, free_at)
            free_at = start + phase.download
            held, admitted, tie = held + size, admitted + 1, tie + 1
            heapq.heappush(ends, (free_at + phase.after, tie, size, index))
            if index >= 0:
                times[index] = free_at + phase.after - called
        if not ends:
            return times
        now, _, size, index = heapq.heappop(ends)
        held, admitted = held - size, admitted - 1
        if index < 0:
            warm_left -= 1
            call(in_flight if warm_left == 0 else 0)
        else:
            call(1)
