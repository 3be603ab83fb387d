"""The engine end to end against a real SeaweedFS on loopback."""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import anyio
import pytest
import xxhash

import fastpipe
from fastpipe import Config
from fastpipe.stages import Checksum, FileStage, LocalFile, ObjectInfo, StreamStage

PART = 64 * 1024


class OrderedStage(StreamStage):
    """Asserts that views arrive in byte order and records what it saw."""

    name = "ordered"

    def __init__(self) -> None:
        self.offset = 0
        self.calls = 0
        self.digest = hashlib.sha256()
        self.thread: int | None = None

    def start(self, info: ObjectInfo) -> None:
        self.offset = 0
        self.size = info.size

    def update(self, view: memoryview) -> None:
        assert isinstance(view, memoryview)
        assert self.offset + len(view) <= self.size
        self.offset += len(view)
        self.calls += 1
        self.digest.update(view)
        self.thread = threading.get_ident()

    def finish(self) -> dict[str, Any]:
        assert self.offset == self.size
        return {"bytes": self.offset}


@pytest.mark.parametrize("size", [0, 1, PART - 1, PART, PART + 1, 3 * PART + 7])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_sizes_round_trip(put_object: Any, tmp_path: Any, size: int, concurrency: int) -> None:
    data = os.urandom(size)
    uri = put_object(data)
    dest = tmp_path / "out.bin"
    ordered = OrderedStage()
    report = fastpipe.run(
        uri,
        stages=[Checksum("sha256"), Checksum("xxh3_128"), ordered],
        dest=dest,
        config=Config(part_size=PART, max_concurrency=concurrency),
    )
    assert report.passed, report.error
    assert dest.read_bytes() == data
    assert report.stages[0].result["hexdigest"] == hashlib.sha256(data).hexdigest()
    assert report.stages[1].result["hexdigest"] == xxhash.xxh3_128_hexdigest(data)
    assert ordered.digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert report.dest == str(dest)
    assert report.size == size
    assert report.download.bytes == size
    assert report.download.parts == -(-size // PART)
    assert report.download.plane == "raw"
    assert oct(dest.stat().st_mode & 0o777) == oct(0o600)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_stream_stages_run_off_the_event_loop(put_object: Any) -> None:
    uri = put_object(os.urandom(3 * PART))
    ordered = OrderedStage()
    fastpipe.run(uri, stages=[ordered], config=Config(part_size=PART))
    assert ordered.thread is not None and ordered.thread != threading.get_ident()


@pytest.mark.parametrize(
    "algo", ["xxh3_64", "xxh3_128", "sha256", "sha1", "md5", "crc32c", "crc32"]
)
def test_checksum_algorithms(put_object: Any, algo: str) -> None:
    import zlib

    import crc32c

    data = os.urandom(PART * 2 + 3)
    expected = {
        "xxh3_64": xxhash.xxh3_64_hexdigest(data),
        "xxh3_128": xxhash.xxh3_128_hexdigest(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "sha1": hashlib.sha1(data).hexdigest(),
        "md5": hashlib.md5(data).hexdigest(),
        "crc32c": f"{crc32c.crc32c(data):08x}",
        "crc32": f"{zlib.crc32(data):08x}",
    }[algo]
    report = fastpipe.run(put_object(data), stages=[Checksum(algo, expect=expected)])
    assert report.passed, report.error
    assert report.stage("checksum").result == {
        "algorithm": algo,
        "hexdigest": expected,
        "expected": expected,
    }


def test_botocore_data_plane(put_object: Any, tmp_path: Any) -> None:
    data = os.urandom(5 * PART + 11)
    dest = tmp_path / "o"
    report = fastpipe.run(
        put_object(data),
        stages=[Checksum("sha256")],
        dest=dest,
        config=Config(part_size=PART, data_plane="botocore", max_concurrency=4),
    )
    assert report.passed
    assert report.download.plane == "botocore"
    assert dest.read_bytes() == data


def test_local_file_source(tmp_path: Any) -> None:
    data = os.urandom(5 * PART + 1)
    path = tmp_path / "local.bin"
    path.write_bytes(data)
    seen: list[str] = []

    class SeePath(FileStage):
        name = "see"

        def run(self, local: LocalFile) -> str:
            seen.append(local.path)
            with local.window(0, local.size) as view:
                assert bytes(view) == data
            return "ok"

    report = fastpipe.run(str(path), stages=[Checksum("sha256"), SeePath()])
    assert report.passed
    assert report.download.plane == "local"
    assert report.download.bytes == 0
    assert seen == [str(path)]  # processed in place, no copy
    assert report.stage("checksum").result["hexdigest"] == hashlib.sha256(data).hexdigest()


def test_large_object(s3_client: Any, bucket: str, tmp_path: Any) -> None:
    """256 MiB, multipart-uploaded: same bytes, same digest, default part plan."""
    size = 256 << 20
    src = tmp_path / "src.bin"
    digest = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(size // (16 << 20)):
            block = os.urandom(16 << 20)
            digest.update(block)
            f.write(block)
    s3_client.upload_file(str(src), bucket, "large.bin")
    dest = tmp_path / "dest.bin"
    report = fastpipe.run(f"s3://{bucket}/large.bin", stages=[Checksum("sha256")], dest=dest)
    assert report.passed
    assert report.stage("checksum").result["hexdigest"] == digest.hexdigest()
    assert report.download.parts == 32 and report.download.part_size == 8 << 20
    with open(src, "rb") as a, open(dest, "rb") as b:
        while block := a.read(16 << 20):
            assert block == b.read(16 << 20)


def test_progress_callback(put_object: Any) -> None:
    events: list[fastpipe.Progress] = []
    uri = put_object(os.urandom(20 * PART))
    fastpipe.run(uri, config=Config(part_size=PART), progress=events.append)
    assert events
    assert all(e.total == 20 * PART for e in events)
    assert all(0 <= e.bytes_done <= e.total for e in events)


class _Noop(FileStage):
    name = "noop"

    def run(self, local: LocalFile) -> int:
        return local.size


@pytest.mark.parametrize("early", [True, False], ids=["early-file-stage", "file-stage-after"])
def test_progress_ends_at_the_total_with_real_seconds(
    put_object: Any, tmp_path: Any, early: bool
) -> None:
    """The last download event says every byte is in (a fast download used to give one
    event with 0 bytes); file-stage events carry the object's elapsed seconds, not 0.0."""
    size = 20 * PART + 7
    data = os.urandom(size)
    uri = put_object(data)
    events: list[fastpipe.Progress] = []
    stage = _Noop()
    stage.reads_in_order = early
    report = fastpipe.run(
        uri, stages=[Checksum(), stage], config=Config(part_size=PART), progress=events.append
    )
    assert report.passed
    download = [e for e in events if e.phase == "download"]
    assert download and download[-1].bytes_done == size == download[-1].total
    # The ETA is end to end: with every byte in, the file stage is still ahead.
    assert download[-1].eta_seconds is not None and download[-1].eta_seconds > 0.0
    assert [e.bytes_done for e in download] == sorted(e.bytes_done for e in download)
    staged = [e for e in events if e.phase == "file" and e.stage == "noop"]
    assert staged and all(e.seconds > 0.0 and e.bytes_done == size for e in staged)
    assert events.index(staged[0]) > events.index(download[-1])
    # A local file: the stream phase ends at its size too.
    local = tmp_path / "local.bin"
    local.write_bytes(data)
    events.clear()
    assert fastpipe.run(str(local), stages=[Checksum()], progress=events.append).passed
    stream = [e for e in events if e.phase == "stream"]
    assert stream and stream[-1].bytes_done == size
    assert stream[-1].eta_seconds == 0.0  # no file stage left


@pytest.mark.anyio
async def test_caller_cancel_removes_temp_file(put_object: Any, tmp_path: Any) -> None:
    """A cancel scope of the caller stops the download and leaves nothing behind."""
    uri = put_object(os.urandom(64 * PART))
    started = threading.Event()

    class Slow(StreamStage):
        name = "slow"

        def update(self, view: memoryview) -> None:
            started.set()
            import time

            time.sleep(0.5)

        def finish(self) -> None:
            return None

    dest = tmp_path / "never.bin"
    finished = False

    async def work() -> None:
        nonlocal finished
        await fastpipe.process(uri, stages=[Slow()], dest=dest, config=Config(part_size=PART))
        finished = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(work)
        while not started.is_set():
            await anyio.sleep(0.01)
        assert any(p.name.endswith(".fastpipe-tmp") for p in tmp_path.iterdir())
        tg.cancel_scope.cancel()
    assert not finished
    assert list(tmp_path.iterdir()) == []


@pytest.mark.anyio
async def test_engine_reuses_one_client(put_object: Any) -> None:
    uris = [put_object(os.urandom(PART + i)) for i in range(3)]
    async with fastpipe.Engine(Config(part_size=PART)) as engine:
        reports = [await engine.process(u) for u in uris]
        client = await engine._s3.client()
        assert client is await engine._s3.client()
    assert all(r.passed for r in reports)
    assert [r.size for r in reports] == [PART, PART + 1, PART + 2]


def test_missing_key_raises(bucket: str, s3_server: Any) -> None:
    with pytest.raises(fastpipe.ObjectNotFound) as info:
        fastpipe.run(f"s3://{bucket}/no-such-key")
    assert "no-such-key" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    report = info.value.report
    assert report is not None and report.error_type == "ObjectNotFound"


def test_missing_bucket_raises(s3_server: Any) -> None:
    with pytest.raises(fastpipe.ObjectNotFound, match="no such bucket"):
        fastpipe.run("s3://no-such-bucket-here/key")


def test_part_plan_stays_under_10000_parts() -> None:
    config = Config()
    assert config.plan_part_size(100 << 30) == 11 << 20  # 100 GiB: 8 MiB would be 12,800 parts
    size = 100 << 30
    assert -(-size // config.plan_part_size(size)) <= 10_000
    assert config.plan_part_size(1 << 30) == 8 << 20


def test_temp_dir_holds_the_temp_file(put_object: Any, tmp_path: Any) -> None:
    seen: list[str] = []

    class Where(FileStage):
        name = "where"

        def run(self, local: LocalFile) -> None:
            seen.append(os.path.dirname(local.path))

    report = fastpipe.run(put_object(os.urandom(PART)), stages=[Where()], temp_dir=tmp_path)
    assert report.passed
    assert seen == [str(tmp_path)]
    assert list(tmp_path.iterdir()) == []  # removed after the run
