"""Start, wait for and stop the loopback server processes of the local S3 and SQS tools."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import ClassVar


def start_server(
    args: list[str],
    log_path: str,
    *,
    url: str,
    timeout: float,
    name: str,
    error: type[Exception],
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``args`` in its own session (output to ``log_path``) and wait until ``url`` answers.

    On any failure the process is stopped before the error goes on. On Linux, when started
    from the main thread, the server also gets SIGTERM if this process dies without
    stopping it (a killed test run must not leave servers behind).
    """
    log = open(log_path, "wb")  # noqa: SIM115 - the child keeps its own copy
    try:
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            preexec_fn=_die_with_parent(),
        )
    finally:
        log.close()
    try:
        wait_http_ready(proc, url, timeout, name=name, error=error, log_path=log_path)
    except BaseException:
        stop_process_group(proc)
        raise
    return proc


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when this process dies.

    The kernel sends it when the *thread* that forked ends, so it is only used from the
    main thread, whose end is the process's.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took hold
            os._exit(1)

    return set_parent_death_signal


_PR_SET_PDEATHSIG = 1


def log_tail(path: str, lines: int = 30) -> str:
    """The last ``lines`` lines of a server's log file ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
    except OSError:
        return ""


def wait_http_ready(
    proc: subprocess.Popen[bytes],
    url: str,
    timeout: float,
    *,
    name: str,
    error: type[Exception],
    log_path: str,
) -> None:
    """Wait until ``url`` gives any HTTP answer; ``error`` if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise error(f"{name} exited early:\n{log_tail(log_path)}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # an HTTP error response (e.g. S3's 403) means the server is up
        except OSError:
            time.sleep(0.2)
    raise error(f"{name} did not answer within {timeout}s")


def stop_process_group(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a server started in its own session: SIGTERM, then SIGKILL after a short wait."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


class ServerProcess:
    """What the local S3 and SQS servers share: a process in its own session and a temp folder.

    Subclasses (dataclasses) hold ``_proc`` and ``_tmp`` and name their log file.
    """

    _proc: subprocess.Popen[bytes] | None
    _tmp: str
    _log_name: ClassVar[str]

    @property
    def log_path(self) -> str:
        """The server's log file, in its temp folder."""
        return os.path.join(self._tmp, self._log_name)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server printed (for error messages)."""
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a short wait) and remove its data."""
        proc, self._proc = self._proc, None
        stop_process_group(proc)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = ""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def stop_workers(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 60.0) -> None:
    """SIGTERM (a drain) to each worker process still running, then wait for each
    (killed past ``timeout`` seconds)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
