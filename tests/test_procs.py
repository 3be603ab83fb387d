"""The shared start/wait/stop helpers of the local S3 and SQS servers (real processes)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from typing import ClassVar

import pytest

from fastpipe.tools._procs import ServerProcess, start_server
from fastpipe.tools.locals3 import free_ports


class _Boom(Exception):
    pass


@dataclasses.dataclass
class _Server(ServerProcess):
    _proc: subprocess.Popen[bytes] | None = None
    _tmp: str = ""
    _log_name: ClassVar[str] = "server.log"


def test_a_server_that_exits_early_raises_with_its_log(tmp_path: os.PathLike[str]) -> None:
    log_path = os.path.join(tmp_path, "server.log")
    code = "import sys; print('no config file', flush=True); sys.exit(3)"
    with pytest.raises(_Boom, match="toy exited early:\nno config file"):
        start_server(
            [sys.executable, "-c", code],
            log_path,
            url="http://127.0.0.1:1/",
            timeout=60,
            name="toy",
            error=_Boom,
        )


def test_start_waits_for_http_and_stop_ends_the_group_and_removes_the_folder() -> None:
    (port,) = free_ports(1)
    server = _Server(_tmp=tempfile.mkdtemp(prefix="fastpipe-test-procs-"))
    tmp = server._tmp
    server._proc = start_server(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        os.path.join(tmp, "server.log"),
        url=f"http://127.0.0.1:{port}/",
        timeout=60,
        name="http.server",
        error=_Boom,
    )
    proc = server._proc
    assert proc.poll() is None  # it answered, so it runs
    server.stop()
    assert proc.poll() is not None
    assert server._proc is None
    assert not os.path.exists(tmp)
    assert server.log_tail() == ""  # the folder is gone; no error


_PARENT = """
import os, sys, tempfile
from fastpipe.tools._procs import start_server
port = int(sys.argv[1])
proc = start_server(
    [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
    os.path.join(tempfile.mkdtemp(), "server.log"),
    url=f"http://127.0.0.1:{port}/", timeout=60, name="http.server", error=RuntimeError,
)
print(proc.pid, flush=True)
sys.stdin.read()  # until killed
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")  # a zombie has ended
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux")
def test_a_server_ends_when_the_process_that_started_it_is_killed() -> None:
    """A test run killed with SIGKILL must not leave its servers running."""
    import signal
    import time

    (port,) = free_ports(1)
    with subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as parent:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        assert not _gone(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    for _ in range(300):  # polled, not timed: the kernel signals it at once
        if _gone(server_pid):
            break
        time.sleep(0.05)
    else:
        os.kill(server_pid, signal.SIGKILL)
        pytest.fail("the server outlived the process that started it")
