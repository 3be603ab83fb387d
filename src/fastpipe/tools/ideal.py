"""The spread the queue alone makes: the predictability bench's objects through an ideal
engine.

With several objects in flight, an object's time from its call holds its wait for the
work admitted before it, and in a closed loop of mixed sizes (each caller sends its next
object when its last one ends) that work differs from one object to the next. How much
of the spread of the end-to-end time is the queue's, and how much the engine's? This
module replays the bench's calls (the same sizes in the same order, the same warm-up,
the same number in flight) through an engine whose every phase takes exactly the run's
median for the object's size (the seconds before the download and after it; the
download at the pace the engine learned), objects admitted in arrival order within the
disk budget and the object slots, and the downloads in the engine's order: one after
another in admission order (``download_order`` "admission"), or all at once, sharing
the capacity by their connections ("shared"). Nothing in it varies, so whatever spread
its times show comes from the queue: it is the floor of the p90/p50 an engine that
downloads in that order can reach for that sequence of calls."""

from __future__ import annotations

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
    weights: Mapping[int, float] | None = None,
) -> list[float]:
    """Seconds from call to end of each object of ``order`` through the ideal engine.

    The ``warm`` objects are called at once first (unrecorded, as in the bench); when
    the last of them ends, ``in_flight`` callers each call the next size of ``order``
    and call again the moment their object ends. An object is admitted when it is first
    in line, a slot of ``max_objects`` is free and its size fits in what is left of
    ``disk_budget`` (held until it ends; an object larger than the whole budget goes in
    alone). Its download may start ``before`` seconds later and takes ``download``
    seconds of the engine's whole capacity; it ends ``after`` seconds after its download.

    Without ``weights``, downloads go one at a time in admission order (``"admission"``);
    with them (size -> weight), every object ready to download does, each getting the
    capacity in proportion to its size's weight (``"shared"``: processor sharing).
    """
    calls: deque[int] = deque(order)
    times: list[float] = [0.0] * len(order)
    waiting: deque[tuple[float, int, int]] = deque()  # (called at, size, index; -1: warm)
    live: list[_Object] = []  # admitted, in admission order
    held = 0
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
        while waiting and len(live) < max_objects and (
            held + waiting[0][1] <= disk_budget or not live
        ):
            called, size, index = waiting.popleft()
            phase = phases[size]
            weight = 1.0 if weights is None else weights[size]
            obj = _Object(size, index, called, now + phase.before, phase.download, weight)
            if obj.left <= 0:  # nothing to download: it ends after its own phases
                obj.left, obj.end = 0.0, obj.ready + phase.after
            live.append(obj)
            held += size
        if not live:
            return times
        now = _advance(live, now, phases, in_turn=weights is None)
        for o in [o for o in live if o.left <= 0 and o.end <= now]:
            live.remove(o)
            held -= o.size
            if o.index < 0:
                warm_left -= 1
                call(in_flight if warm_left == 0 else 0)
            else:
                times[o.index] = now - o.called
                call(1)


@dataclass
class _Object:
    """One admitted object of the replay: ``left`` seconds of download at the whole
    capacity (0 once done), its ``weight`` when downloads share it, ``end`` once its
    download is done."""

    size: int
    index: int
    called: float
    ready: float
    left: float
    weight: float
    end: float = 0.0


def _advance(
    live: list[_Object], now: float, phases: Mapping[int, Phases], in_turn: bool
) -> float:
    """Run the admitted objects (in admission order) to the next event: one ready to
    download, a download's end, an object's end; the time then."""
    pending = [o for o in live if o.left > 0]
    if in_turn:  # the first one not downloaded, once it is ready
        active = pending[:1] if pending and pending[0].ready <= now else []
    else:
        active = [o for o in pending if o.ready <= now]
    total = sum(o.weight for o in active)
    step = min(
        [o.ready - now for o in pending if o.ready > now]
        + [o.left * total / o.weight for o in active]
        + [o.end - now for o in live if o.left <= 0]
    )
    now += step
    for o in active:
        o.left -= step * o.weight / total
        if o.left <= 1e-9 * (1.0 + now):  # its download ends now
            o.left, o.end = 0.0, now + phases[o.size].after
    return now
