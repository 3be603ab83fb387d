"""A network-bound link on loopback: shape the traffic from one local TCP port with ``tc``.

``fastpipe bench --link-rate 2.4Gbit`` runs the S3 server on the same machine as the
client, so without shaping every figure is CPU-bound. This module slows down what the
server *sends* (the bytes of the objects) to a given rate, and nothing else:

- an htb root qdisc on ``lo`` with a handle of its own (:data:`HANDLE`), whose default
  class is unlimited, so that other loopback traffic passes at full speed;
- one htb class at the rate, fed by a u32 filter matching ``ip sport PORT`` (the server
  binds 127.0.0.1 only, so IPv4 is all there is to match).

It only ever touches ``lo``; it refuses (:class:`ShapingError`, exit code 2) when it
cannot shape: not root, no ``tc``, or a root qdisc on ``lo`` that it did not put there.
The shaping is removed when the context ends, whatever ends it (an error, Ctrl-C,
SIGTERM or SIGHUP: :func:`signals_raise` turns those into exceptions so that ``finally``
blocks run). A shaping left behind by a process killed with SIGKILL is recognised by its
handle and removed by the next run, unless another run holds the lock file and so still
uses it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import IO, Any
from urllib.parse import urlsplit

from .. import UsageError

#: The only device this module changes.
DEVICE = "lo"
#: Major number of our root qdisc ("fa57"): how a shaping of ours is recognised.
HANDLE = "fa57"
SHAPED_CLASS = f"{HANDLE}:1"
DEFAULT_CLASS = f"{HANDLE}:2"
#: The rate of the default class: far above what loopback carries on any machine.
UNLIMITED_BITS = 100_000_000_000
#: htb's quantum: at least lo's MTU (64 KiB), below the 200000 the kernel warns about.
QUANTUM = 200_000
#: Unlimited, as the word in a ``--link-rate`` list.
UNLIMITED = "unlimited"

_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?bit)\s*$", re.IGNORECASE)


class ShapingError(UsageError):
    """The link cannot be shaped here (not root, no ``tc``, a foreign qdisc on ``lo``)."""


class Interrupted(KeyboardInterrupt):
    """A SIGTERM or SIGHUP arrived while shaping; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# -- rates ----------------------------------------------------------------------------------


def parse_rate(text: str) -> int | None:
    """``"2.4Gbit"`` -> 2_400_000_000 bits per second; ``"unlimited"`` -> None.

    Units are decimal, as ``tc`` reads them: bit, kbit, mbit, gbit, tbit (any case).
    """
    if text.strip().lower() == UNLIMITED:
        return None
    match = _RATE.match(text)
    if not match:
        raise UsageError(f"bad link rate {text!r}: expected e.g. 2.4Gbit, 800Mbit or {UNLIMITED}")
    bits = round(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if bits < 8_000:
        raise UsageError(f"link rate {text!r} is too low (at least 8kbit)")
    return bits


def parse_rates(text: str) -> list[int | None]:
    """A comma-separated ``--link-rate`` list, in its order, each rate once."""
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise UsageError("empty link rate list")
    return list(dict.fromkeys(parse_rate(part) for part in parts))


def format_rate(bits: int | None) -> str:
    """The label of a rate: ``2.4Gbit``, ``800Mbit``, ``unlimited``."""
    if bits is None:
        return UNLIMITED
    for unit, scale in (("Tbit", 10**12), ("Gbit", 10**9), ("Mbit", 10**6), ("kbit", 10**3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits}bit"


def burst_bytes(bits: int) -> int:
    """The shaped class's bucket: 2 ms at the rate, and never less than two 64 KiB packets
    of lo's (a smaller bucket holds TCP below the rate; a much larger one lets bursts
    through at loopback speed)."""
    return max(bits // 8 // 500, 128 << 10)


# -- command lines --------------------------------------------------------------------------


def setup_commands(port: int, bits: int, tc: str = "tc") -> list[list[str]]:
    """The ``tc`` command lines that shape what leaves local TCP port ``port`` to ``bits``
    per second on ``lo``; the rest of lo's traffic goes to an unlimited default class."""
    if not 0 < port < 65536:
        raise UsageError(f"not a TCP port: {port}")
    burst = burst_bytes(bits)
    dev = ["dev", DEVICE]
    return [
        [tc, "qdisc", "add", *dev, "root", "handle", f"{HANDLE}:", "htb", "default", "2"],
        [tc, "class", "add", *dev, "parent", f"{HANDLE}:", "classid", DEFAULT_CLASS, "htb"]
        + ["rate", f"{UNLIMITED_BITS}bit", "burst", f"{16 << 20}b", "cburst", f"{16 << 20}b"]
        + ["quantum", str(QUANTUM)],
        [tc, "class", "add", *dev, "parent", f"{HANDLE}:", "classid", SHAPED_CLASS, "htb"]
        + ["rate", f"{bits}bit", "ceil", f"{bits}bit", "burst", f"{burst}b"]
        + ["cburst", f"{burst}b", "quantum", str(QUANTUM)],
        [tc, "filter", "add", *dev, "parent", f"{HANDLE}:", "protocol", "ip", "prio", "1"]
        + ["u32", "match", "ip", "sport", str(port), "0xffff", "flowid", SHAPED_CLASS],
    ]


def teardown_commands(tc: str = "tc") -> list[list[str]]:
    """The ``tc`` command line that removes our root qdisc (its classes and filter go with
    it) and gives lo back its default, ``noqueue``."""
    return [[tc, "qdisc", "del", "dev", DEVICE, "root", "handle", f"{HANDLE}:"]]


def show_command(tc: str = "tc") -> list[str]:
    """``tc qdisc show dev lo``."""
    return [tc, "qdisc", "show", "dev", DEVICE]


# -- what is on lo now ----------------------------------------------------------------------


def root_qdisc(show_output: str) -> str | None:
    """The kind and handle of the root qdisc in ``tc qdisc show`` output (``"noqueue 0:"``,
    ``"htb fa57:"``), or None when there is no root line."""
    for line in show_output.splitlines():
        words = line.split()
        if len(words) >= 4 and words[0] == "qdisc" and "root" in words[3:]:
            return f"{words[1]} {words[2]}"
    return None


def is_ours(root: str | None) -> bool:
    """Whether ``root`` (from :func:`root_qdisc`) is a shaping this module put on lo."""
    return root == f"htb {HANDLE}:"


def find_tc(path: str | None = None) -> str | None:
    """The ``tc`` binary on ``path`` (default: ``$PATH``), or None."""
    return shutil.which("tc", path=path)


def loopback_port(endpoint: str) -> int:
    """The port of a loopback endpoint (the one whose traffic ``--link-rate`` shapes);
    :class:`ShapingError` for any other endpoint."""
    parts = urlsplit(endpoint)
    if parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
        raise ShapingError(
            f"--link-rate shapes loopback only; {endpoint} is not a 127.0.0.1 endpoint with a port"
        )
    return parts.port


def check_can_shape(
    euid: int | None = None,
    path: str | None = None,
    qdisc_show: str | None = None,
) -> str:
    """Refuse (:class:`ShapingError`) unless this process can shape lo; return ``tc``'s path.

    ``euid``, ``path`` (``$PATH``) and ``qdisc_show`` (the output of
    ``tc qdisc show dev lo``) are read from the system when not given. A root qdisc of ours
    is accepted (a run killed with SIGKILL leaves one; :func:`shape_port` replaces it).
    """
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        raise ShapingError(
            "--link-rate needs root: it shapes lo with tc (run as root, or use unlimited)"
        )
    tc = find_tc(path)
    if tc is None:
        raise ShapingError("--link-rate needs tc (iproute2), which is not on PATH")
    if qdisc_show is None:
        qdisc_show = _tc(show_command(tc)).stdout
    root = root_qdisc(qdisc_show)
    if root is None:
        raise ShapingError(f"cannot read {DEVICE}'s root qdisc from `tc qdisc show dev lo`")
    if not (root.startswith("noqueue ") or is_ours(root)):
        raise ShapingError(
            f"{DEVICE} already has a root qdisc ({root}) that fastpipe did not add; "
            "it will not replace it (remove it, or use --link-rate unlimited)"
        )
    return tc


def _tc(argv: Sequence[str], check: bool = False) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ShapingError(f"`{' '.join(argv)}` failed: {exc}") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ShapingError(
            f"`{' '.join(argv)}` failed (exit {proc.returncode}): "
            f"{detail[-1] if detail else 'no message'}"
        )
    return proc


# -- the lock -------------------------------------------------------------------------------


def lock_path() -> str:
    """The lock file held while a shaping is in place (one shaping on lo at a time)."""
    folder = "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir()
    return os.path.join(folder, "fastpipe-linkshape.lock")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    import fcntl

    with open(lock_path(), "a+", encoding="ascii") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise ShapingError(
                f"another process (pid {holder}) is shaping {DEVICE} now; wait for it to end"
            ) from None
        _write_pid(f)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_pid(f: IO[str]) -> None:
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()


# -- signals --------------------------------------------------------------------------------

#: Signals whose default action would end the process without running ``finally``.
CAUGHT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Interrupted` (SIGINT already
    raises KeyboardInterrupt), so that the ``finally`` blocks that undo a shaping run.
    Outside the main thread (where handlers cannot be set) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Any] = {}
    try:
        for caught in CAUGHT_SIGNALS:
            previous[caught] = signal.signal(caught, _raise_interrupted)
        yield
    finally:
        for caught, handler in previous.items():
            signal.signal(caught, handler)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP for the block (the undoing of a shaping must not be
    cut short); a signal that arrived meanwhile is delivered after it."""
    held = {signal.SIGINT, *CAUGHT_SIGNALS}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# -- the shaping ----------------------------------------------------------------------------


def _remove(tc: str) -> None:
    """Remove our root qdisc from lo if it is there; refuse if lo is left shaped."""
    if not is_ours(root_qdisc(_tc(show_command(tc)).stdout)):
        return
    for argv in teardown_commands(tc):
        _tc(argv)
    left = root_qdisc(_tc(show_command(tc)).stdout)
    if is_ours(left):
        raise ShapingError(
            f"could not remove the shaping of {DEVICE}; run: {' '.join(teardown_commands()[0])}"
        )


@contextlib.contextmanager
def shape_port(
    port: int, bits: int, say: Callable[[str], None] | None = None
) -> Iterator[list[list[str]]]:
    """Shape what leaves local TCP port ``port`` on lo to ``bits`` per second, for the block.

    Yields the ``tc`` command lines that were run. Refuses (:class:`ShapingError`) before
    changing anything when it cannot shape; always removes the shaping at the end, also
    on an exception, Ctrl-C, SIGTERM or SIGHUP.
    """
    tc = check_can_shape()
    commands = setup_commands(port, bits, tc)
    with signals_raise(), _locked():
        if is_ours(root_qdisc(_tc(show_command(tc)).stdout)):
            # Nobody holds the lock, so no process uses it: a killed run left it behind.
            if say:
                say(f"removing a shaping of {DEVICE} left by an earlier run")
            with _signals_held():
                _remove(tc)
        try:
            with _signals_held():  # a half-built shaping is undone below all the same
                for argv in commands:
                    _tc(argv, check=True)
            if say:
                say(f"shaping {DEVICE}: from port {port} at {format_rate(bits)}")
            yield commands
        finally:
            with _signals_held():
                _remove(tc)
