"""The ``command`` stage through the engine and the CLI: timeouts, cancels, shell quoting.

Signals are sent to a real ``fastpipe run`` process, and the program the stage started is
looked up afterwards in ``/proc`` by its process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

import fastpipe
from fastpipe import UsageError
from fastpipe.stages import Command, parse_spec


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def _wait_gone(pgid: int) -> list[int]:
    """The group's members once they are gone, or those left after a generous wait.

    SIGKILL lands asynchronously, and an orphan is reaped by init: poll, never judge by
    elapsed time (the programs sleep 60 s, far past this wait).
    """
    deadline = time.monotonic() + 20
    while (members := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return members


def _wait_for(path: Path, proc: subprocess.Popen[str] | None = None) -> int:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"fastpipe exited first: {proc.communicate()}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return int(path.read_text())


@pytest.fixture
def sleeper(tmp_path: Path) -> Path:
    """A script that starts a background child, writes its own pid, then waits 60 s."""
    script = tmp_path / "sleeper.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"sleep 60 &\n"
        f"echo $! > {tmp_path}/child.pid\n"
        f"echo $$ > {tmp_path}/pid.tmp && mv {tmp_path}/pid.tmp {tmp_path}/pid\n"
        "wait\n"
    )
    script.chmod(0o755)
    return script


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(4096))
    return path


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_signal_kills_the_program(
    signum: int, tmp_path: Path, sleeper: Path, data: Path
) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastpipe.cli",
            "run",
            str(data),
            "--no-progress",
            "--stage",
            f"command:cmd={sleeper}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pgid = _wait_for(tmp_path / "pid", proc)
        child = int((tmp_path / "child.pid").read_text())
        assert pgid in _group_members(pgid) and child in _group_members(pgid)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == (130 if signum == signal.SIGINT else 143), stderr
    assert "Traceback" not in stderr
    assert _wait_gone(pgid) == []


@pytest.mark.anyio
async def test_library_cancel_kills_the_program(tmp_path: Path, sleeper: Path, data: Path) -> None:
    pid_file = tmp_path / "pid"

    async def cancel_once_started(scope: anyio.CancelScope) -> None:
        while not pid_file.exists():
            await anyio.sleep(0.02)
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_once_started, scope)
            await fastpipe.process(str(data), stages=[Command([str(sleeper)])])
    assert scope.cancelled_caught
    pgid = int(pid_file.read_text())
    # The cancel returned before the 60 s sleep could end on its own, and took it along.
    assert _wait_gone(pgid) == []


def test_command_timeout_reports_its_timeout_and_tails(data: Path) -> None:
    stage = parse_spec('command:cmd="echo out; echo err >&2; exec sleep 60",shell=true,timeout=0.5')
    report = fastpipe.run(str(data), stages=[stage])
    assert not report.passed and report.error_type == "StageTimeout"
    failed = report.stage("command")
    assert failed.error is not None
    assert "ran past its 0.5 s timeout" in failed.error and "None" not in failed.error
    assert failed.result is not None
    assert failed.result["stdout_tail"] == "out\n"
    assert failed.result["stderr_tail"] == "err\n"
    assert failed.result["returncode"] == -signal.SIGKILL


def test_engine_timeout_kills_the_program(tmp_path: Path, sleeper: Path, data: Path) -> None:
    # The engine's own deadline (the common `timeout` of a stage) reaches the program too.
    stage = Command([str(sleeper)])
    stage.timeout = 0.5
    report = fastpipe.run(str(data), stages=[stage])
    assert report.error_type == "StageTimeout"
    error = report.stage("command").error
    assert error is not None and f"{data}: stage command ran past its timeout of 0.5 s" in error
    assert _wait_gone(int((tmp_path / "pid").read_text())) == []


@pytest.mark.parametrize("name", ["x;touch pwned", "$(touch dollar)", "a'b;touch quote"])
def test_shell_path_is_quoted_once(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    path = folder / name
    path.write_bytes(b"12345")
    report = fastpipe.run(str(path), stages=[Command("wc -c {path}", shell=True)])
    assert report.passed, report.error
    assert report.stage("command").result["stdout_tail"].startswith("5 ")
    assert sorted(os.listdir(folder)) == [name]  # nothing was touched


@pytest.mark.parametrize(
    "cmd", ["wc -c '{path}'", 'wc -c "{path}"', "wc -c \\{path}", 'sh -c "wc -c {path}"']
)
def test_shell_refuses_a_quoted_placeholder(cmd: str) -> None:
    with pytest.raises(UsageError, match="already shell-quoted"):
        Command(cmd, shell=True)
    with pytest.raises(UsageError, match="already shell-quoted"):
        parse_spec("command:cmd=wc -c '{path}',shell=true")


def test_bare_command_names_cmd() -> None:
    with pytest.raises(UsageError, match=r"stage 'command' needs option cmd"):
        parse_spec("command")
    with pytest.raises(UsageError, match=r"needs option cmd"):
        parse_spec("command:timeout=3")


def test_cli_bare_command_is_a_usage_error(data: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "run", str(data), "--stage", "command"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "needs option cmd" in out.stderr and "Traceback" not in out.stderr
