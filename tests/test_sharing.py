"""Objects in flight sharing the engine: the tracker's integrals on a synthetic clock,
weighted processor sharing, the sharing model's fit, the prediction and ETA under
sharing, and the report's fields (a real server)."""

from __future__ import annotations

import os
from collections import deque
from dataclasses import replace
from typing import Any

import anyio
import pytest

from fastpipe import Config, Engine, Report
from fastpipe._groups import run_async
from fastpipe._model import (
    Load,
    Observation,
    Position,
    StageCost,
    TimeModel,
    shared_point,
)
from fastpipe._sharing import (
    InFlight,
    Shared,
    SharedPoint,
    SharingModel,
    shared_finish,
    weight_of,
)
from fastpipe.stages import Checksum, Scan

MiB = 1 << 20
A = StageCost("a", "a", "stream")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_in_flight_count_average_and_shares() -> None:
    clock = Clock()
    flight = InFlight(clock)
    done = {"a": 0, "b": 0}
    a = flight.enter(100, 16, lambda: done["a"])
    clock.now += 1.0  # a alone: its whole share for 1 s
    b = flight.enter(50, 8, lambda: done["b"])
    assert flight.count == 2
    done["a"] = 40
    assert flight.neighbours(b) == ((60, 16.0),)
    clock.now += 3.0  # a 16/24 and b 8/24 of the engine for 3 s
    assert flight.share_so_far(a) == pytest.approx(1.0 + 2.0)
    assert flight.share_so_far(b) == pytest.approx(1.0)
    assert flight.since_download(b) == 0.0
    flight.downloaded(b)  # b holds no connection any more
    assert b.download_share == pytest.approx(1.0) and b.download_span == pytest.approx(3.0)
    assert flight.neighbours(a) == ()
    clock.now += 1.0  # a alone again in its download
    assert flight.share_so_far(a) == pytest.approx(4.0)
    assert flight.since_download(b) == pytest.approx(1.0)
    assert flight.leave(b) == pytest.approx(2.0)  # two objects all along its 4 s
    clock.now += 1.0
    # a: 1 s alone, 4 s beside b, 1 s alone: (1 + 8 + 1) / 6
    assert flight.leave(a) == pytest.approx(10 / 6)
    assert flight.count == 0


def test_stay_writes_what_the_model_learns() -> None:
    clock = Clock()
    flight = InFlight(clock)
    report = Report(source="s3://b/k")
    report.model = {"load": {}}
    with flight.stay(report, 10, 4) as ticket:
        clock.now += 2.0
        flight.downloaded(ticket)
        clock.now += 0.5
    load = report.model["load"]
    assert load["in_flight_avg"] == 1.0
    assert load["share_seconds"] == pytest.approx(2.0)
    assert load["download_span"] == pytest.approx(2.0)
    assert load["stay_seconds"] == pytest.approx(2.5)


def test_weight_is_the_connections_held() -> None:
    assert weight_of(8, 16) == 8.0  # a 64 MiB object of 8 MiB parts
    assert weight_of(128, 16) == 16.0
    assert weight_of(0, 16) == 1.0


def test_processor_sharing_as_neighbours_finish() -> None:
    # 100 bytes beside a neighbour with 50 left, equal weights, 10 bytes/s in all:
    # 5 bytes/s each for 10 s, then 10 bytes/s alone for the last 50 bytes.
    seconds, average = shared_finish(100, 1, [(50, 1)], 10)
    assert seconds == pytest.approx(15.0)
    assert average == pytest.approx((2 * 10 + 1 * 5) / 15)
    # Weights: twice the connections, twice the share.
    seconds, _ = shared_finish(100, 2, [(1000, 1)], 30)
    assert seconds == pytest.approx(5.0)


def test_processor_sharing_in_a_closed_loop() -> None:
    # Kept at one other object: each that ends is replaced by a typical one.
    seconds, average = shared_finish(100, 1, [], 10, typical=(100, 1), keep=1.0)
    assert seconds == pytest.approx(20.0) and average == pytest.approx(2.0)
    # Two neighbours now, one usually: when they end only one comes back.
    seconds, average = shared_finish(100, 1, [(50, 1), (50, 1)], 10, (100, 1), keep=1.0)
    assert seconds == pytest.approx(15.0 + 10.0)
    assert average == pytest.approx((3 * 15 + 2 * 10) / 25)
    # Half an object on average: a neighbour of half the weight.
    seconds, _ = shared_finish(100, 1, [], 15, (1000, 1), keep=0.5)
    assert seconds == pytest.approx(10.0)


def _point(size: int, capacity: float, **kw: float) -> SharedPoint:
    return SharedPoint(size, kw.get("weight", 16.0), capacity, 0.2, 0.1, 3.0, 12.0)


def test_sharing_model_fits_capacity_and_overhead() -> None:
    model = SharingModel()
    assert model.fit() is None
    # Share-seconds = (size + 32 MiB) / (800 MiB/s): the overhead is 32 MiB's worth.
    for size in (64 * MiB, 256 * MiB, 1024 * MiB) * 3:
        model.add(_point(size, size / ((size + 32 * MiB) / (800 * MiB))))
    fit = model.fit()
    assert fit is not None and fit.objects == 9
    assert fit.capacity == pytest.approx(800 * MiB)
    assert fit.overhead == pytest.approx(32 * MiB)
    assert fit.before == pytest.approx(0.2) and fit.after == pytest.approx(0.1)
    assert fit.others == 3.0 and fit.typical_weight == 12.0
    # A stall among them moves neither.
    model.add(_point(256 * MiB, 10 * MiB))
    again = model.fit()
    assert again is not None and again.capacity == pytest.approx(800 * MiB, rel=0.05)
    # Round trip through the state file's form.
    assert SharingModel.from_list(model.to_list()).fit() == again


def _shared_observation() -> Observation:
    """An object of 100 MiB that spent 3 s in all, 0.5 s of it admitted, its download
    2 s long beside two others (a quarter of the engine: 0.5 share-seconds)."""
    return Observation(
        size=100 * MiB,
        seconds=3.0,
        stages=((A, 1.0),),
        download_bytes=100 * MiB,
        download_seconds=2.0,
        load=Load(admission_wait=0.5, in_flight=3),
        in_flight_avg=3.0,
        weight=8.0,
        share_seconds=0.5,
        download_span=2.0,
        stay_seconds=2.25,
    )


def test_what_a_shared_object_teaches() -> None:
    obs = _shared_observation()
    point = shared_point(obs)
    assert point is not None
    assert point.capacity == pytest.approx(200 * MiB)
    assert point.before == pytest.approx(0.25) and point.after == pytest.approx(0.25)
    # A quarter of the engine: the two others weighed 24 together, 12 each.
    assert point.others == 2.0 and point.neighbour_weight == pytest.approx(12.0)


def test_what_an_object_in_turn_teaches() -> None:
    obs = replace(_shared_observation(), ahead_bytes=300 * MiB)
    point = shared_point(obs)
    assert point is not None and (point.ahead, point.span) == (300 * MiB, 2.0)
    alone = shared_point(replace(obs, ahead_bytes=None))
    assert alone is not None and alone.ahead == -1.0


def _shared_model() -> TimeModel:
    m = TimeModel({"download": 800 * MiB, "a": 4000 * MiB})
    m._fixed.append((0.0, 0.1))
    for size in (64 * MiB, 256 * MiB, 1024 * MiB):
        # Each saw 400 MiB/s, with 3 others of weight 16 beside it.
        m.sharing.add(SharedPoint(size, 16.0, 400 * MiB, 0.2, 0.1, 3.0, 16.0))
    return m


def test_learning_goes_to_the_lone_or_the_sharing_model() -> None:
    m = TimeModel()
    lone = Observation(
        size=64 * MiB,
        seconds=1.0,
        stages=((A, 0.5),),
        download_bytes=64 * MiB,
        download_seconds=0.5,
        in_flight_avg=1.0,
    )
    m.learn(lone)
    assert m.rate("download").objects == 1 and not m.sharing.points
    shared = replace(
        lone,
        in_flight_avg=3.0,
        weight=8.0,
        share_seconds=0.25,
        download_span=0.5,
        stay_seconds=0.8,
    )
    m.learn(shared)
    assert m.rate("download").objects == 1  # the lone rates are left as they are
    assert len(m.sharing.points) == 1 and m.objects == 2


def test_prediction_beside_neighbours() -> None:
    m = _shared_model()
    alone = m.predict(400 * MiB, [A])
    assert alone.shared is None
    # Three neighbours, 400 MiB left each, all of weight 16: a quarter of 400 MiB/s
    # until all four end together (4 s); nobody to replace them beyond the three.
    load = Load.shared(4)
    load = Load(
        load.connection_share,
        load.heavy_share,
        in_flight=4,
        weight=16.0,
        neighbours=((400 * MiB, 16.0),) * 3,
        admission_wait=1.0,
    )
    p = m.predict(400 * MiB, [A], load=load)
    assert p.shared is not None
    assert p.seconds == pytest.approx(1.0 + 0.2 + 4.0 + 0.1)
    assert p.in_flight_expected == pytest.approx(4.0)
    assert p.lone_seconds == pytest.approx(alone.seconds)
    described = p.describe()["load"]
    assert described["in_flight"] == 4 and described["neighbours"] == 3
    assert described["shared"]["capacity"] == pytest.approx(400 * MiB)
    # Its ETA is not corrected (errors beside others are spread, not biased), even when
    # objects alone of its size taught a correction.
    m._eta.update({f"{alone.eta_group}:{b}": deque([0.5] * 3) for b in range(10)})
    assert m.predict(400 * MiB, [A]).eta_factors == (0.5,) * 10
    shared = m.predict(400 * MiB, [A], load=load)
    assert (shared.eta_factors, shared.eta_group) == ((), "")
    at = Position(100 * MiB, 100 * MiB, 0.01, 1.0, neighbours=((300 * MiB, 16.0),) * 3)
    assert shared.remaining(at) == shared.remaining(at, corrected=False)


def test_eta_replans_as_neighbours_come_and_go() -> None:
    m = _shared_model()
    load = Load(in_flight=4, weight=16.0, neighbours=((400 * MiB, 16.0),) * 3)
    p = m.predict(400 * MiB, [A], load=load)
    beside = ((300 * MiB, 16.0),) * 3
    # A quarter done at the learned pace: 300 MiB left, each of four at 100 MiB/s.
    at = Position(downloaded=100 * MiB, download_seconds=1.0, share_so_far=0.25)
    assert p.remaining(_with(at, beside)) == pytest.approx(3.0 + 0.1)
    # The neighbours ended and nobody came: the rest alone, at 400 MiB/s.
    m.sharing.points.clear()
    for size in (64 * MiB, 256 * MiB, 1024 * MiB):
        m.sharing.add(SharedPoint(size, 16.0, 400 * MiB, 0.2, 0.1, 0.0, 16.0))
    p = m.predict(400 * MiB, [A], load=load)
    assert p.remaining(_with(at, ())) == pytest.approx(0.75 + 0.1)
    # It went at half the learned capacity so far: its own pace weighs in.
    slow = Position(downloaded=100 * MiB, download_seconds=2.0, share_so_far=0.5)
    assert p.remaining(_with(slow, ())) > p.remaining(_with(at, ()))


def _with(at: Position, neighbours: tuple[tuple[float, float], ...]) -> Position:
    return Position(
        downloaded=at.downloaded,
        download_seconds=at.download_seconds,
        share_so_far=at.share_so_far,
        neighbours=neighbours,
    )


def test_shared_fields_round_trip_in_the_state_file(tmp_path: Any) -> None:
    m = _shared_model()
    path = str(tmp_path / "model.json")
    m.save(path)
    again = TimeModel.load(path)
    assert again.sharing.fit() == m.sharing.fit()
    assert isinstance(again.sharing.fit(), Shared)


def test_reports_say_what_they_shared(put_object: Any) -> None:
    """Objects run side by side: each report's model carries the count it was admitted
    with, its weight, and the count over its life."""
    uris = [put_object(os.urandom(3 * MiB)) for _ in range(3)]
    config = Config(part_size=MiB, model_path="")

    async def main() -> list[Report]:
        reports: list[Report] = []
        async with Engine(config) as engine:

            async def one(uri: str) -> None:
                reports.append(await engine.process(uri, [Checksum(), Scan()]))

            async with anyio.create_task_group() as tg:
                for uri in uris:
                    tg.start_soon(one, uri)
        return reports

    reports = run_async(main)
    assert len(reports) == 3 and all(r.passed for r in reports)
    for report in reports:
        assert report.model is not None
        load = report.model["load"]
        assert 1 <= load["in_flight"] <= 3
        assert load["weight"] == 3.0  # three parts of 1 MiB
        assert 1.0 <= load["in_flight_avg"] <= 3.0
        assert load["share_seconds"] is not None and load["share_seconds"] > 0
        assert load["stay_seconds"] >= load["download_span"] > 0
        assert "in_flight_expected" in load and "shared" in load


def test_default_disk_budget_stays_below_the_writeback_threshold(tmp_path: Any) -> None:
    from fastpipe._budgets import default_disk_budget, writeback_threshold

    vmstat = tmp_path / "vmstat"
    vmstat.write_text("nr_dirty 10\nnr_dirty_background_threshold 1000\n")
    assert writeback_threshold(str(vmstat)) == 1000 * os.sysconf("SC_PAGE_SIZE")
    vmstat.write_text("nr_dirty 10\n")
    assert writeback_threshold(str(vmstat)) is None
    assert writeback_threshold(str(tmp_path / "missing")) is None
    threshold = writeback_threshold()
    if threshold:  # Linux
        assert default_disk_budget(tmp_path) <= threshold


def test_rates_follow_a_machine_whose_speed_changes() -> None:
    from fastpipe._model import WINDOW, recent_median

    assert recent_median([1.0, 2.0, 3.0]) == 2.0
    assert recent_median([9.0] + [1.0] * 4) == 1.0  # one outlier does not move it
    # After a long run at 100, the machine halves its speed: within 8 objects the
    # recency-weighted median is the new speed (the plain median of 32 needs 17).
    old = [100.0] * (WINDOW - 8)
    assert recent_median(old + [50.0] * 8) == 50.0
    assert recent_median(old + [50.0] * 4) == 100.0


def test_newcomers_start_after_the_time_before_a_download() -> None:
    # A closed loop of one other (weight 1, 100 MB each) at 10 B/s; a newcomer needs 2 s
    # (its HEAD and temp file) before it downloads: 20 B alone, then 80 B at half pace.
    seconds, average = shared_finish(100, 1, [], 10, (100, 1), keep=1.0, delay=2.0)
    assert seconds == pytest.approx(2.0 + 16.0)
    assert average == pytest.approx((2 * 1 + 16 * 2) / 18)
    # An object through within the delay is never slowed by a newcomer.
    assert shared_finish(10, 1, [], 10, (100, 1), keep=3.0, delay=2.0) == (1.0, 1.0)
    # The neighbours already downloading share from the start.
    seconds, _ = shared_finish(10, 1, [(100, 1)], 10, (100, 1), keep=1.0, delay=2.0)
    assert seconds == pytest.approx(2.0)


def test_objects_about_to_download_are_neighbours() -> None:
    clock = Clock()
    flight = InFlight(clock)
    a = flight.enter(100, 16)
    with flight.coming(64, 8.0):
        assert flight.neighbours(a) == ((64, 8.0),)
        with pytest.raises(RuntimeError), flight.coming(32, 4.0):
            assert len(flight.neighbours(a)) == 2
            raise RuntimeError("its temp file could not be opened")
        assert flight.neighbours(a) == ((64, 8.0),)
    assert flight.neighbours(a) == ()
    assert flight.count == 1  # not in flight before it enters


def test_a_size_never_seen_gets_the_neighbours_of_its_own_size() -> None:
    model = SharingModel()
    # Small objects saw three neighbours; the one large object saw one (two large
    # objects fill the disk budget), and took longer before and after its download.
    for _ in range(4):
        model.add(SharedPoint(64 * MiB, 8.0, 800 * MiB, 0.1, 0.2, 3.0, 14.0))
    model.add(SharedPoint(1024 * MiB, 16.0, 800 * MiB, 0.3, 0.4, 1.0, 10.0))
    large = model.fit(1024 * MiB)
    assert large is not None and large.others == 1.0 and large.typical_weight == 10.0
    # One object of the size is too few for its seconds after: all objects'. The
    # seconds before follow a line in the size (the temp file's removal grows with it).
    assert large.before == pytest.approx(0.3) and large.after == pytest.approx(0.2)
    assert model.fit(64 * MiB).before == pytest.approx(0.1)  # type: ignore[union-attr]
    for _ in range(2):
        model.add(SharedPoint(1024 * MiB, 16.0, 800 * MiB, 0.3, 0.4, 1.0, 10.0))
    large = model.fit(1024 * MiB)
    assert large is not None and large.before == pytest.approx(0.3)
    assert large.after == pytest.approx(0.4)
    small = model.fit(64 * MiB)
    assert small is not None and small.others == 3.0 and small.after == pytest.approx(0.2)


def test_eta_after_the_download_is_what_objects_of_its_size_took_after_it() -> None:
    m = _shared_model()
    load = Load(in_flight=4, weight=16.0, neighbours=((400 * MiB, 16.0),) * 3)
    p = m.predict(400 * MiB, [A], load=load)
    assert p.shared is not None and p.shared.after == pytest.approx(0.1)
    done = Position(
        downloaded=400 * MiB,
        streamed=400 * MiB,
        download_seconds=1.0,
        share_so_far=0.25,
        neighbours=(),
    )
    # The stream stage is through: the learned seconds after the download are left.
    assert p.remaining(done) == pytest.approx(0.1)
    # 0.04 s of them already past.
    later = Position(
        downloaded=400 * MiB,
        streamed=400 * MiB,
        download_seconds=1.0,
        neighbours=(),
        after_download=0.04,
    )
    assert p.remaining(later) == pytest.approx(0.06)
    # Its stream stage lags 300 MiB behind at its own pace so far (100 MiB/s): 3 s.
    lagging = Position(
        downloaded=400 * MiB,
        streamed=100 * MiB,
        stream_busy=1.0,
        download_seconds=1.0,
        share_so_far=0.25,
        neighbours=(),
    )
    assert p.remaining(lagging) == pytest.approx(3.0)
