"""--resume: a run killed with SIGKILL continues from its journal, and only then."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from faultproxy import Fault, FaultProxy

SIZE = 8 << 20
PART = 256 << 10
HELD_AFTER = 8  # GETs that pass before the proxy holds the rest


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastpipe.cli", *args]




def _start_and_kill(uri: str, dest: Path, proxy: FaultProxy) -> None:
    """Start a resumable run that stalls after HELD_AFTER parts, and SIGKILL it."""
    proxy.reset(lambda n, request: Fault("hold") if n >= HELD_AFTER else None)
    journal = dest.parent / f".{dest.name}.fastpipe-journal"
    proc = subprocess.Popen(
        _cli(
            "run",
            uri,
            "--dest",
            str(dest),
            "--resume",
            "--concurrency",
            "1",
            "--part-size",
            str(PART),
            "--endpoint-url",
            proxy.url,
            "--json",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        done: list[int] = []
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                done = json.loads(journal.read_text())["done"]
            except (OSError, ValueError, KeyError):
                done = []
            if len(done) >= HELD_AFTER:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the download ended before it was killed"
        assert done == list(range(HELD_AFTER))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proxy.reset(None)  # releases the held request
    assert proc.returncode == -signal.SIGKILL
    assert not dest.exists()
    assert journal.exists()


@pytest.fixture
def big_object(s3_client: Any, bucket: str, tmp_path: Path) -> tuple[str, bytes]:
    data = os.urandom(SIZE)
    key = f"resume-{os.getpid()}-{time.monotonic_ns()}"
    s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}", data


def test_resume_fetches_only_missing_parts(
    big_object: tuple[str, bytes], tmp_path: Path, proxy: FaultProxy
) -> None:
    uri, data = big_object
    dest = tmp_path / "out.bin"
    _start_and_kill(uri, dest, proxy)
    result = subprocess.run(
        _cli(
            "run",
            uri,
            "--dest",
            str(dest),
            "--resume",
            "--part-size",
            "8MiB",
            "--stage",
            "checksum:algo=sha256",
            "--json",
        ),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    dl = report["download"]
    assert dl["reused_bytes"] == HELD_AFTER * PART
    assert dl["bytes"] == SIZE - HELD_AFTER * PART
    assert dl["part_size"] == PART  # the journal's plan is kept
    assert report["stages"][0]["result"]["hexdigest"] == hashlib.sha256(data).hexdigest()
    assert dest.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]  # journal removed


def test_resume_refused_when_object_changed(
    big_object: tuple[str, bytes], s3_client: Any, bucket: str, tmp_path: Path, proxy: FaultProxy
) -> None:
    uri, _ = big_object
    dest = tmp_path / "out.bin"
    _start_and_kill(uri, dest, proxy)
    s3_client.put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=b"new content")
    result = subprocess.run(
        _cli("run", uri, "--dest", str(dest), "--resume"), capture_output=True, text=True
    )
    assert result.returncode == 4
    assert "refusing to resume" in result.stderr
    assert uri in result.stderr
    assert not dest.exists()


def test_no_resume_without_flag(
    big_object: tuple[str, bytes], tmp_path: Path, proxy: FaultProxy
) -> None:
    uri, data = big_object
    dest = tmp_path / "out.bin"
    _start_and_kill(uri, dest, proxy)
    result = subprocess.run(
        _cli("run", uri, "--dest", str(dest), "--json"), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    dl = json.loads(result.stdout)["download"]
    assert dl["reused_bytes"] == 0
    assert dl["bytes"] == SIZE
    assert dest.read_bytes() == data


def test_resume_needs_dest(bucket: str) -> None:
    result = subprocess.run(
        _cli("run", f"s3://{bucket}/x", "--resume"), capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "--resume needs --dest" in result.stderr
