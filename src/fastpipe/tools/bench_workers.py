"""``fastpipe bench --workers``: queue-fed workers against one queue, 1 and then 2 processes.

Uploads ``--objects`` objects of ``--object-size`` (default 32 x 64 MiB) to the embedded
S3 (or ``--endpoint-url``), starts a local SQS (moto's server) and, for each worker count,
a fresh queue and that many ``fastpipe worker`` processes (checksum + scan + chunk, the
pipeline of the other benches). Once every worker answers on its metrics port, the
objects' S3 events are sent at once and the clock runs until the results files hold one
result per object. It reports objects per second, aggregate GiB/s and the p50/p90 of the
enqueue-to-result latency (each result's ``end_to_end_seconds``, from SQS's
``SentTimestamp``), beside the in-process single-object rate of the same stages (what
``fastpipe run`` does with one object) for the "one worker >= 0.85x one object" check.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .. import s3_event
from .._console import format_size
from ._procs import stop_workers
from .bench import (
    CHUNK_AVG,
    DEFAULT_BUCKET,
    delete_keys,
    pipeline_stages,
    write_random,
)
from .locals3 import LocalS3, free_ports
from .localsqs import LocalSQS
from .machine import machine_info
from .predictability import quantile
from .s3 import ensure_bucket, s3_client, upload_file
from .shaping import Interrupted, signals_raise

#: The pipeline of the other benches, as worker ``--stage`` specs.
WORKER_STAGES = ["checksum", "scan", f"chunk:avg_size={CHUNK_AVG}"]
KEY_PREFIX = "fastpipe-bench/workers/"


@dataclass
class WorkersRun:
    """One worker count's figures."""

    workers: int
    objects: int
    object_size: int
    seconds: float
    objects_per_second: float
    gib_per_second: float
    latency_p50: float
    latency_p90: float


#: The ``q`` quantile (0..1) of values, linearly interpolated (the predictability bench's).
percentile = quantile


def upload_objects(
    endpoint_url: str | None, bucket: str, count: int, size: int, workdir: str
) -> list[str]:
    """Upload ``count`` random objects of ``size`` bytes; return their keys."""
    path = os.path.join(workdir, "object")
    keys = []
    client = s3_client(endpoint_url)  # one client for all (each costs tenths of a second)
    try:
        ensure_bucket(client, bucket)
        for i in range(count):
            write_random(path, size)
            key = f"{KEY_PREFIX}{i:03d}.bin"
            upload_file(client, path, bucket, key)
            keys.append(key)
    finally:
        client.close()
    os.remove(path)
    return keys


def single_object_rate(uri: str, endpoint_url: str | None, repeat: int = 3) -> float:
    """GiB/s of one object through one engine, same stages (median of ``repeat``, after
    one warm-up)."""
    import anyio

    from .. import Config, Engine

    rates: list[float] = []

    async def main() -> None:
        async with Engine(Config(endpoint_url=endpoint_url)) as engine:
            for round_ in range(repeat + 1):
                started = time.perf_counter()
                report = await engine.process(uri, pipeline_stages())
                if not report.passed:
                    raise RuntimeError(f"{uri}: {report.failed_stage or report.error}")
                if round_:
                    rates.append((report.size or 0) / (time.perf_counter() - started) / (1 << 30))

    anyio.run(main)
    return statistics.median(rates)


def run_workers(
    sqs_server: LocalSQS,
    endpoint_url: str | None,
    bucket: str,
    keys: Sequence[str],
    size: int,
    workers: int,
    workdir: str,
    max_objects: int = 2,
    timeout: float = 900.0,
) -> WorkersRun:
    """Start ``workers`` processes on a fresh queue, send the events of ``keys`` and time
    them until every object has its result."""
    queue, _dlq = sqs_server.create_queue(
        f"bench-{uuid.uuid4().hex[:10]}", visibility_timeout=60, dlq_max_receives=3
    )
    sqs = sqs_server.client()
    run_dir = tempfile.mkdtemp(prefix=f"workers-{workers}-", dir=workdir)
    results = [os.path.join(run_dir, f"results-{n}.jsonl") for n in range(workers)]
    ports = free_ports(workers)
    procs = [
        _start_worker(queue, endpoint_url, results[n], ports[n], run_dir, max_objects)
        for n in range(workers)
    ]
    try:
        deadline = time.monotonic() + 60
        for port in ports:  # the metrics server starts just before the worker's loop
            _wait(functools.partial(_answers, port), deadline, procs, "a worker's metrics port")
        started = time.monotonic()
        events = [json.dumps(s3_event(bucket, key, size=size)) for key in keys]
        for i in range(0, len(events), 10):
            entries = [
                {"Id": str(n), "MessageBody": body} for n, body in enumerate(events[i : i + 10])
            ]
            sqs.send_message_batch(QueueUrl=queue, Entries=entries)
        _wait(
            lambda: _count_lines(results) >= len(keys),
            started + timeout,
            procs,
            "every object's result",
            interval=0.02,
        )
        seconds = time.monotonic() - started
    finally:
        stop_workers(procs)
    got = _read_results(results)
    bad = [r["key"] for r in got if r["outcome"] != "passed"]
    if bad or sorted(r["key"] for r in got) != sorted(keys):
        raise RuntimeError(f"{workers} worker(s): unexpected results (not passed: {bad[:3]})")
    latencies = [float(r["end_to_end_seconds"]) for r in got]
    total = len(keys) * size
    return WorkersRun(
        workers=workers,
        objects=len(keys),
        object_size=size,
        seconds=round(seconds, 3),
        objects_per_second=len(keys) / seconds,
        gib_per_second=total / seconds / (1 << 30),
        latency_p50=percentile(latencies, 0.5),
        latency_p90=percentile(latencies, 0.9),
    )


def _start_worker(
    queue: str, endpoint_url: str | None, results: str, port: int, tmp: str, max_objects: int
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as an installed package runs
    argv = [
        sys.executable, "-m", "fastpipe.cli", "worker", "--queue", queue,
        "--results", results, "--metrics-port", str(port), "--wait-seconds", "1",
        "--temp-dir", tmp, "--max-objects", str(max_objects),
    ]  # fmt: skip
    if endpoint_url:
        argv += ["--endpoint-url", endpoint_url]
    for spec in WORKER_STAGES:
        argv += ["--stage", spec]
    return subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1):
            return True
    except OSError:
        return False


def _read_results(paths: Sequence[str]) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    for path in paths:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                got.extend(json.loads(line) for line in f)
    return got


def _count_lines(paths: Sequence[str]) -> int:
    total = 0
    for path in paths:
        if os.path.exists(path):
            with open(path, "rb") as f:
                total += f.read().count(b"\n")
    return total


def _wait(
    cond: Callable[[], bool],
    deadline: float,
    procs: Sequence[subprocess.Popen[bytes]],
    what: str,
    interval: float = 0.05,
) -> None:
    while not cond():
        for proc in procs:
            if proc.poll() is not None:
                _, err = proc.communicate()
                raise RuntimeError(f"a worker exited early:\n{err.decode(errors='replace')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)



def bench_workers(
    sqs_server: LocalSQS,
    endpoint_url: str | None,
    bucket: str,
    count: int,
    size: int,
    worker_counts: Sequence[int] = (1, 2),
    say: Callable[[str], None] = print,
    reference: bool = True,
) -> dict[str, Any]:
    """Upload the objects, measure the single-object rate (``reference``) and each worker
    count; return the figures (``runs``, ``single_object_gib_s``)."""
    with tempfile.TemporaryDirectory(prefix="fastpipe-bench-workers-") as workdir:
        say(f"uploading {count} x {format_size(size)}")
        keys = upload_objects(endpoint_url, bucket, count, size, workdir)
        single = None
        if reference:
            single = single_object_rate(f"s3://{bucket}/{keys[0]}", endpoint_url)
            say(f"one object in one engine: {single:.3f} GiB/s")
        runs = []
        for workers in worker_counts:
            run = run_workers(sqs_server, endpoint_url, bucket, keys, size, workers, workdir)
            say(format_run(run))
            runs.append(asdict(run))
    return {"runs": runs, "single_object_gib_s": single}


def format_run(run: WorkersRun) -> str:
    """One line of figures."""
    return (
        f"{run.workers} worker(s): {run.objects} x {format_size(run.object_size)} in "
        f"{run.seconds:.2f}s: {run.objects_per_second:.2f} objects/s, "
        f"{run.gib_per_second:.3f} GiB/s, enqueue-to-result p50 {run.latency_p50:.2f}s "
        f"p90 {run.latency_p90:.2f}s"
    )


def cmd_bench_workers(args: argparse.Namespace) -> int:
    """``fastpipe bench --workers``: the embedded S3 (unless ``--endpoint-url``) and a
    local SQS; prints the figures and writes them to ``--out``/workers.json (130/143/129
    on SIGINT/SIGTERM/SIGHUP, the servers and workers stopped)."""
    try:
        # SIGTERM and SIGHUP unwind like Ctrl-C: the workers and the servers go away.
        with signals_raise():
            return _bench(args)
    except Interrupted as exc:
        print(f"fastpipe bench: interrupted by {exc}", file=sys.stderr)
        return 128 + exc.signum


def _bench(args: argparse.Namespace) -> int:
    bucket = args.bucket or DEFAULT_BUCKET
    count, size = args.objects, args.object_size
    with LocalSQS() as sqs_server:
        if args.endpoint_url:
            data = bench_workers(sqs_server, args.endpoint_url, bucket, count, size)
            keys = [f"{KEY_PREFIX}{i:03d}.bin" for i in range(count)]
            delete_keys(args.endpoint_url, bucket, keys)
        else:
            with LocalS3() as s3, s3.exported_env():
                data = bench_workers(sqs_server, s3.endpoint_url, bucket, count, size)
    runs, single = data["runs"], data["single_object_gib_s"]
    if single and runs:
        ratio = runs[0]["gib_per_second"] / single
        print(f"one worker / one object in one engine: {ratio:.2f} (target >= 0.85)")
    if len(runs) > 1:
        ratio = runs[1]["gib_per_second"] / runs[0]["gib_per_second"]
        print(f"two workers / one worker: {ratio:.2f} (target >= 1.00)")
    os.makedirs(args.out, exist_ok=True)
    data["machine"] = machine_info()
    path = os.path.join(args.out, "workers.json")
    with tempfile.NamedTemporaryFile("w", dir=args.out, delete=False, suffix=".tmp") as f:
        try:
            json.dump(data, f, indent=2)
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)  # never half a file under the name
    return 0
