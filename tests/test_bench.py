"""The bench's fit; neither the engine's ETA nor `fastpipe estimate` reads bench results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import fastpipe
from fastpipe.stages import StreamStage
from fastpipe.tools import fit as fitting

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
    fit = fitting.linear_fit([(GiB, 3.0), (2 * GiB, 5.0), (4 * GiB, 9.0)])
    assert fit is not None
    assert fit.per_gib == pytest.approx(2.0) and fit.intercept == pytest.approx(1.0)
    assert fit.r2 == pytest.approx(1.0)
    assert fitting.linear_fit([(GiB, 1.0), (GiB, 2.0)]) is None  # one size: no line


def test_estimate_seconds(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    assert fitting.estimate_seconds(GiB, str(path)) is None
    _results(path, per_gib=1.5, intercept=0.5)
    assert fitting.estimate_seconds(10 * GiB, str(path)) == pytest.approx(15.5)


def test_progress_eta_ignores_bench_results(tmp_path: Path, monkeypatch: Any) -> None:
    """A results file left in the cache does not change what the library reports."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    results = Path(fitting.default_results_path())
    results.parent.mkdir(parents=True)
    _results(results, per_gib=0.0, intercept=100.0)  # "100 s whatever the size"
    source = tmp_path / "f.bin"
    source.write_bytes(os.urandom(1 << 20))
    first_update = threading.Event()

    class Slow(StreamStage):
        name = "slow"

        def update(self, view: memoryview) -> None:
            # Hold the first bytes until a progress event was seen at 0 bytes.
            first_update.wait(30)

        def finish(self) -> None:
            return None

    events: list[fastpipe.Progress] = []

    def on_progress(event: fastpipe.Progress) -> None:
        events.append(event)
        first_update.set()

    fastpipe.run(str(source), stages=[Slow()], progress=on_progress)
    first = events[0]
    assert first.bytes_done == 0
    assert first.eta_seconds is None  # no rate yet, and no prior from the bench


def test_bench_help_lists_every_variant() -> None:
    from fastpipe.tools.bench import VARIANTS

    out = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "bench", "--help"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for name in VARIANTS:
        assert name in text


def test_bench_refuses_an_unknown_variant(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "bench", "--variants", "fastpipe,nope"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "unknown variant 'nope'" in out.stderr


def test_tiny_bench_end_to_end(tmp_path: Path) -> None:
    """`fastpipe bench` on its own embedded server; `fastpipe estimate` then still works
    (from the time model, not from the bench's results)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "bench", "--sizes", "1MiB,2MiB", "--repeat", "1"]
        + ["--warmup", "0", "--variants", "fastpipe,sequential", "--no-low-entropy"]
        + ["--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = results["runs"]
    assert {(r["variant"], r["size"]) for r in runs} == {
        (v, s) for v in ("fastpipe", "sequential") for s in (1 << 20, 2 << 20)
    }
    assert all(r["exit_code"] == 0 and r["detail"].get("passed") for r in runs)
    # The server's CPU time is measured through LocalS3.pid.
    assert all(r["server_cpu_seconds"] is not None for r in runs)
    estimate = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "estimate", "1GiB"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert estimate.returncode == 0, estimate.stderr
    assert "end to end" in estimate.stdout
