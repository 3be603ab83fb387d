"""Checksum + scan + chunk of one object: overlapped against the two baselines.

    PYTHONPATH=src python -m pytest benches/bench_pipeline.py -p no:cacheprovider \\
        --benchmark-columns=min,median,max

``overlapped``: one fastpipe pass (checksum and scan while the bytes arrive, chunk on the
local file). ``sequential``: fastpipe downloads to a file, then each stage runs over it in
turn. ``three_services``: each stage downloads the object itself (queue latency left
out, so a lower bound of that design). All three run in this process through the library
(:mod:`fastpipe.tools.bench`, the functions ``fastpipe bench`` runs in a process each).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fastpipe.tools.bench import run_overlapped, run_sequential, run_three_services

pytestmark = pytest.mark.benchmark(group="pipeline")


def _chunk_result(report: Any) -> dict[str, Any]:
    result: dict[str, Any] = report.stage("chunk").result
    return result


def test_pipeline_overlapped(bench: Any, bench_object: Any) -> None:
    report = bench(
        lambda: run_overlapped(bench_object.uri, bench_object.config), setup=os.sync, baseline=True
    )
    assert report.passed
    assert _chunk_result(report)["chunks"] > 0


def test_pipeline_sequential(bench: Any, bench_object: Any, tmp_path: Path) -> None:
    reports = bench(
        lambda: run_sequential(bench_object.uri, str(tmp_path), bench_object.config),
        setup=os.sync,
    )
    assert [r.passed for r in reports] == [True] * 4
    assert not list(tmp_path.iterdir())  # the downloaded file is removed


def test_pipeline_three_services(bench: Any, bench_object: Any) -> None:
    reports = bench(
        lambda: run_three_services(bench_object.uri, bench_object.config), setup=os.sync
    )
    assert [r.passed for r in reports] == [True] * 3
