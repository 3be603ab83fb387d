"""The bench's fit; neither the engine's ETA nor `fastpipe estimate` reads bench results."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
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

    report = fastpipe.run(str(source), stages=[Slow()], progress=on_progress)
    first = events[0]
    assert first.bytes_done == 0
    # Before the first byte the ETA comes from the engine's time model (built-in rates
    # here: nothing learned in this cache), never from the bench's "100 s".
    assert report.model is not None and report.model["source"] == "builtin"
    assert first.eta_seconds is not None and first.eta_seconds < 100.0


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
        + ["--warmup", "0", "--variants", "fastpipe,sequential,fastpipe-library"]
        + ["--no-low-entropy"]
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
        (v, s)
        for v in ("fastpipe", "sequential", "fastpipe-library")
        for s in (1 << 20, 2 << 20)
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


def _run(variant: str, seconds: float, rate: int | None, size: int = GiB) -> dict[str, Any]:
    return {
        "variant": variant,
        "size": size,
        "seconds": seconds,
        "peak_rss": 1 << 20,
        "link_rate": rate,
    }


def test_targets_and_table_per_link_rate() -> None:
    """Shaped rates get the network-bound targets, with D = s5cmd and S = local-stages."""
    from fastpipe.tools.bench import check_targets, format_table

    rate = 2_400_000_000
    seconds = {
        "fastpipe": 4.0,
        "fastpipe-download": 3.9,
        "sequential": 4.5,
        "s5cmd": 3.6,
        "local-stages": 0.9,
        "three-services": 11.0,
    }
    runs = [_run(v, s, rate) for v, s in seconds.items()]
    runs += [_run("fastpipe", 1.5, None), _run("sequential", 1.8, None)]
    runs += [_run("fastpipe-library", 0.9, None), _run("s5cmd", 1.1, None)]
    checks = {name: (value, limit) for name, value, limit, _ in check_targets(runs)}
    at = "1.0 GiB at 2.4Gbit"
    assert checks[f"{at}: fastpipe / fastpipe-download"] == (pytest.approx(4.0 / 3.9), 1.05)
    bound = 3.6 / (3.6 + 0.9)
    (name,) = [n for n in checks if n.startswith(f"{at}: (fastpipe / sequential)")]
    assert checks[name] == (pytest.approx((4.0 / 4.5) / bound), 1.05)
    assert checks[f"{at}: fastpipe / three-services"] == (pytest.approx(4.0 / 11.0), 0.40)
    assert checks[f"{at}: fastpipe-download / s5cmd"] == (pytest.approx(3.9 / 3.6), 1.05)
    assert checks["1.0 GiB at unlimited: fastpipe / sequential"] == (pytest.approx(1.5 / 1.8), 0.8)
    assert checks["1.0 GiB at unlimited: fastpipe-library / s5cmd"] == (
        pytest.approx(0.9 / 1.1),
        0.85,
    )
    table = format_table(runs).splitlines()
    assert table[0].split()[0] == "link"
    assert [line.split()[0] for line in table[1:5]] == ["unlimited"] * 4
    assert {line.split()[0] for line in table[5:]} == {"2.4Gbit"}


needs_root_and_tc = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None, reason="shaping lo needs root and tc"
)


def _lo_root() -> str:
    out = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True)
    return " ".join(out.stdout.split()[:3])


@needs_root_and_tc
def test_tiny_bench_with_link_rates(tmp_path: Path) -> None:
    """Two link rates in one call: each run records its rate, lo is as before after."""
    before = _lo_root()
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "bench", "--sizes", "1MiB", "--repeat", "1"]
        + ["--warmup", "0", "--variants", "fastpipe,local-stages", "--no-low-entropy"]
        + ["--link-rate", "unlimited,800Mbit", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    assert "shaping lo: from port" in out.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["link_rates"] == [None, 800_000_000]
    assert sorted((r["variant"], r["link_rate"] or 0) for r in results["runs"]) == [
        ("fastpipe", 0),
        ("fastpipe", 800_000_000),
        ("local-stages", 0),
        ("local-stages", 800_000_000),
    ]
    assert all(r["exit_code"] == 0 and r["detail"].get("passed") for r in results["runs"])
    assert (tmp_path / "out" / "time_vs_size.png").stat().st_size > 0
    assert _lo_root() == before


@needs_root_and_tc
def test_sigterm_during_a_shaped_bench_cleans_up(tmp_path: Path) -> None:
    """SIGTERM while shaped: exit 143, lo as before, the embedded server stopped."""
    before = _lo_root()
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    argv = [sys.executable, "-m", "fastpipe.cli", "bench", "--sizes", "8MiB", "--repeat", "50"]
    argv += ["--warmup", "0", "--variants", "fastpipe", "--no-low-entropy"]
    argv += ["--link-rate", "800Mbit", "--out", str(tmp_path / "out")]
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stderr is not None
        endpoint = None
        for line in proc.stderr:
            if line.startswith("endpoint "):
                endpoint = line.split()[1].rstrip(",")
            if line.startswith("shaping lo:"):
                break
        assert endpoint is not None
        assert _lo_root().startswith("qdisc htb fa57:")
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        code = proc.wait(timeout=60)
    assert code == 143, rest
    assert "interrupted by SIGTERM" in rest
    assert _lo_root() == before
    port = int(endpoint.rsplit(":", 1)[1])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the server is gone


def _predictability(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`fastpipe bench --predictability` on 1 and 2 MiB objects, twice each, its output
    and the model's cache under ``tmp_path``."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "bench", "--predictability"]
        + ["--sizes", "1MiB,2MiB", "--repeat", "2", "--predict-warmup", "1"]
        + [*extra, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )


def test_predictability_section(tmp_path: Path) -> None:
    """`fastpipe bench --predictability` on tiny objects: the spread and error figures."""
    out = _predictability(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "p90/p50" in out.stdout and "eta_10" in out.stdout
    data = json.loads((tmp_path / "out" / "predictability.json").read_text())
    assert len(data["runs"]) == 4 and all(r["passed"] for r in data["runs"])
    assert all(r["predicted"] and r["model_source"] == "learned" for r in data["runs"])
    assert set(data["summary"]["sizes"]) == {str(1 << 20), str(2 << 20)}
    assert data["summary"]["errors"]["predicted"]["n"] == 4
    # One at a time, an ideal engine's times do not spread: no queue.
    ideal = data["summary"]["ideal"]
    assert [s["p90_over_p50"] for s in ideal.values()] == pytest.approx([1.0, 1.0])
    # The model learned into the bench's own state file, not the user's cache.
    assert (tmp_path / "out" / "model.json").exists()
    assert not (tmp_path / "cache" / "fastpipe" / "model.json").exists()


def test_predictability_in_flight(tmp_path: Path) -> None:
    """`--in-flight 2`: objects run two at once through one engine, each with its
    prediction, ETAs and actual time, and the prediction assumes the shared connections."""
    out = _predictability(tmp_path, "--in-flight", "2")
    assert out.returncode == 0, out.stderr
    assert "2 in flight" in out.stdout and "p90/p50" in out.stdout
    data = json.loads((tmp_path / "out" / "predictability.json").read_text())
    assert data["in_flight"] == 2
    runs = data["runs"]
    assert len(runs) == 4 and all(r["passed"] and r["seconds"] > 0 for r in runs)
    assert all(r["predicted"] for r in runs)
    # The first pair is admitted together: the later one's prediction (after its HEAD,
    # while the other still holds its slot) gets half of the connections.
    assert any(r["connection_share"] == 0.5 for r in runs)
    assert data["summary"]["errors"]["predicted"]["n"] == 4
    # The same calls through the ideal engine: the queue's spread, per size.
    assert set(data["summary"]["ideal"]) == {str(1 << 20), str(2 << 20)}
    assert data["disk_budget"] > 0 and data["max_objects"] == 8  # what it replayed with
    assert "through an ideal engine" in out.stdout


def test_predictability_shared_within_a_disk_budget(tmp_path: Path) -> None:
    """`--download-order shared --disk-budget`: the engine runs with both, the record
    says so, and the ideal engine replays the calls with the downloads shared."""
    out = _predictability(
        tmp_path, "--in-flight", "2", "--download-order", "shared", "--disk-budget", "3MiB"
    )
    assert out.returncode == 0, out.stderr
    assert "download order shared" in out.stdout
    data = json.loads((tmp_path / "out" / "predictability.json").read_text())
    assert data["download_order"] == "shared" and data["disk_budget"] == 3 << 20
    assert all(r["passed"] for r in data["runs"])
    assert set(data["summary"]["ideal"]) == {str(1 << 20), str(2 << 20)}
    assert "through an ideal engine" in out.stdout


def test_predictability_takes_one_link_rate(tmp_path: Path) -> None:
    out = _predictability(tmp_path, "--link-rate", "unlimited,800Mbit")
    assert out.returncode == 2 and "--predictability takes one --link-rate" in out.stderr


@needs_root_and_tc
def test_predictability_on_a_shaped_link(tmp_path: Path) -> None:
    """`--link-rate`: the objects run with the server's traffic shaped, the record says
    the rate, and lo is as before after."""
    before = _lo_root()
    out = _predictability(tmp_path, "--in-flight", "2", "--link-rate", "800Mbit")
    assert out.returncode == 0, out.stderr
    assert "shaping lo: from port" in out.stdout
    data = json.loads((tmp_path / "out" / "predictability.json").read_text())
    assert data["link_rate"] == 800_000_000 and all(r["passed"] for r in data["runs"])
    assert _lo_root() == before


def test_predictability_summary_arithmetic() -> None:
    from fastpipe.tools.predictability import quantile, summarize

    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == pytest.approx(4.6)
    runs = [
        {"size": 10, "seconds": s, "predicted": 2.0, "eta_10": 2.0, "eta_50": None}
        for s in (1.0, 2.0, 4.0)
    ]
    summary = summarize(runs)
    sizes = summary["sizes"]["10"]
    assert sizes["p50"] == 2.0 and sizes["max"] == 4.0
    assert sizes["p90_over_p50"] == pytest.approx(3.6 / 2.0)
    errors = summary["errors"]["predicted"]
    assert errors["median"] == pytest.approx(0.5) and errors["n"] == 3  # 1.0, 0.0, 0.5
    assert summary["errors"]["eta_50"] == {"n": 0, "median": None, "p90": None}
