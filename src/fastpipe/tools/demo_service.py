"""``fastpipe demo service``: the queue-fed service on a laptop, no AWS account needed.

Starts the embedded S3 (SeaweedFS) and a local SQS (moto's server), creates a queue with a
dead-letter queue, uploads a dozen objects of mixed sizes (one that fails a stage), sends
their S3 events and one malformed message, runs two ``fastpipe worker`` processes until
the queue is empty, then prints one line per object, the dead-letter queue's content and
a metrics summary.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

from .. import s3_event
from .._console import format_size, printable, write_stdout
from ._procs import stop_workers
from .locals3 import LocalS3, free_ports
from .localsqs import LocalSQS

BUCKET = "fastpipe-demo-service"
STAGES = ["checksum:algo=sha256", "scan:max_run=1048576"]
#: The object that fails: a long run of zeros trips ``scan:max_run``.
FAILING_KEY = "incoming/zeros.bin"


def demo_sizes(largest: int) -> list[int]:
    """Twelve sizes from 0 bytes up to ``largest``, spread on a log scale."""
    sizes = [0, 1]
    while len(sizes) < 11:
        sizes.append(max(2, largest >> (2 * (11 - len(sizes)))))
    return sizes + [largest]


def run_demo_service(largest: int = 32 << 20, timeout: float = 120.0) -> int:
    """Run the demo; return 0 when every object got its expected verdict."""
    with (
        LocalS3() as s3,
        s3.exported_env(),
        LocalSQS() as sqs_server,
        tempfile.TemporaryDirectory(prefix="fastpipe-demo-service-") as tmp,
    ):
        write_stdout(
            f"local S3 (SeaweedFS) at {s3.endpoint_url}, local SQS at {sqs_server.endpoint_url}"
        )
        queue, dlq = sqs_server.create_queue(
            "fastpipe-demo", visibility_timeout=5, dlq_max_receives=2
        )
        assert dlq is not None
        sqs = sqs_server.client()
        expected = _seed(s3.client(), sqs, queue, largest)
        write_stdout(
            f"uploaded {len(expected)} objects, sent their events and one malformed "
            "message; starting two workers"
        )
        ports = free_ports(2)
        results = [os.path.join(tmp, f"results-{n}.jsonl") for n in range(2)]
        procs = [_start_worker(queue, results[n], ports[n], tmp) for n in range(2)]
        try:
            _wait_empty(sqs, queue, dlq, timeout, procs)
            metrics = [_scrape(port) for port in ports]
        finally:
            stop_workers(procs)
        ok = _print_verdicts(expected, _read_results(results), results)
        dead = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        bodies = [m["Body"] for m in dead.get("Messages", [])]
        write_stdout(
            f"dead-letter queue: {len(bodies)} message(s): "
            + ", ".join(repr(printable(b)) for b in bodies)
        )
        ok = ok and bodies == ["a message that is not an S3 event"]
        _print_metrics(metrics)
        write_stdout("every object got its verdict" if ok else "some verdicts are missing")
        return 0 if ok else 1


def _seed(s3_client: Any, sqs: Any, queue: str, largest: int) -> dict[str, str]:
    """Upload the demo objects, send their events and a malformed message; the verdicts."""
    s3_client.create_bucket(Bucket=BUCKET)
    rng = random.Random(12)
    expected: dict[str, str] = {}
    for i, size in enumerate(demo_sizes(largest)):
        key = f"incoming/object {i:02d}.bin"
        s3_client.put_object(Bucket=BUCKET, Key=key, Body=rng.randbytes(size))
        expected[key] = "passed"
    s3_client.put_object(Bucket=BUCKET, Key=FAILING_KEY, Body=bytes(2 << 20))
    expected[FAILING_KEY] = "failed"
    for key in expected:
        head = s3_client.head_object(Bucket=BUCKET, Key=key)
        event = s3_event(BUCKET, key, size=head["ContentLength"], etag=head["ETag"])
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(event))
    sqs.send_message(QueueUrl=queue, MessageBody="a message that is not an S3 event")
    return expected


def _start_worker(queue: str, results: str, port: int, tmp: str) -> subprocess.Popen[bytes]:
    """One ``fastpipe worker`` process on the queue, with its results file and metrics."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    argv = [
        sys.executable, "-m", "fastpipe.cli", "worker", "--queue", queue,
        "--results", results, "--metrics-port", str(port),
        "--wait-seconds", "1", "--temp-dir", tmp,
    ]  # fmt: skip
    for spec in STAGES:
        argv += ["--stage", spec]
    return subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _read_results(results: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Every worker's results file, by key."""
    got: dict[str, dict[str, Any]] = {}
    for path in results:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    record = json.loads(line)
                    got[record["key"]] = record
    return got


def _print_verdicts(
    expected: dict[str, str], got: dict[str, dict[str, Any]], results: list[str]
) -> bool:
    """One line per object (worker, size, seconds, verdict); True when all are as expected."""
    write_stdout(f"{'worker':<10} {'size':>10} {'seconds':>8}  verdict  object")
    ok = True
    for key, verdict in expected.items():
        record = got.get(key)
        if record is None:
            ok = False
            write_stdout(f"{'-':<10} {'':>10} {'':>8}  missing  {printable(key)}")
            continue
        stage = record.get("failed_stage")
        shown = record["outcome"] + (f" ({stage})" if stage else "")
        ok = ok and record["outcome"] == verdict
        worker = "worker-" + str(1 + results.index(_which(results, key)))
        write_stdout(
            f"{worker:<10} {format_size(record['size'] or 0):>10} "
            f"{record['end_to_end_seconds']:>8.2f}  {shown:<7}  {printable(key)}"
        )
    return ok


def _print_metrics(metrics: Sequence[str]) -> None:
    """The two workers' metrics, summed by name and labels."""
    totals: dict[str, float] = {}
    for text in metrics:
        for name, labels, value in _samples(text):
            label = f"{name}{{{labels}}}" if labels else name
            totals[label] = totals.get(label, 0.0) + value
    write_stdout(
        "metrics (both workers): "
        + ", ".join(f"{name} {value:g}" for name, value in sorted(totals.items()))
    )


def _which(results: list[str], key: str) -> str:
    for path in results:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                if any(json.loads(line)["key"] == key for line in f):
                    return path
    return results[0]


def _wait_empty(
    sqs: Any, queue: str, dlq: str, timeout: float, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Until the queue holds nothing (visible or in flight) and the DLQ has the bad one."""
    deadline = time.monotonic() + timeout
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                _, err = proc.communicate()
                raise RuntimeError(f"a worker exited early:\n{err.decode(errors='replace')}")
        attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=names)["Attributes"]
        dead = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=names)["Attributes"]
        if sum(int(attrs[n]) for n in names) == 0 and int(dead[names[0]]) >= 1:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the queue was not empty after {timeout:.0f}s")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


_SAMPLE = re.compile(r"^(fastpipe_(?:objects_total|bytes_total|messages_total|retries_total))"
                     r"(?:\{([^}]*)\})? ([0-9.e+]+)$", re.MULTILINE)


def _samples(text: str) -> list[tuple[str, str, float]]:
    return [(m.group(1), m.group(2) or "", float(m.group(3))) for m in _SAMPLE.finditer(text)]
