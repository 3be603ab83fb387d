"""Many objects from one engine: budgets measured from outside, map, sources, sinks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
from faultproxy import FaultProxy

import fastpipe
from fastpipe import Config, Engine, JsonLinesSink, Report
from fastpipe._placement import local_path_for_key, make_key_folders
from fastpipe._sinks import merge_tags
from fastpipe.stages import Checksum, FileStage, LocalFile

KiB, MiB = 1 << 10, 1 << 20


def run_cli(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


# -- keys to paths -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",
        "/abs/key",
        "a/../../b",
        "..",
        "a\\..\\..\\b",
        "nul\x00/ctl\x01\x1f/x",
        "x" * 400 + "/" + "y" * 300,
        "a//./b/",
        "",
        ".fastpipe-x.fastpipe-tmp",
        "sp ace/+plus/ünï/ok",
    ],
)
def test_key_paths_never_leave_the_folder(key: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    relative = local_path_for_key(key)
    assert not relative.startswith("/")
    for segment in relative.split("/"):
        assert segment not in ("", ".", "..")
        assert "\\" not in segment and not any(ord(c) < 32 for c in segment)
        assert len(segment.encode()) <= 255 and not segment.startswith(".")
    path = make_key_folders(str(root), relative)
    assert os.path.realpath(path).startswith(str(root) + os.sep)
    Path(path).write_bytes(b"x")  # the name fits the file system


def test_key_folders_refuse_a_planted_symlink(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a").symlink_to(outside)
    with pytest.raises(fastpipe.DestinationError):
        make_key_folders(str(root), "a/b")


# -- the CLI over a prefix -----------------------------------------------------------------


def _upload_tree(s3_client: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    names = [
        "a b/c+d.bin",
        "ünïcödé/файл.bin",
        "dots..here/x..y.bin",
        "deep/er/and/deeper/z.bin",
        "plus+plus/ sp .bin",
    ]
    sizes = [0, 1, 4095, 64 * KiB, 300 * KiB + 7, 1 * MiB, 3 * MiB + 5, 17]
    objects: dict[str, bytes] = {}
    for i in range(40):
        name = names[i % len(names)].replace(".bin", f"-{i}.bin")
        key = f"{prefix}{name}"
        data = os.urandom(sizes[i % len(sizes)])
        s3_client.put_object(Bucket=bucket, Key=key, Body=data)
        objects[key] = data
    return objects


def test_recursive_keeps_every_object_under_dest(
    s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    prefix = f"tree-{uuid.uuid4().hex[:8]}/"
    objects = _upload_tree(s3_client, bucket, prefix)
    s3_client.put_object(Bucket=bucket, Key=prefix.rstrip("/") + "-sibling", Body=b"not me")
    dest, results = tmp_path / "dest", tmp_path / "results.jsonl"
    dest.mkdir()
    proc = run_cli(
        "run",
        f"s3://{bucket}/{prefix}",
        "--recursive",
        "--dest",
        str(dest),
        "--json",
        "--results",
        str(results),
        "--max-objects",
        "4",
        "--part-size",
        "256KiB",
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 40 and all(r["passed"] and r["exit_code"] == 0 for r in lines)
    assert {r["source"] for r in lines} == {f"s3://{bucket}/{k}" for k in objects}
    assert "objects 40, passed 40, failed 0, errors 0" in proc.stderr
    assert len(results.read_text().splitlines()) == 40
    for key, data in objects.items():
        assert (dest / local_path_for_key(key)).read_bytes() == data, key
    kept = {p for p in dest.rglob("*") if p.is_file()}
    assert len(kept) == 40  # no temp file left, nothing else
    outside = {p for p in tmp_path.rglob("*") if p.is_file() and dest not in p.parents}
    assert outside == {results}


def test_filters_and_text_output(s3_client: Any, bucket: str) -> None:
    prefix = f"filt-{uuid.uuid4().hex[:8]}/"
    for name in ("a.bin", "b.bin", "c.txt", "sub/d.bin"):
        s3_client.put_object(Bucket=bucket, Key=prefix + name, Body=name.encode())
    proc = run_cli(
        "run",
        f"s3://{bucket}/{prefix}",
        "--recursive",
        "--include",
        "*.bin",
        "--exclude",
        "*/b.bin",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert sorted(line.split()[1].rsplit("/", 1)[-1] for line in out[:-1]) == ["a.bin", "d.bin"]
    assert out[-1].startswith("objects 2, passed 2, failed 0, errors 0")


def test_from_file_goes_on_past_bad_lines_and_missing_objects(
    put_object: Any, bucket: str, tmp_path: Path
) -> None:
    good = [put_object(os.urandom(1000 + i)) for i in range(3)]
    listing = tmp_path / "sources.txt"
    listing.write_text(
        "# a comment\n\n"
        f"{good[0]}\n"
        "s3://x/bad-bucket-name\n"
        f"s3://{bucket}/no-such-key-{uuid.uuid4().hex}\n"
        f"{good[1]}\n"
        "  \n"
        f"{good[2]}\n"
    )
    proc = run_cli("run", "--from", str(listing), "--json")
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 5
    by_type = {r["error_type"] for r in lines}
    assert by_type == {None, "UsageError", "ObjectNotFound"}
    bad = next(r for r in lines if r["error_type"] == "UsageError")
    assert "line 4" in bad["error"]
    assert sum(r["passed"] for r in lines) == 3
    assert proc.returncode == 3  # the highest error class seen: source missing
    # The same list on stdin.
    proc = run_cli("run", "--from", "-", "--json", input=listing.read_text())
    assert proc.returncode == 3 and len(proc.stdout.splitlines()) == 5


def test_from_a_missing_file_is_a_one_line_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-list.txt"
    proc = run_cli("run", "--from", str(missing))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"fastpipe: error: --from {missing}: cannot read: No such file" in proc.stderr


# -- budgets measured from outside ---------------------------------------------------------


class HoldsFile(FileStage):
    """A heavy stage that waits a little for another temp file to appear beside its own
    (it would, without a disk budget)."""

    name = "hold"
    seen: list[int] = []

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def run(self, local: LocalFile) -> None:
        seen = threading.Event()
        for _ in range(20):
            count = len(list(self.folder.glob("*.fastpipe-tmp")))
            HoldsFile.seen.append(count)
            if count > 1 and seen.wait(0):
                return
            seen.wait(0.02)


def test_disk_budget_keeps_one_temp_file_at_once(
    s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    # Scaled down from 100 MiB / 60 MiB: the same ratio, for CI time.
    keys = []
    for i in range(4):
        key = f"disk-{uuid.uuid4().hex}-{i}"
        s3_client.put_object(Bucket=bucket, Key=key, Body=os.urandom(6 * MiB))
        keys.append(f"s3://{bucket}/{key}")
    big = f"disk-big-{uuid.uuid4().hex}"
    s3_client.put_object(Bucket=bucket, Key=big, Body=os.urandom(11 * MiB))
    sources = keys[:2] + [f"s3://{bucket}/{big}"] + keys[2:]
    temp = tmp_path / "temp"
    temp.mkdir()
    most = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal most
        while not stop.is_set():
            most = max(most, len(list(temp.glob("*.fastpipe-tmp"))))

    HoldsFile.seen = []
    watcher = threading.Thread(target=poll)
    watcher.start()
    try:
        reports = fastpipe.run_many(
            sources,
            lambda: [Checksum(), HoldsFile(temp)],
            config=Config(disk_budget=10 * MiB, max_objects=5, part_size=1 * MiB),
            temp_dir=temp,
        )
    finally:
        stop.set()
        watcher.join()
    assert most == 1 and max(HoldsFile.seen) == 1
    assert [r.passed for r in reports] == [True, True, False, True, True]
    assert reports[2].error_type == "BudgetExceeded" and reports[2].exit_code == 6
    assert str(11 * MiB) in (reports[2].error or "") and str(10 * MiB) in (reports[2].error or "")
    assert sum(r.queued_seconds > 0 for r in reports) >= 2  # they waited their turn
    assert not list(temp.iterdir())


@pytest.mark.anyio
async def test_max_connections_holds_across_concurrent_calls(
    proxy: FaultProxy, put_object: Any
) -> None:
    sources = [put_object(os.urandom(4 * MiB)) for _ in range(4)]
    config = Config(
        endpoint_url=proxy.url, max_connections=8, part_size=256 * KiB, max_concurrency=16
    )
    async with Engine(config) as engine, anyio.create_task_group() as tg:
        for source in sources:
            tg.start_soon(engine.process, source, [Checksum()])
    gets = proxy.gets()
    assert len(gets) == 64
    events = sorted(
        [(g.received_at, 1) for g in gets] + [(g.answered_at, -1) for g in gets],
        key=lambda e: (e[0], e[1]),
    )
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    assert 1 < peak <= 8


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str | None, int]]:
    """Each (folder, value) the default disk budget is computed for (the real function)."""
    from fastpipe import _budgets

    calls: list[tuple[str | None, int]] = []
    real = _budgets.default_disk_budget

    def spy(folder: Any = None) -> int:
        value = real(folder)
        calls.append((None if folder is None else os.fspath(folder), value))
        return value

    monkeypatch.setattr(_budgets, "default_disk_budget", spy)
    return calls


@pytest.mark.anyio
async def test_default_disk_budget_is_measured_where_the_temp_files_go(
    measured: list[tuple[str | None, int]], put_object: Any, tmp_path: Path
) -> None:
    good = put_object(b"good bytes")
    dest, temp, other = tmp_path / "dest", tmp_path / "temp", tmp_path / "other"
    for folder in (dest, temp, other):
        folder.mkdir()
    # map (and so `fastpipe run --dest`): the dest folder, where its temp files are made.
    async with Engine() as engine:
        async for report in engine.map([good], lambda: [Checksum()], dest=dest):
            assert report.passed, report
        # Made once: a later call with another folder shares the first one's budget.
        await engine.process(good, [Checksum()], temp_dir=other)
        assert measured == [(str(dest), engine.budgets.disk_budget)]
    measured.clear()
    # A file dest: measured beside it (its nearest existing folder).
    async with Engine() as engine:
        await engine.process(good, [Checksum()], dest / "one.bin")
        assert measured == [(str(dest / "one.bin"), engine.budgets.disk_budget)]
    measured.clear()
    # No dest: the temp_dir given, else the system temp folder.
    async with Engine() as engine:
        await engine.process(good, [Checksum()], temp_dir=temp)
        assert measured == [(str(temp), engine.budgets.disk_budget)]
    measured.clear()
    async with Engine() as engine:
        await engine.process(good, [Checksum()])
        assert measured == [(None, engine.budgets.disk_budget)]
    measured.clear()
    # A budget given is never measured.
    async with Engine(Config(disk_budget=5 * MiB)) as engine:
        await engine.process(good, [Checksum()], temp_dir=temp)
        assert (measured, engine.budgets.disk_budget) == ([], 5 * MiB)


# -- map: bounded memory -------------------------------------------------------------------

_RSS_SCRIPT = """
import resource, sys
import anyio
from fastpipe import Engine, Config

async def main(n):
    def sources():
        for i in range(n):
            yield f"/nonexistent/fastpipe-map/{i}"
    count = 0
    async with Engine(Config(max_objects=8)) as engine:
        async for report in engine.map(sources(), lambda: []):
            assert report.error_type == "ObjectNotFound", report
            count += 1
    assert count == n
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

anyio.run(main, int(sys.argv[1]))
"""


def test_map_memory_does_not_grow_with_sources() -> None:
    def peak(n: int) -> int:
        proc = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(n)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1])  # KiB on Linux

    small, large = peak(1_000), peak(100_000)
    assert large - small < 20 * 1024, (small, large)


# -- map: the caller's own errors ---------------------------------------------------------


def _bad_sources(good: str) -> Any:
    """One good URI, then the caller's own error (with a cause of its own)."""
    yield good
    try:
        raise KeyError("row 2")
    except KeyError as exc:
        raise ValueError("bad source row") from exc


async def _bad_async_sources(good: str) -> Any:
    for source in _bad_sources(good):
        yield source


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_map_raises_the_sources_own_error(kind: str, put_object: Any) -> None:
    good = put_object(b"good bytes")
    sources = _bad_sources(good) if kind == "sync" else _bad_async_sources(good)
    reports: list[Report] = []
    async with Engine() as engine:
        with pytest.raises(ValueError, match="^bad source row$") as caught:
            async for report in engine.map(sources, lambda: [Checksum()]):
                reports.append(report)
    assert type(caught.value) is ValueError  # not an ExceptionGroup around it
    assert isinstance(caught.value.__cause__, KeyError)  # its own cause kept
    assert all(r.error is None for r in reports)


def test_process_many_raises_the_sources_own_error(put_object: Any) -> None:
    with pytest.raises(ValueError, match="^bad source row$") as caught:
        fastpipe.run_many(_bad_sources(put_object(b"good bytes")), lambda: [Checksum()])
    assert isinstance(caught.value.__cause__, KeyError)


# -- sinks ---------------------------------------------------------------------------------


def test_tag_merges_with_the_objects_own_tags(s3_client: Any, bucket: str, put_object: Any) -> None:
    good = put_object(b"good bytes", Tagging="owner=alice&fastpipe-status=stale")
    bad = put_object(b"bad bytes", Tagging="owner=bob")
    full = put_object(b"crowded", Tagging="&".join(f"t{i}=v" for i in range(9)))
    expect = hashlib.sha256(b"good bytes").hexdigest()
    proc = run_cli(
        "run",
        good,
        bad,
        full,
        "--tag",
        "--json",
        "--stage",
        f"checksum:algo=sha256,expect={expect}",
    )
    lines = {r["source"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert proc.returncode == 1  # a stage failed; a tagging failure is reported, not fatal

    def tags(uri: str) -> dict[str, str]:
        key = uri.split("/", 3)[3]
        answer = s3_client.get_object_tagging(Bucket=bucket, Key=key)
        return {t["Key"]: t["Value"] for t in answer["TagSet"]}

    good_tags = tags(good)
    assert good_tags["owner"] == "alice" and good_tags["fastpipe-status"] == "passed"
    assert good_tags["fastpipe-etag"] == lines[good]["etag"]
    assert "fastpipe-stage" not in good_tags
    bad_tags = tags(bad)
    assert bad_tags == {
        "owner": "bob",
        "fastpipe-status": "failed",
        "fastpipe-stage": "checksum",
        "fastpipe-etag": lines[bad]["etag"],
    }
    assert "fastpipe-status" not in tags(full)
    assert "no room" in lines[full]["sink_errors"][0]
    assert lines[good]["sink_errors"] == [] and lines[bad]["sink_errors"] == []
    assert "sink errors 1" in proc.stderr


def test_xxh3_digest_tag_and_merge_rules() -> None:
    with pytest.raises(fastpipe.FastpipeError, match="no room"):
        merge_tags(
            {f"t{i}": "v" for i in range(8)},
            {"fastpipe-a": "1", "fastpipe-b": "2", "fastpipe-c": "3"},
            "x",
        )
    merged = merge_tags({"fastpipe-old": "x", "own": "y"}, {"fastpipe-status": "passed"}, "x")
    assert merged == {"own": "y", "fastpipe-status": "passed"}


@pytest.mark.anyio
async def test_json_lines_sink_writes_whole_lines(tmp_path: Path, put_object: Any) -> None:
    sources = [put_object(os.urandom(10 + i)) for i in range(5)]
    path = tmp_path / "results.jsonl"
    sink = JsonLinesSink(path)
    async with Engine() as engine:
        seen = [r async for r in engine.map(sources, lambda: [Checksum()], sinks=[sink])]
    await sink.aclose()
    assert {r.source for r in seen} == set(sources)
    lines = path.read_text().splitlines()
    assert {json.loads(line)["source"] for line in lines} == set(sources)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert all(isinstance(r, Report) and r.passed for r in seen)


def test_one_object_with_results_and_tag(
    put_object: Any, s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    uri = put_object(b"single", Tagging="keep=me")
    results = tmp_path / "r.jsonl"
    proc = run_cli("run", uri, "--json", "--results", str(results), "--tag", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # one JSON report, not lines and a summary
    assert report["passed"] and report["sink_errors"] == []
    assert [json.loads(line)["source"] for line in results.read_text().splitlines()] == [uri]
    answer = s3_client.get_object_tagging(Bucket=bucket, Key=uri.split("/", 3)[3])
    tags = {t["Key"]: t["Value"] for t in answer["TagSet"]}
    assert tags["keep"] == "me" and tags["fastpipe-status"] == "passed"
    assert len(tags["fastpipe-xxh3"]) == 32  # the default checksum is xxh3_128


def test_many_progress_line() -> None:
    import io

    from fastpipe import Phase, Progress
    from fastpipe._many_cli import ManyProgress

    stream = io.StringIO()
    bar = ManyProgress(stream)
    callback = bar.for_object("s3://b/k/one\x1b.bin")
    callback(Progress(5 * MiB, 10 * MiB, 1.0, None, Phase.DOWNLOAD))
    bar.draw(force=True)
    assert "0/? objects" in stream.getvalue() and "5.0 MiB" in stream.getvalue()
    assert "one\\x1b.bin" in stream.getvalue()  # escaped
    bar.total = 1
    bar.finished(Report(source="s3://b/k/one\x1b.bin", size=10 * MiB))
    assert "1/1 objects" in stream.getvalue().rsplit("\r", 1)[-1]


def test_progress_displays_share_one_status_line() -> None:
    import io

    from fastpipe._console import ProgressBar, StatusLine
    from fastpipe._many_cli import ManyProgress

    for cls in (ManyProgress, ProgressBar):
        stream = io.StringIO()
        bar = cls(stream)
        assert isinstance(bar, StatusLine)
        bar.close()
        assert stream.getvalue() == ""  # nothing drawn: no line to end
        bar._write("x" * 200)
        bar.close()
        assert stream.getvalue() == "\r" + "x" * 120 + "\x1b[K\n"


@pytest.mark.anyio
async def test_disk_budget_is_first_come_first_served() -> None:
    from fastpipe._budgets import DiskBudget

    budget = DiskBudget(100)
    order: list[str] = []
    assert await budget.acquire(60, "a") == 60

    async def take(name: str, size: int) -> None:
        await budget.acquire(size, name)
        order.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, "big", 90)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(take, "small", 20)  # fits now (60 + 20), but must not overtake "big"
        await anyio.wait_all_tasks_blocked()
        assert order == []
        budget.release(60)
        await anyio.wait_all_tasks_blocked()
        assert order == ["big"]
        budget.release(90)
    assert order == ["big", "small"]
    with pytest.raises(fastpipe.BudgetExceeded, match="101 bytes .* 100 bytes"):
        await budget.acquire(101, "huge")
    loose = DiskBudget(100, strict=False)
    assert await loose.acquire(50, "x") == 50
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(loose.acquire, 500, "alone")  # admitted alone, as the whole budget
            await anyio.wait_all_tasks_blocked()
            assert loose.used == 50
            loose.release(50)
    assert loose.used == 100


def test_a_signal_stops_a_many_object_run_and_leaves_no_temp_file(
    proxy: FaultProxy, put_object: Any, tmp_path: Path
) -> None:
    import signal
    import time

    from faultproxy import Fault, always

    sources = [put_object(os.urandom(512 * KiB)) for _ in range(3)]
    proxy.reset(always(Fault("hold")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastpipe.cli", "run", *sources, "--endpoint-url", proxy.url]
        + ["--temp-dir", str(tmp_path), "--part-size", "256KiB", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while proxy.held() < 1:  # the downloads are under way, held by the proxy
            assert time.monotonic() < deadline and proc.poll() is None, "no GET arrived"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proxy.release()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_run_until_signal_cancels_the_work_and_names_the_signal() -> None:
    import os
    import signal

    import anyio

    from fastpipe._many_cli import run_until_signal

    outcome: dict[str, object] = {}
    cancelled: list[bool] = []
    # Should the signal come before the receiver is up, the test fails instead of dying.
    previous = signal.signal(signal.SIGTERM, lambda *_: outcome.setdefault("early", True))

    async def work() -> None:
        try:
            for _ in range(3):  # let the signal watcher start first
                await anyio.sleep(0)
            os.kill(os.getpid(), signal.SIGTERM)
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise

    try:
        run_until_signal(work, outcome)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert outcome == {"signal": signal.SIGTERM}
    assert cancelled == [True]
