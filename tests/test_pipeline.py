"""The three-stage pipeline: gating, file stages, built-ins through the CLI contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import fastpipe
from fastpipe import Config
from fastpipe.stages import (
    Checksum,
    Chunk,
    FileStage,
    Limits,
    LocalFile,
    Scan,
    StreamStage,
    Verify,
    parse_spec,
)

PART = 256 << 10


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", *args], capture_output=True, text=True
    )


class Counting(StreamStage):
    name = "counting"

    def __init__(self) -> None:
        self.bytes = 0

    def update(self, view: memoryview) -> None:
        self.bytes += len(view)

    def finish(self) -> int:
        return self.bytes


def test_wrong_expect_fails_early_and_skips_the_rest(
    s3_client: Any, bucket: str, tmp_path: Path
) -> None:
    size = 128 << 20
    s3_client.put_object(Bucket=bucket, Key="gate.bin", Body=os.urandom(size))
    dest = tmp_path / "gate.bin"
    result = _cli(
        "run",
        f"s3://{bucket}/gate.bin",
        "--dest",
        str(dest),
        "--json",
        "--concurrency",
        "2",
        "--part-size",
        "1MiB",
        "--stage",
        "limits:magic=00ff",  # random data: fails on the first bytes
        "--stage",
        "checksum",
        "--stage",
        "scan",
        "--stage",
        "chunk",
    )
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is False
    assert report["failed_stage"] == "limits"
    assert [s["status"] for s in report["stages"]] == ["failed", "skipped", "skipped", "skipped"]
    assert "magic" in report["error"]
    # Gating cancels the download: far fewer bytes than the object were fetched.
    assert report["download"]["bytes"] < size // 4
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_exit_1_no_dest(put_object: Any, tmp_path: Path) -> None:
    uri = put_object(os.urandom(3 * PART))
    dest = tmp_path / "x.bin"
    result = _cli(
        "run",
        uri,
        "--dest",
        str(dest),
        "--json",
        "--stage",
        "checksum:algo=sha256,expect=" + "00" * 32,
        "--stage",
        "scan",
    )
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["failed_stage"] == "checksum"
    assert report["stages"][0]["status"] == "failed"
    assert report["stages"][0]["result"]["algorithm"] == "sha256"
    assert report["stages"][1]["status"] == "skipped"
    assert list(tmp_path.iterdir()) == []


def test_limits_reject_before_any_get(put_object: Any) -> None:
    uri = put_object(os.urandom(4 * PART))
    counting = Counting()
    report = fastpipe.run(uri, stages=[Limits(max_size=PART), counting])
    assert not report.passed
    assert report.failed_stage == "limits"
    assert report.download.bytes == 0
    assert report.download.parts == 0
    assert counting.bytes == 0
    assert report.stage("counting").status == "skipped"


def test_all_builtins_pass_and_report_json(put_object: Any, tmp_path: Path) -> None:
    data = b"hello world\n" * 50_000 + os.urandom(PART).replace(b"\n", b"x")
    uri = put_object(data)
    manifest = tmp_path / "m.fpcdc"
    result = _cli(
        "run",
        uri,
        "--json",
        "--part-size",
        "128KiB",
        "--stage",
        "limits:min_size=1,max_size=1GiB",
        "--stage",
        "checksum:algo=sha256",
        "--stage",
        "verify:strict=true",
        "--stage",
        "scan",
        "--stage",
        f"chunk:avg_size=16KiB,threads=2,manifest={manifest}",
        "--stage",
        "command:cmd=test -s {path}",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("source", "size", "etag", "passed", "failed_stage", "error", "seconds", "dest"):
        assert key in report
    for key in ("seconds", "bytes", "parts", "part_size", "concurrency", "retries"):
        assert key in report["download"]
    assert report["passed"] is True and report["failed_stage"] is None
    assert [s["name"] for s in report["stages"]] == [
        "limits",
        "checksum",
        "verify",
        "scan",
        "chunk",
        "command",
    ]
    assert [s["kind"] for s in report["stages"]] == [
        "stream",
        "stream",
        "stream",
        "stream",
        "file",
        "file",
    ]
    assert all(s["status"] == "passed" for s in report["stages"])
    verify = report["stages"][2]["result"]
    assert verify["method"] != "unverifiable" and verify["expected"] == verify["actual"]
    assert report["stages"][3]["result"]["lines"] == 50_000
    assert report["stages"][4]["result"]["chunks"] >= 1
    assert manifest.exists()


def test_raising_user_stage_is_reported(put_object: Any) -> None:
    class Broken(StreamStage):
        name = "broken"

        def update(self, view: memoryview) -> None:
            raise ZeroDivisionError("user bug")

        def finish(self) -> None:
            return None

    class BrokenFile(FileStage):
        name = "broken-file"

        def run(self, local: LocalFile) -> None:
            raise RuntimeError("file stage bug")

    uri = put_object(os.urandom(PART))
    report = fastpipe.run(uri, stages=[Broken(), Checksum()])
    assert report.failed_stage == "broken"
    assert report.stage("broken").error == "ZeroDivisionError: user bug"
    assert report.stage("checksum").status == "skipped"
    report = fastpipe.run(uri, stages=[Checksum(), BrokenFile(), Chunk()])
    assert report.failed_stage == "broken-file"
    assert report.stage("checksum").status == "passed"
    assert report.stage("chunk").status == "skipped"
    assert "file stage bug" in (report.error or "")


def test_file_stages_wait_for_stream_stages(put_object: Any) -> None:
    order: list[str] = []

    class Stream(StreamStage):
        name = "s"

        def update(self, view: memoryview) -> None:
            pass

        def finish(self) -> None:
            order.append("stream-finished")

    class File(FileStage):
        name = "f"

        def run(self, local: LocalFile) -> int:
            order.append("file")
            return local.size

    class AsyncFile(FileStage):
        name = "af"

        async def run(self, local: LocalFile) -> str:  # type: ignore[override]
            order.append("async-file")
            return "ok"

    report = fastpipe.run(put_object(os.urandom(PART)), stages=[File(), Stream(), AsyncFile()])
    assert report.passed
    assert order == ["stream-finished", "file", "async-file"]
    assert report.stage("af").result == "ok"


def test_stage_timeout_fails_the_stage(put_object: Any) -> None:
    class Sleepy(FileStage):
        name = "sleepy"
        timeout = 0.2

        def run(self, local: LocalFile) -> None:
            import time

            time.sleep(2)

    report = fastpipe.run(put_object(b"x"), stages=[Sleepy(), Checksum()])
    assert report.failed_stage == "sleepy"
    assert "timeout" in (report.stage("sleepy").error or "")
    assert report.exit_code == 1


def test_verify_detects_altered_expected(s3_client: Any, bucket: str, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    src = tmp_path / "mp.bin"
    src.write_bytes(os.urandom((5 << 20) * 3 + 12345))
    s3_client.upload_file(
        str(src),
        bucket,
        "mp.bin",
        Config=TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20),
    )
    uri = f"s3://{bucket}/mp.bin"
    report = fastpipe.run(uri, stages=[Verify(strict=True)])
    assert report.passed, report.error
    good = report.stage("verify").result
    report = fastpipe.run(uri, stages=[Verify(expected="AAAAAA==-4")])
    assert not report.passed
    assert report.failed_stage == "verify"
    assert good["method"] != "unverifiable"


def test_unknown_stage_and_option_are_usage_errors() -> None:
    result = _cli("run", "s3://bucket/key", "--stage", "nope")
    assert result.returncode == 2
    assert "unknown stage 'nope'" in result.stderr and "checksum" in result.stderr
    result = _cli("run", "s3://bucket/key", "--stage", "checksum:colour=red")
    assert result.returncode == 2
    assert "colour" in result.stderr and "algo" in result.stderr


def test_stages_command_lists_builtins() -> None:
    result = _cli("stages")
    assert result.returncode == 0
    for name in ("checksum", "limits", "verify", "scan", "chunk", "command"):
        assert f"{name} (" in result.stdout


def test_spec_parsing_quotes_and_sizes() -> None:
    stage = parse_spec("command:cmd=\"sh -c 'exit 0' {path}\",timeout=5")
    assert stage.name == "command"
    chunk = parse_spec("chunk:avg_size=64KiB,threads=2")
    assert isinstance(chunk, Chunk)
    assert isinstance(parse_spec("scan:max_run=100"), Scan)
    with pytest.raises(fastpipe.UsageError):
        parse_spec("chunk:avg_size=lots")


def test_concurrency_recorded(put_object: Any) -> None:
    report = fastpipe.run(
        put_object(os.urandom(PART * 4)), config=Config(part_size=PART, max_concurrency=3)
    )
    assert report.download.concurrency == 3 and report.download.parts == 4


def test_every_stage_takes_a_timeout_option(put_object: Any) -> None:
    for name in ("checksum", "limits", "verify", "scan", "chunk"):
        assert parse_spec(f"{name}:timeout=2.5").timeout == 2.5
    command = parse_spec("command:cmd=true,timeout=3")  # the command's own timeout
    assert command.timeout is None
    with pytest.raises(fastpipe.UsageError, match="timeout"):
        parse_spec("scan:timeout=-1")
    result = _cli("run", put_object(b"x" * 1000), "--json", "--stage", "scan:timeout=60")
    assert result.returncode == 0, result.stderr


def test_run_many_takes_spec_strings_and_classes(put_object: Any) -> None:
    sources = [put_object(os.urandom(1000)), put_object(os.urandom(2000))]
    reports = fastpipe.run_many(sources, ["checksum:algo=sha256", Scan])
    assert [r.passed for r in reports] == [True, True]
    digests = [r.stage("checksum").result for r in reports]
    assert [d["algorithm"] for d in digests] == ["sha256", "sha256"]
    assert digests[0]["hexdigest"] != digests[1]["hexdigest"]  # fresh stages per object
    assert [r.stage("scan").status for r in reports] == ["passed", "passed"]
    (one,) = fastpipe.run_many(sources[:1], "checksum:algo=md5")
    assert one.stage("checksum").result["algorithm"] == "md5"


def test_run_many_refuses_stage_instances_and_bad_specs() -> None:
    with pytest.raises(fastpipe.UsageError, match="needs a factory"):
        fastpipe.run_many(["s3://bucket/key"], [Checksum()])  # type: ignore[list-item]
    with pytest.raises(fastpipe.UsageError, match="unknown stage 'nope'"):
        fastpipe.run_many(["s3://bucket/key"], ["nope"])
    with pytest.raises(fastpipe.UsageError, match="not a stage spec"):
        fastpipe.run_many(["s3://bucket/key"], [42])  # type: ignore[list-item]


def test_default_stages_verify_a_stored_checksum(put_object: Any) -> None:
    data = os.urandom(300_000)
    uri = put_object(data, ChecksumAlgorithm="CRC32C")
    report = fastpipe.run(uri, config=Config(part_size=PART))
    assert report.passed, report.error
    assert [s.name for s in report.stages] == ["checksum", "verify"]
    assert report.stage("verify").result["method"] == "checksum-crc32c"
    assert report.verified == "verify: checksum-crc32c against the value S3 stored"
    result = _cli("run", uri, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "verified  verify: checksum-crc32c against the value S3 stored" in result.stdout
    assert "nothing verified" not in result.stdout


def test_default_verify_catches_bytes_that_differ_from_the_stored_crc() -> None:
    import base64
    import zlib

    from fastpipe.stages import ObjectInfo

    good = os.urandom(100_000)
    stored = base64.b64encode(zlib.crc32(good).to_bytes(4, "big")).decode()
    info = ObjectInfo("s3://b/k", len(good), etag="0" * 32, checksums={"CRC32": stored})
    (verify,) = [s for s in fastpipe._engine.default_stages() if isinstance(s, Verify)]
    verify.start(info)
    verify.update(memoryview(good[:-1] + bytes([good[-1] ^ 1])))  # one flipped bit
    with pytest.raises(fastpipe.StageFailed, match="s3://b/k: checksum-crc32 mismatch"):
        verify.finish()


def test_nothing_verified_is_said(s3_server: Any, bucket: str, tmp_path: Path) -> None:
    import boto3
    from botocore.config import Config as BotoConfig

    # boto3 sends a CRC32 by default now; an older uploader stores none, only the ETag.
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
        config=BotoConfig(request_checksum_calculation="when_required"),
    )
    client.put_object(Bucket=bucket, Key="no-checksum.bin", Body=os.urandom(5000))
    uri = f"s3://{bucket}/no-checksum.bin"
    report = fastpipe.run(uri)
    assert report.passed, report.error
    assert report.verified is None
    verify = report.stage("verify").result
    assert verify["method"] == "unverifiable"
    assert any("etag=false" in reason for reason in verify["reason"])  # the MD5 was skipped
    result = _cli("run", uri, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "PASSED" in result.stdout and "nothing verified" in result.stdout
    payload = json.loads(_cli("run", uri, "--json").stdout)
    assert payload["passed"] is True and payload["verified"] is None
    # A check asked for is named, and an explicit ETag check still runs.
    local = tmp_path / "f.bin"
    local.write_bytes(b"abc")
    sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    report = fastpipe.run(str(local), stages=[Checksum("sha256", expect=sha)])
    assert report.verified == "checksum: sha256 against the expected value"
    report = fastpipe.run(uri, stages=[Verify()])
    assert report.verified == "verify: etag-md5 against the value S3 stored"
