"""Placement: where the bytes land (destination, temp file, resume state) and that
nothing planted there, nor a bad place, turns into a write elsewhere or a traceback."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import fastpipe
from fastpipe import Config
from fastpipe._placement import ObjectPlacement, Placement, ResumeState
from fastpipe.stages import FileStage, LocalFile, ObjectInfo

PART = 256 << 10
VICTIM = b"outside the destination\n"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", *args], capture_output=True, text=True
    )


def _resume(uri: str, dest: Path, **kwargs: Any) -> fastpipe.Report:
    return fastpipe.run(uri, stages=[], dest=dest, config=Config(**kwargs), resume=True)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the destination folder that a planted symlink points to."""
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "victim"
    path.write_bytes(VICTIM)
    path.chmod(0o644)
    return path


@pytest.fixture
def dest_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "dest"
    folder.mkdir()
    return folder


def _check_victim(victim: Path) -> None:
    assert victim.read_bytes() == VICTIM
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


# -- item 1: symlinks and foreign files at the resume names -------------------------------


@pytest.mark.parametrize("which", ["temp_path", "journal_path", "lock_path"])
def test_symlink_at_a_resume_name_is_refused(
    put_object: Callable[..., str], dest_dir: Path, victim: Path, which: str
) -> None:
    uri = put_object(os.urandom(PART + 7))
    dest = dest_dir / "out.bin"
    planted = getattr(ResumeState(str(dest)), which)
    os.symlink(victim, planted)
    with pytest.raises(fastpipe.DestinationError, match="symbolic link") as info:
        _resume(uri, dest)
    assert info.value.exit_code == 2
    _check_victim(victim)
    # Nothing of ours is left; the planted link is left for the user to see.
    assert os.listdir(dest_dir) == [os.path.basename(planted)]


def test_symlink_at_the_journal_new_name_is_not_followed(
    put_object: Callable[..., str], dest_dir: Path, victim: Path
) -> None:
    data = os.urandom(2 * PART + 7)
    uri = put_object(data)
    dest = dest_dir / "out.bin"
    os.symlink(victim, ResumeState(str(dest)).journal_path + ".new")
    report = _resume(uri, dest, part_size=PART)
    assert report.passed
    _check_victim(victim)
    assert dest.read_bytes() == data
    assert os.listdir(dest_dir) == ["out.bin"]


def test_hard_link_at_the_temp_name_is_refused(
    put_object: Callable[..., str], dest_dir: Path, victim: Path
) -> None:
    """With a journal that matches the object (so that the temp file would be reused)."""
    uri = put_object(os.urandom(len(VICTIM)))
    dest = dest_dir / "out.bin"
    state = ResumeState(str(dest))
    head = fastpipe.run(uri, stages=[])
    journal = {"version": 1, "source": uri, "etag": head.etag, "version_id": head.version_id}
    journal.update(size=len(VICTIM), part_size=PART, done=[])
    Path(state.journal_path).write_text(json.dumps(journal))
    os.link(victim, state.temp_path)
    with pytest.raises(fastpipe.DestinationError, match="hard links"):
        _resume(uri, dest)
    _check_victim(victim)
    names = sorted(os.path.basename(p) for p in (state.temp_path, state.journal_path))
    assert sorted(os.listdir(dest_dir)) == names


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_temp_file_of_another_user_is_refused(
    put_object: Callable[..., str], dest_dir: Path
) -> None:
    uri = put_object(os.urandom(PART))
    dest = dest_dir / "out.bin"
    temp = Path(ResumeState(str(dest)).temp_path)
    temp.write_bytes(b"x" * PART)
    os.chown(temp, 65534, 65534)
    with pytest.raises(fastpipe.DestinationError, match="not a regular file of this user"):
        _resume(uri, dest)
    assert temp.read_bytes() == b"x" * PART
    assert os.listdir(dest_dir) == [temp.name]


def test_fifo_at_the_temp_name_is_refused(put_object: Callable[..., str], dest_dir: Path) -> None:
    uri = put_object(os.urandom(PART))
    dest = dest_dir / "out.bin"
    temp = ResumeState(str(dest)).temp_path
    os.mkfifo(temp)
    with pytest.raises(fastpipe.DestinationError, match="not a regular file"):
        _resume(uri, dest)
    assert os.listdir(dest_dir) == [os.path.basename(temp)]


def test_symlink_at_dest_is_replaced_not_followed(
    put_object: Callable[..., str], dest_dir: Path, victim: Path
) -> None:
    data = os.urandom(PART)
    dest = dest_dir / "out.bin"
    os.symlink(victim, dest)
    for resume in (False, True):
        report = fastpipe.run(put_object(data), stages=[], dest=dest, force=True, resume=resume)
        assert report.passed
        assert not dest.is_symlink() and dest.read_bytes() == data
        _check_victim(victim)
        dest.unlink()
        os.symlink(victim, dest)


# -- item 7: temp names never hold the key ------------------------------------------------


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_temp_name_does_not_hold_the_key(
    s3_client: Any, bucket: str, dest_dir: Path, resume: bool
) -> None:
    key = "x;touch pwned$(touch dollar)'q"
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"payload")
    seen: list[str] = []

    class Where(FileStage):
        name = "where"

        def run(self, local: LocalFile) -> None:
            seen.append(os.path.basename(local.path))

    report = fastpipe.run(f"s3://{bucket}/{key}", stages=[Where()], dest=dest_dir, resume=resume)
    assert report.passed
    (name,) = seen
    assert re.fullmatch(r"\.fastpipe-[A-Za-z0-9_]+\.fastpipe-tmp", name), name
    assert "touch" not in name
    if resume:
        assert name == os.path.basename(ResumeState(report.dest or "").temp_path)


# -- item 9: what --dest may be ---------------------------------------------------------


def test_trailing_slash_means_a_folder(put_object: Callable[..., str], tmp_path: Path) -> None:
    uri = put_object(b"payload")
    missing = str(tmp_path / "newfolder") + "/"
    with pytest.raises(fastpipe.DestinationError, match="does not exist"):
        fastpipe.run(uri, stages=[], dest=missing)
    assert os.listdir(tmp_path) == []
    (tmp_path / "newfolder").mkdir()
    report = fastpipe.run(uri, stages=[], dest=missing)
    assert report.dest == str(tmp_path / "newfolder" / uri.rsplit("/", 1)[1])


def test_empty_dest_is_a_usage_error(put_object: Callable[..., str]) -> None:
    with pytest.raises(fastpipe.UsageError, match="dest must not be empty"):
        fastpipe.run(put_object(b"payload"), stages=[], dest="")
    result = _cli("run", "s3://bucket/key", "--dest", "")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr


# -- item 8: bad places get one line and the documented exit code -------------------------


def _bad_places(tmp_path: Path) -> list[tuple[str, list[str], int, str]]:
    long_ascii = str(tmp_path / ("n" * 300))
    long_utf8 = str(tmp_path / ("日" * 90))  # 90 characters, 270 bytes
    return [
        ("temp-dir /proc", ["--temp-dir", "/proc"], 2, "/proc"),
        ("dest /proc/x.bin", ["--dest", "/proc/x.bin"], 2, "/proc"),
        ("dest /proc/x.bin resume", ["--dest", "/proc/x.bin", "--resume"], 2, "/proc"),
        ("dest too long", ["--dest", long_ascii], 2, "too long"),
        ("dest too long resume", ["--dest", long_ascii, "--resume"], 2, "too long"),
        ("dest too long utf-8", ["--dest", long_utf8], 2, "too long"),
        ("dest too long utf-8 resume", ["--dest", long_utf8, "--resume"], 2, "too long"),
        ("dest missing folder/", ["--dest", str(tmp_path / "nope") + "/"], 2, "does not exist"),
    ]


def test_bad_places_give_one_line(put_object: Callable[..., str], tmp_path: Path) -> None:
    uri = put_object(os.urandom(1000))
    for label, args, code, cause in _bad_places(tmp_path):
        result = _cli("run", uri, *args)
        assert result.returncode == code, (label, result.stderr)
        assert "Traceback" not in result.stderr, label
        assert result.stderr.count("\n") == 1, (label, result.stderr)
        assert cause in result.stderr, (label, result.stderr)
    assert os.listdir(tmp_path) == []


def test_long_utf8_name_that_fits_is_kept(put_object: Callable[..., str], tmp_path: Path) -> None:
    """80 three-byte characters (240 bytes) fit; the temp names beside them are short."""
    data = os.urandom(1000)
    dest = tmp_path / ("日" * 80)
    for resume in (False, True):
        report = fastpipe.run(put_object(data), stages=[], dest=dest, resume=resume, force=True)
        assert report.passed and dest.read_bytes() == data
    assert os.listdir(tmp_path) == [dest.name]


# -- placement is per call, validated in one place ----------------------------------------


def test_placement_is_validated_once_for_library_and_cli(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], list[str], str]] = [
        ({"resume": True}, ["--resume"], "resume needs a destination (--dest)"),
        ({"dest": ""}, ["--dest", ""], "dest must not be empty"),
        ({"temp_dir": str(tmp_path / "nope")}, ["--temp-dir", str(tmp_path / "nope")], "nope"),
    ]
    for kwargs, args, message in cases:
        with pytest.raises(fastpipe.UsageError, match=re.escape(message)):
            Placement(**kwargs)
        with pytest.raises(fastpipe.UsageError, match=re.escape(message)):
            fastpipe.run("s3://bucket/key", stages=[], **kwargs)
        result = _cli("run", "s3://bucket/key", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
    assert Placement(dest=tmp_path).dest == str(tmp_path)  # PathLike accepted, kept as str
    for name in ("force", "resume", "temp_dir"):
        assert name not in {f.name for f in dataclasses.fields(Config)}


def test_a_placement_is_closed_once_its_close_went_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine skips a second close (and its hand-off to a thread) only once the first
    # went through: a close that failed leaves the placement open, and the next removes.
    placed = ObjectPlacement(Placement(temp_dir=tmp_path), "some/key")
    info = ObjectInfo(source="s3://b/some/key", size=1024, etag='"e"')
    placed.open_temp("s3://b/some/key", info, 256)
    assert placed.temp is not None and not placed.closed
    path = placed.temp.path
    assert os.path.exists(path)
    with monkeypatch.context() as m:
        m.setattr(os, "unlink", lambda p: (_ for _ in ()).throw(PermissionError(p)))
        with pytest.raises(PermissionError):
            placed.close()
    assert not placed.closed and os.path.exists(path)
    placed.close()
    assert placed.closed and not os.path.exists(path) and os.listdir(tmp_path) == []
    placed.close()  # idempotent
    assert placed.closed


@pytest.mark.anyio
async def test_one_engine_places_each_call_its_own_way(
    put_object: Callable[..., str], tmp_path: Path
) -> None:
    """force, resume and temp_dir are per call: one engine (one S3 client) serves all."""
    data = os.urandom(PART + 3)
    uri = put_object(data)
    dest = tmp_path / "out.bin"
    async with fastpipe.Engine(Config(part_size=PART)) as engine:
        first = await engine.process(uri, [], dest, resume=True)
        assert first.passed and dest.read_bytes() == data
        with pytest.raises(fastpipe.DestinationError, match="already exists"):
            await engine.process(uri, [], dest)
        again = await engine.process(uri, [], dest, force=True)
        assert again.passed
        seen: list[str] = []

        class Where(FileStage):
            name = "where"

            def run(self, local: LocalFile) -> None:
                seen.append(os.path.dirname(local.path))

        scratch = tmp_path / "scratch"
        scratch.mkdir()
        assert (await engine.process(uri, [Where()], temp_dir=scratch)).passed
        assert seen == [str(scratch)] and os.listdir(scratch) == []
        many = await engine.process_many([uri], lambda: [], tmp_path, force=True)
        assert many[0].passed
    assert sorted(os.listdir(tmp_path)) == sorted(["out.bin", "scratch", uri.rsplit("/", 1)[1]])


# -- temp files a killed run left ---------------------------------------------------------


_HOLDER = """
import sys, time
from fastpipe._placement import new_temp_file
temp = new_temp_file(sys.argv[1], 4096)
print(temp.path, flush=True)
time.sleep(600)
"""


def _holder(folder: Path) -> tuple[subprocess.Popen[str], str]:
    """A real process that made a fresh temp file in ``folder`` and holds it."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_sweep_removes_a_killed_runs_temp_file_never_a_live_ones(tmp_path: Path) -> None:
    from fastpipe._placement import TEMP_SUFFIX, sweep_once

    dead, dead_path = _holder(tmp_path)
    alive, alive_path = _holder(tmp_path)
    try:
        dead.kill()  # SIGKILL: nothing of its own cleanup runs
        dead.wait()
        resume = ResumeState(str(tmp_path / "kept.bin"))
        Path(resume.temp_path).write_bytes(b"resumable")  # kept on purpose for --resume
        older = tmp_path / (".fastpipe-abcd1234" + TEMP_SUFFIX)  # no lock tells its state
        older.write_bytes(b"x")
        assert sweep_once(str(tmp_path)) == [dead_path]
        assert sorted(os.listdir(tmp_path)) == sorted(
            os.path.basename(p) for p in (alive_path, resume.temp_path, str(older))
        )
        assert sweep_once(str(tmp_path)) == []  # once per folder and process
    finally:
        for proc in (dead, alive):
            proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
