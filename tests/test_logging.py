"""The ``fastpipe`` logger: retries, URL renewals and the data plane at DEBUG, one INFO
line per object, never a signature; the CLI's -v/-vv send them to stderr."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from faultproxy import Fault, FaultProxy, Request

import fastpipe
from fastpipe import Config

PART = 256 * 1024
REPO_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _signatures(requests: list[Request]) -> set[str]:
    found: set[str] = set()
    for request in requests:
        query = parse_qs(urlsplit(request.target).query)
        for name in ("X-Amz-Signature", "X-Amz-Credential"):
            found.update(query.get(name, []))
        found.update(re.findall(r"Signature=([0-9a-f]+)", request.headers.get("authorization", "")))
    return found


def _first_get_of_each_part(fault: Fault) -> Any:
    seen: set[int] = set()

    def plan(n: int, request: Request) -> Fault | None:
        end = request.range[1] if request.range else -1
        if end in seen:
            return None
        seen.add(end)
        return fault

    return plan


@pytest.fixture(scope="module")
def logged_object(s3_client: Any, bucket: str) -> tuple[str, bytes]:
    data = os.urandom(2 * PART + 10)
    s3_client.put_object(Bucket=bucket, Key="logging/three-parts.bin", Body=data)
    return f"s3://{bucket}/logging/three-parts.bin", data


@pytest.mark.parametrize("plane", ["raw", "botocore"])
def test_retry_lines_name_part_attempt_cause_backoff_and_no_signature(
    proxy: FaultProxy, logged_object: Any, caplog: pytest.LogCaptureFixture, plane: str
) -> None:
    uri, _ = logged_object
    # The server quotes the signed request in its 503 message: the cause is logged
    # without the signature.
    proxy.reset(_first_get_of_each_part(Fault("error", status=503, code="SlowDown", echo=True)))
    config = Config(endpoint_url=proxy.url, part_size=PART, data_plane=plane, backoff_base=0.01)
    with caplog.at_level(logging.DEBUG, logger="fastpipe"):
        report = fastpipe.run(uri, config=config)
    assert report.passed
    messages = [r.getMessage() for r in caplog.records]
    retries = [
        (r, m)
        for r, m in zip(caplog.records, messages, strict=True)
        if "attempt" in m and "retrying" in m
    ]
    assert len(retries) == 3 == report.download.retries
    for record, message in retries:
        assert record.levelno == logging.DEBUG and record.name == "fastpipe._fetch"
        assert re.search(r"part \d \(bytes \d+-\d+\) attempt 1 failed: .*SlowDown", message)
        assert "cannot serve GET" in message and "<redacted>" in message
        assert re.search(r"retrying in \d+\.\d{3}s$", message)
    assert any(f"data plane {plane}" in m for m in messages)
    done = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(done) == 1 and uri in done[0].getMessage() and "passed" in done[0].getMessage()
    secrets = _signatures(proxy.gets())
    assert secrets
    for message in messages:
        assert not any(value in message for value in secrets), message
        assert "X-Amz-Signature" not in message


def test_expired_url_renewal_is_logged(
    proxy: FaultProxy, logged_object: Any, caplog: pytest.LogCaptureFixture
) -> None:
    uri, _ = logged_object
    expired = Fault("error", status=403, code="AccessDenied", message="Request has expired")
    proxy.reset(lambda n, request: expired if n == 0 else None)
    config = Config(endpoint_url=proxy.url, part_size=PART, data_plane="raw", max_concurrency=1)
    with caplog.at_level(logging.DEBUG, logger="fastpipe"):
        assert fastpipe.run(uri, config=config).passed
    lines = [r.getMessage() for r in caplog.records]
    assert any("signing the GET URL again (it expired)" in m and uri in m for m in lines)
    assert not any("http://" in m or "X-Amz" in m for m in lines)  # the URI, never the URL


def test_failed_object_logs_one_info_line(
    proxy: FaultProxy, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"s3://{bucket}/logging/no-such-key"
    with caplog.at_level(logging.INFO, logger="fastpipe"), pytest.raises(fastpipe.ObjectNotFound):
        fastpipe.run(uri, config=Config(endpoint_url=proxy.url))
    done = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(done) == 1 and uri in done[0] and "ObjectNotFound" in done[0]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=REPO_SRC, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_verbose_logs_to_stderr(proxy: FaultProxy, logged_object: Any) -> None:
    uri, _ = logged_object
    proxy.reset(_first_get_of_each_part(Fault("error", status=503, code="SlowDown", echo=True)))
    base = ["run", uri, "--endpoint-url", proxy.url, "--part-size", "256KiB", "--no-progress"]
    quiet = _cli(*base)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    proxy.reset(_first_get_of_each_part(Fault("error", status=503, code="SlowDown", echo=True)))
    info = _cli(*base, "-v")
    assert info.returncode == 0, info.stderr
    assert "INFO" in info.stderr and "passed" in info.stderr and "DEBUG" not in info.stderr
    proxy.reset(_first_get_of_each_part(Fault("error", status=503, code="SlowDown", echo=True)))
    debug = _cli(*base, "-vv")
    assert debug.returncode == 0, debug.stderr
    assert "DEBUG fastpipe._fetch" in debug.stderr and "retrying in" in debug.stderr
    assert "data plane raw" in debug.stderr
    assert not any(value in debug.stderr for value in _signatures(proxy.gets()))
    assert "X-Amz-Signature" not in debug.stderr
