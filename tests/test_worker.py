"""The queue-fed worker, end to end: real worker processes, SeaweedFS, moto's SQS server.

Each test makes its own queue (with a dead-letter queue) on the session's local SQS server,
uploads small objects, enqueues their events and runs ``fastpipe worker`` processes; the
fault proxy holds GETs where a test needs an object in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from faultproxy import Fault, FaultProxy, always

from fastpipe._events import s3_event

REPO_SRC = str(Path(__file__).resolve().parents[1] / "src")


def wait_until(cond: Callable[[], object], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.05)


class WorkerProc:
    """A ``fastpipe worker`` process whose stderr is collected by a thread."""

    def __init__(self, argv: list[str]) -> None:
        env = dict(os.environ, PYTHONPATH=REPO_SRC, PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastpipe.cli", "worker", *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float = 120.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


@pytest.fixture
def workers() -> Any:
    """Start worker processes; any still running at the end are killed."""
    started: list[WorkerProc] = []

    def start(*argv: str) -> WorkerProc:
        proc = WorkerProc(list(argv))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def queues(sqs_server: Any, s3_server: Any) -> tuple[str, str]:
    """A fresh queue (visibility 30 s) with a dead-letter queue after 2 receives."""
    return sqs_server.create_queue(f"q-{uuid.uuid4().hex[:12]}", dlq_max_receives=2)


def counts(sqs: Any, url: str) -> tuple[int, int]:
    attrs = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(
        attrs["ApproximateNumberOfMessagesNotVisible"]
    )


def results(*paths: Path) -> list[dict[str, Any]]:
    out = []
    for path in paths:
        if path.exists():
            out.extend(json.loads(line) for line in path.read_text().splitlines())
    return out


def put_event(sqs: Any, queue: str, s3_client: Any, bucket: str, key: str) -> dict[str, Any]:
    """Send the S3 event of an existing object (as S3 would); return the event."""
    head = s3_client.head_object(Bucket=bucket, Key=key)
    event = s3_event(bucket, key, size=head["ContentLength"], etag=head["ETag"])
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(event))
    return event


def put_object_event(
    sqs: Any, queue: str, s3_client: Any, bucket: str, prefix: str, body: bytes
) -> tuple[str, dict[str, Any]]:
    """Upload ``body`` under a fresh key below ``prefix`` and send its S3 event; return
    the key and the event."""
    key = f"{prefix}/{uuid.uuid4().hex}.bin"
    s3_client.put_object(Bucket=bucket, Key=key, Body=body)
    return key, put_event(sqs, queue, s3_client, bucket, key)


def temp_files(folder: Path) -> list[str]:
    """Temp files anywhere under ``folder`` (their names, and workers' folders, are hidden)."""
    return [
        os.path.join(root, name)
        for root, _dirs, names in os.walk(folder)
        for name in names
        if name.endswith(".fastpipe-tmp")
    ]


def metric(text: str, name: str, **labels: str) -> float:
    label = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{label}}}" if label else "")) + r" ([0-9.e+]+)"
    found = re.search(pattern, text)
    assert found, f"{name} {labels} not in metrics"
    return float(found.group(1))


def test_three_workers_give_one_result_per_object(
    sqs_server: Any, queues: tuple[str, str], s3_client: Any, bucket: str, tmp_path: Path,
    workers: Any
) -> None:
    queue, dlq = queues
    prefix = f"svc-{uuid.uuid4().hex[:8]}/"
    sizes = [0, 1, 100, 4096, 65536, 300_000, 1 << 20, 2 << 20] * 2
    keys = []
    for i, size in enumerate(sizes):
        key = f"{prefix}nested {i}/obj+{i} ünï.bin"
        s3_client.put_object(Bucket=bucket, Key=key, Body=os.urandom(size))
        keys.append(key)
    too_big = f"{prefix}too big.bin"
    s3_client.put_object(Bucket=bucket, Key=too_big, Body=os.urandom(3 << 20))
    keys.append(too_big)
    env = dict(os.environ, PYTHONPATH=REPO_SRC)
    sent = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "enqueue", f"s3://{bucket}/{prefix}",
         "--queue", queue],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert sent.returncode == 0, sent.stderr
    assert f"{len(keys)} message(s) sent" in sent.stderr
    files = [tmp_path / f"results-{n}.jsonl" for n in range(3)]
    dest = tmp_path / "kept"
    dest.mkdir()
    procs = [
        workers("--queue", queue, "--once", "--wait-seconds", "2", "--results", str(f),
                "--stage", "checksum", "--stage", "limits:max_size=2MiB",
                "--temp-dir", str(tmp_path), "--dest", str(dest), "--tag")
        for f in files
    ]
    for proc in procs:
        assert proc.wait() == 0, proc.stderr
    got = results(*files)
    by_key = Counter(r["key"] for r in got)
    assert by_key == Counter(keys), by_key
    verdicts = {r["key"]: (r["outcome"], r["failed_stage"]) for r in got}
    assert verdicts[too_big] == ("failed", "limits")
    assert all(verdicts[k] == ("passed", None) for k in keys if k != too_big)
    assert len({r["worker"] for r in got}) >= 1
    # --tag: each verdict is on its object, for the ETag that was read.
    failed_tags = object_tags(s3_client, bucket, too_big)
    assert failed_tags["fastpipe-status"] == "failed"
    assert failed_tags["fastpipe-stage"] == "limits"
    passed_tags = object_tags(s3_client, bucket, keys[4])
    assert passed_tags["fastpipe-status"] == "passed" and "fastpipe-stage" not in passed_tags
    assert passed_tags["fastpipe-etag"] == verdicts_etag(got, keys[4])
    sqs = sqs_server.client()
    assert counts(sqs, queue) == (0, 0)
    assert counts(sqs, dlq) == (0, 0)
    assert temp_files(tmp_path) == []
    # Each object that passed is kept under its key's last segment; the failed one is not.
    kept = sorted(p.name for p in dest.iterdir())
    assert kept == sorted(k.rsplit("/", 1)[1] for k in keys if k != too_big)
    for key in keys[:3]:
        body = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert (dest / key.rsplit("/", 1)[1]).read_bytes() == body


def object_tags(s3_client: Any, bucket: str, key: str) -> dict[str, str]:
    answer = s3_client.get_object_tagging(Bucket=bucket, Key=key)
    return {t["Key"]: t["Value"] for t in answer["TagSet"]}


def verdicts_etag(got: list[dict[str, Any]], key: str) -> str:
    [etag] = {r["etag"] for r in got if r["key"] == key}
    return str(etag)


def test_tagged_object_is_skipped_by_a_fresh_worker(
    sqs_server: Any, queues: tuple[str, str], s3_client: Any, bucket: str, tmp_path: Path,
    workers: Any
) -> None:
    queue, dlq = queues
    sqs = sqs_server.client()
    done = f"tag/{uuid.uuid4().hex}-done.bin"
    stale = f"tag/{uuid.uuid4().hex}-stale.bin"
    for key in (done, stale):
        s3_client.put_object(Bucket=bucket, Key=key, Body=os.urandom(5000))
    first = put_event(sqs, queue, s3_client, bucket, done)
    out_a = tmp_path / "a.jsonl"
    a = workers("--queue", queue, "--once", "--wait-seconds", "1", "--results", str(out_a),
                "--tag", "--temp-dir", str(tmp_path))
    assert a.wait() == 0, a.stderr
    assert [r["key"] for r in results(out_a)] == [done]
    assert object_tags(s3_client, bucket, done)["fastpipe-status"] == "passed"
    # A verdict for another ETag (an older version's) does not count.
    s3_client.put_object_tagging(Bucket=bucket, Key=stale, Tagging={"TagSet": [
        {"Key": "fastpipe-status", "Value": "passed"},
        {"Key": "fastpipe-etag", "Value": "0123456789abcdef0123456789abcdef"},
    ]})
    # The same event again, to a fresh worker whose results file is empty: the tags,
    # not its memory, tell it the object is done.
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(first))
    put_event(sqs, queue, s3_client, bucket, stale)
    out_b = tmp_path / "b.jsonl"
    b = workers("--queue", queue, "--once", "--wait-seconds", "1", "--results", str(out_b),
                "--tag", "--temp-dir", str(tmp_path))
    assert b.wait() == 0, b.stderr
    assert "2 received, 2 deleted, 0 released, 1 skipped" in b.stderr
    assert [r["key"] for r in results(out_b)] == [stale]
    assert object_tags(s3_client, bucket, stale)["fastpipe-etag"] == verdicts_etag(
        results(out_b), stale
    )
    assert counts(sqs, queue) == (0, 0) and counts(sqs, dlq) == (0, 0)


def test_killed_worker_message_reappears_and_its_temp_file_is_removed(
    sqs_server: Any, s3_server: Any, proxy: FaultProxy, s3_client: Any, bucket: str,
    tmp_path: Path, workers: Any
) -> None:
    queue, _ = sqs_server.create_queue(f"kill-{uuid.uuid4().hex[:8]}", visibility_timeout=4)
    key, _ = put_object_event(
        sqs_server.client(), queue, s3_client, bucket, "kill", os.urandom(1 << 20)
    )
    temp = tmp_path / "temp"
    temp.mkdir()
    proxy.reset(always(Fault("hold")))
    first = workers("--queue", queue, "--endpoint-url", proxy.url, "--temp-dir", str(temp))
    wait_until(lambda: proxy.held() >= 1, what="the GET held at the proxy")
    wait_until(lambda: len(temp_files(temp)) == 1, what="the dead worker's temp file")
    left_behind = temp_files(temp)
    first.proc.send_signal(signal.SIGKILL)
    first.wait()
    proxy.reset(None)
    out = tmp_path / "results.jsonl"
    second = workers("--queue", queue, "--wait-seconds", "2", "--results", str(out),
                     "--temp-dir", str(temp), "-v")
    wait_until(lambda: len(results(out)) == 1, what="the result of the second worker")
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait() == 0, second.stderr
    assert "dead worker" in second.stderr
    [result] = results(out)
    assert (result["key"], result["outcome"]) == (key, "passed")
    assert result["receive_count"] >= 2  # the same message, handed out again
    assert not any(os.path.exists(p) for p in left_behind)
    assert os.listdir(temp) == []  # nothing of either worker remains
    assert counts(sqs_server.client(), queue) == (0, 0)


def test_killed_workers_temp_file_in_dest_is_removed_by_the_next_worker(
    sqs_server: Any, proxy: FaultProxy, s3_client: Any, bucket: str, tmp_path: Path,
    workers: Any
) -> None:
    queue, _ = sqs_server.create_queue(f"kdest-{uuid.uuid4().hex[:8]}", visibility_timeout=4)
    idle_queue, _ = sqs_server.create_queue(f"idle-{uuid.uuid4().hex[:8]}")
    body = os.urandom(1 << 20)
    key, _ = put_object_event(sqs_server.client(), queue, s3_client, bucket, "kdest", body)
    dest = tmp_path / "kept"
    dest.mkdir()
    proxy.reset(always(Fault("hold")))
    first = workers("--queue", queue, "--endpoint-url", proxy.url, "--dest", str(dest),
                    "--temp-dir", str(tmp_path))
    wait_until(lambda: proxy.held() >= 1, what="the GET held at the proxy")
    wait_until(lambda: len(temp_files(dest)) == 1, what="the temp file in dest")
    [partial] = temp_files(dest)
    # A worker that starts while the first one lives leaves its temp file alone.
    bystander = workers("--queue", idle_queue, "--once", "--wait-seconds", "1",
                        "--dest", str(dest), "--temp-dir", str(tmp_path))
    assert bystander.wait() == 0, bystander.stderr
    assert temp_files(dest) == [partial]
    first.proc.send_signal(signal.SIGKILL)
    first.wait()
    proxy.reset(None)
    assert temp_files(dest) == [partial]  # nothing of the dead worker removes it
    out = tmp_path / "results.jsonl"
    second = workers("--queue", queue, "--wait-seconds", "2", "--results", str(out),
                     "--dest", str(dest), "--temp-dir", str(tmp_path))
    wait_until(lambda: len(results(out)) == 1, what="the result of the next worker")
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait() == 0, second.stderr
    assert "removed 1 temp file(s) that dead runs left in" in second.stderr
    [result] = results(out)
    assert (result["key"], result["outcome"]) == (key, "passed")
    assert temp_files(dest) == []
    assert [p.name for p in dest.iterdir()] == [key.rsplit("/", 1)[1]]
    assert (dest / key.rsplit("/", 1)[1]).read_bytes() == body


def test_heartbeat_keeps_a_slow_object_with_one_worker(
    sqs_server: Any, proxy: FaultProxy, s3_client: Any, bucket: str, tmp_path: Path,
    workers: Any
) -> None:
    queue, _ = sqs_server.create_queue(f"beat-{uuid.uuid4().hex[:8]}", visibility_timeout=3)
    key, _ = put_object_event(
        sqs_server.client(), queue, s3_client, bucket, "beat", os.urandom(256 << 10)
    )
    proxy.reset(always(Fault("hold")))
    out = tmp_path / "results.jsonl"
    # Two slots: a message that became visible again would be received by this worker too.
    proc = workers("--queue", queue, "--endpoint-url", proxy.url, "--once", "--wait-seconds",
                   "1", "--max-objects", "2", "--results", str(out), "--temp-dir", str(tmp_path))
    wait_until(lambda: proxy.held() >= 1, what="the GET held at the proxy")
    # The object takes about 12 s, four visibility timeouts.
    timer = threading.Timer(12.0, proxy.release)
    timer.start()
    try:
        assert proc.wait() == 0, proc.stderr
    finally:
        timer.cancel()
    [result] = results(out)
    assert result["outcome"] == "passed"
    assert result["receive_count"] == 1
    assert "1 received, 1 deleted, 0 released" in proc.stderr
    assert len(proxy.gets()) == 1  # processed once
    assert counts(sqs_server.client(), queue) == (0, 0)


def test_malformed_message_goes_to_the_dlq_and_metrics_match_results(
    sqs_server: Any, queues: tuple[str, str], s3_client: Any, bucket: str, tmp_path: Path,
    workers: Any
) -> None:
    from fastpipe.tools.locals3 import free_ports

    queue, dlq = queues
    sqs = sqs_server.client()
    sqs.set_queue_attributes(QueueUrl=queue, Attributes={"VisibilityTimeout": "1"})
    keys = [f"m/{uuid.uuid4().hex}-{i}.bin" for i in range(3)]
    for i, key in enumerate(keys):
        s3_client.put_object(Bucket=bucket, Key=key, Body=os.urandom(1000 * (i + 1)))
    events = [put_event(sqs, queue, s3_client, bucket, key) for key in keys]
    sqs.send_message(QueueUrl=queue, MessageBody="this is not an S3 event")
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps({"Event": "s3:TestEvent"}))
    out = tmp_path / "results.jsonl"
    (port,) = free_ports(1)
    proc = workers("--queue", queue, "--wait-seconds", "1", "--results", str(out),
                   "--metrics-port", str(port), "--stage", "checksum",
                   "--stage", "limits:max_size=2000", "--temp-dir", str(tmp_path),
                   "--disk-budget", "64MiB")
    wait_until(lambda: len(results(out)) == 3, what="three results")
    wait_until(lambda: counts(sqs, dlq)[0] == 1, what="the malformed message in the DLQ")
    [moved] = sqs.receive_message(QueueUrl=dlq, WaitTimeSeconds=1)["Messages"]
    assert moved["Body"] == "this is not an S3 event"
    assert proc.proc.poll() is None  # the worker keeps running
    # A duplicate delivery of an object already done is acknowledged, not processed.
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(events[0]))

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())

    wait_until(lambda: metric(scrape(), "fastpipe_messages_total", action="skipped") >= 2,
               what="the test event and the duplicate counted as skipped")
    wait_until(lambda: counts(sqs, queue) == (0, 0), what="an empty queue")
    text = scrape()
    got = results(out)
    assert len(got) == 3  # the duplicate wrote nothing
    outcomes = Counter(r["outcome"] for r in got)
    assert outcomes == {"passed": 2, "failed": 1}
    assert metric(text, "fastpipe_objects_total", outcome="passed") == 2
    assert metric(text, "fastpipe_objects_total", outcome="failed") == 1
    assert metric(text, "fastpipe_bytes_total") == sum(r["download"]["bytes"] for r in got)
    assert metric(text, "fastpipe_object_seconds_count") == 3
    predicted = sum(1 for r in got if r.get("predicted_seconds") is not None)
    assert predicted >= 2  # every object that got past HEAD
    assert metric(text, "fastpipe_predicted_seconds_count") == predicted
    assert metric(text, "fastpipe_prediction_ratio_count") == predicted
    assert metric(text, "fastpipe_messages_total", action="deleted") == 5  # 3 + test + dup
    assert metric(text, "fastpipe_messages_total", action="left") >= 2
    assert metric(text, "fastpipe_objects_in_flight") == 0
    assert metric(text, "fastpipe_retries_total") == sum(r["download"]["retries"] for r in got)
    assert metric(text, "fastpipe_admission_seconds_count") == 3
    assert metric(text, "fastpipe_admission_seconds_sum") == pytest.approx(
        sum(r["queued_seconds"] for r in got), abs=1e-6
    )
    assert metric(text, "fastpipe_disk_budget_bytes") == 64 << 20
    assert metric(text, "fastpipe_disk_budget_used_bytes") == 0  # nothing in flight
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.stderr


def test_sigterm_drains_two_objects_in_flight(
    sqs_server: Any, queues: tuple[str, str], proxy: FaultProxy, s3_client: Any, bucket: str,
    tmp_path: Path, workers: Any
) -> None:
    queue, _ = queues
    sqs = sqs_server.client()
    keys = [f"drain/{uuid.uuid4().hex}-{i}.bin" for i in range(2)]
    for key in keys:
        s3_client.put_object(Bucket=bucket, Key=key, Body=os.urandom(100_000))
        put_event(sqs, queue, s3_client, bucket, key)
    proxy.reset(always(Fault("hold")))
    out = tmp_path / "results.jsonl"
    from fastpipe.tools.locals3 import free_ports

    (port,) = free_ports(1)
    proc = workers("--queue", queue, "--endpoint-url", proxy.url, "--max-objects", "2",
                   "--drain-timeout", "120", "--results", str(out), "--temp-dir", str(tmp_path),
                   "--metrics-port", str(port))
    wait_until(lambda: proxy.held() >= 2, what="both GETs held")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    assert metric(text, "fastpipe_objects_in_flight") == 2
    assert metric(text, "fastpipe_disk_budget_used_bytes") == 200_000  # both temp files
    proc.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "draining" in proc.stderr, what="the worker draining")
    proxy.release()
    assert proc.wait() == 0, proc.stderr
    got = results(out)
    assert sorted(r["key"] for r in got) == sorted(keys)
    assert all(r["outcome"] == "passed" for r in got)
    assert counts(sqs, queue) == (0, 0)
    assert temp_files(tmp_path) == []


def test_drain_timeout_releases_the_message_and_removes_the_temp_file(
    sqs_server: Any, queues: tuple[str, str], proxy: FaultProxy, s3_client: Any, bucket: str,
    tmp_path: Path, workers: Any
) -> None:
    queue, _ = queues
    sqs = sqs_server.client()
    key, _ = put_object_event(sqs, queue, s3_client, bucket, "drain", os.urandom(1 << 20))
    proxy.reset(always(Fault("hold")))
    out = tmp_path / "results.jsonl"
    proc = workers("--queue", queue, "--endpoint-url", proxy.url, "--drain-timeout", "0.5",
                   "--results", str(out), "--temp-dir", str(tmp_path))
    wait_until(lambda: proxy.held() >= 1, what="the GET held")
    wait_until(lambda: len(temp_files(tmp_path)) == 1, what="the temp file")
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 0, proc.stderr
    assert temp_files(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]
    assert results(out) == []
    # Visible again at once (the queue's own timeout is 30 s): no wait needed.
    [message] = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=0)["Messages"]
    assert key.split("/")[1] in message["Body"]


def test_second_signal_stops_at_once(
    sqs_server: Any, queues: tuple[str, str], proxy: FaultProxy, s3_client: Any, bucket: str,
    tmp_path: Path, workers: Any
) -> None:
    queue, _ = queues
    sqs = sqs_server.client()
    key, _ = put_object_event(sqs, queue, s3_client, bucket, "abort", os.urandom(1000))
    proxy.reset(always(Fault("hold")))
    proc = workers("--queue", queue, "--endpoint-url", proxy.url, "--drain-timeout", "600",
                   "--temp-dir", str(tmp_path))
    wait_until(lambda: proxy.held() >= 1, what="the GET held")
    proc.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "draining" in proc.stderr, what="the worker draining")
    proc.proc.send_signal(signal.SIGINT)
    assert proc.wait() == 130, proc.stderr
    assert temp_files(tmp_path) == []
    # Not released: the message stays invisible until its visibility timeout.
    assert counts(sqs, queue) == (0, 1)


def test_stale_event_gone_object_results_queue_and_enqueue_from_file(
    sqs_server: Any, queues: tuple[str, str], s3_client: Any, bucket: str, tmp_path: Path,
    workers: Any
) -> None:
    queue, _ = queues
    sqs = sqs_server.client()
    results_queue, _ = sqs_server.create_queue(f"res-{uuid.uuid4().hex[:8]}")
    key = f"stale/{uuid.uuid4().hex} a+b.bin"
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"first")
    put_event(sqs, queue, s3_client, bucket, key)  # announces the first ETag
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"second, newer")
    gone = f"stale/{uuid.uuid4().hex}-gone.bin"
    listing = tmp_path / "list.txt"
    listing.write_text(f"# objects to check\n\ns3://{bucket}/{gone}\n")
    env = dict(os.environ, PYTHONPATH=REPO_SRC)
    sent = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "enqueue", "--from", str(listing),
         "--queue", queue],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert sent.returncode == 0, sent.stderr
    out = tmp_path / "results.jsonl"
    proc = workers("--queue", queue, "--once", "--wait-seconds", "1", "--results", str(out),
                   "--results-queue", results_queue, "--temp-dir", str(tmp_path))
    assert proc.wait() == 0, proc.stderr
    got = {r["key"]: r for r in results(out)}
    assert set(got) == {key, gone}
    stale = got[key]
    assert stale["outcome"] == "passed" and stale["newer_than_event"] is True
    assert "newer than the event" in stale["note"]
    assert stale["size"] == len(b"second, newer")
    assert got[gone]["outcome"] == "gone"
    assert got[gone]["error_type"] == "ObjectNotFound"
    assert counts(sqs, queue) == (0, 0)
    answer = sqs.receive_message(QueueUrl=results_queue, MaxNumberOfMessages=10,
                                 WaitTimeSeconds=1)
    sent_results = {json.loads(m["Body"])["key"] for m in answer["Messages"]}
    assert sent_results == {key, gone}


def test_enqueue_from_a_missing_file_or_with_bad_lines_names_the_file_and_the_cause(
    sqs_server: Any, queues: tuple[str, str], bucket: str, tmp_path: Path
) -> None:
    queue, _ = queues
    env = dict(os.environ, PYTHONPATH=REPO_SRC)

    def enqueue(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fastpipe.cli", "enqueue", "--from", str(path),
             "--queue", queue],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )

    missing = tmp_path / "no-such-list.txt"
    sent = enqueue(missing)
    assert sent.returncode == 2 and "Traceback" not in sent.stderr
    assert f"fastpipe: error: --from {missing}: cannot read: No such file" in sent.stderr
    # Bad lines are reported (file, line, cause) and skipped, as by run --from; the rest
    # is sent and the exit code says a line was bad.
    listing = tmp_path / "list.txt"
    listing.write_text(f"s3://{bucket}/a.bin\n/local/path\ns3://x/bad\n\ns3://{bucket}/b.bin\n")
    sent = enqueue(listing)
    assert sent.returncode == 2, sent.stderr
    assert "Traceback" not in sent.stderr
    assert f"fastpipe: error: {listing} line 2: not an s3:// URI: '/local/path'" in sent.stderr
    assert f"fastpipe: error: {listing} line 3: malformed S3 URI" in sent.stderr
    assert "2 message(s) sent, 2 bad line(s) skipped" in sent.stderr
    assert counts(sqs_server.client(), queue) == (2, 0)


@pytest.mark.parametrize(
    ("fault", "summary"),
    [
        # Retries exhausted: visible again after a backoff (not at once, not deleted).
        (
            Fault("error", status=503, code="SlowDown"),
            "0 deleted, 1 released, 0 skipped, 0 left",
        ),
        # Access denied: left for the visibility timeout and the redrive policy.
        (
            Fault("error", status=403, code="AccessDenied"),
            "0 deleted, 0 released, 0 skipped, 1 left",
        ),
    ],
    ids=["retries-exhausted", "access-denied"],
)
def test_transient_and_denied_outcomes_keep_the_message(
    sqs_server: Any, queues: tuple[str, str], proxy: FaultProxy, s3_client: Any, bucket: str,
    tmp_path: Path, workers: Any, fault: Fault, summary: str
) -> None:
    queue, _ = queues
    sqs = sqs_server.client()
    key, _ = put_object_event(sqs, queue, s3_client, bucket, "keep", os.urandom(1000))
    proxy.reset(always(fault))
    out = tmp_path / "results.jsonl"
    proc = workers("--queue", queue, "--endpoint-url", proxy.url, "--once", "--wait-seconds",
                   "1", "--max-attempts", "1", "--results", str(out), "--temp-dir", str(tmp_path))
    assert proc.wait() == 0, proc.stderr
    assert summary in proc.stderr
    assert results(out) == []
    assert counts(sqs, queue) == (0, 1)  # kept, invisible for now
    assert temp_files(tmp_path) == []


def test_temp_folder_of_a_live_worker_is_kept_and_a_dead_ones_removed(tmp_path: Path) -> None:
    from fastpipe._worker import _TempFolder

    alive, dead = _TempFolder(str(tmp_path)), _TempFolder(str(tmp_path))
    assert alive.claim() == [] and dead.claim() == []
    Path(alive.path, ".fastpipe-a.fastpipe-tmp").write_bytes(b"x")
    Path(dead.path, ".fastpipe-b.fastpipe-tmp").write_bytes(b"y")
    assert dead._lock_fd is not None
    os.close(dead._lock_fd)  # what the kernel does when a process dies: the flock goes
    dead._lock_fd = None
    newcomer = _TempFolder(str(tmp_path))
    assert newcomer.claim() == [dead.path]
    assert temp_files(tmp_path) == [os.path.join(alive.path, ".fastpipe-a.fastpipe-tmp")]
    for folder in (alive, newcomer):
        folder.release()
    assert os.listdir(tmp_path) == []


@pytest.mark.anyio
async def test_library_worker_in_the_callers_event_loop(
    sqs_server: Any, queues: tuple[str, str], s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    import anyio

    import fastpipe

    queue, _ = queues
    sqs = sqs_server.client()
    key, _ = put_object_event(sqs, queue, s3_client, bucket, "lib", b"library")
    sink = fastpipe.JsonLinesSink(tmp_path / "r.jsonl")
    worker = fastpipe.Worker(queue, ["checksum:algo=sha256"], sinks=[sink], wait_seconds=1,
                             temp_dir=tmp_path)
    async with anyio.create_task_group() as tg:

        async def stop_when_done() -> None:
            while not (tmp_path / "r.jsonl").read_text():
                await anyio.sleep(0.05)
            worker.stop()

        tg.start_soon(stop_when_done)
        with anyio.fail_after(60):
            stats = await worker.run()
    await sink.aclose()
    assert stats.deleted == 1 and stats.outcomes == {"passed": 1}
    [result] = results(tmp_path / "r.jsonl")
    assert result["stages"][0]["result"]["hexdigest"] == hashlib.sha256(b"library").hexdigest()


@pytest.mark.anyio
async def test_worker_default_disk_budget_is_measured_where_its_temp_files_go(
    sqs_server: Any, queues: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`worker --dest` makes its temp files in dest, `--temp-dir` in a folder of its own
    under it: the default disk budget reads that file system's free space, not /tmp's."""
    import fastpipe
    from fastpipe import _budgets

    measured: list[tuple[str, int]] = []
    real = _budgets.default_disk_budget

    def spy(folder: Any = None) -> int:
        measured.append((os.fspath(folder), real(folder)))
        return measured[-1][1]

    monkeypatch.setattr(_budgets, "default_disk_budget", spy)
    queue, _ = queues
    dest, temp = tmp_path / "dest", tmp_path / "temp"
    dest.mkdir()
    temp.mkdir()
    for kwargs in ({"dest": dest, "temp_dir": temp}, {"temp_dir": temp}):
        engine = fastpipe.Engine()
        try:
            worker = fastpipe.Worker(queue, engine=engine, wait_seconds=1, once=True, **kwargs)
            await worker.run()  # an empty queue: it ends after one long poll
            [(folder, value)] = measured
            # dest itself; else the worker's own folder under temp_dir.
            where = Path(folder) if "dest" in kwargs else Path(folder).parent
            assert where == (dest if "dest" in kwargs else temp), folder
            assert engine.budgets.disk_budget == value
        finally:
            await engine.aclose()
        measured.clear()


@pytest.mark.anyio
async def test_library_worker_reads_its_results_file_when_it_runs(
    sqs_server: Any, queues: tuple[str, str], s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    import fastpipe

    queue, _ = queues
    sqs = sqs_server.client()
    key, event = put_object_event(sqs, queue, s3_client, bucket, "lib", b"done once")
    out = tmp_path / "r.jsonl"

    async def run_once() -> Any:
        sink = fastpipe.JsonLinesSink(out)
        worker = fastpipe.Worker(queue, sinks=[sink], wait_seconds=1, once=True,
                                 temp_dir=tmp_path, results_file=out)
        try:
            return await worker.run()
        finally:
            await sink.aclose()

    first = await run_once()
    assert first.outcomes == {"passed": 1}
    # A restarted worker remembers what the file holds: the redelivery is acknowledged.
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(event))
    second = await run_once()
    assert (second.skipped, second.deleted, second.outcomes) == (1, 1, {})
    assert len(results(out)) == 1
    # A results file that cannot be read is a usage error when the worker starts.
    temp = tmp_path / "t"
    temp.mkdir()
    worker = fastpipe.Worker(queue, wait_seconds=1, once=True, temp_dir=temp,
                             results_file=tmp_path)
    with pytest.raises(fastpipe.UsageError, match="results file"):
        await worker.run()
    assert os.listdir(temp) == []  # no temp folder was claimed


def test_library_worker_stages_are_checked_as_process_many_checks_them(
    sqs_server: Any, queues: tuple[str, str], tmp_path: Path
) -> None:
    import fastpipe
    from fastpipe.stages import Checksum

    queue, _ = queues
    with pytest.raises(fastpipe.UsageError, match="Worker got a stage instance .* factory"):
        fastpipe.Worker(queue, [Checksum()], temp_dir=tmp_path)
    with pytest.raises(fastpipe.UsageError, match="not a stage spec or stage class: 3"):
        fastpipe.Worker(queue, [3], temp_dir=tmp_path)  # type: ignore[list-item]
    with pytest.raises(fastpipe.UsageError, match="no-such-stage"):
        fastpipe.Worker(queue, ["no-such-stage"], temp_dir=tmp_path)
    fastpipe.Worker(queue, [Checksum, "verify"], temp_dir=tmp_path)  # classes and specs


def test_missing_queue_and_bad_arguments_are_one_line_errors(
    sqs_server: Any, s3_server: Any, tmp_path: Path, workers: Any
) -> None:
    queue = f"{sqs_server.endpoint_url}/123456789012/no-such-queue-{uuid.uuid4().hex[:8]}"
    proc = workers("--queue", queue, "--once", "--temp-dir", str(tmp_path))
    assert proc.wait() == 3, proc.stderr
    assert proc.stderr.startswith("fastpipe: error: ") and "Traceback" not in proc.stderr
    assert queue in proc.stderr and "GetQueueAttributes" in proc.stderr
    assert os.listdir(tmp_path) == []  # its temp folder and lock are gone
    proc = workers("--queue", queue, "--wait-seconds", "30")
    assert proc.wait() == 2 and "--wait-seconds" in proc.stderr
