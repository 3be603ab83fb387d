"""Downloads in turn (``Config.download_order`` "admission"): the order and lanes on their
own, the tracker's neighbours ahead, the time model's arithmetic, and real downloads
through the engine against SeaweedFS."""

from __future__ import annotations

import os
import time
from typing import Any

import anyio
import pytest

from fastpipe import Config, Engine, Report, UsageError, _budgets, _fetch
from fastpipe._groups import run_async
from fastpipe._many_cli import add_budget_arguments, budget_settings
from fastpipe._model import Load, Position, StageCost, TimeModel
from fastpipe._sharing import InFlight, Shared, SharedPoint, SharingModel
from fastpipe.stages import Checksum, FileStage, LocalFile

MiB = 1 << 20
A = StageCost("a", "a", "stream")


# -- the order on its own -----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_turn_waits_for_every_older_tail() -> None:
    turns = _budgets.Turns()
    log: list[str] = []
    with turns.take() as first, turns.take() as second, turns.take() as third:
        assert [t.number for t in (first, second, third)] == [0, 1, 2]
        with anyio.fail_after(1):
            assert await first.wait() < 1.0  # nobody ahead: at once
        assert turns.ahead(first) == []
        assert turns.ahead(third) == [first, second]

        async def waiter(turn: _budgets.Turn) -> None:
            await turn.wait()
            log.append(f"start {turn.number}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, third)
            tg.start_soon(waiter, second)
            await anyio.sleep(0.05)
            assert log == []  # the first is not in its tail yet
            log.append("tail 0")
            first.tail()
            await anyio.sleep(0.05)
            assert log == ["tail 0", "start 1"]  # the third waits for the second too
            log.append("tail 1")
            second.tail()
        assert log == ["tail 0", "start 1", "tail 1", "start 2"]
        first.tail()  # twice: harmless
        assert turns.ahead(third) == []


@pytest.mark.anyio
async def test_a_turn_ended_any_way_lets_the_next_one_go() -> None:
    """An object that fails or is cancelled before its download (so never signals its
    tail) does not hold the ones after it: its turn's block ends it."""
    turns = _budgets.Turns()
    with pytest.raises(RuntimeError), turns.take():
        raise RuntimeError("HEAD failed")
    with turns.take() as later:
        with anyio.fail_after(5):
            await later.wait()
        assert turns.ahead(later) == []


async def _note_start(turn: _budgets.Turn, started: list[float]) -> None:
    """Wait for ``turn``'s start and note when it came."""
    await turn.wait()
    started.append(time.perf_counter())


@pytest.mark.anyio
async def test_a_stalled_download_ahead_stops_holding_the_next_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An older download that brings no byte for STALLED_AFTER seconds lets the next one
    start; one that keeps bringing bytes is waited for until its tail."""
    monkeypatch.setattr(_budgets, "STALLED_AFTER", 0.05)
    turns = _budgets.Turns()
    with turns.take() as stalled, turns.take() as moving, turns.take() as last:
        stalled.watch(lambda: 100)  # started, then nothing more
        bytes_in = [0]
        moving.watch(lambda: bytes_in[0])
        with anyio.fail_after(5):
            await moving.wait()  # the stalled one ahead does not hold it
        started: list[float] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_note_start, last, started)
            for _ in range(6):  # bytes keep coming for 0.3 s: it waits
                await anyio.sleep(0.03)
                bytes_in[0] += 1
            assert started == []
            moving.tail()
        assert len(started) == 1


@pytest.mark.anyio
async def test_in_order_pass_the_next_one_waits_for_the_pass_not_the_tail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Order "pass": neither the download's tail nor its end lets the next one start,
    and an older object whose bytes are all in (its stages still reading) is not taken
    for stalled; its pass over its bytes does."""
    monkeypatch.setattr(_budgets, "STALLED_AFTER", 0.05)
    turns = _budgets.Turns(at_pass=True)
    with turns.take() as first, turns.take() as second:
        first.watch(lambda: 100)
        started: list[float] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_note_start, second, started)
            first.parts_out()
            first.download_over()
            await anyio.sleep(0.3)  # six times STALLED_AFTER without a byte
            assert started == [] and turns.ahead(second) == [first]
            first.pass_over()
        assert len(started) == 1
    # In order "admission", the tail is enough.
    turns = _budgets.Turns()
    with turns.take() as first, turns.take() as second:
        first.parts_out()
        with anyio.fail_after(1):
            await second.wait()


def test_download_order_is_checked_and_set_from_the_command_line() -> None:
    with pytest.raises(UsageError, match="download_order must be admission, pass or shared"):
        Config(download_order="fastest")
    assert Config().download_order == "admission"
    import argparse

    parser = argparse.ArgumentParser()
    add_budget_arguments(parser)
    assert budget_settings(parser.parse_args(["--download-order", "shared"])) == {
        "download_order": "shared"
    }
    assert budget_settings(parser.parse_args([])) == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--download-order", "random"])


# -- the tracker --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_in_turn_the_neighbours_are_the_objects_ahead() -> None:
    clock = Clock()
    flight = InFlight(clock)
    done = {"a": 0, "b": 0, "c": 0}
    a = flight.enter(100, 16, lambda: done["a"], turn=0)
    b = flight.enter(50, 8, lambda: done["b"], turn=1)
    assert (a.weight, a.connections) == (0.0, 16.0)  # no share before its turn
    flight.begin(a)
    clock.now += 1.0
    assert flight.share_so_far(a) == pytest.approx(1.0)
    assert flight.share_so_far(b) == 0.0  # waiting: it takes nothing
    done["a"] = 60
    with flight.coming(30, 4, turn=2):
        c = flight.enter(30, 4, lambda: done["c"], turn=3)
        # Ahead of b: a's bytes left; ahead of c: a, b (waiting, whole) and the one coming.
        assert flight.neighbours(b) == ((40, 16.0),)
        assert flight.neighbours(c) == ((40, 16.0), (50, 8.0), (30, 4.0))
        assert flight.neighbours(a) == ()
    flight.downloaded(a)
    assert flight.neighbours(c) == ((50, 8.0),)  # a's download is over
    flight.begin(b)
    clock.now += 2.0
    assert flight.share_so_far(b) == pytest.approx(2.0)  # alone downloading now


# -- the time model -----------------------------------------------------------------------


def _turn_model() -> TimeModel:
    m = TimeModel()
    for size in (64 * MiB, 256 * MiB, 1024 * MiB):
        m.sharing.add(SharedPoint(size, 16.0, 400 * MiB, 0.2, 0.1, 3.0, 16.0))
    return m


def test_in_turn_the_objects_ahead_go_first_at_the_engine_capacity() -> None:
    shared = Shared(400 * MiB, 0.2, 0.1, 400 * MiB, 16.0, 3, others=3.0)
    ahead = ((200 * MiB, 16.0), (100 * MiB, 8.0))
    seconds, count = shared.finish(100 * MiB, 16.0, ahead, in_turn=True)
    assert seconds == pytest.approx((200 + 100 + 100) / 400)
    assert count == 3.0
    assert shared.finish(100 * MiB, 16.0, (), in_turn=True)[0] == pytest.approx(0.25)
    # Shared instead, the same neighbours take their share all along (and newcomers).
    assert shared.finish(100 * MiB, 16.0, ahead)[0] != pytest.approx(1.0)


def test_prediction_and_eta_in_turn() -> None:
    m = _turn_model()
    ahead = ((400 * MiB, 16.0), (200 * MiB, 16.0))
    load = Load(in_flight=3, weight=16.0, neighbours=ahead, admission_wait=0.5, in_turn=True)
    p = m.predict(400 * MiB, [A], load=load)
    assert p.shared is not None
    # Wait, before, the 600 MiB ahead then its own 400 MiB at 400 MiB/s, after.
    assert p.seconds == pytest.approx(0.5 + 0.2 + 2.5 + 0.1)
    assert p.describe()["load"]["in_turn"] is True
    # Its download a quarter through at the learned pace, nobody ahead any more.
    at = Position(downloaded=100 * MiB, download_seconds=0.25, share_so_far=0.25, neighbours=())
    assert p.remaining(at) == pytest.approx(0.75 + 0.1)
    # Waiting for its turn, one object's 100 MiB still ahead.
    waiting = Position(neighbours=((100 * MiB, 16.0),))
    assert p.remaining(waiting) == pytest.approx(0.25 + 1.0 + 0.1)


def test_objects_in_turn_teach_the_pace_through_the_queue() -> None:
    """Objects in turn give a line: seconds from the prediction to the download's end
    against the bytes ahead and their own. Its slope and intercept become the capacity
    and overhead an object in turn predicts with; shared objects keep the shares'."""
    m = _turn_model()  # shares: 400 MiB/s, no overhead
    assert m.sharing.fit() is not None and m.sharing.fit().turn_capacity is None  # type: ignore[union-attr]
    # In turn: 0.05 s to start, then 500 MiB/s through everything ahead and its own.
    for size, ahead in ((64, 0), (256, 64), (1024, 320), (64, 1024), (256, 512)):
        span = 0.05 + (size + ahead) * MiB / (500 * MiB)
        m.sharing.add(SharedPoint(size * MiB, 16.0, 400 * MiB, 0.2, 0.1, 3.0, 16.0,
                                  ahead * MiB, span))
    fit = m.sharing.fit()
    assert fit is not None
    assert fit.turn_capacity == pytest.approx(500 * MiB)
    assert fit.turn_overhead == pytest.approx(0.05 * 500 * MiB)
    assert fit.in_turn().capacity == pytest.approx(500 * MiB)
    assert fit.to_dict()["turn_capacity"] == pytest.approx(500 * MiB)
    ahead = ((300 * MiB, 16.0),)
    turn = m.predict(200 * MiB, [A], load=Load(in_flight=2, weight=16.0, neighbours=ahead,
                                                in_turn=True))
    assert turn.seconds == pytest.approx(0.2 + 0.05 + 1.0 + 0.1)
    assert turn.describe()["load"]["ahead_bytes"] == 300 * MiB
    shared = m.predict(200 * MiB, [A], load=Load(in_flight=2, weight=16.0, neighbours=ahead))
    assert shared.describe()["load"]["ahead_bytes"] is None
    assert shared.seconds != pytest.approx(turn.seconds)
    # The state file keeps the points in turn; one written before them still loads.
    again = SharingModel.from_list(m.sharing.to_list()).fit()
    assert again == fit
    old_rows = [row[:7] for row in m.sharing.to_list()]
    assert SharingModel.from_list(old_rows).fit().turn_capacity is None  # type: ignore[union-attr]


# -- real downloads -----------------------------------------------------------------------


def _observe(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Record, on real downloads, when each turn's tail came and each wait ended, and the
    most ranged GETs in flight at once across objects."""
    seen: dict[str, Any] = {"tail": {}, "start": {}, "active": 0, "most": 0}
    tail, wait, fetch_part = _budgets.Turn.tail, _budgets.Turn.wait, _fetch.Fetcher._fetch_part

    def on_tail(self: _budgets.Turn) -> None:
        seen["tail"].setdefault(self.number, time.perf_counter())
        tail(self)

    async def on_wait(self: _budgets.Turn) -> float:
        waited = await wait(self)
        seen["start"][self.number] = time.perf_counter()
        return waited

    async def on_fetch(self: _fetch.Fetcher, index: int, conn: Any) -> None:
        seen["active"] += 1
        seen["most"] = max(seen["most"], seen["active"])
        try:
            await fetch_part(self, index, conn)
        finally:
            seen["active"] -= 1

    monkeypatch.setattr(_budgets.Turn, "tail", on_tail)
    monkeypatch.setattr(_budgets.Turn, "wait", on_wait)
    monkeypatch.setattr(_fetch.Fetcher, "_fetch_part", on_fetch)
    return seen


def _run_together(uris: list[str], config: Config) -> list[Report]:
    async def main() -> list[Report]:
        reports: list[Report] = []
        async with Engine(config) as engine:

            async def one(uri: str) -> None:
                reports.append(await engine.process(uri, [Checksum()]))

            async with anyio.create_task_group() as tg:
                for uri in uris:
                    tg.start_soon(one, uri)
        return reports

    return run_async(main)


def test_objects_download_in_turn(put_object: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three objects admitted at once: each download starts only once the one admitted
    before it is in its tail (so at most one object's connections plus a tail's at
    once), and the reports say how long each waited for its turn; every byte is right."""
    seen = _observe(monkeypatch)
    uris = [put_object(os.urandom(12 * MiB + 7)) for _ in range(3)]
    config = Config(part_size=MiB, max_concurrency=4, model_path="")
    reports = _run_together(uris, config)
    assert len(reports) == 3 and all(r.passed for r in reports), reports
    assert seen["most"] <= 2 * 4 - 1  # one object's connections and an older's tail
    assert sorted(seen["start"]) == [0, 1, 2]
    for number in (1, 2):
        assert seen["start"][number] >= seen["tail"][number - 1]
    waits = sorted(r.download.turn_wait_seconds for r in reports)
    assert waits[0] == pytest.approx(0.0, abs=0.05) and waits[2] > 0
    for report in reports:
        assert report.model is not None and report.model["load"]["in_turn"] is True
        assert report.model["load"]["ahead_bytes"] is not None
    assert max(r.model["load"]["ahead_bytes"] for r in reports if r.model) > 0


def test_shared_order_downloads_at_once(put_object: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``download_order="shared"``: no turns, every admitted object's fetchers at once."""
    seen = _observe(monkeypatch)
    uris = [put_object(os.urandom(12 * MiB + 7)) for _ in range(3)]
    config = Config(part_size=MiB, max_concurrency=4, model_path="", download_order="shared")
    reports = _run_together(uris, config)
    assert len(reports) == 3 and all(r.passed for r in reports), reports
    assert seen["start"] == {} and seen["tail"] == {}
    assert seen["most"] > 4  # more than one object's connections at once
    assert all(r.download.turn_wait_seconds == 0.0 for r in reports)


class SlowInOrder(FileStage):
    """An early file stage with work left after its last byte: the pass's lag."""

    name = "slow-in-order"
    reads_in_order = True

    def __init__(self, lag: float) -> None:
        self.lag = lag
        self.ended = 0.0

    def run(self, local: LocalFile) -> int:
        total = sum(len(view) for _, view in local.windows(MiB))
        time.sleep(self.lag)
        self.ended = time.perf_counter()
        return total


@pytest.mark.parametrize("order", ["admission", "pass"])
def test_in_order_pass_the_next_download_waits_for_the_pass(
    order: str, put_object: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two objects at once with an early file stage that lags its bytes by 0.6 s: in
    order "pass" the second download starts after the first object's stage is done (a
    download over is never taken for stalled, here 0.2 s); in "admission" at the first
    download's tail, before."""
    monkeypatch.setattr(_budgets, "STALLED_AFTER", 0.2)
    seen = _observe(monkeypatch)
    uris = [put_object(os.urandom(6 * MiB + 3)) for _ in range(2)]
    stages = [SlowInOrder(0.6) for _ in uris]
    config = Config(part_size=MiB, max_concurrency=4, model_path="", download_order=order)

    async def main() -> list[Report]:
        reports: list[Report] = []
        async with Engine(config) as engine:

            async def one(uri: str, stage: SlowInOrder) -> None:
                reports.append(await engine.process(uri, [Checksum(), stage]))

            async with anyio.create_task_group() as tg:
                for uri, stage in zip(uris, stages, strict=True):
                    tg.start_soon(one, uri, stage)
        return reports

    reports = run_async(main)
    assert all(r.passed for r in reports), reports
    assert [r.stage("slow-in-order").result for r in reports] == [6 * MiB + 3] * 2
    first_pass = min(stage.ended for stage in stages)  # the first turn's (see below)
    if order == "pass":
        assert seen["start"][1] >= first_pass
    else:
        assert seen["start"][1] < first_pass


def test_a_failed_object_does_not_hold_the_next_turn(
    put_object: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object whose download fails ends its turn: the ones after it still run."""
    seen = _observe(monkeypatch)
    good = [put_object(os.urandom(6 * MiB)) for _ in range(2)]
    config = Config(part_size=MiB, max_concurrency=4, model_path="")

    async def main() -> list[Any]:
        out: list[Any] = []
        async with Engine(config) as engine:

            async def one(uri: str, stop: bool) -> None:
                def progress(event: Any) -> None:
                    if stop and event.bytes_done > 0:
                        raise RuntimeError("the caller gave up")

                try:
                    out.append(await engine.process(uri, [Checksum()], progress=progress))
                except RuntimeError as exc:
                    out.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(one, good[0], True)
                await anyio.sleep(0.01)
                tg.start_soon(one, good[1], False)
        return out

    results = run_async(main)
    assert any(isinstance(r, RuntimeError) for r in results)
    assert any(isinstance(r, Report) and r.passed for r in results)
    assert len(seen["start"]) == 2

