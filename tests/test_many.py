"""process_many: the download of object k+1 overlaps the file stages of object k."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

import fastpipe
from fastpipe import Config
from fastpipe.stages import Checksum, FileStage, LocalFile, ObjectInfo, StreamStage

PART = 256 << 10


class Log:
    """Events from every object's stages, in the order they happened."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.lock = threading.Lock()
        self.stream_started: dict[str, threading.Event] = {}

    def add(self, event: str) -> None:
        with self.lock:
            self.events.append(event)


def stage_factory(log: Log, wait_for_next: dict[str, str] | None = None) -> Any:
    class Seen(StreamStage):
        name = "seen"

        def start(self, info: ObjectInfo) -> None:
            self.key = info.key or ""
            log.add(f"stream-start {self.key}")
            log.stream_started.setdefault(self.key, threading.Event()).set()

        def update(self, view: memoryview) -> None:
            pass

        def finish(self) -> None:
            log.add(f"stream-end {self.key}")

    class Heavy(FileStage):
        name = "heavy"

        def run(self, local: LocalFile) -> bool:
            key = local.info.key or ""
            log.add(f"file-start {key}")
            overlapped = False
            if wait_for_next and key in wait_for_next:
                # Finishes only once the next object's bytes are flowing: with no
                # pipelining this would wait in vain and return False.
                nxt = log.stream_started.setdefault(wait_for_next[key], threading.Event())
                overlapped = nxt.wait(30)
            log.add(f"file-end {key}")
            return overlapped

    return lambda: [Checksum("sha256"), Seen(), Heavy()]


@pytest.fixture
def objects(s3_client: Any, bucket: str) -> list[tuple[str, bytes]]:
    out = []
    for i in range(3):
        data = os.urandom(3 * PART + i)
        key = f"many-{os.getpid()}-{i}-{threading.get_ident()}"
        s3_client.put_object(Bucket=bucket, Key=key, Body=data)
        out.append((f"s3://{bucket}/{key}", data))
    return out


def test_next_download_overlaps_file_stages(objects: list[tuple[str, bytes]]) -> None:
    log = Log()
    keys = [uri.split("/", 3)[3] for uri, _ in objects]
    factory = stage_factory(log, wait_for_next={keys[0]: keys[1], keys[1]: keys[2]})
    reports = fastpipe.run_many([u for u, _ in objects], factory, config=Config(part_size=PART))
    assert [r.source for r in reports] == [u for u, _ in objects]
    assert all(r.passed for r in reports), [r.error for r in reports]
    assert reports[0].stage("heavy").result is True
    assert reports[1].stage("heavy").result is True
    for report, (_, data) in zip(reports, objects, strict=True):
        assert report.stage("checksum").result["hexdigest"] == hashlib.sha256(data).hexdigest()


def test_one_in_flight_is_sequential(objects: list[tuple[str, bytes]], tmp_path: Path) -> None:
    log = Log()
    reports = fastpipe.run_many(
        [u for u, _ in objects],
        stage_factory(log),
        dest=tmp_path,
        config=Config(part_size=PART),
        max_in_flight=1,
    )
    assert all(r.passed for r in reports)
    kinds = [e.split()[0] for e in log.events]
    assert kinds == ["stream-start", "stream-end", "file-start", "file-end"] * 3
    for report, (_, data) in zip(reports, objects, strict=True):
        assert report.dest is not None
        assert Path(report.dest).parent == tmp_path
        assert Path(report.dest).read_bytes() == data


def test_a_failing_object_does_not_stop_the_rest(
    objects: list[tuple[str, bytes]], bucket: str
) -> None:
    sources = [objects[0][0], f"s3://{bucket}/no-such-key-many", objects[1][0]]
    reports = fastpipe.run_many(sources, config=Config(part_size=PART))
    assert [r.passed for r in reports] == [True, False, True]
    assert reports[1].error_type == "ObjectNotFound"
    assert "no-such-key-many" in (reports[1].error or "")


def test_usage_errors() -> None:
    with pytest.raises(fastpipe.UsageError):
        fastpipe.run_many(["s3://bucket/key"], max_in_flight=0)
