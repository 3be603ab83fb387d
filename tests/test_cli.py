"""The command line as a user meets it, each run a real process.

A bad setup (endpoint, profile, config file, credentials, region, unwritable stdout) gets
one line naming the cause and the documented exit code, never a traceback; with
``--json`` stdout holds exactly one JSON report whatever happens; keys, paths and
messages reach the terminal with their control characters escaped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from faultproxy import Fault, FaultProxy, always

import fastpipe
from fastpipe._console import printable
from fastpipe.tools.locals3 import free_ports

REPO_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
#: What a terminal would act on: ESC, BEL, a newline inside a line, CSI (C1).
TERMINAL_CONTROLS = ("\x1b", "\x07", "\x9b")


def cli_env(**changes: str | None) -> dict[str, str]:
    """This process's environment with ``changes`` (None removes a variable)."""
    env = dict(os.environ, PYTHONPATH=REPO_SRC, PYTHONDONTWRITEBYTECODE="1")
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_cli(
    *argv: str, env: dict[str, str] | None = None, stdout: Any = subprocess.PIPE, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", *argv],
        env=env or cli_env(),
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        **kw,
    )


def one_json_report(stdout: str) -> dict[str, Any]:
    """stdout holds exactly one JSON object (one line)."""
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    report = json.loads(lines[0])
    assert isinstance(report, dict)
    return report


# -- bad setup: one line, the documented exit code, no traceback ---------------------------

#: No AWS settings from the machine: each case sets what it tests.
_CLEAN = {
    "AWS_ACCESS_KEY_ID": "fastpipe-test",
    "AWS_SECRET_ACCESS_KEY": "fastpipe-test-secret",
    "AWS_PROFILE": None,
    "AWS_DEFAULT_PROFILE": None,
    "AWS_ENDPOINT_URL": None,
    "AWS_ENDPOINT_URL_S3": None,
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": None,
    "AWS_REGION": None,
    "AWS_DEFAULT_REGION": None,
    "AWS_CONFIG_FILE": "/nonexistent/fastpipe-test-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/fastpipe-test-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _bad_config_file(tmp_path: Path) -> str:
    path = tmp_path / "config"
    path.write_text("[default\nregion = us-east-1\n")  # the section header is not closed
    return str(path)


def _profile_file(tmp_path: Path) -> str:
    path = tmp_path / "config-with-profile"
    path.write_text("[profile other]\nregion = us-east-1\n")
    return str(path)


def _endpoint_profile(tmp_path: Path) -> str:
    path = tmp_path / "config-with-endpoint"
    path.write_text("[default]\nendpoint_url = localhost:18433\n")
    return str(path)


# (id, extra argv, environment changes (callables get tmp_path), exit code, words of the line)
SETUP_CASES: list[tuple[str, list[str], dict[str, Any], int, str]] = [
    ("endpoint-no-scheme", ["--endpoint-url", "127.0.0.1:18433"], {}, 2, "127.0.0.1:18433"),
    ("endpoint-env-no-scheme", [], {"AWS_ENDPOINT_URL": "127.0.0.1:18433"}, 2, "AWS_ENDPOINT_URL"),
    ("endpoint-ftp", ["--endpoint-url", "ftp://127.0.0.1/"], {}, 2, "endpoint"),
    # Endpoints botocore finds itself (service variable, profile) are refused by it.
    ("endpoint-s3-env", [], {"AWS_ENDPOINT_URL_S3": "127.0.0.1:18433"}, 2, "127.0.0.1:18433"),
    ("endpoint-in-profile", [], {"AWS_CONFIG_FILE": _endpoint_profile}, 2, "localhost:18433"),
    ("missing-profile", [], {"AWS_PROFILE": "no-such-profile"}, 3, "no-such-profile"),
    (
        "missing-profile-with-region",
        ["--region", "eu-west-1"],
        {"AWS_PROFILE": "no-such-profile", "AWS_CONFIG_FILE": _profile_file},
        3,
        "no-such-profile",
    ),
    ("malformed-config-file", [], {"AWS_CONFIG_FILE": _bad_config_file}, 3, "config file"),
    ("key-without-secret", [], {"AWS_SECRET_ACCESS_KEY": None}, 3, "AWS_SECRET_ACCESS_KEY"),
    ("bad-region", ["--region", "bad region"], {}, 2, "bad region"),
]


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize(
    ("argv", "changes", "code", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in SETUP_CASES],
)
def test_bad_setup_is_one_line(
    tmp_path: Path,
    argv: list[str],
    changes: dict[str, Any],
    code: int,
    words: str,
    as_json: bool,
) -> None:
    (port,) = free_ports(1)  # nothing listens: a request that got through would say so
    env_changes = dict(_CLEAN)
    env_changes.update({k: (v(tmp_path) if callable(v) else v) for k, v in changes.items()})
    args = ["run", "s3://fastpipe-setup/key.bin", "--no-progress"]
    endpoint_set = "--endpoint-url" in argv or any(k.startswith("AWS_ENDPOINT") for k in changes)
    if not endpoint_set and changes.get("AWS_CONFIG_FILE") is not _endpoint_profile:
        args += ["--endpoint-url", f"http://127.0.0.1:{port}"]
    proc = run_cli(*args, *argv, *(["--json"] if as_json else []), env=cli_env(**env_changes))
    assert "Traceback" not in proc.stderr
    assert proc.returncode == code, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("fastpipe: error: ") and words in line, line
    assert "unreachable" not in line  # the cause is the setup, not the network
    assert "fastpipe-test-secret" not in proc.stderr + proc.stdout
    if as_json:
        report = one_json_report(proc.stdout)
        assert report["exit_code"] == code and report["passed"] is False
        assert words in report["error"] and report["error_type"]
    else:
        assert proc.stdout == ""


@pytest.mark.parametrize(
    "argv",
    [["stages"], ["run", "LOCAL", "--json"], ["run", "LOCAL", "--no-progress"]],
    ids=["stages", "run-json", "run-summary"],
)
def test_unwritable_stdout_exit_5(tmp_path: Path, argv: list[str]) -> None:
    local = tmp_path / "small.bin"
    local.write_bytes(b"some bytes")
    argv = [str(local) if a == "LOCAL" else a for a in argv]
    with open("/dev/full", "w") as full:
        proc = run_cli(*argv, stdout=full)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 5, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("fastpipe: error: ") and "stdout" in line


def test_closed_pipe_is_not_an_error() -> None:
    """`fastpipe stages | head -1`: the reader left; no traceback, exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastpipe.cli", "stages"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the child writes: its first write meets a closed pipe
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in err


# -- --json: exactly one report on stdout ----------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["run", "--json"], "no source"),
        (["run", "x.bin", "--json", "--part-size", "abc"], "--part-size"),
        (["run", "x.bin", "--json", "--no-such-option"], "--no-such-option"),
        (["run", "x.bin", "--js", "--stage", "nope"], "unknown stage"),
        (["run", "s3:/x", "--json"], "s3://bucket/key"),
        (["run", "s3://bucket/key", "--json", "--resume"], "resume needs a destination (--dest)"),
    ],
)
def test_json_usage_error_prints_a_report(argv: list[str], words: str) -> None:
    proc = run_cli(*argv)
    assert proc.returncode == 2, proc.stderr
    report = one_json_report(proc.stdout)
    assert report["exit_code"] == 2 and report["passed"] is False
    assert report["error_type"] == "UsageError" and words in report["error"]
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr


def test_json_report_carries_the_exit_code(tmp_path: Path) -> None:
    local = tmp_path / "ok.bin"
    local.write_bytes(b"data")
    passed = one_json_report(run_cli("run", str(local), "--json").stdout)
    assert passed["exit_code"] == 0 and passed["passed"] is True
    proc = run_cli("run", str(local), "--json", "--stage", "limits:max_size=1")
    assert proc.returncode == 1
    assert one_json_report(proc.stdout)["exit_code"] == 1


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_json_interrupt_prints_a_report(
    proxy: FaultProxy, put_object: Any, tmp_path: Path, signum: int, code: int
) -> None:
    uri = put_object(os.urandom(1 << 20))
    proxy.reset(always(Fault("hold")))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastpipe.cli", "run", uri, "--endpoint-url", proxy.url]
        + ["--dest", str(tmp_path / "o.bin"), "--part-size", "256KiB", "--json"],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while proxy.held() < 1:  # the download is under way, held by the proxy
            assert time.monotonic() < deadline and proc.poll() is None, "no GET arrived"
            time.sleep(0.02)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proxy.release()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    report = one_json_report(out)
    assert report["exit_code"] == code and report["error_type"] == "Interrupted"
    assert report["source"] == uri and signal.Signals(signum).name in report["error"]
    assert "Traceback" not in err


# -- control characters never reach the terminal raw ------------------------------------------


def test_printable_escapes_controls() -> None:
    text = "a\x1b]0;title\x07b\x1b[2Jc\nd\re\tf\x9b\x7f\u202eg\u2028h\udcff"
    shown = printable(text)
    assert shown == ("a\\x1b]0;title\\x07b\\x1b[2Jc\\nd\\re\\tf\\x9b\\x7f\\u202eg\\u2028h\\udcff")
    assert printable("plain é 日本 ✓") == "plain é 日本 ✓"
    assert shown.isprintable()


NASTY_NAME = "title\x1b]0;pwned\x07clear\x1b[2Jline\nbreak\x9bend.bin"


def test_summary_escapes_a_local_name(tmp_path: Path) -> None:
    path = tmp_path / NASTY_NAME
    path.write_bytes(b"payload")
    proc = run_cli("run", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert not any(c in proc.stdout for c in TERMINAL_CONTROLS)
    first = proc.stdout.splitlines()[0]
    assert first.startswith("PASSED") and printable(str(path)) in first
    # JSON keeps the exact name (json escapes it).
    report = one_json_report(run_cli("run", str(path), "--json").stdout)
    assert report["source"] == str(path)


def test_error_lines_escape_a_local_name(tmp_path: Path) -> None:
    missing = tmp_path / NASTY_NAME
    proc = run_cli("run", str(missing))
    assert proc.returncode == 3
    (line,) = proc.stderr.splitlines()
    assert "no such file" in line and printable(str(missing)) in line
    assert not any(c in proc.stderr for c in TERMINAL_CONTROLS)


def test_error_lines_escape_a_key(bucket: str) -> None:
    key = "a\x1b[2Jb\nc\x07d"
    proc = run_cli("run", f"s3://{bucket}/{key}", "--no-progress")
    assert proc.returncode == 3, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert printable(key) in line
    assert not any(c in proc.stderr for c in TERMINAL_CONTROLS)


def test_stage_failure_line_escapes_a_key(put_object: Any) -> None:
    key = "k\x1b]0;x\x07\nnext"
    uri = put_object(b"not what was expected", key=key)
    proc = run_cli("run", uri, "--stage", "checksum:algo=sha256,expect=00", "--no-progress")
    assert proc.returncode == 1, proc.stderr
    assert not any(c in proc.stdout + proc.stderr for c in TERMINAL_CONTROLS)
    assert proc.stdout.splitlines()[0].startswith("FAILED")
    assert len(proc.stderr.splitlines()) == 1  # the message stays one line


# -- smaller ones -------------------------------------------------------------------------------


def test_version_and_help_texts() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"fastpipe {fastpipe.__version__}"
    helptext = run_cli("run", "--help").stdout
    for option in ("--region", "--concurrency", "--no-progress"):
        after = helptext.split(option, 2)[-1].split("\n  -", 1)[0]  # its entry in the list
        assert len(after.split()) > 1, f"{option} has no help text"


def test_parser_build_does_not_measure_the_disk_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """--help says how the default disk budget is chosen; it is measured when used."""
    import shutil

    from fastpipe import _budgets
    from fastpipe.cli import build_parser

    def measured(*args: object) -> None:
        raise AssertionError("the disk budget was measured while building the parser")

    monkeypatch.setattr(shutil, "disk_usage", measured)
    monkeypatch.setattr(_budgets, "writeback_threshold", measured)
    parser = build_parser()
    run = next(a for a in parser._actions if a.dest == "command").choices["run"]  # type: ignore[attr-defined]
    helptext = " ".join(run.format_help().split())
    assert "(default: 90% of the free space where the temp files go (--dest's folder, else " \
        "--temp-dir, else the system temp folder), at most the kernel's writeback threshold; " \
        "measured at start)" in helptext


def test_report_source_is_absolute_for_a_relative_path(tmp_path: Path) -> None:
    (tmp_path / "rel.bin").write_bytes(b"x")
    proc = run_cli("run", "rel.bin", "--json", cwd=tmp_path)
    assert one_json_report(proc.stdout)["source"] == str(tmp_path / "rel.bin")


def test_report_source_keeps_the_version(bucket: str) -> None:
    uri = f"s3://{bucket}/missing-versioned.bin?versionId=v-1234"
    proc = run_cli("run", uri, "--json")
    assert proc.returncode == 3, proc.stderr
    assert one_json_report(proc.stdout)["source"] == uri
