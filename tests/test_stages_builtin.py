"""The built-in stages limits, verify and command, driven directly (no engine).

verify runs against objects a real S3 server (embedded SeaweedFS) stored: single-part and
multipart uploads, with and without x-amz-checksum-* values, read back through HEAD the
way the engine reads them.
"""

from __future__ import annotations

import base64
import dataclasses
import gc
import hashlib
import io
import os
import random
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastpipe._exceptions import StageFailed, StageTimeout, UsageError
from fastpipe._objectinfo import object_info_from_head, strip_etag
from fastpipe.stages import verify as verify_module
from fastpipe.stages._base import LocalFile, ObjectInfo, StreamStage
from fastpipe.stages._registry import builtin_stages, parse_spec
from fastpipe.stages.command import Command
from fastpipe.stages.limits import Limits, content_type_matches, parse_magic
from fastpipe.stages.verify import Verify, choose_plan

MiB = 1 << 20
BUCKET = "fastpipe-stages"


def splits(data: bytes, rng: random.Random, max_piece: int = 3 * MiB) -> Iterator[memoryview]:
    """Views of ``data`` in random sizes: tiny ones first, then up to ``max_piece``."""
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        limit = 7 if pos < 64 else max_piece
        n = rng.randint(1, limit)
        yield view[pos : pos + n]
        pos += n


def drive(stage: StreamStage, info: ObjectInfo, data: bytes, seed: int = 0) -> Any:
    """Run a stream stage the way the engine does, over random split points."""
    stage.check_info(info)
    stage.start(info)
    for piece in splits(data, random.Random(seed)):
        stage.update(piece)
    return stage.finish()


def info_for(data: bytes, **fields: Any) -> ObjectInfo:
    return ObjectInfo(source=fields.pop("source", "s3://bucket/key"), size=len(data), **fields)


# ---------------------------------------------------------------- registry


def test_builtins_registered() -> None:
    stages = builtin_stages()
    for name, cls, kind in (
        ("limits", Limits, "stream"),
        ("verify", Verify, "stream"),
        ("command", Command, "file"),
    ):
        assert stages[name][0] is cls
        assert cls.kind == kind
        assert cls.name == name


def test_parse_specs() -> None:
    limits = parse_spec('limits:min_size=1KiB,max_size=2MiB,magic=1f8b,content_type="video/*"')
    assert isinstance(limits, Limits)
    assert (limits.min_size, limits.max_size, limits.magic) == (1024, 2 * MiB, b"\x1f\x8b")
    assert limits.content_types == ["video/*"]
    verify = parse_spec("verify:strict=yes,expected=abc,lanes=2")
    assert isinstance(verify, Verify)
    assert (verify.strict, verify.expected, verify.lanes) == (True, "abc", 2)
    command = parse_spec('command:cmd="wc -c {path}",timeout=2.5,tail=1KiB,shell=false')
    assert isinstance(command, Command)
    assert command.argv("/a b") == ["wc", "-c", "/a b"]
    assert (command.command_timeout, command.tail) == (2.5, 1024)
    with pytest.raises(UsageError, match="magic"):
        parse_spec("limits:magic=xyz")
    with pytest.raises(UsageError, match="min_size"):
        parse_spec("limits:min_size=2MiB,max_size=1MiB")
    with pytest.raises(UsageError, match="strict"):
        parse_spec("verify:strict=maybe")
    with pytest.raises(UsageError, match="timeout"):
        parse_spec('command:cmd="true",timeout=0')


# ---------------------------------------------------------------- limits


def test_limits_size_from_metadata() -> None:
    stage = Limits(min_size="1KiB", max_size=4096)
    stage.check_info(ObjectInfo("s3://b/ok", 2048))
    with pytest.raises(StageFailed, match=r"s3://b/small: size 10 bytes is below min_size 1024"):
        stage.check_info(ObjectInfo("s3://b/small", 10))
    with pytest.raises(StageFailed, match=r"s3://b/big: .*above max_size 4096") as caught:
        stage.check_info(ObjectInfo("s3://b/big", 4097))
    assert caught.value.result == {"size": 4097, "content_type": None}
    assert drive(stage, ObjectInfo("s3://b/ok", 2048), b"x" * 2048) == {
        "size": 2048,
        "content_type": None,
    }


@pytest.mark.parametrize(
    ("declared", "pattern", "ok"),
    [
        ("video/mp4", "video/mp4", True),
        ("Video/MP4", "video/mp4", True),
        ("video/mp4", "video/*", True),
        ("video/mp4; codecs=avc1", "video/*", True),
        ("text/plain; charset=utf-8", "text/plain", True),
        ("text/plain", "text/plain; charset=latin-1", True),
        ("application/vnd.ms-excel", "application/vnd.*", True),
        ("anything/at-all", "*", True),
        ("audio/mp4", "video/*", False),
        ("video", "video/*", False),
        ("text/plain2", "text/plain", False),
    ],
)
def test_content_type_matches(declared: str, pattern: str, ok: bool) -> None:
    assert content_type_matches(declared, pattern) is ok


def test_limits_content_type() -> None:
    stage = Limits(content_type="video/*|application/mxf")
    for declared in ("video/mp4", "application/mxf; foo=bar"):
        stage.check_info(ObjectInfo("s3://b/k", 1, content_type=declared))
    with pytest.raises(StageFailed, match=r"s3://b/k: content type 'text/html' does not match"):
        stage.check_info(ObjectInfo("s3://b/k", 1, content_type="text/html"))
    with pytest.raises(StageFailed, match="has no declared content type") as caught:
        stage.check_info(ObjectInfo("/tmp/local", 1))
    assert caught.value.result["content_type_ok"] is False
    result = drive(stage, ObjectInfo("s3://b/k", 3, content_type="video/mp4"), b"abc")
    assert result == {"size": 3, "content_type": "video/mp4", "content_type_ok": True}


def test_parse_magic() -> None:
    assert parse_magic("89504E47") == b"\x89PNG"
    assert parse_magic("0x1f8b") == b"\x1f\x8b"
    assert parse_magic("50 4B 03 04") == b"PK\x03\x04"
    assert parse_magic(b"%PDF") == b"%PDF"
    with pytest.raises(UsageError):
        parse_magic("")


PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("cut", range(0, len(PNG) + 2))
def test_limits_magic_split_anywhere(cut: int) -> None:
    data = PNG + b"rest of the image" * 3
    stage = Limits(magic=PNG.hex())
    info = info_for(data)
    stage.check_info(info)
    stage.start(info)
    # the prefix arrives in three pieces: [0, cut), one byte, the rest
    for piece in (data[:cut], data[cut : cut + 1], data[cut + 1 :]):
        stage.update(memoryview(piece))
    assert stage.finish() == {
        "size": len(data),
        "content_type": None,
        "magic": PNG.hex(),
        "magic_ok": True,
    }


def test_limits_magic_byte_by_byte_and_random() -> None:
    data = PNG + os.urandom(5000)
    stage = Limits(magic=PNG)
    info = info_for(data)
    stage.start(info)
    for i in range(len(data)):
        stage.update(memoryview(data)[i : i + 1])
    assert stage.finish()["magic_ok"] is True
    for seed in range(20):
        assert drive(stage, info, data, seed)["magic_ok"] is True


def test_limits_magic_mismatch_fails_early() -> None:
    data = b"\x89PNX" + b"\0" * 100
    stage = Limits(magic=PNG)
    info = info_for(data, source="s3://b/fake.png")
    stage.start(info)
    stage.update(memoryview(data[:2]))  # a matching beginning passes
    with pytest.raises(
        StageFailed, match=r"s3://b/fake.png: starts with 89504e5800000000, not"
    ) as caught:
        stage.update(memoryview(data[2:]))
    assert caught.value.result["magic_ok"] is False
    assert caught.value.result["magic"] == data[:8].hex()


def test_limits_magic_object_shorter_than_prefix() -> None:
    stage = Limits(magic=PNG)
    short = PNG[:5]
    with pytest.raises(StageFailed, match="shorter than the 8-byte magic prefix"):
        stage.check_info(info_for(short))
    # a local file whose size is only known as it is read: caught at finish
    stage.start(info_for(short))
    stage.update(memoryview(short))
    with pytest.raises(StageFailed, match=r"is 5 bytes long, shorter than the 8-byte") as caught:
        stage.finish()
    assert caught.value.result["magic"] == short.hex()
    stage.start(info_for(b""))
    with pytest.raises(StageFailed, match="is 0 bytes long"):
        stage.finish()


# ---------------------------------------------------------------- verify, no server


def crc64nvme_reference(data: bytes, crc: int = 0) -> int:
    """Bitwise CRC-64/NVME (reflected 0x9a6c9329ac4bc9b5, init and xorout all ones)."""
    poly = 0x9A6C9329AC4BC9B5
    crc ^= 0xFFFFFFFFFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (poly if crc & 1 else 0)
    return crc ^ 0xFFFFFFFFFFFFFFFF


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_crc64nvme_matches_reference() -> None:
    pytest.importorskip("awscrt")
    assert crc64nvme_reference(b"123456789") == 0xAE8B14860A799888
    digest = verify_module.new_digest("CRC64NVME")
    assert digest is not None
    data = os.urandom(3000)
    digest.update(memoryview(data)[:1234])
    digest.update(memoryview(data)[1234:])
    assert digest.digest() == crc64nvme_reference(data).to_bytes(8, "big")


def crc32c_reference(data: bytes) -> int:
    """Bitwise CRC32C (Castagnoli, reflected), the oracle for both backends."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("backend", ["awscrt", "crc32c"])
def test_crc32c_backends(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "awscrt":
        pytest.importorskip("awscrt")
    else:
        monkeypatch.setattr(verify_module, "_awscrt_checksums", lambda: None)
    assert crc32c_reference(b"123456789") == 0xE3069283
    data = os.urandom(10_000)
    stored = b64(crc32c_reference(data).to_bytes(4, "big"))
    result = drive(Verify(), info_for(data, checksums={"CRC32C": stored}), data)
    assert result == {"method": "checksum-crc32c", "expected": stored, "actual": stored}


def test_crc64nvme_without_awscrt_falls_back_to_etag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "_awscrt_checksums", lambda: None)
    data = b"hello world"
    etag = hashlib.md5(data).hexdigest()
    info = info_for(data, etag=etag, checksums={"CRC64NVME": "AAAAAAAAAAA="})
    assert drive(Verify(), info, data)["method"] == "etag-md5"
    plan = choose_plan(dataclasses.replace(info, etag=None))
    assert isinstance(plan, list)
    assert any("awscrt" in reason for reason in plan)


def test_verify_whole_object_checksums_by_hand() -> None:
    data = os.urandom(200_000)
    values = {
        "CRC32": b64(zlib.crc32(data).to_bytes(4, "big")),
        "SHA1": b64(hashlib.sha1(data).digest()),
        "SHA256": b64(hashlib.sha256(data).digest()),
    }
    for name, value in values.items():
        result = drive(Verify(), info_for(data, checksums={name: value}), data, seed=len(name))
        assert result == {"method": f"checksum-{name.lower()}", "expected": value, "actual": value}
    # the cheapest algorithm is preferred when several are stored
    assert drive(Verify(), info_for(data, checksums=values), data)["method"] == "checksum-crc32"
    # hex is accepted for an override
    hex_crc = zlib.crc32(data).to_bytes(4, "big").hex()
    stage = Verify(expected=hex_crc)
    assert (
        drive(stage, info_for(data, checksums={"CRC32": "AAAAAA=="}), data)["actual"]
        == (values["CRC32"])
    )


def test_verify_empty_object() -> None:
    md5 = hashlib.md5(b"").hexdigest()
    assert drive(Verify(), info_for(b"", etag=md5), b"") == {
        "method": "etag-md5",
        "expected": md5,
        "actual": md5,
    }


def multipart_etag(data: bytes, part_size: int) -> str:
    parts = [data[i : i + part_size] for i in range(0, len(data), part_size)] or [b""]
    md5s = b"".join(hashlib.md5(p).digest() for p in parts)
    return f"{hashlib.md5(md5s).hexdigest()}-{len(parts)}"


@pytest.mark.parametrize("lanes", [1, 2, 3])
@pytest.mark.parametrize(
    ("size", "part_size"),
    [
        (1, 1000),
        (999, 1000),
        (1000, 1000),
        (1001, 1000),
        (3 * MiB + 17, MiB),
        (4 * MiB, MiB),
        (5 * MiB + 1, 2 * MiB + 3),
        (2 * MiB, 3 * MiB),
    ],
)
def test_verify_multipart_etag_by_hand(size: int, part_size: int, lanes: int) -> None:
    data = random.Random(size).randbytes(size)
    etag = multipart_etag(data, part_size)
    info = info_for(
        data, etag=etag, parts_count=int(etag.split("-")[1]), multipart_part_size=part_size
    )
    for seed in range(3):
        result = drive(Verify(lanes=lanes), info, data, seed)
        assert result == {
            "method": "etag-multipart-md5",
            "expected": etag,
            "actual": etag,
            "part_size": part_size,
        }
    wrong = etag.replace(etag[0], "0" if etag[0] != "0" else "1", 1)
    with pytest.raises(StageFailed, match=r"s3://bucket/key: etag-multipart-md5 mismatch"):
        drive(Verify(expected=wrong, lanes=lanes), info, data)


def test_verify_stage_reused_and_abandoned() -> None:
    """start() after an unfinished object resets the stage (lanes included)."""
    data = random.Random(1).randbytes(3 * MiB)
    info = info_for(data, etag=multipart_etag(data, MiB), multipart_part_size=MiB)
    stage = Verify(lanes=2)
    stage.start(info)
    stage.update(memoryview(data)[: 2 * MiB + 5])  # abandoned in the middle
    assert drive(stage, info, data)["method"] == "etag-multipart-md5"
    assert not lane_threads()
    # an abandoned stage that is dropped stops its hashing threads
    stage.start(info)
    stage.update(memoryview(data)[: MiB + 5])
    assert lane_threads()
    del stage
    gc.collect()
    deadline = time.monotonic() + 5
    while lane_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not lane_threads()


def lane_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fastpipe-verify-lane")]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"etag": "not-an-md5"}, "is not an MD5"),
        ({"etag": "0" * 32 + "-3"}, "part size is unknown"),
        ({"etag": "0" * 32 + "-2", "multipart_part_size": 1000}, "cannot make"),
        ({"etag": "0" * 32 + "-3", "multipart_part_size": 1000, "parts_count": 4}, "HEAD says 4"),
        ({"checksums": {"CRC32C": "AAAAAA==-3"}, "checksum_type": "COMPOSITE"}, "unknown"),
        ({}, "no stored checksum and no ETag"),
    ],
)
def test_verify_unverifiable(fields: dict[str, Any], reason: str) -> None:
    data = b"x" * 2500
    info = info_for(data, **fields)
    result = drive(Verify(), info, data)
    assert result["method"] == "unverifiable"
    assert any(reason in r for r in result["reason"])
    with pytest.raises(StageFailed, match="cannot be verified .* strict"):
        Verify(strict=True).check_info(info)
    stage = Verify(strict=True)
    stage.start(info)
    with pytest.raises(StageFailed, match="strict"):
        stage.finish()


def test_verify_expected_without_metadata_is_an_etag() -> None:
    data = b"local file bytes"
    md5 = hashlib.md5(data).hexdigest()
    assert drive(Verify(expected=md5.upper()), info_for(data), data)["method"] == "etag-md5"
    with pytest.raises(StageFailed, match=f"etag-md5 mismatch: given {'0' * 32}"):
        drive(Verify(expected="0" * 32), info_for(data, source="/data/f"), data)


def test_verify_short_body_fails() -> None:
    data = b"abcdef"
    info = info_for(data, etag=hashlib.md5(data).hexdigest())
    stage = Verify()
    stage.start(info)
    stage.update(memoryview(data[:3]))
    with pytest.raises(StageFailed, match="received 3 bytes, HEAD said 6"):
        stage.finish()


# ---------------------------------------------------------------- verify against SeaweedFS


@pytest.fixture(scope="module")
def s3(s3_server: Any) -> Any:
    """The session's server (tests/conftest.py)."""
    return s3_server


def client(server: Any, checksums: str = "when_supported") -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name="us-east-1",
        config=Config(request_checksum_calculation=checksums),
    )


@pytest.fixture(scope="module")
def bucket(s3: Any) -> str:
    client(s3).create_bucket(Bucket=BUCKET)
    return BUCKET


def head_info(c: Any, key: str) -> tuple[ObjectInfo, dict[str, Any], dict[str, Any] | None]:
    """HEAD the object as the engine does: checksums on, and part 1 when multipart."""
    head = c.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    part1 = None
    if "-" in strip_etag(head["ETag"]) or head.get("PartsCount"):
        part1 = c.head_object(Bucket=BUCKET, Key=key, PartNumber=1, ChecksumMode="ENABLED")
    info = object_info_from_head(head, part1, f"s3://{BUCKET}/{key}")
    return info, head, part1


def shown(response: dict[str, Any] | None) -> dict[str, Any] | None:
    if response is None:
        return None
    skip = ("ResponseMetadata", "LastModified", "Metadata", "AcceptRanges")
    return {k: v for k, v in response.items() if k not in skip}


def check_object(c: Any, key: str, data: bytes, method: str, part_size: int | None = None) -> None:
    """HEAD, download, verify on random splits; a changed expected value must fail."""
    info, head, part1 = head_info(c, key)
    print(f"\n{key}\n  HEAD   {shown(head)}\n  PART 1 {shown(part1)}")
    assert info.size == len(data)
    assert info.multipart_part_size == part_size
    body = c.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == data
    for seed, lanes in ((1, 1), (2, 2), (3, None)):
        result = drive(Verify(lanes=lanes), info, body, seed)
        assert result["method"] == method, result
        assert result["actual"] == result["expected"]
    expected = result["expected"]
    altered = ("B" if expected[0] == "A" else "A") + expected[1:]
    if method.startswith("etag"):
        altered = ("1" if expected[0] == "0" else "0") + expected[1:]
    with pytest.raises(StageFailed, match=rf"s3://{BUCKET}/{key}: {method} mismatch") as caught:
        drive(Verify(expected=altered), info, body)
    assert caught.value.result["expected"] == altered
    assert caught.value.result["actual"] == expected
    # one flipped byte in the downloaded bytes is caught too
    flipped = bytearray(body)
    flipped[len(body) // 2] ^= 1
    with pytest.raises(StageFailed, match="mismatch"):
        drive(Verify(), info, bytes(flipped))
    # with the checksums hidden, the ETag still verifies the same bytes
    etag_method = "etag-multipart-md5" if part_size else "etag-md5"
    bare = dataclasses.replace(info, checksums={}, checksum_type=None)
    assert drive(Verify(lanes=2), bare, body, seed=4)["method"] == etag_method


@pytest.mark.parametrize("algorithm", ["CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME"])
def test_seaweedfs_single_part_checksum(s3: Any, bucket: str, algorithm: str) -> None:
    needs_crt_upload(algorithm)
    c = client(s3)
    data = os.urandom(300_000 + len(algorithm))
    key = f"single-{algorithm}"
    c.put_object(Bucket=bucket, Key=key, Body=data, ChecksumAlgorithm=algorithm)
    check_object(c, key, data, f"checksum-{algorithm.lower()}")


def test_seaweedfs_single_part_default_and_plain(s3: Any, bucket: str) -> None:
    data = os.urandom(123_457)
    c = client(s3)  # boto3 >= 1.36 adds a CRC32 by default
    c.put_object(Bucket=bucket, Key="single-default", Body=data)
    check_object(c, "single-default", data, "checksum-crc32")
    plain = client(s3, checksums="when_required")
    plain.put_object(Bucket=bucket, Key="single-plain", Body=data)
    info, head, _ = head_info(plain, "single-plain")
    assert info.checksums == {}
    assert info.etag == hashlib.md5(data).hexdigest()
    check_object(plain, "single-plain", data, "etag-md5")
    # a HEAD of part 1 of a single-part object: what the server says
    part1 = plain.head_object(Bucket=bucket, Key="single-plain", PartNumber=1)
    print(f"\nsingle-plain PART 1 {shown(part1)}")
    assert object_info_from_head(head, part1, "s3://x/y").multipart_part_size is None


def needs_crt_upload(algorithm: str) -> None:
    """botocore computes CRC32C and CRC64NVME for uploads only with awscrt."""
    if algorithm in ("CRC32C", "CRC64NVME"):
        pytest.importorskip("awscrt")


def upload_multipart(c: Any, key: str, data: bytes, part_size: int) -> None:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(
        multipart_threshold=part_size,
        multipart_chunksize=part_size,
        max_concurrency=4,
        preferred_transfer_client="classic",
    )
    c.upload_fileobj(io.BytesIO(data), BUCKET, key, Config=config)


@pytest.mark.parametrize(
    ("size", "part_size"),
    [
        (12 * MiB + 7, 5 * MiB),  # last part shorter
        (12 * MiB, 6 * MiB),  # parts of equal size
        (5 * MiB + 1, 5 * MiB),  # last part of one byte
        (11 * MiB + 3, 7 * MiB + 5),  # part size not a power of two
    ],
)
def test_seaweedfs_multipart_upload_file(s3: Any, bucket: str, size: int, part_size: int) -> None:
    data = random.Random(size).randbytes(size)
    parts = -(-size // part_size)
    # boto3's default: a composite CRC32 over the parts
    c = client(s3)
    key = f"mp-default-{size}-{part_size}"
    upload_multipart(c, key, data, part_size)
    info, _, _ = head_info(c, key)
    assert info.parts_count == parts
    assert info.etag == multipart_etag(data, part_size)
    check_object(c, key, data, "composite-crc32", part_size)
    # no checksum at all: the multipart ETag
    plain = client(s3, checksums="when_required")
    key = f"mp-plain-{size}-{part_size}"
    upload_multipart(plain, key, data, part_size)
    check_object(plain, key, data, "etag-multipart-md5", part_size)


@pytest.mark.parametrize(
    ("algorithm", "checksum_type"),
    [
        ("CRC32C", "COMPOSITE"),
        ("CRC32", "COMPOSITE"),
        ("SHA1", "COMPOSITE"),
        ("SHA256", "COMPOSITE"),
        ("CRC32", "FULL_OBJECT"),
        ("CRC32C", "FULL_OBJECT"),
        ("CRC64NVME", "FULL_OBJECT"),
    ],
)
def test_seaweedfs_multipart_by_hand(
    s3: Any, bucket: str, algorithm: str, checksum_type: str
) -> None:
    needs_crt_upload(algorithm)
    c = client(s3)
    part_size = 5 * MiB
    data = random.Random(algorithm).randbytes(2 * part_size + 4321)
    key = f"mp-{algorithm}-{checksum_type}"
    upload = c.create_multipart_upload(
        Bucket=bucket, Key=key, ChecksumAlgorithm=algorithm, ChecksumType=checksum_type
    )
    parts = []
    for number, offset in enumerate(range(0, len(data), part_size), 1):
        response = c.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=data[offset : offset + part_size],
            ChecksumAlgorithm=algorithm,
        )
        parts.append(
            {
                "PartNumber": number,
                "ETag": response["ETag"],
                f"Checksum{algorithm}": response[f"Checksum{algorithm}"],
            }
        )
    extra = {"ChecksumType": checksum_type} if checksum_type == "FULL_OBJECT" else {}
    c.complete_multipart_upload(
        Bucket=bucket,
        Key=key,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": parts},
        **extra,
    )
    info, _, _ = head_info(c, key)
    assert info.checksum_type == checksum_type
    method = f"{'composite' if checksum_type == 'COMPOSITE' else 'checksum'}-{algorithm.lower()}"
    check_object(c, key, data, method, part_size)


def test_object_info_from_head_mapping() -> None:
    head = {
        "ContentLength": 13631611,
        "ETag": '"4a0be6b4fac5c71304147b8e00d29eac-3"',
        "VersionId": "v1",
        "ContentType": "video/mp4",
        "ChecksumCRC32C": "zV4hVg==-3",
        "ChecksumSHA256": "",
        "ChecksumType": "COMPOSITE",
    }
    part1 = {"ContentLength": 5242880, "PartsCount": 3, "ETag": head["ETag"]}
    info = object_info_from_head(head, part1, "s3://bkt/a/b.mp4")
    assert info == ObjectInfo(
        source="s3://bkt/a/b.mp4",
        size=13631611,
        etag="4a0be6b4fac5c71304147b8e00d29eac-3",
        version_id="v1",
        content_type="video/mp4",
        bucket="bkt",
        key="a/b.mp4",
        checksums={"CRC32C": "zV4hVg==-3"},
        checksum_type="COMPOSITE",
        parts_count=3,
        multipart_part_size=5242880,
    )
    # no part HEAD: the part count still comes from the ETag, the size stays unknown
    info = object_info_from_head(head, None, "s3://bkt/k", bucket="other", key="k2")
    assert (info.parts_count, info.multipart_part_size) == (3, None)
    assert (info.bucket, info.key) == ("other", "k2")
    single = object_info_from_head({"ContentLength": 5, "ETag": '"abc"'}, None, "/local")
    assert (single.etag, single.parts_count, single.bucket) == ("abc", None, None)


# ---------------------------------------------------------------- command


def local_file(path: Path) -> LocalFile:
    return LocalFile(str(path), path.stat().st_size, ObjectInfo(f"s3://b/{path.name}", 0))


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "sample.bin"
    path.write_bytes(b"hello fastpipe\n")
    return path


def test_command_true_and_false(sample: Path) -> None:
    result = Command("true {path}").run(local_file(sample))
    assert result["cmd"] == ["true", str(sample)]
    assert result["returncode"] == 0
    assert result["stdout_tail"] == result["stderr_tail"] == ""
    assert result["seconds"] >= 0
    with pytest.raises(
        StageFailed, match=r"s3://b/sample.bin: command false .* status 1"
    ) as caught:
        Command("false").run(local_file(sample))
    assert caught.value.result["returncode"] == 1
    assert caught.value.result["cmd"] == ["false", str(sample)]  # path appended


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_command_script_checks_the_file(tmp_path: Path, sample: Path) -> None:
    script = write_script(
        tmp_path / "check.sh",
        'test "$#" -eq 2 || { echo "want 2 args, got $#" >&2; exit 3; }\n'
        'grep -q "$1" "$2" || { echo "no $1 in $2" >&2; exit 4; }\n'
        'echo "found $1"\n',
    )
    result = Command(f"{script} fastpipe {{path}}").run(local_file(sample))
    assert result["stdout_tail"] == "found fastpipe\n"
    with pytest.raises(StageFailed, match=r"exited with status 4: no missing in ") as caught:
        Command(f"{script} missing {{path}}").run(local_file(sample))
    assert caught.value.result["stderr_tail"].startswith("no missing in ")


def test_command_path_with_spaces_and_semicolon(tmp_path: Path) -> None:
    folder = tmp_path / "odd dir"
    folder.mkdir()
    path = folder / "a b; touch pwned $(touch pwned2) 'q\".bin"
    path.write_bytes(b"data")
    script = write_script(
        tmp_path / "args.sh", 'printf "%s\\n" "$#" "$1"; if test -f "$1"; then cat "$1"; fi\n'
    )
    result = Command(f"{script} {{path}}").run(local_file(path))
    assert result["stdout_tail"] == f"1\n{path}\ndata"
    assert result["cmd"] == [str(script), str(path)]
    # an argument that embeds the placeholder stays one argument
    result = Command(f"{script} --input={{path}}").run(local_file(path))
    assert result["stdout_tail"].splitlines()[:2] == ["1", f"--input={path}"]
    # through a shell, the path is quoted for it, and is "$1" too
    result = Command("test -f {path} && wc -c < {path}", shell=True).run(local_file(path))
    assert result["stdout_tail"].strip() == "4"
    assert result["cmd"][:2] == ["/bin/sh", "-c"]
    assert result["cmd"][-1] == str(path)
    result = Command('cat "$1"', shell=True).run(local_file(path))
    assert result["stdout_tail"] == "data"
    for cwd in (Path.cwd(), folder, tmp_path):
        assert not (cwd / "pwned").exists()
        assert not (cwd / "pwned2").exists()


def test_command_timeout_kills_the_group(tmp_path: Path, sample: Path) -> None:
    marker = tmp_path / "survivor"
    # a background child keeps the pipes open and would touch the marker if it survived
    cmd = f"(sleep 3; touch {marker}) & sleep 30"
    started = time.monotonic()
    with pytest.raises(StageTimeout, match=r"ran past its 0.5 s timeout") as caught:
        Command(cmd, shell=True, timeout=0.5).run(local_file(sample))
    assert time.monotonic() - started < 4
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.result["returncode"] == -9
    time.sleep(3.5)
    assert not marker.exists()


def test_command_does_not_wait_for_background_children(sample: Path) -> None:
    started = time.monotonic()
    result = Command("sleep 30 & echo done", shell=True).run(local_file(sample))
    assert result["stdout_tail"] == "done\n"
    assert time.monotonic() - started < 10


def test_command_tail_keeps_the_end(sample: Path) -> None:
    code = "import sys; sys.stdout.write('x' * 100000 + 'END'); sys.stderr.write('e' * 50)"
    result = Command([sys.executable, "-c", code], tail=10).run(local_file(sample))
    assert result["stdout_tail"] == "xxxxxxxEND"
    assert result["stderr_tail"] == "e" * 10


def test_command_failures(sample: Path) -> None:
    with pytest.raises(StageFailed, match="could not start"):
        Command("/nonexistent/program {path}").run(local_file(sample))
    with pytest.raises(StageFailed, match="was killed by SIGTERM"):
        Command("kill -TERM $$", shell=True).run(local_file(sample))
    with pytest.raises(UsageError, match="does not parse"):
        Command('echo "unbalanced')
    with pytest.raises(UsageError, match="empty"):
        Command("  ")


# ---------------------------------------------------------------- chunk manifests


class _HeldChunk:
    """Makes a Chunk stage block in its first window until the engine calls it off."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from fastpipe.stages import chunk as chunk_module

        self.entered = threading.Event()
        self.released = threading.Event()
        real = chunk_module.fingerprints

        def held(view: Any, ends: Any) -> Any:
            self.entered.set()
            self.released.wait()
            return real(view, ends)

        monkeypatch.setattr(chunk_module, "fingerprints", held)

    def stage(self, **kwargs: Any) -> Any:
        from fastpipe.stages.chunk import Chunk

        held = self

        class Held(Chunk):
            def cancel(self) -> None:
                super().cancel()
                held.released.set()

        return Held(**kwargs)


@pytest.mark.parametrize("way_out", ["timeout", "cancel"])
def test_chunk_leaves_no_temp_manifest_when_called_off(
    way_out: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyio

    import fastpipe

    source = tmp_path / "data.bin"
    source.write_bytes(os.urandom(256 << 10))
    folder = tmp_path / "manifests"
    folder.mkdir()
    held = _HeldChunk(monkeypatch)
    stage = held.stage(avg_size=16 << 10, manifest=str(folder / "m.fpcdc"))
    temp_modes: list[int] = []

    async def main() -> Any:
        async def call_off(scope: anyio.CancelScope) -> None:
            await anyio.to_thread.run_sync(held.entered.wait)
            temp_modes.extend(stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir())
            if way_out == "cancel":
                scope.cancel()

        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(call_off, scope)
                return await fastpipe.process(str(source), stages=[stage])
        return None

    if way_out == "timeout":
        stage.timeout = 0.3  # the stage blocks until called off: the deadline always passes
    report = anyio.run(main)
    assert temp_modes == [0o600]  # the temp manifest existed while the stage ran
    assert list(folder.iterdir()) == []
    if way_out == "timeout":
        assert report is not None and report.error_type == "StageTimeout"
        assert f"{source}: stage chunk ran past its timeout of 0.3 s" in str(report.error)
    else:
        assert report is None


def test_chunk_refuses_a_missing_manifest_folder(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "m.fpcdc"
    with pytest.raises(UsageError, match=r"chunk manifest=.*folder .* does not exist"):
        parse_spec(f"chunk:manifest={missing}")
    with pytest.raises(UsageError, match=r"chunk previous=.*folder .* does not exist"):
        parse_spec(f"chunk:previous={missing}")
    with pytest.raises(UsageError, match=r"chunk previous=.*no such manifest"):
        parse_spec(f"chunk:previous={tmp_path / 'm.fpcdc'}")


def test_chunk_manifest_readers_refuse_a_bad_header_alike(tmp_path: Path) -> None:
    from fastpipe.stages.chunk import _HEADER, read_manifest

    short = tmp_path / "short.fpcdc"
    short.write_bytes(b"x" * (_HEADER.size - 1))
    magic = tmp_path / "magic.fpcdc"
    magic.write_bytes(b"x" * _HEADER.size)
    for path, cause in ((short, "too short"), (magic, "bad magic")):
        message = f"{str(path)!r} is not a fastpipe chunk manifest ({cause})"
        with pytest.raises(ValueError) as read:
            read_manifest(path)
        assert str(read.value) == message
        with pytest.raises(UsageError) as built:
            parse_spec(f"chunk:previous={path}")
        assert str(built.value) == f"chunk previous={path}: unusable: {message}"


def test_cli_refuses_a_missing_manifest_folder_before_any_byte(tmp_path: Path) -> None:
    source = tmp_path / "data.bin"
    source.write_bytes(b"x" * 1000)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastpipe.cli",
            "run",
            str(source),
            "--stage",
            f"chunk:manifest={tmp_path / 'nope' / 'm.fpcdc'}",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_chunk_previous_with_other_sizes_is_refused(tmp_path: Path) -> None:
    import fastpipe
    from fastpipe.stages.chunk import Chunk

    source = tmp_path / "data.bin"
    source.write_bytes(os.urandom(512 << 10))
    manifest = tmp_path / "m.fpcdc"
    report = fastpipe.run(str(source), stages=[Chunk(avg_size=16 << 10, manifest=str(manifest))])
    assert report.passed, report.error
    with pytest.raises(UsageError, match=r"made with chunk sizes min/avg/max 4096/16384/65536"):
        Chunk(avg_size=32 << 10, previous=str(manifest))
    # The same sizes: the same bytes hold no new chunk.
    again = Chunk(avg_size=16 << 10, previous=str(manifest), manifest=str(manifest))
    report = fastpipe.run(str(source), stages=[again])
    assert report.passed, report.error
    result = report.stage("chunk").result
    assert result["new_chunks"] == 0 and result["new_bytes"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "m.fpcdc"]
