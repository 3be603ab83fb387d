"""The workers bench's code path (``fastpipe bench --workers``) on tiny objects.

No timing is asserted: this only keeps the bench from rotting. It runs real worker
processes against the session's SeaweedFS and local SQS.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastpipe.tools.bench_workers import bench_workers, percentile


def test_percentile_interpolates() -> None:
    assert percentile([3.0], 0.9) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.9) == 4.6


def test_bench_workers_runs_one_then_two_workers(sqs_server: Any, s3_server: Any) -> None:
    bucket = f"bench-workers-{uuid.uuid4().hex[:8]}"
    lines: list[str] = []
    data = bench_workers(
        sqs_server, s3_server.endpoint_url, bucket, count=4, size=70_000, say=lines.append
    )
    runs = data["runs"]
    assert [r["workers"] for r in runs] == [1, 2]
    for run in runs:
        assert run["objects"] == 4 and run["object_size"] == 70_000
        assert run["seconds"] > 0 and run["objects_per_second"] > 0
        assert 0 < run["latency_p50"] <= run["latency_p90"]
    assert data["single_object_gib_s"] > 0
    assert any("2 worker(s): 4 x" in line for line in lines)
