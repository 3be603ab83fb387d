"""--resume: a run interrupted in any way continues from its journal, and only then.

A download is held at the fault proxy after HELD_AFTER parts (one fetcher, so parts go
in order), the journal is watched until it lists those parts, and the run is then
killed, interrupted, or left to exhaust its retries.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from faultproxy import Fault, FaultProxy, internal_error

import fastpipe
from fastpipe import Config
from fastpipe._placement import ResumeState

SIZE = 8 << 20
PART = 256 << 10
HELD_AFTER = 8  # GETs that pass before the proxy holds (or fails) the rest


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastpipe.cli", *args]


def state_of(dest: Path) -> ResumeState:
    """The resume state's file names for ``dest``."""
    return ResumeState(str(dest))


def _journal_done(dest: Path) -> list[int]:
    try:
        done = json.loads(Path(state_of(dest).journal_path).read_text())["done"]
    except (OSError, ValueError, KeyError):
        return []
    assert isinstance(done, list)
    return done


def _resumable_run(uri: str, dest: Path, proxy: FaultProxy, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
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
            *extra,
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_parts(proc: subprocess.Popen[str], dest: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if len(_journal_done(dest)) >= HELD_AFTER:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the download ended before it was interrupted"
    assert _journal_done(dest) == list(range(HELD_AFTER))


def _start_and_stop(uri: str, dest: Path, proxy: FaultProxy, signum: int) -> str:
    """Start a resumable run that stalls after HELD_AFTER parts and send it ``signum``.

    Returns its stderr.
    """
    proxy.reset(lambda n, request: Fault("hold") if n >= HELD_AFTER else None)
    proc = _resumable_run(uri, dest, proxy)
    try:
        _wait_for_parts(proc, dest)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        proxy.reset(None)  # releases the held request
    expected = {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 130, signal.SIGTERM: 143}
    assert proc.returncode == expected[signum], err
    _check_kept(dest)
    if signum != signal.SIGKILL:
        # A run that ends on its own lets go of the lock and removes its file.
        assert not os.path.exists(state_of(dest).lock_path)
    return err


def _check_kept(dest: Path) -> None:
    """What an interrupted resumable run leaves: its temp file and journal, no dest."""
    state = state_of(dest)
    assert not dest.exists()
    assert _journal_done(dest) == list(range(HELD_AFTER))
    assert os.path.getsize(state.temp_path) == SIZE
    assert os.stat(state.temp_path).st_mode & 0o777 == 0o600


def _resume(uri: str, dest: Path, *extra: str) -> dict[str, Any]:
    """Resume without the proxy; return the JSON report."""
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
            *extra,
        ),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    report["stderr"] = result.stderr
    return report


def _check_resumed(report: dict[str, Any], dest: Path, data: bytes) -> None:
    dl = report["download"]
    assert dl["reused_bytes"] == HELD_AFTER * PART
    assert dl["bytes"] == SIZE - HELD_AFTER * PART
    assert dl["part_size"] == PART  # the journal's plan is kept
    assert report["stages"][0]["result"]["hexdigest"] == hashlib.sha256(data).hexdigest()
    assert dest.read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # state removed


@pytest.fixture
def big_object(s3_client: Any, bucket: str, tmp_path: Path) -> tuple[str, bytes]:
    data = os.urandom(SIZE)
    key = f"resume-{os.getpid()}-{time.monotonic_ns()}"
    s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}", data


@pytest.mark.parametrize(
    "signum", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["KILL", "INT", "TERM"]
)
def test_resume_fetches_only_missing_parts(
    big_object: tuple[str, bytes], tmp_path: Path, proxy: FaultProxy, signum: int
) -> None:
    uri, data = big_object
    dest = tmp_path / "out.bin"
    _start_and_stop(uri, dest, proxy, signum)
    _check_resumed(_resume(uri, dest), dest, data)


def test_resume_after_retries_exhausted(
    big_object: tuple[str, bytes], tmp_path: Path, proxy: FaultProxy
) -> None:
    uri, data = big_object
    dest = tmp_path / "out.bin"
    proxy.reset(lambda n, request: internal_error() if n >= HELD_AFTER else None)
    proc = _resumable_run(uri, dest, proxy, "--max-attempts", "2")
    _, err = proc.communicate(timeout=120)
    proxy.reset(None)
    assert proc.returncode == 3, err
    assert "failed after 2 attempts" in err
    _check_kept(dest)
    assert not os.path.exists(state_of(dest).lock_path)
    _check_resumed(_resume(uri, dest), dest, data)


def test_changed_object_discards_the_state(
    big_object: tuple[str, bytes], s3_client: Any, bucket: str, tmp_path: Path, proxy: FaultProxy
) -> None:
    """The object changed since the interrupted run: the state is dropped, with a
    warning, and the run starts over (it is never stuck on it, with or without --force)."""
    uri, _ = big_object
    dest = tmp_path / "out.bin"
    _start_and_stop(uri, dest, proxy, signal.SIGKILL)
    new = os.urandom(1_000_003)  # smaller than what the temp file holds
    s3_client.put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=new)
    report = _resume(uri, dest)
    assert "discarding the resume state" in report["stderr"]
    assert "changed" in report["stderr"] and uri in report["stderr"]
    assert "Traceback" not in report["stderr"]
    assert report["download"]["reused_bytes"] == 0
    assert report["download"]["bytes"] == len(new)
    assert dest.read_bytes() == new  # exactly the new object: no tail of the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_other_object_to_same_dest_starts_over(
    big_object: tuple[str, bytes],
    put_object: Callable[..., str],
    tmp_path: Path,
    proxy: FaultProxy,
    force: bool,
) -> None:
    """An interrupted 8 MiB run, then a 1 MB object to the same --dest: the kept file is
    the small object, at its size."""
    uri, _ = big_object
    dest = tmp_path / "out.bin"
    _start_and_stop(uri, dest, proxy, signal.SIGINT)
    other = os.urandom(1_000_000)
    report = _resume(put_object(other), dest, *(["--force"] if force else []))
    assert "another object" in report["stderr"]
    assert dest.read_bytes() == other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_stale_longer_temp_file_is_cut(put_object: Callable[..., str], tmp_path: Path) -> None:
    """A temp file longer than the object under a journal that matches it (a forged or
    corrupted state) is never kept at its old length."""
    data = os.urandom(3 * PART + 5)
    uri = put_object(data)
    dest = tmp_path / "out.bin"
    config = Config(part_size=PART)
    state = state_of(dest)
    head = fastpipe.run(uri, stages=[], config=Config(part_size=PART))
    journal = {
        "version": 1,
        "source": uri,
        "etag": head.etag,
        "version_id": head.version_id,
        "size": len(data),
        "part_size": PART,
        "done": [0],
    }
    Path(state.journal_path).write_text(json.dumps(journal))
    Path(state.temp_path).write_bytes(data[:PART] + os.urandom(2 * len(data)))
    report = fastpipe.run(uri, stages=[], dest=dest, config=config, resume=True)
    assert report.passed
    assert report.download.reused_bytes == 0  # the file had the wrong size: not trusted
    assert dest.read_bytes() == data
    # The same with a file of the right size: its whole part is kept.
    dest.unlink()
    Path(state.journal_path).write_text(json.dumps(journal))
    Path(state.temp_path).write_bytes(data[:PART] + bytes(len(data) - PART))
    report = fastpipe.run(uri, stages=[], dest=dest, config=config, resume=True)
    assert report.download.reused_bytes == PART
    assert dest.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_temp_file_without_journal_is_not_kept_long(
    put_object: Callable[..., str], tmp_path: Path
) -> None:
    """A run killed before its first journal write leaves a temp file of another size:
    the next resumable run must not keep its tail."""
    data = os.urandom(PART + 1)
    uri = put_object(data)
    dest = tmp_path / "out.bin"
    Path(state_of(dest).temp_path).write_bytes(os.urandom(10 * PART))
    report = fastpipe.run(uri, stages=[], dest=dest, resume=True)
    assert report.passed
    assert dest.read_bytes() == data


def test_second_resumable_run_is_refused(
    big_object: tuple[str, bytes], tmp_path: Path, proxy: FaultProxy
) -> None:
    """Two --resume runs to one destination: the second is refused (exit 2) and leaves
    the first's state alone; the first then finishes with the right bytes."""
    uri, data = big_object
    dest = tmp_path / "out.bin"
    proxy.reset(lambda n, request: Fault("hold") if n >= HELD_AFTER else None)
    first = _resumable_run(uri, dest, proxy)
    try:
        _wait_for_parts(first, dest)
        state = state_of(dest)
        before = sorted(os.listdir(tmp_path))
        assert before == sorted(
            os.path.basename(p) for p in (state.temp_path, state.journal_path, state.lock_path)
        )
        second = subprocess.run(
            _cli("run", uri, "--dest", str(dest), "--resume"), capture_output=True, text=True
        )
        assert second.returncode == 2, second.stderr
        assert "in use by another --resume run" in second.stderr
        assert "Traceback" not in second.stderr and second.stderr.count("\n") == 1
        assert sorted(os.listdir(tmp_path)) == before
        assert os.path.getsize(state.temp_path) == SIZE
        with pytest.raises(fastpipe.DestinationError, match="in use"):
            fastpipe.run(uri, dest=dest, resume=True, force=True)
    finally:
        proxy.reset(None)  # the first run goes on
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert dest.read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_no_resume_without_flag(
    big_object: tuple[str, bytes], tmp_path: Path, proxy: FaultProxy
) -> None:
    uri, data = big_object
    dest = tmp_path / "out.bin"
    _start_and_stop(uri, dest, proxy, signal.SIGKILL)
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
    assert "resume needs a destination (--dest)" in result.stderr
    assert "Traceback" not in result.stderr
