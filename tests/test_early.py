"""A file stage that reads in order starts while the download runs, and stays gated."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from faultproxy import Fault, FaultProxy

import fastpipe
from fastpipe import Config, StageFailed
from fastpipe.stages import Checksum, Chunk, FileStage, LocalFile, StreamStage

PART = 256 << 10




class InOrder(FileStage):
    """Reads windows in order; notes when the first one arrived."""

    name = "in-order"
    reads_in_order = True

    def __init__(self) -> None:
        self.first_window = threading.Event()
        self.windows = 0

    def run(self, local: LocalFile) -> int:
        total = 0
        for _, view in local.windows(PART):
            self.first_window.set()
            self.windows += 1
            total += len(view)
        return total


def test_file_stage_starts_before_the_download_ends(proxy: FaultProxy, put_object: Any) -> None:
    uri = put_object(os.urandom(8 * PART))
    proxy.reset(lambda n, request: Fault("hold") if n >= 2 else None)  # parts 2.. wait
    stage = InOrder()
    outcome: dict[str, Any] = {}

    def work() -> None:
        outcome["report"] = fastpipe.run(
            uri,
            stages=[Checksum(), stage],
            config=Config(endpoint_url=proxy.url, part_size=PART, max_concurrency=1),
        )

    thread = threading.Thread(target=work)
    thread.start()
    try:
        # The download cannot finish while the proxy holds part 2, yet the stage runs.
        deadline = time.monotonic() + 30
        while proxy.held() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.held() >= 1
        assert stage.first_window.wait(30)
        assert thread.is_alive()
    finally:
        proxy.reset(None)
        thread.join(60)
    report = outcome["report"]
    assert report.passed
    assert report.stage("in-order").result == 8 * PART
    assert stage.windows == 8


def test_late_stream_failure_skips_early_stage_and_its_manifest(
    put_object: Any, tmp_path: Path
) -> None:
    uri = put_object(os.urandom(40 * PART))
    manifest = tmp_path / "m.fpcdc"
    chunk = Chunk(avg_size=16 << 10, manifest=str(manifest))
    report = fastpipe.run(
        uri,
        stages=[Checksum("sha256", expect="00" * 32), chunk],  # fails at the very end
        dest=tmp_path / "o.bin",
        config=Config(part_size=PART),
    )
    assert not report.passed
    assert report.failed_stage == "checksum"
    assert report.stage("chunk").status == "skipped"
    assert report.stage("chunk").result is None
    assert list(tmp_path.iterdir()) == []  # no manifest, no destination, no temp file


def test_early_chunk_matches_chunk_on_the_local_file(put_object: Any, tmp_path: Path) -> None:
    data = os.urandom(20 * PART) + bytes(3 * PART) + os.urandom(PART)
    uri = put_object(data)
    report = fastpipe.run(
        uri, stages=[Checksum(), Chunk(avg_size=16 << 10)], config=Config(part_size=PART)
    )
    local = tmp_path / "local.bin"
    local.write_bytes(data)
    again = fastpipe.run(str(local), stages=[Chunk(avg_size=16 << 10)])
    assert report.passed and again.passed
    assert report.stage("chunk").result == again.stage("chunk").result


def test_early_stage_failure_is_reported_in_its_turn(put_object: Any) -> None:
    class Fails(InOrder):
        name = "fails"

        def run(self, local: LocalFile) -> int:
            with local.window(0, PART):
                raise StageFailed("bad header")

    class Later(StreamStage):
        name = "later"

        def update(self, view: memoryview) -> None:
            pass

        def finish(self) -> str:
            return "ok"

    report = fastpipe.run(
        put_object(os.urandom(4 * PART)),
        stages=[Later(), Fails(), Chunk()],
        config=Config(part_size=PART),
    )
    assert report.failed_stage == "fails"
    assert report.stage("later").status == "passed"
    assert report.stage("chunk").status == "skipped"
    assert "bad header" in (report.error or "")
