"""The bench's fit, `fastpipe estimate`, and the progress ETA prior it feeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import fastpipe
from fastpipe import _estimate
from fastpipe.stages import StreamStage

GiB = 1 << 30


def _results(path: Path, per_gib: float, intercept: float) -> None:
    runs = [
        {
            "variant": "fastpipe",
            "size": size,
            "seconds": intercept + per_gib * size / GiB,
            "peak_rss": 1 << 20,
        }
        for size in (64 << 20, 256 << 20, GiB)
    ]
    path.write_text(json.dumps({"runs": runs, "machine": {"cpu_count": 2}}))


def test_linear_fit_recovers_a_line() -> None:
    fit = _estimate.linear_fit([(GiB, 3.0), (2 * GiB, 5.0), (4 * GiB, 9.0)])
    assert fit is not None
    assert fit.per_gib == pytest.approx(2.0) and fit.intercept == pytest.approx(1.0)
    assert fit.r2 == pytest.approx(1.0)
    assert _estimate.linear_fit([(GiB, 1.0), (GiB, 2.0)]) is None  # one size: no line


def test_estimate_seconds_and_cli(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    assert _estimate.estimate_seconds(GiB, str(path)) is None
    _results(path, per_gib=1.5, intercept=0.5)
    assert _estimate.estimate_seconds(10 * GiB, str(path)) == pytest.approx(15.5)
    out = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "estimate", "10GiB", "--results", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "15.5" in out.stdout


def test_progress_eta_uses_the_bench_prior(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    results = Path(_estimate.default_results_path())
    results.parent.mkdir(parents=True)
    _results(results, per_gib=0.0, intercept=100.0)  # "100 s whatever the size"
    source = tmp_path / "f.bin"
    source.write_bytes(os.urandom(1 << 20))

    class Slow(StreamStage):
        name = "slow"

        def update(self, view: memoryview) -> None:
            time.sleep(0.6)  # keeps the first progress events at 0 bytes

        def finish(self) -> None:
            return None

    events: list[fastpipe.Progress] = []
    fastpipe.run(str(source), stages=[Slow()], progress=events.append)
    first = events[0]
    assert first.bytes_done == 0
    assert first.eta_seconds is not None and 90 < first.eta_seconds <= 100
