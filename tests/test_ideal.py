"""The ideal engine of the predictability bench (``fastpipe.tools.ideal``): the spread a
queue alone makes, on timelines worked out by hand."""

from __future__ import annotations

from typing import Any

import pytest

from fastpipe import Config
from fastpipe.tools.ideal import Phases, ideal_times, phases_by_size
from fastpipe.tools.predictability import (
    call_order,
    connection_weights,
    format_summary,
    ideal_summary,
    summarize,
)

BIG = 1 << 40  # a disk budget that never binds
# Size 1: 1 s of download then 0.5 s of stages; size 2: 2 s of download, nothing after.
PHASES = {1: Phases(0.0, 1.0, 0.5), 2: Phases(0.0, 2.0, 0.0)}


def test_one_at_a_time_every_object_takes_its_phases() -> None:
    phases = {1: Phases(0.1, 1.0, 0.5), 2: Phases(0.2, 2.0, 0.0)}
    times = ideal_times([1, 2, 1, 2], [], 1, phases, BIG, 8)
    assert times == pytest.approx([1.6, 2.2, 1.6, 2.2])


def test_in_turn_an_object_waits_for_the_downloads_admitted_before_it() -> None:
    # Two callers. At 0: object 0 (size 1) downloads 0-1 and ends at 1.5; object 1
    # (size 2) downloads 1-3. At 1.5 the first caller sends object 2 (size 1): its
    # download waits for object 1's, 3-4, and it ends at 4.5, 3 s after its call.
    times = ideal_times([1, 2, 1], [], 2, PHASES, BIG, 8)
    assert times == pytest.approx([1.5, 3.0, 3.0])


def test_the_disk_budget_and_the_object_slots_hold_the_next_object_back() -> None:
    # Room for one object of size 1: the second is admitted when the first ends (1.5 s)
    # and takes 1.5 s more, 3 s from its call.
    assert ideal_times([1, 1], [], 2, PHASES, 1, 8) == pytest.approx([1.5, 3.0])
    assert ideal_times([1, 1], [], 2, PHASES, BIG, 1) == pytest.approx([1.5, 3.0])
    # An object larger than the whole budget goes in alone instead of waiting forever.
    assert ideal_times([2, 2], [], 2, PHASES, 1, 8) == pytest.approx([2.0, 4.0])


def test_the_warm_up_runs_first_all_at_once() -> None:
    # Warm-up objects of size 2 and 1 at once: downloads 0-2 and 2-3, the last ends at
    # 3.5; then two callers: object 0 (size 1) 3.5-4.5, ends 5.0; object 1 (size 2)
    # 4.5-6.5.
    times = ideal_times([1, 2], [2, 1], 2, PHASES, BIG, 8)
    assert times == pytest.approx([1.5, 3.0])


def test_shared_downloads_split_the_capacity_by_weight() -> None:
    # Two callers, equal weights. At 0 objects 0 (size 1) and 1 (size 2) download at
    # half the capacity each: object 0's download ends at 2.0 (object 1 has 1 s of it
    # left) and it ends at 2.5; object 1 alone to 2.5 (0.5 s left). Object 2 (size 1),
    # called at 2.5, shares with it: object 1's download ends at 3.5, object 2's (0.5 s
    # left) at 4.0, and it ends at 4.5, 2 s after its call.
    even = {1: 1.0, 2: 1.0}
    assert ideal_times([1, 2, 1], [], 2, PHASES, BIG, 8, even) == pytest.approx(
        [2.5, 3.5, 2.0]
    )
    # Weights 1 and 3: object 1 downloads at 3/4 of the capacity, 2 s of it by 8/3;
    # object 0 has 1/3 s left then, alone: its download ends at 3.0, it at 3.5.
    uneven = {1: 1.0, 2: 3.0}
    assert ideal_times([1, 2], [], 2, PHASES, BIG, 8, uneven) == pytest.approx([3.5, 8 / 3])
    # One at a time, sharing is the same as in turn; nothing to download: its phases.
    assert ideal_times([1, 2, 1], [], 1, PHASES, BIG, 8, even) == pytest.approx(
        ideal_times([1, 2, 1], [], 1, PHASES, BIG, 8)
    )
    nothing = {1: Phases(0.2, 0.0, 0.5)}
    assert ideal_times([1, 1], [], 2, nothing, BIG, 8, {1: 1.0}) == pytest.approx([0.7, 0.7])


def test_connection_weights_follow_the_engines_rule() -> None:
    mib = 1 << 20
    weights = connection_weights([1, 8 * mib, 64 * mib, 1 << 30], Config())
    assert weights == {1: 1.0, 8 * mib: 1.0, 64 * mib: 8.0, 1 << 30: 16.0}
    assert connection_weights([64 * mib], Config(max_concurrency=4)) == {64 * mib: 4.0}


def test_shared_the_disk_budget_still_admits_in_order() -> None:
    # Room for one object: sharing has no one to share with.
    even = {1: 1.0, 2: 1.0}
    assert ideal_times([1, 2], [], 2, PHASES, 2, 8, even) == pytest.approx([1.5, 3.5])


def _record(
    size: int, before: float, download: float, after: float, **extra: Any
) -> dict[str, Any]:
    turn = extra.pop("turn_wait", 0.0)
    queued = extra.pop("queued", 0.0)
    span = turn + download
    return {
        "size": size,
        "seconds": queued + before + span + after,
        "queued": queued,
        "turn_wait": turn,
        "download_seconds": download,
        "download_span": span,
        "stay_seconds": span + after,
        **extra,
    }


def test_phases_are_each_sizes_medians_from_the_records() -> None:
    runs = [
        _record(1, 0.1, 1.0, 0.5, queued=3.0, turn_wait=2.0),
        _record(1, 0.3, 1.2, 0.7),
        _record(1, 0.2, 5.0, 0.6),  # an outlier moves a median little
        _record(2, 0.1, 2.0, 0.0),
        {"size": 2, "seconds": 1.0},  # no phases recorded: left out
    ]
    phases = phases_by_size(runs)
    assert phases[1] == Phases(pytest.approx(0.2), pytest.approx(1.2), pytest.approx(0.6))
    assert phases[2] == Phases(pytest.approx(0.1), pytest.approx(2.0), pytest.approx(0.0))
    # At the pace the engine learned through the queue instead of each one's own.
    assert phases_by_size(runs, pace=4.0)[1].download == pytest.approx(0.25)


def test_the_bench_summary_carries_the_ideal_engines_spread() -> None:
    warm, order = call_order([1, 2], repeat=3, warmup=1)
    assert warm == [1] and sorted(order) == [1, 1, 1, 2, 2, 2]
    assert call_order([2, 1], 3, 1) == (warm, order)  # the same calls for the same seed
    runs = [_record(1, 0.0, 1.0, 0.5), _record(2, 0.0, 2.0, 0.0)]
    alone = ideal_summary(runs, warm, order, 1, BIG, 8)
    assert [s["p90_over_p50"] for s in alone.values()] == pytest.approx([1.0, 1.0])
    shared = ideal_summary(runs, warm, order, 2, BIG, 8)
    times = ideal_times(order, warm, 2, phases_by_size(runs), BIG, 8)
    ones = sorted(t for s, t in zip(order, times, strict=True) if s == 1)
    assert shared["1"]["p50"] == pytest.approx(ones[1])
    assert shared["2"]["p90_over_p50"] is not None
    # A size with no phases measured: nothing to replay.
    assert ideal_summary(runs[:1], warm, order, 2, BIG, 8) == {}
    # Shared downloads: the learned capacity and the connections' weights.
    learned = [dict(r, shared={"capacity": 2.0, "turn_capacity": 1.0}) for r in runs]
    both = ideal_summary(learned, warm, order, 2, BIG, 8, {1: 1.0, 2: 2.0})
    times = ideal_times(order, warm, 2, phases_by_size(learned, 2.0), BIG, 8, {1: 1.0, 2: 2.0})
    twos = sorted(t for s, t in zip(order, times, strict=True) if s == 2)
    assert both["2"]["p50"] == pytest.approx(twos[1])
    summary = dict(summarize([dict(r, predicted=None) for r in runs]), ideal=shared)
    text = format_summary(summary, in_flight=2)
    assert "through an ideal engine" in text and f"{shared['1']['p90_over_p50']:.2f}" in text
