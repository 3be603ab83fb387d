"""The time model: its overlap arithmetic on synthetic rates, online learning, the state
file, calibration and ``fastpipe estimate``."""

from __future__ import annotations

import json
import logging
import os
import random
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import fastpipe
from fastpipe import Config, Engine, Report
from fastpipe._calibrate import calibrate, measure
from fastpipe._groups import run_async
from fastpipe._model import (
    BUILTIN_FIXED,
    BUILTIN_RATES,
    EARLY_LAST_WINDOW,
    ETA_BUCKETS,
    ETA_RATIO_BOUNDS,
    MIN_ETA_READINGS,
    MIN_LINE_OBJECTS,
    MIN_RATE_BYTES,
    Load,
    Observation,
    Position,
    StageCost,
    TimeModel,
    default_model_path,
    eta_group,
    pipeline_key,
    recent_median,
    settle_eta_readings,
    stage_costs,
)
from fastpipe._objectinfo import ObjectInfo
from fastpipe.stages import (
    Checksum,
    Chunk,
    Command,
    FileStage,
    Limits,
    LocalFile,
    Scan,
    StreamStage,
    Verify,
)

MiB = 1 << 20
S = 1024 * MiB
W = EARLY_LAST_WINDOW

A = StageCost("a", "a", "stream")
B = StageCost("b", "b", "stream")
EARLY = StageCost("chunk", "chunk", "file", early=True)
TAIL = StageCost("tool", "tool", "file")
#: A file stage after the download (the tail of the objects in the learning tests).
CHUNK = StageCost("chunk", "chunk", "file")


def model(**rates: float) -> TimeModel:
    """A model whose rates (MiB/s) are given, fixed cost learned as 1 s."""
    m = TimeModel({k: v * MiB for k, v in rates.items()})
    m._fixed.append((0.0, 1.0))  # one point: overlap factor 1, fixed cost 1 s
    return m


def test_download_bound() -> None:
    # Two stream stages of 1024 MiB/s run one after another: 512 MiB/s together, faster
    # than the 128 MiB/s download, so the download sets the pass.
    p = model(download=128, a=1024, b=1024).predict(S, [A, B])
    assert p.download == pytest.approx(8.0)
    assert p.stream == pytest.approx(8.0)
    assert p.bound == "download"
    assert p.seconds == pytest.approx(1.0 + 8.0)


def test_stage_bound() -> None:
    # 256 + 256 MiB/s in sequence is 128 MiB/s: slower than a 512 MiB/s download.
    p = model(download=512, a=256, b=256).predict(S, [A, B])
    assert p.download == pytest.approx(2.0)
    assert p.stream == pytest.approx(8.0)
    assert p.bound == "stream"
    assert p.seconds == pytest.approx(9.0)


def test_early_file_stage_hides_under_the_download() -> None:
    # chunk at 1024 MiB/s keeps up with a 128 MiB/s download; only its last window
    # (taken after the stream stages passed) follows the pass.
    p = model(download=128, a=1024, chunk=1024).predict(S, [A, EARLY])
    assert p.early == pytest.approx(8.0 + W / (1024 * MiB))
    assert p.bound == "download"
    assert p.tail == 0.0
    assert p.seconds == pytest.approx(1.0 + 8.0 + W / (1024 * MiB))


def test_early_file_stage_slower_than_the_download() -> None:
    p = model(download=1024, a=4096, chunk=128).predict(S, [A, EARLY])
    assert p.early == pytest.approx(8.0)  # the whole file at its own rate
    assert p.bound == "chunk"
    assert p.seconds == pytest.approx(9.0)


def test_tail_follows_the_pass() -> None:
    not_early = StageCost("chunk", "chunk", "file", early=False)
    p = model(download=128, a=1024, chunk=1024, tool=256).predict(S, [A, not_early, TAIL])
    assert p.stream == pytest.approx(8.0)
    assert p.tail == pytest.approx(1.0 + 4.0)
    assert p.seconds == pytest.approx(1.0 + 8.0 + 5.0)


def test_local_file_has_no_download() -> None:
    p = model(a=256).predict(S, [A], download_key=None)
    assert p.download_rate is None and p.download == 0.0
    assert p.seconds == pytest.approx(1.0 + 4.0)


def test_shared_connections_heavy_slots_and_admission_wait() -> None:
    m = model(download=256, a=4096, tool=512)
    alone = m.predict(S, [A, TAIL])
    assert alone.seconds == pytest.approx(1.0 + 4.0 + 2.0)
    load = Load.shared(in_flight=4, heavy_slots=2, admission_wait=3.0)
    assert load.connection_share == 0.25 and load.heavy_share == 0.5
    shared = m.predict(S, [A, TAIL], load=load)
    assert shared.download == pytest.approx(16.0)
    assert shared.tail == pytest.approx(4.0)
    assert shared.seconds == pytest.approx(3.0 + 1.0 + 16.0 + 4.0)
    with pytest.raises(ValueError):
        Load(connection_share=0.0)


def test_builtin_rates_say_so() -> None:
    m = TimeModel()
    p = m.predict(S, [StageCost("checksum", "checksum:xxh3_128", "stream"), EARLY])
    assert p.source == "builtin" and p.fixed == BUILTIN_FIXED
    described = p.describe()
    assert described["source"] == "builtin"
    assert described["download"]["source"] == "builtin"
    assert described["download"]["rate"] == BUILTIN_RATES["download"]
    assert [s["source"] for s in described["stages"]] == ["builtin", "builtin"]
    assert described["stages"][0]["rate"] == BUILTIN_RATES["checksum:xxh3_128"]
    # An unknown user stage gets its kind's conservative rate.
    assert m.rate("mine", "file").rate == BUILTIN_RATES["file"]
    json.dumps(described)


def test_remaining_is_end_to_end() -> None:
    m = model(download=128, a=1024, tool=64)
    p = m.predict(S, [A, TAIL])
    # Before the first byte: the whole pass and the tail (the fixed cost is spent).
    assert p.remaining(Position()) == pytest.approx(8.0 + 16.0)
    # All bytes in and streamed: the file stage is still ahead.
    done = Position(downloaded=S, streamed=S, stream_busy=1.0, download_seconds=8.0)
    assert p.remaining(done) == pytest.approx(16.0)
    # Ten seconds into that stage, six are left; after it, nothing.
    in_tail = Position(S, S, 1.0, 8.0, file_stages_done=0, in_stage=10.0)
    assert p.remaining(in_tail) == pytest.approx(6.0)
    assert p.remaining(Position(S, S, 1.0, 8.0, file_stages_done=1)) == 0.0


def test_remaining_follows_the_object_own_rates() -> None:
    # The model (built-in download rate) says 128 MiB/s; the object shows 512 MiB/s.
    m = model(download=128, a=4096)
    p = m.predict(S, [A])
    half = Position(downloaded=S // 2, streamed=S // 2, stream_busy=0.1, download_seconds=1.0)
    # No learned download rate: the object's own rate decides what is left.
    assert p.remaining(half) == pytest.approx(1.0)
    # An early stage: what it has left (at its rate) once the stream stages passed.
    e = model(download=1024, a=4096, chunk=128).predict(S, [A, EARLY])
    at_end = Position(S, S, 0.25, 1.0, early_done=S - W)
    assert e.remaining(at_end) == pytest.approx(W / (128 * MiB))


def test_eta_applies_the_steady_rate_to_the_bytes_left() -> None:
    """Downloads that take a start-up (0.05 s) then run at 1000 MiB/s: the model learns
    both, and at 10% of the bytes the ETA is the bytes left at the steady rate (an average
    rate, start-up included, would stretch them), from the seconds since the start-up."""
    start, steady = 0.05, 1000 * MiB
    m = TimeModel()
    for size in [64 * MiB, 256 * MiB, 1024 * MiB] * 4:
        dl = start + size / steady
        stages = ((A, size / (100_000 * MiB)),)
        m.learn(Observation(size, 0.2 + dl, stages, download_bytes=size, download_seconds=dl))
    line = m.download_line("download")
    assert line is not None
    assert line[0] == pytest.approx(start, rel=1e-6) and line[1] == pytest.approx(steady)
    assert m.download_line("other") is None
    size = 64 * MiB
    p = m.predict(size, [A])
    assert (p.download_start, p.steady_rate) == pytest.approx(line)
    assert p.describe()["download_steady_rate"] == pytest.approx(steady)
    tenth = size // 10
    at = Position(tenth, tenth, 0.0001, download_seconds=start + tenth / steady)
    assert p.remaining(at) == pytest.approx((size - tenth) / steady, rel=0.01)
    # Before the first byte: the start-up still ahead, then every byte.
    assert p.remaining(Position()) == pytest.approx(start + size / steady, rel=0.01)
    # Sizes too alike to tell a start-up from a rate: no line, the average rate.
    alike = TimeModel()
    for _ in range(5):
        obs = Observation(size, 1.0, ((A, 0.001),), download_bytes=size, download_seconds=0.5)
        alike.learn(obs)
    assert alike.download_line("download") is None
    assert alike.predict(size, [A]).steady_rate is None


def test_the_download_rate_is_that_of_objects_of_about_the_size() -> None:
    """Downloads with a start-up (0.05 s, then 1000 MiB/s): a 64 MiB object's rate is
    well below a 1 GiB one's. Each size is predicted at the rate of the recent downloads
    within a factor of 2 of it, once there are three; before, at every size's median."""
    start, steady = 0.05, 1000 * MiB
    m = TimeModel()

    def learn(size: int) -> None:
        dl = start + size / steady
        stages = ((A, size / (100_000 * MiB)),)
        m.learn(Observation(size, 0.2 + dl, stages, download_bytes=size, download_seconds=dl))

    def rate_of(size: int) -> float:
        return size / (start + size / steady)

    for size in [64 * MiB, 1024 * MiB] * 2 + [256 * MiB]:
        learn(size)
    everyone = m.rate("download", "download")
    assert m.download_rate("download", 64 * MiB) == everyone  # two alike: not yet
    learn(64 * MiB)
    small = m.download_rate("download", 64 * MiB)
    assert small.rate == pytest.approx(rate_of(64 * MiB)) and small.objects == 3
    assert m.download_rate("download", 100 * MiB).rate == pytest.approx(rate_of(64 * MiB))
    assert m.download_rate("download", 1024 * MiB) == m.rate("download", "download")
    learn(1024 * MiB)
    assert m.download_rate("download", 1024 * MiB).rate == pytest.approx(rate_of(1024 * MiB))
    # The prediction downloads at it, and says so.
    p = m.predict(64 * MiB, [A])
    assert p.download_rate is not None
    assert p.download_rate.rate == pytest.approx(rate_of(64 * MiB))
    assert p.download == pytest.approx(start + 64 * MiB / steady)
    assert m.download_rate("other", 64 * MiB) == m.rate("other", "download")


def test_eta_learns_what_it_errs_by_per_tenth_of_the_bytes() -> None:
    """Readings that say the ETA at 10-19% of the bytes was 25% too long (for objects of
    about 256 MiB, alone): after three, that tenth's ETA is corrected; other tenths, other
    sizes and objects sharing the engine keep theirs; the raw ETA stays available."""
    m = model(download=1024, a=4096)
    size = 256 * MiB
    p = m.predict(size, [A])
    assert p.eta_group == eta_group(size, shared=False) == eta_group(300 * MiB, shared=False)
    assert p.eta_factors == (1.0,) * ETA_BUCKETS
    readings = ((1, 0.4, 0.3), (5, 0.2, 0.2), (9, 0.1, 100.0))  # the last: clamped
    for n in range(MIN_ETA_READINGS):
        if n == MIN_ETA_READINGS - 1:
            assert m.eta_factors(p.eta_group) == (1.0,) * ETA_BUCKETS  # not yet
        obs = Observation(size, 1.0, ((A, 0.1),), download_bytes=size, download_seconds=0.3)
        m.learn(replace(obs, eta_readings=readings, eta_group=p.eta_group))
    factors = m.eta_factors(p.eta_group)
    assert factors[1] == pytest.approx(0.75) and factors[5] == pytest.approx(1.0)
    assert factors[9] == ETA_RATIO_BOUNDS[1] and factors[0] == 1.0
    p = m.predict(size, [A])
    at = Position(size * 15 // 100, size * 15 // 100, 0.001, download_seconds=0.03)
    assert p.remaining(at) == pytest.approx(0.75 * p.remaining(at, corrected=False))
    after = Position(size, size, 0.05, 0.3)
    assert p.remaining(after) == p.remaining(after, corrected=False)
    assert m.predict(64 * MiB, [A]).eta_factors == (1.0,) * ETA_BUCKETS
    assert m.eta_factors(eta_group(size, shared=True)) == (1.0,) * ETA_BUCKETS
    assert TimeModel.from_dict(m.to_dict()).eta_factors(p.eta_group) == factors
    assert p.describe()["eta"]["factors"][1] == pytest.approx(0.75)


def test_settled_readings_count_from_the_object_end() -> None:
    report = SimpleNamespace(model={"eta": {"group": "alone:28", "readings": [[1, 10.0, 0.5]]}})
    settle_eta_readings(report, 10.4)
    assert report.model["eta"]["readings"] == [[1, 0.5, pytest.approx(0.4)]]
    settle_eta_readings(SimpleNamespace(model=None), 1.0)  # no prediction: nothing to do


def _observation(size: int, dl: float, a: float, chunk: float, fixed: float) -> Observation:
    """An object whose phases ran at these rates (MiB/s), with this fixed cost."""
    seconds_dl = size / (dl * MiB)
    seconds_a = size / (a * MiB)
    seconds_chunk = size / (chunk * MiB)
    total = fixed + max(seconds_dl, seconds_a) + seconds_chunk
    return Observation(
        size=size,
        seconds=total,
        stages=((A, seconds_a), (CHUNK, seconds_chunk)),
        download_bytes=size,
        download_seconds=seconds_dl,
    )


def test_learning_converges_and_ignores_outliers() -> None:
    rng = random.Random(7)
    m = TimeModel()
    for i in range(30):
        size = rng.choice([64, 256, 1024]) * MiB
        if i % 10 == 3:  # a stall: everything ten times slower
            m.learn(_observation(size, 40.0, 100.0, 50.0, 5.0))
        else:
            jitter = rng.uniform(0.95, 1.05)
            m.learn(_observation(size, 400 * jitter, 1000 * jitter, 500 * jitter, 0.3))
    assert m.objects == 30
    dl = m.rate("download")
    assert dl.source == "learned" and dl.objects == 30
    assert dl.rate == pytest.approx(400 * MiB, rel=0.05)
    assert m.rate("a").rate == pytest.approx(1000 * MiB, rel=0.05)
    assert m.rate("chunk", "file").rate == pytest.approx(500 * MiB, rel=0.05)
    assert m.fixed()[0] == pytest.approx(0.3, abs=0.02)
    p = m.predict(S, [A, CHUNK])
    assert p.source == "learned"
    assert p.seconds == pytest.approx(0.3 + 2.56 + 2.048, rel=0.05)


def test_overlap_factor_and_fixed_cost_are_fitted() -> None:
    """Where the phases share the cores the pass runs longer than its slowest phase: a
    line through (pass, time) points gives that factor and the fixed cost, outliers and
    all."""
    rng = random.Random(3)
    m = TimeModel()
    for i in range(24):
        size = rng.choice([32, 64, 128, 256, 512]) * MiB
        dl_seconds = size / (400 * MiB)
        stall = 4.0 if i % 8 == 5 else 0.0
        obs = Observation(
            size=size,
            seconds=0.2 + 1.4 * dl_seconds + stall,
            stages=((A, size / (1000 * MiB)),),
            download_bytes=size,
            download_seconds=dl_seconds,
        )
        m.learn(obs)
    fixed, factor, source, objects = m.fit()
    assert source == "learned" and objects == 24
    assert factor == pytest.approx(1.4, rel=1e-6) and fixed == pytest.approx(0.2, abs=1e-6)
    p = m.predict(S, [A])
    assert p.overlap == pytest.approx(1.4)
    assert p.seconds == pytest.approx(0.2 + 1.4 * 2.56)
    assert p.describe()["overlap_factor"] == pytest.approx(1.4)
    # One size only: no line, the factor stays 1.
    same = TimeModel()
    for _ in range(5):
        same.learn(_observation(S, 400, 1000, 500, 0.3))
    assert same.fit()[:2] == pytest.approx((0.3, 1.0))


def _lone(size: int, seconds: float, stages: tuple[StageCost, ...] = (A, EARLY)) -> Observation:
    """A lone object of ``size`` that took ``seconds`` (its phases at 400 MiB/s each)."""
    phase = size / (400 * MiB)
    return Observation(
        size=size,
        seconds=seconds,
        stages=tuple((c, phase) for c in stages),
        download_key="download:raw",
        download_bytes=size,
        download_seconds=phase,
    )


def test_alone_the_pipeline_own_line_in_the_size_predicts() -> None:
    """Alone, the prediction is the line of seconds against size that the pipeline's
    lone objects drew (Theil-Sen: a stall does not move it), not the arithmetic with one
    overlap factor for every size, which leaves a bias per size."""
    m = TimeModel()
    line = lambda size: 0.01 + 1.7 * size / S  # noqa: E731 - the truth of this test
    sizes = [64 * MiB, 256 * MiB, S] * 4
    for i, size in enumerate(sizes):
        stall = 3.0 if i == 5 else 0.0
        m.learn(_lone(size, line(size) + stall))
    key = pipeline_key("download:raw", (A, EARLY))
    assert key == "download:raw|a|chunk@early"
    fitted = m.size_line(key)
    assert fitted is not None and fitted.objects == 12
    assert fitted.slope == pytest.approx(1.7 / S) and fitted.intercept == pytest.approx(0.01)
    p = m.predict(128 * MiB, [A, EARLY], download_key="download:raw")
    assert p.size_line == fitted
    assert p.seconds == pytest.approx(line(128 * MiB))
    assert p.lone_seconds == pytest.approx(line(128 * MiB))
    described = p.describe()["size_line"]
    assert described["seconds_per_gib"] == pytest.approx(1.7)
    assert described["intercept_seconds"] == pytest.approx(0.01) and described["objects"] == 12
    # The admission wait comes on top, and is not learned into the line.
    waited = m.predict(S, [A, EARLY], download_key="download:raw", load=Load(admission_wait=2.0))
    assert waited.seconds == pytest.approx(2.0 + line(S))
    m.learn(replace(_lone(S, 2.0 + line(S)), load=Load(admission_wait=2.0)))
    assert m.size_line(key) is not None
    assert m.size_line(key).seconds(S) == pytest.approx(line(S))  # type: ignore[union-attr]


def test_the_size_line_waits_for_spread_sizes_and_its_own_pipeline() -> None:
    m = TimeModel()
    for _ in range(5):  # one size only: no line, the arithmetic
        m.learn(_lone(S, 2.0))
    assert m.size_line(pipeline_key("download:raw", (A, EARLY))) is None
    assert m.predict(S, [A, EARLY], download_key="download:raw").size_line is None
    for size in (64 * MiB, 256 * MiB):
        m.learn(_lone(size, 2.0 * size / S))
    assert m.predict(S, [A, EARLY], download_key="download:raw").size_line is not None
    # Spread sizes, but fewer than MIN_LINE_OBJECTS objects: the first ones are cold.
    few = TimeModel()
    sizes = [64 * MiB, 256 * MiB, S] * MIN_LINE_OBJECTS
    for size in sizes[: MIN_LINE_OBJECTS - 1]:
        few.learn(_lone(size, 2.0 * size / S))
    assert few.size_line(pipeline_key("download:raw", (A, EARLY))) is None
    few.learn(_lone(sizes[MIN_LINE_OBJECTS - 1], 2.0 * sizes[MIN_LINE_OBJECTS - 1] / S))
    assert few.size_line(pipeline_key("download:raw", (A, EARLY))) is not None
    # Another stage list, another data plane, or an early stage run late: not its line.
    assert m.predict(S, [A], download_key="download:raw").size_line is None
    assert m.predict(S, [A, EARLY], download_key="download:botocore").size_line is None
    late = replace(EARLY, early=False)
    assert m.predict(S, [A, late], download_key="download:raw").size_line is None


def test_beside_others_the_line_neither_predicts_nor_learns() -> None:
    m = TimeModel()
    for size in (64 * MiB, 256 * MiB, S) * 2:
        m.learn(_lone(size, 2.0 * size / S))
    key = pipeline_key("download:raw", (A, EARLY))
    shared = m.predict(S, [A, EARLY], download_key="download:raw", load=Load.shared(2))
    assert shared.size_line is None
    before = m.size_line(key)
    # An object admitted beside another, or one resumed, teaches the line nothing.
    m.learn(replace(_lone(S, 9.0), load=Load.shared(2)))
    m.learn(replace(_lone(S, 9.0), reused_bytes=S // 2))
    assert m.size_line(key) == before


def test_a_shared_prediction_does_not_claim_the_line() -> None:
    """Beside others the sharing model predicts; the line may still give the object's
    time alone (``lone_seconds``), but the report does not say it gave the prediction."""
    from fastpipe._sharing import SharedPoint

    m = TimeModel()
    for size in (64 * MiB, 256 * MiB, S) * 2:
        m.learn(_lone(size, 2.0 * size / S))
        m.sharing.add(SharedPoint(size, 16.0, 400 * MiB, 0.2, 0.1, 3.0, 16.0))
    p = m.predict(S, [A, EARLY], download_key="download:raw", load=Load.shared(4))
    assert p.shared is not None and p.size_line is None
    assert p.describe()["size_line"] is None
    assert p.lone_seconds == pytest.approx(2.0)


def test_small_objects_teach_the_fixed_cost_only() -> None:
    m = model(download=400, a=1000)
    m._fixed.clear()
    size = MIN_RATE_BYTES // 4
    obs = Observation(
        size=size,
        seconds=0.2 + size / (400 * MiB),
        stages=((A, 0.05),),
        download_bytes=size,
        download_seconds=0.1,  # latency: a rate of 10 MiB/s would be a lie
    )
    m.learn(obs)
    assert m.rate("download").source == "calibrated"
    assert m.rate("a").source == "calibrated"
    assert m.fixed()[0] == pytest.approx(0.2, abs=1e-6)


def test_learning_under_load_scales_back_to_a_lone_object() -> None:
    m = TimeModel()
    obs = Observation(
        size=S,
        seconds=10.0,
        stages=((A, 1.0), (TAIL, 4.0)),
        download_bytes=S,
        download_seconds=8.0,
        load=Load(connection_share=0.5, heavy_share=0.5),
    )
    m.learn(obs)
    assert m.rate("download").rate == pytest.approx(256 * MiB)
    assert m.rate("tool", "file").rate == pytest.approx(512 * MiB)
    assert m.rate("a").rate == pytest.approx(1024 * MiB)


def test_observation_from_reports() -> None:
    report = Report(source="s3://b/k", size=S, passed=True, seconds=9.0)
    report.download.bytes, report.download.seconds = S, 8.0
    report.stages = [SimpleNamespace(seconds=1.0)]  # type: ignore[list-item]
    obs = Observation.from_report(report, [A])
    assert obs is not None and obs.download_key == "download"
    assert obs.stages == ((A, 1.0),) and obs.download_seconds == 8.0
    report.passed = False  # a stopped object did only part of its work
    assert Observation.from_report(report, [A]) is None


def test_state_file_round_trip_and_permissions(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "fastpipe" / "model.json"
    m = TimeModel({"scan": 3e9}, str(path))
    for size in (S, S // 4, S // 16):
        m.learn(_observation(size, 400, 1000, 500, 0.3))
    m.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["model.json"]  # no temp file left
    again = TimeModel.load(str(path))
    assert again.to_dict() == m.to_dict()
    assert again.rate("download").objects == 3 and again.objects == 3
    assert again.download_line("download") == m.download_line("download") is not None
    assert again.rate("scan").source == "calibrated"
    assert again.predict(S, [A, CHUNK]).seconds == m.predict(S, [A, CHUNK]).seconds
    assert len(again.to_dict()["size_lines"]["download|a|chunk"]) == 3


def test_unusable_state_file_falls_back(tmp_path: Path, caplog: Any) -> None:
    path = tmp_path / "model.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="fastpipe"):
        m = TimeModel.load(str(path))
    assert m.source == "builtin" and "unusable" in caplog.text
    path.write_text(json.dumps({"version": 99}))
    assert TimeModel.load(str(path)).source == "builtin"
    assert TimeModel.load(str(tmp_path / "missing.json")).source == "builtin"


def test_model_path_config(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model_path() == str(tmp_path / "fastpipe" / "model.json")
    assert Config().resolved_model_path() == default_model_path()
    assert Config(model_path="").resolved_model_path() is None
    assert Config(model_path="/x/m.json").resolved_model_path() == "/x/m.json"


def test_cost_keys() -> None:
    assert Checksum("sha256").cost_key() == "checksum:sha256"
    assert Checksum().cost_key() == "checksum:xxh3_128"
    assert Scan().cost_key() == "scan" and Limits().cost_key() == "limits"
    assert Chunk(threads=3).cost_key() == "chunk:t3"
    assert Command("true").cost_key() != Command("false").cost_key()
    crc = ObjectInfo("s3://b/k", 10, etag="0" * 32, checksums={"CRC32C": "AAAAAA=="})
    assert Verify().cost_key(crc) == "verify:crc32c"
    md5 = ObjectInfo("s3://b/k", 10, etag="0" * 32)
    assert Verify().cost_key(md5) == "verify:md5"
    assert Verify(etag=False).cost_key(md5) == "verify:none"
    multipart = ObjectInfo(
        "s3://b/k", 20 * MiB, etag="0" * 32 + "-3", parts_count=3, multipart_part_size=8 * MiB
    )
    assert Verify(lanes=2).cost_key(multipart) == "verify:md5-lanes"
    assert Verify(lanes=1).cost_key(multipart) == "verify:md5"

    class Mine(StreamStage):
        name = "mine"

        def update(self, view: memoryview) -> None:
            pass

        def finish(self) -> None:
            return None

    assert Mine().cost_key() == "mine"
    costs = stage_costs([Checksum(), Chunk(threads=2), Chunk(threads=2)], md5)
    assert [(c.key, c.kind, c.early) for c in costs] == [
        ("checksum:xxh3_128", "stream", False),
        ("chunk:t2", "file", True),  # the first file stage reads in order
        ("chunk:t2", "file", False),
    ]
    assert not stage_costs([Chunk()], md5, early_file_stages=False)[0].early


def test_calibrate_measures_every_builtin_stage(tmp_path: Path) -> None:
    rates = measure(1 * MiB, temp_dir=str(tmp_path))
    for key in ("checksum:sha256", "checksum:xxh3_128", "scan", "limits", "verify:crc32"):
        assert rates[key] > 0, key
    assert any(key.startswith("chunk:t") for key in rates)
    assert "verify:md5" in rates
    assert ("verify:md5-lanes" in rates) == ((os.cpu_count() or 1) > 1)
    assert os.listdir(tmp_path) == []  # the chunk stage's temp file is gone
    path = tmp_path / "state" / "model.json"
    m = calibrate(str(path), 1 * MiB, temp_dir=str(tmp_path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = TimeModel.load(str(path))
    assert loaded.source == "calibrated" and loaded.calibrated == m.calibrated
    assert loaded.rate("checksum:sha256").source == "calibrated"
    assert loaded.rate("download").source == "builtin"  # needs S3: learned later


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_calibrate_and_estimate_cli(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = _cli("estimate", "1GiB", env=env)
    assert out.returncode == 0, out.stderr
    assert "end to end" in out.stdout and "model: builtin" in out.stdout
    assert "fastpipe calibrate" in out.stdout
    out = _cli("calibrate", "--size", "1MiB", env=env)
    assert out.returncode == 0, out.stderr
    assert "checksum:sha256" in out.stdout
    state = tmp_path / "cache" / "fastpipe" / "model.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    out = _cli("estimate", "1GiB", "--stage", "scan", "--stage", "chunk", "--json", env=env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["source"] == "calibrated" and data["size"] == 1 << 30
    assert [s["name"] for s in data["stages"]] == ["scan", "chunk"]
    assert data["stages"][0]["source"] == "calibrated"
    assert data["stages"][1]["early"] is True
    assert data["download"]["source"] == "builtin"
    assert data["predicted_seconds"] > 0
    # Four objects at once: each gets a quarter of the connections, so it takes longer.
    shared = json.loads(_cli("estimate", "1GiB", "--in-flight", "4", "--json", env=env).stdout)
    alone = json.loads(_cli("estimate", "1GiB", "--json", env=env).stdout)
    assert shared["predicted_seconds"] > alone["predicted_seconds"]
    out = _cli("estimate", "1GiB", "--stage", "nope", env=env)
    assert out.returncode == 2 and "unknown stage" in out.stderr


def test_estimate_says_when_the_size_line_predicts(tmp_path: Path) -> None:
    from fastpipe._engine import default_stages

    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    m = TimeModel(path=str(tmp_path / "cache" / "fastpipe" / "model.json"))
    costs = tuple(stage_costs(default_stages()))
    for size in [64 * MiB, 256 * MiB, S] * 2:
        seconds = 0.02 + 1.5 * size / S
        obs = Observation(
            size,
            seconds,
            tuple((c, seconds / 2) for c in costs),
            download_key="download:raw",
            download_bytes=size,
            download_seconds=seconds / 2,
        )
        m.learn(obs)
    m.save()
    out = _cli("estimate", "512MiB", env=env)
    assert out.returncode == 0, out.stderr
    assert "about 0.8 s end to end" in out.stdout
    assert "alone: 6 lone objects of these stages lie on 0.02 s + 1.50 s/GiB" in out.stdout
    data = json.loads(_cli("estimate", "512MiB", "--json", env=env).stdout)
    assert data["size_line"]["objects"] == 6
    assert data["predicted_seconds"] == pytest.approx(0.02 + 0.75)
    # Beside others, the arithmetic of shares: no line.
    shared = json.loads(_cli("estimate", "512MiB", "--in-flight", "4", "--json", env=env).stdout)
    assert shared["size_line"] is None


# -- the engine's model: reports, learning, the state file, the end-to-end ETA ------------


class _SlowFile(FileStage):
    """A file stage after the download (not in order): its work is the tail."""

    name = "slowfile"

    def run(self, local: LocalFile) -> int:
        return local.size


def test_reports_carry_the_prediction_and_the_model(put_object: Any, tmp_path: Path) -> None:
    uri = put_object(os.urandom(5 * MiB))
    state = tmp_path / "model.json"
    config = Config(part_size=1 * MiB, model_path=str(state))

    async def main() -> list[Report]:
        async with Engine(config) as engine:
            return [await engine.process(uri, [Checksum(), Scan()]) for _ in range(2)]

    first, second = run_async(main)
    assert first.passed and second.passed
    assert first.predicted_seconds is not None and first.predicted_seconds > 0
    model = first.model
    assert model is not None and model["source"] == "builtin"
    assert model["predicted_seconds"] == first.predicted_seconds
    assert model["download"]["key"] == "download:raw"
    assert model["download"]["source"] == "builtin"
    assert [s["key"] for s in model["stages"]] == ["checksum:xxh3_128", "scan"]
    # The second object is predicted from the first one's timings.
    assert second.model is not None and second.model["source"] == "learned"
    assert second.model["objects"] == 1
    assert second.model["download"]["source"] == "learned"
    assert second.model["download"]["objects"] == 1
    assert all(s["source"] == "learned" and s["objects"] == 1 for s in second.model["stages"])
    json.dumps(second.to_dict())
    # Saved at close, 0600, with both objects.
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert TimeModel.load(str(state)).objects == 2


def test_eta_readings_are_kept_settled_and_learned(put_object: Any, tmp_path: Path) -> None:
    """With a progress callback, each report keeps the first raw ETA of each tenth of
    the bytes and what in fact remained; the model learns them, per group and tenth."""
    uri = put_object(os.urandom(8 * MiB))
    state = tmp_path / "model.json"
    config = Config(part_size=1 * MiB, model_path=str(state))

    async def main() -> list[Report]:
        async with Engine(config) as engine:
            return [
                await engine.process(uri, [Checksum()], progress=lambda event: None)
                for _ in range(MIN_ETA_READINGS + 1)
            ]

    reports = run_async(main)
    for report in reports:
        assert report.passed and report.model is not None
        eta = report.model["eta"]
        assert eta["group"] == eta_group(8 * MiB, shared=False)
        buckets = [b for b, _, _ in eta["readings"]]
        assert buckets and len(set(buckets)) == len(buckets)
        assert all(0 <= b < ETA_BUCKETS for b in buckets) and buckets[0] == 0
        for _, raw, actual in eta["readings"]:
            assert raw > 0 and 0 <= actual <= report.seconds
        json.dumps(report.to_dict())
    learned = TimeModel.load(str(state))
    group = reports[0].model["eta"]["group"]
    low, high = ETA_RATIO_BOUNDS
    ratios = [
        min(max(r.model["eta"]["readings"][0][2] / r.model["eta"]["readings"][0][1], low), high)
        for r in reports
    ]
    assert learned.eta_factors(group)[0] == pytest.approx(recent_median(ratios))


def test_no_state_file_with_an_empty_model_path(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "f.bin"
    source.write_bytes(os.urandom(MiB))
    report = fastpipe.run(str(source), [Scan()], config=Config(model_path=""))
    assert report.passed and report.model is not None
    assert report.model["download"] is None  # a local file is read in place
    assert not (tmp_path / "cache").exists()


def test_eta_includes_the_file_stages(put_object: Any) -> None:
    """At the end of the download the ETA still counts the file stage ahead."""
    size = 6 * MiB
    uri = put_object(os.urandom(size))
    events: list[fastpipe.Progress] = []
    report = fastpipe.run(
        uri, [Checksum(), _SlowFile()], config=Config(part_size=MiB), progress=events.append
    )
    assert report.passed
    download = [e for e in events if e.phase == "download"]
    assert download[0].eta_seconds is not None  # from the model, before the first byte
    assert download[-1].bytes_done == size
    assert download[-1].eta_seconds is not None and download[-1].eta_seconds > 0
    staged = [e for e in events if e.stage == "slowfile"]
    assert len(staged) == 2
    assert staged[0].eta_seconds is not None and staged[0].eta_seconds > 0
    assert staged[-1].eta_seconds == 0.0


def test_eta_weighs_the_prediction_until_the_object_has_run_its_predicted_time() -> None:
    """Early in an object the ETA leans on the prediction made before the first byte
    (less the seconds gone); its own pace counts for the fraction of the predicted time
    it has run, and alone once past it."""
    p = TimeModel({"download": 100 * MiB}).predict(100 * MiB, [])
    total = p.seconds
    assert total > 0
    # Nothing run yet: the prediction. Half of it run: halfway between the two ends.
    assert p.blend_eta(5.0, 0.0) == pytest.approx(total)
    half = p.blend_eta(5.0, total / 2)
    assert half == pytest.approx(0.5 * 5.0 + 0.5 * (total / 2))
    # Past the predicted time: the object's own ETA only.
    assert p.blend_eta(5.0, total * 1.5) == pytest.approx(5.0)
    assert p.blend_eta(0.0, 0.0) == 0.0  # nothing left is nothing left
    assert replace(p, seconds=0.0).blend_eta(5.0, 1.0) == 5.0
