"""`fastpipe bench --link-rate`: the tc command lines, the refusals, and a real shaping of lo.

The real tests change lo's root qdisc (they need root and tc, as CI has here) and check
that it is back to what it was afterwards, also after an error and after a SIGTERM.
Only a port of a plain TCP server on 127.0.0.1 is shaped; no test reads a clock.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastpipe import UsageError
from fastpipe.tools import shaping
from fastpipe.tools.shaping import (
    HANDLE,
    ShapingError,
    check_can_shape,
    format_rate,
    parse_rate,
    parse_rates,
    root_qdisc,
    setup_commands,
    shape_port,
    teardown_commands,
)

REPO_SRC = str(Path(shaping.__file__).parents[2])
NOQUEUE = "qdisc noqueue 0: root refcnt 2 \n"

can_shape = os.geteuid() == 0 and shutil.which("tc") is not None
needs_root_and_tc = pytest.mark.skipif(not can_shape, reason="shaping lo needs root and tc")


# -- rates ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("2.4Gbit", 2_400_000_000),
        ("800Mbit", 800_000_000),
        ("800mbit", 800_000_000),
        (" 1gbit ", 1_000_000_000),
        ("500kbit", 500_000),
        ("unlimited", None),
        ("Unlimited", None),
    ],
)
def test_parse_rate(text: str, bits: int | None) -> None:
    assert parse_rate(text) == bits


@pytest.mark.parametrize(
    "text", ["", "fast", "2.4", "2.4GB", "2.4 Gbps", "-1Gbit", "1e9bit", "0Mbit", "1kbit"]
)
def test_parse_rate_refuses_bad_input(text: str) -> None:
    with pytest.raises(UsageError):
        parse_rate(text)


def test_parse_rates_keeps_order_and_drops_repeats() -> None:
    assert parse_rates("unlimited,2.4Gbit,800Mbit,2400Mbit") == [None, 2_400_000_000, 800_000_000]
    with pytest.raises(UsageError):
        parse_rates(" , ")
    with pytest.raises(UsageError):
        parse_rates("unlimited,slow")


def test_format_rate_round_trips() -> None:
    for text in ("2.4Gbit", "800Mbit", "unlimited", "1.5Tbit", "64kbit"):
        assert format_rate(parse_rate(text)) == text


# -- the command lines ------------------------------------------------------------------------


def test_setup_commands_for_a_rate_and_port() -> None:
    assert setup_commands(8333, 2_400_000_000) == [
        ["tc", "qdisc", "add", "dev", "lo", "root", "handle", "fa57:", "htb", "default", "2"],
        ["tc", "class", "add", "dev", "lo", "parent", "fa57:", "classid", "fa57:2", "htb"]
        + ["rate", "100000000000bit", "burst", "16777216b", "cburst", "16777216b"]
        + ["quantum", "200000"],
        ["tc", "class", "add", "dev", "lo", "parent", "fa57:", "classid", "fa57:1", "htb"]
        + ["rate", "2400000000bit", "ceil", "2400000000bit", "burst", "600000b"]
        + ["cburst", "600000b", "quantum", "200000"],
        ["tc", "filter", "add", "dev", "lo", "parent", "fa57:", "protocol", "ip", "prio", "1"]
        + ["u32", "match", "ip", "sport", "8333", "0xffff", "flowid", "fa57:1"],
    ]
    assert teardown_commands() == [["tc", "qdisc", "del", "dev", "lo", "root", "handle", "fa57:"]]


def test_commands_touch_only_lo() -> None:
    for argv in setup_commands(1, 8_000, tc="/sbin/tc") + teardown_commands("/sbin/tc"):
        assert argv[0] == "/sbin/tc"
        assert argv[argv.index("dev") + 1] == "lo"
        assert argv.count("dev") == 1
    # a low rate still gets a bucket of two of lo's 64 KiB packets
    assert "131072b" in setup_commands(1, 800_000)[2]


def test_setup_commands_refuse_a_bad_port() -> None:
    for port in (0, 65536, -1):
        with pytest.raises(UsageError):
            setup_commands(port, 800_000_000)


# -- refusals ---------------------------------------------------------------------------------


def test_root_qdisc_reads_tc_output() -> None:
    assert root_qdisc(NOQUEUE) == "noqueue 0:"
    ours = f"qdisc htb {HANDLE}: root refcnt 2 r2q 10 default 0x2 direct_packets_stat 0\n"
    assert root_qdisc(ours) == f"htb {HANDLE}:"
    assert root_qdisc("qdisc ingress ffff: parent ffff:fff1 ----------------\n") is None
    assert root_qdisc("") is None


def test_refuses_when_not_root() -> None:
    with pytest.raises(ShapingError, match="needs root"):
        check_can_shape(euid=1000, qdisc_show=NOQUEUE)


def test_refuses_without_tc(tmp_path: Path) -> None:
    with pytest.raises(ShapingError, match="needs tc"):
        check_can_shape(euid=0, path=str(tmp_path), qdisc_show=NOQUEUE)


def _fake_tc(folder: Path) -> str:
    tc = folder / "tc"
    tc.write_text("#!/bin/sh\nexit 0\n")
    tc.chmod(0o755)
    return str(folder)


@pytest.mark.parametrize(
    "show",
    [
        "qdisc htb 1: root refcnt 2 r2q 10 default 0 direct_packets_stat 0\n",
        "qdisc fq_codel 0: root refcnt 2 limit 10240p flows 1024\n",
        "qdisc netem 8001: root refcnt 2 limit 1000 delay 10ms\n",
    ],
)
def test_refuses_a_foreign_root_qdisc(tmp_path: Path, show: str) -> None:
    path = _fake_tc(tmp_path)
    with pytest.raises(ShapingError, match="did not add"):
        check_can_shape(euid=0, path=path, qdisc_show=show)


def test_accepts_noqueue_and_its_own_qdisc(tmp_path: Path) -> None:
    path = _fake_tc(tmp_path)
    assert check_can_shape(euid=0, path=path, qdisc_show=NOQUEUE) == str(tmp_path / "tc")
    ours = f"qdisc htb {HANDLE}: root refcnt 2 r2q 10 default 0x2\n"
    assert check_can_shape(euid=0, path=path, qdisc_show=ours) == str(tmp_path / "tc")
    with pytest.raises(ShapingError, match="cannot read"):
        check_can_shape(euid=0, path=path, qdisc_show="")


def test_bench_refuses_a_bad_link_rate(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "bench", "--link-rate", "fast"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "bad link rate 'fast'" in out.stderr


def test_bench_refuses_to_shape_without_tc(tmp_path: Path) -> None:
    """The refusal comes before any server starts or object is written: one line, exit 2."""
    env = dict(os.environ, PATH=str(tmp_path), PYTHONPATH=REPO_SRC)
    out = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "bench", "--link-rate", "unlimited,800Mbit"]
        + ["--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastpipe bench: error: ")
    assert "tc" in lines[0] or "root" in lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


# -- a real shaping of lo -------------------------------------------------------------------


def lo_root() -> str | None:
    return root_qdisc(subprocess.run(["tc", "qdisc", "show", "dev", "lo"], **_text).stdout)


_text: dict[str, object] = {"capture_output": True, "text": True, "check": True}


@pytest.fixture
def sender() -> Iterator[int]:
    """A TCP server on a free loopback port that sends 1 MiB to each client."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"x" * (1 << 20))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    server.close()
    thread.join(10)


def fetch(port: int) -> int:
    received = 0
    with socket.create_connection(("127.0.0.1", port)) as conn:
        while chunk := conn.recv(1 << 16):
            received += len(chunk)
    return received


def shaped_bytes() -> int:
    """Bytes sent through the shaped class, from ``tc -s class show dev lo``."""
    out = subprocess.run(["tc", "-s", "class", "show", "dev", "lo"], **_text).stdout
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"class htb {HANDLE}:1 "):
            return int(lines[i + 1].split()[1])  # " Sent N bytes M pkt ..."
    raise AssertionError(f"no shaped class in:\n{out}")


@needs_root_and_tc
def test_shapes_a_port_and_restores_lo(sender: int) -> None:
    before = lo_root()
    with shape_port(sender, 800_000_000) as commands:
        assert lo_root() == f"htb {HANDLE}:"
        filters = subprocess.run(["tc", "filter", "show", "dev", "lo"], **_text).stdout
        assert f"match {sender:04x}0000/ffff0000 at 20" in filters  # ip sport PORT
        assert commands[-1][-6:] == ["ip", "sport", str(sender), "0xffff", "flowid", "fa57:1"]
        assert fetch(sender) == 1 << 20
        assert shaped_bytes() >= 1 << 20  # the server's bytes went through the shaped class
    assert lo_root() == before


@needs_root_and_tc
def test_removes_the_shaping_after_an_error(sender: int) -> None:
    before = lo_root()
    with pytest.raises(RuntimeError, match="inside"), shape_port(sender, 2_400_000_000):
        assert lo_root() == f"htb {HANDLE}:"
        raise RuntimeError("inside")
    assert lo_root() == before


@needs_root_and_tc
def test_refuses_while_another_process_shapes(sender: int) -> None:
    before = lo_root()
    with shape_port(sender, 800_000_000):
        code = (
            "import sys\n"
            "from fastpipe.tools.shaping import shape_port, ShapingError\n"
            "try:\n"
            f"    with shape_port({sender}, 800_000_000):\n"
            "        pass\n"
            "except ShapingError as exc:\n"
            "    print(exc)\n"
            "    sys.exit(2)\n"
        )
        env = dict(os.environ, PYTHONPATH=REPO_SRC)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert proc.returncode == 2, proc.stderr
        assert "is shaping lo now" in proc.stdout
        assert lo_root() == f"htb {HANDLE}:"  # the second process left ours alone
    assert lo_root() == before


@needs_root_and_tc
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_removes_the_shaping(sender: int, signum: int) -> None:
    """A real process shaping lo gets SIGTERM or SIGINT: it ends, and lo is as before."""
    before = lo_root()
    code = (
        "import sys, threading\n"
        "from fastpipe.tools.shaping import shape_port\n"
        f"with shape_port({sender}, 800_000_000):\n"
        "    print('shaped', flush=True)\n"
        "    threading.Event().wait(120)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_SRC)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"shaped\n"
        assert lo_root() == f"htb {HANDLE}:"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert b"Interrupt" in err  # KeyboardInterrupt, or shaping.Interrupted for SIGTERM
    assert lo_root() == before


@needs_root_and_tc
def test_removes_a_shaping_left_by_a_killed_run(sender: int) -> None:
    """SIGKILL leaves the qdisc; the next run recognises its handle and replaces it."""
    before = lo_root()
    code = (
        "import threading\n"
        "from fastpipe.tools.shaping import shape_port\n"
        f"with shape_port({sender}, 800_000_000):\n"
        "    print('shaped', flush=True)\n"
        "    threading.Event().wait(120)\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_SRC)
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"shaped\n"
        finally:
            proc.kill()
    try:
        assert lo_root() == f"htb {HANDLE}:"  # left behind
        said: list[str] = []
        with shape_port(sender, 2_400_000_000, say=said.append):
            assert lo_root() == f"htb {HANDLE}:"
        assert any("left by an earlier run" in line for line in said)
        assert lo_root() == before
    finally:
        if lo_root() == f"htb {HANDLE}:":
            subprocess.run(teardown_commands()[0], check=False)
