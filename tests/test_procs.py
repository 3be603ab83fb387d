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
