"""The ``command`` file stage: run an external program on the local file.

The exit status is the verdict. The path is one argument of its own, never parsed by a
shell, unless the user asks for a shell (then it is quoted for it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import signal
import subprocess
import threading
import time
from typing import IO, Any

from .._exceptions import StageFailed, StageTimeout, UsageError
from ._base import FileStage, LocalFile, ObjectInfo
from ._registry import Option, register, to_bool, to_size

PLACEHOLDER = "{path}"
#: Seconds given to the pipes to close once the program has exited.
_DRAIN_AFTER_EXIT = 2.0


class _Tail:
    """Read a pipe to its end, keeping only its last ``limit`` bytes."""

    def __init__(self, pipe: IO[bytes], limit: int) -> None:
        self._pipe = pipe
        self._limit = limit
        self._data = bytearray()
        self._thread = threading.Thread(
            target=self._read, name="fastpipe-command-pipe", daemon=True
        )
        self._thread.start()

    def _read(self) -> None:
        # The pipe is closed here, by its reader, so its descriptor can never be reused
        # under a read still blocked on it.
        fd = self._pipe.fileno()
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return
                self._data += chunk
                if len(self._data) > self._limit:
                    del self._data[: len(self._data) - self._limit]
        except OSError:
            return
        finally:
            self._pipe.close()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def text(self) -> str:
        return bytes(self._data).decode("utf-8", errors="replace")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def placeholder_in_quotes(script: str) -> bool:
    """Whether a ``{path}`` in a ``/bin/sh`` script stands inside quotes or after ``\\``.

    There the shell-quoted path that replaces it would be unquoted again: a file name
    holding ``'`` or ``$(...)`` would run as shell code.
    """
    quote: str | None = None
    i = 0
    while i < len(script):
        if quote is not None and script.startswith(PLACEHOLDER, i):
            return True
        if quote is None and script[i] == "\\" and script.startswith(PLACEHOLDER, i + 1):
            return True
        quote, i = _shell_step(script, i, quote)
    return False


def _shell_step(script: str, i: int, quote: str | None) -> tuple[str | None, int]:
    """The quote state after the character at ``i`` (``'``, ``"`` or None), and where the
    next character to read is (a backslash escapes the one after it, except in ``'...'``)."""
    ch = script[i]
    if quote == "'":
        return (None if ch == "'" else quote), i + 1
    if quote == '"':
        if ch == "\\":
            return quote, i + 2
        return (None if ch == '"' else quote), i + 1
    if ch == "\\":
        return None, i + 2
    if ch in "'\"":
        return ch, i + 1
    return None, i + 1


@register(
    "command",
    {
        "cmd": Option(
            str, 'program and arguments, {path} for the local file (e.g. "ffprobe {path}")'
        ),
        "shell": Option(
            to_bool,
            "run cmd through /bin/sh; {path} is put in already shell-quoted: never quote it "
            "again (write wc -c {path}, not '{path}'); default false",
        ),
        "timeout": Option(float, "seconds before the program is killed and the stage fails"),
        "tail": Option(to_size, "bytes of stdout/stderr kept in the result (default 4096)"),
    },
    "run an external program on the local file; exit status 0 passes",
)
class Command(FileStage):
    """Run an external program on the local file; exit status 0 passes.

    ``cmd`` is split like a shell would (``shlex``) and ``{path}`` is replaced by the local
    path inside its argument, so a path with spaces or ``;`` stays one argument; without a
    ``{path}`` the path is appended as the last argument.

    With ``shell=True`` the string runs through ``/bin/sh -c``; ``{path}`` is substituted
    **already shell-quoted** (``shlex.quote``) and must not be quoted again: write
    ``wc -c {path}``, never ``wc -c '{path}'`` or ``"{path}"`` (a ``{path}`` inside quotes
    or after a backslash is refused, since the quotes would cancel each other and a file
    name such as ``x;touch pwned`` would run as code). The path is also the script's
    ``$1``, which is safe inside double quotes (``"$1"``).

    The program runs in a session of its own. Its whole process group is killed (SIGKILL)
    past ``timeout`` seconds (the stage fails with :class:`~fastpipe.StageTimeout`, the
    output tails kept in its result) and on every other way out: the engine's stage
    timeout, the caller's cancel, Ctrl-C or SIGTERM in the CLI (:meth:`cancel`). Only the
    last ``tail`` bytes of stdout and stderr are kept.

    Result: ``{"cmd": [argv...], "returncode", "seconds", "stdout_tail", "stderr_tail"}``.
    """

    name = "command"

    def __init__(
        self,
        cmd: str | list[str],
        shell: bool = False,
        timeout: float | None = None,
        tail: int = 4096,
    ) -> None:
        if isinstance(cmd, list):
            if not cmd:
                raise UsageError("command cmd is empty")
            if shell:
                raise UsageError("command shell=true needs cmd as one string")
            self.argv_template = list(cmd)
        else:
            if not cmd.strip():
                raise UsageError("command cmd is empty")
            if shell and placeholder_in_quotes(cmd):
                raise UsageError(
                    f"command cmd {cmd!r} puts {PLACEHOLDER} inside quotes or after a "
                    f"backslash: with shell=true {PLACEHOLDER} is substituted already "
                    f'shell-quoted, so write it bare (or use "$1")'
                )
            if not shell:
                try:
                    self.argv_template = shlex.split(cmd)
                except ValueError as exc:
                    raise UsageError(f"command cmd {cmd!r} does not parse: {exc}") from None
        self.cmd = cmd
        self.shell = shell
        if timeout is not None and timeout <= 0:
            raise UsageError(f"command timeout must be positive, not {timeout}")
        # Enforced here, where the process group can be killed and the output tails kept.
        self.command_timeout = timeout
        if tail < 0:
            raise UsageError(f"command tail must not be negative, not {tail}")
        self.tail = tail
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._cancelled = False

    def argv(self, path: str) -> list[str]:
        """The argument vector run for a local file at ``path``."""
        if self.shell:
            assert isinstance(self.cmd, str)
            script = self.cmd.replace(PLACEHOLDER, shlex.quote(path))
            return ["/bin/sh", "-c", script, "fastpipe", path]
        if not any(PLACEHOLDER in arg for arg in self.argv_template):
            return [*self.argv_template, path]
        return [arg.replace(PLACEHOLDER, path) for arg in self.argv_template]

    def cost_key(self, info: ObjectInfo | None = None) -> str:
        """``command:<12 hex of the command's hash>``: each program costs its own."""
        text = self.cmd if isinstance(self.cmd, str) else "\0".join(self.cmd)
        return f"command:{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def cancel(self) -> None:
        """Kill the process group of every program this stage runs, now (any thread)."""
        with self._lock:
            self._cancelled = True
            running = list(self._running)
        for proc in running:
            _kill_group(proc)

    def run(self, local: LocalFile) -> dict[str, Any]:
        argv = self.argv(local.path)
        shown = shlex.join(argv)
        source = local.info.source
        started = time.monotonic()
        result: dict[str, Any] = {
            "cmd": argv,
            "returncode": None,
            "seconds": 0.0,
            "stdout_tail": "",
            "stderr_tail": "",
        }
        with self._lock:
            if self._cancelled:
                self._cancelled = False
                raise StageFailed(f"{source}: command {shown} was cancelled", result=result)
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            except OSError as exc:
                raise StageFailed(
                    f"{source}: command {shown} could not start: {exc.strerror or exc}",
                    result=result,
                ) from None
            self._running.add(proc)
        try:
            timed_out, tails = self._wait(proc)
        finally:
            with self._lock:
                self._running.discard(proc)
                cancelled, self._cancelled = self._cancelled, False
        result["returncode"] = proc.returncode
        result["seconds"] = round(time.monotonic() - started, 6)
        result["stdout_tail"], result["stderr_tail"] = tails[0].text(), tails[1].text()
        if cancelled:
            raise StageFailed(f"{source}: command {shown} was cancelled and killed", result=result)
        if timed_out:
            raise StageTimeout(
                f"{source}: command {shown} ran past its {self.command_timeout:g} s timeout "
                f"and was killed",
                result=result,
            )
        if proc.returncode != 0:
            if proc.returncode < 0:
                try:
                    status = f"was killed by {signal.Signals(-proc.returncode).name}"
                except ValueError:
                    status = f"was killed by signal {-proc.returncode}"
            else:
                status = f"exited with status {proc.returncode}"
            last = result["stderr_tail"].strip().splitlines()[-1:] or [""]
            detail = f": {last[0][:200]}" if last[0] else ""
            raise StageFailed(f"{source}: command {shown} {status}{detail}", result=result)
        return result

    def _wait(self, proc: subprocess.Popen[bytes]) -> tuple[bool, tuple[_Tail, _Tail]]:
        """Wait for the program, killing its group on any way out but its own exit.

        Returns whether it ran past the timeout, and the tails of stdout and stderr.
        """
        assert proc.stdout is not None and proc.stderr is not None
        out, err = _Tail(proc.stdout, self.tail), _Tail(proc.stderr, self.tail)
        timed_out = False
        try:
            proc.wait(timeout=self.command_timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        finally:
            # Background children left in the group may hold the pipes open: give them a
            # moment, then kill the group rather than wait for them.
            out.join(_DRAIN_AFTER_EXIT)
            err.join(_DRAIN_AFTER_EXIT)
            if out.alive() or err.alive():
                _kill_group(proc)
                out.join(_DRAIN_AFTER_EXIT)
                err.join(_DRAIN_AFTER_EXIT)
        return timed_out, (out, err)
