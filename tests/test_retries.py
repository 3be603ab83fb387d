"""Retries that really happen, faults that are never retried, and endpoints that do not
answer. The fault proxy (tests/faultproxy.py) counts the requests per range, keeps their
headers and the times they arrived and were answered."""

from __future__ import annotations

import logging
import os
import re
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from faultproxy import Fault, FaultProxy, Plan, Request, always, fast_retry_config, slow_down

import fastpipe
from fastpipe import Config
from fastpipe.stages import Checksum
from fastpipe.tools.locals3 import LocalS3

PART = 256 * 1024
PLANES = ["raw", "botocore"]


def config(endpoint: str, plane: str, **kwargs: Any) -> Config:
    config: Config = fast_retry_config(endpoint, PART, plane, **kwargs)
    return config


def first_gets_of_each_part(cuts: int, fault: Fault) -> Plan:
    """``fault`` on the first ``cuts`` GETs of every part (a part is known by its last
    byte: a resumed GET keeps it)."""
    seen: Counter[int] = Counter()

    def plan(n: int, request: Request) -> Fault | None:
        end = request.range[1] if request.range else -1
        seen[end] += 1
        return fault if seen[end] <= cuts else None

    return plan


def attempts_per_part(proxy: FaultProxy) -> Counter[int]:
    return Counter(r.range[1] for r in proxy.gets() if r.range is not None)


@pytest.fixture(scope="module")
def object_4_parts(s3_client: Any, bucket: str) -> tuple[str, bytes, list[int]]:
    data = os.urandom(3 * PART + 1000)
    key = "retries/four-parts.bin"
    s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    ends = [min(len(data), (i + 1) * PART) - 1 for i in range(4)]
    return f"s3://{bucket}/{key}", data, ends


# -- a part cut N times is tried N + 1 times ----------------------------------------------


FAULTS = {
    "reset": Fault("reset", after_bytes=100),
    "close": Fault("close", after_bytes=1),
    "503": slow_down(),
    "500": Fault("error", status=500, code="InternalError"),
    "429": Fault("error", status=429, code="TooManyRequests"),
}


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_part_faulted_n_times_is_tried_n_plus_1_times(
    proxy: FaultProxy, object_4_parts: Any, tmp_path: Any, plane: str, fault: str
) -> None:
    uri, data, ends = object_4_parts
    cuts = 2
    proxy.reset(first_gets_of_each_part(cuts, FAULTS[fault]))
    report = fastpipe.run(
        uri,
        stages=[Checksum("sha256")],
        dest=tmp_path / "o.bin",
        config=config(proxy.url, plane, max_attempts=cuts + 1),
    )
    assert report.passed, report.error
    assert (tmp_path / "o.bin").read_bytes() == data
    assert attempts_per_part(proxy) == Counter({end: cuts + 1 for end in ends})
    assert report.download.retries == cuts * len(ends) == sum(proxy.faults.values())
    # Every GET is pinned to the object HEAD saw.
    gets = proxy.gets()
    assert gets and all(r.headers.get("if-match") == f'"{report.etag}"' for r in gets)


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("max_attempts", [1, 2, 4])
def test_max_attempts_bounds_the_attempts_exactly(
    proxy: FaultProxy, object_4_parts: Any, tmp_path: Any, plane: str, max_attempts: int
) -> None:
    uri, _, ends = object_4_parts
    proxy.reset(always(Fault("reset", after_bytes=100)))
    with pytest.raises(fastpipe.RetriesExhausted) as info:
        fastpipe.run(
            uri,
            dest=tmp_path,
            config=config(proxy.url, plane, max_attempts=max_attempts, max_concurrency=1),
        )
    # One fetcher: the first part takes every attempt, and nothing else is asked.
    assert attempts_per_part(proxy) == Counter({ends[0]: max_attempts})
    assert f"{max_attempts} attempts" in str(info.value)
    report = info.value.report
    assert report is not None and report.download.retries == max_attempts - 1
    assert os.listdir(tmp_path) == []


# -- what is never retried ----------------------------------------------------------------


NOT_RETRIED = [
    pytest.param(403, "AccessDenied", fastpipe.AccessDenied, id="denied"),
    pytest.param(404, "NoSuchKey", fastpipe.ObjectNotFound, id="missing"),
    pytest.param(412, "PreconditionFailed", fastpipe.ObjectChanged, id="changed"),
]


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize(("status", "code", "error"), NOT_RETRIED)
def test_get_answered_missing_denied_or_changed_is_not_retried(
    proxy: FaultProxy,
    object_4_parts: Any,
    tmp_path: Any,
    plane: str,
    status: int,
    code: str,
    error: type[fastpipe.FastpipeError],
) -> None:
    uri, _, _ = object_4_parts
    proxy.reset(always(Fault("error", status=status, code=code)))
    with pytest.raises(error) as info:
        fastpipe.run(
            uri, dest=tmp_path, config=config(proxy.url, plane, max_attempts=5, max_concurrency=1)
        )
    assert len(proxy.gets()) == 1
    assert len(proxy.heads()) == 1
    report = info.value.report
    assert report is not None and report.download.retries == 0
    assert info.value.request_id == "faultproxy"  # S3's request id is kept
    assert os.listdir(tmp_path) == []


def test_missing_object_is_headed_once(proxy: FaultProxy, bucket: str) -> None:
    with pytest.raises(fastpipe.ObjectNotFound):
        fastpipe.run(f"s3://{bucket}/retries/no-such-key", config=config(proxy.url, "raw"))
    object_heads = [r for r in proxy.heads() if urlsplit(r.target).path.endswith("no-such-key")]
    assert len(object_heads) == 1
    assert proxy.gets() == []


def test_denied_object_is_headed_once(
    proxy: FaultProxy, object_4_parts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, _, _ = object_4_parts
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "reader-denied")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "denied-secret")
    with pytest.raises(fastpipe.AccessDenied):
        fastpipe.run(uri, config=config(proxy.url, "raw"))
    assert len(proxy.heads()) == 1
    assert proxy.gets() == []


# -- faults on HEAD -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [slow_down(), Fault("error", status=500, code="InternalError")],
    ids=["503", "500"],
)
def test_head_fault_then_success(proxy: FaultProxy, object_4_parts: Any, fault: Fault) -> None:
    uri, data, _ = object_4_parts
    proxy.reset(None, head_plan=lambda n, request: fault if n == 0 else None)
    report = fastpipe.run(uri, stages=[Checksum("sha256")], config=config(proxy.url, "raw"))
    assert report.passed, report.error
    assert report.size == len(data)
    heads = proxy.heads()
    assert len(heads) == 2 and heads[0].applied and not heads[1].applied
    assert heads[0].target == heads[1].target


# -- backoff --------------------------------------------------------------------------------


_RETRY_LINE = re.compile(r"part (\d+) \(bytes (\d+)-(\d+)\) attempt (\d+) failed: .* in ([\d.]+)s$")


@pytest.mark.parametrize("plane", PLANES)
def test_retries_back_off(
    proxy: FaultProxy,
    object_4_parts: Any,
    plane: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each retry waits its backoff: the proxy sees the next attempt no sooner than the
    backoff the engine logged after the fault's answer."""
    uri, _, ends = object_4_parts
    proxy.reset(first_gets_of_each_part(2, slow_down()))
    base = 0.02
    with caplog.at_level(logging.DEBUG, logger="fastpipe"):
        report = fastpipe.run(
            uri,
            stages=[],
            config=config(proxy.url, plane, max_concurrency=1, backoff_base=base, backoff_max=1.0),
        )
    assert report.passed
    lines = [_RETRY_LINE.search(r.getMessage()) for r in caplog.records]
    retries = [m for m in lines if m is not None]
    assert len(retries) == report.download.retries == 2 * len(ends)
    gets = proxy.gets()
    for match in retries:
        last, attempt, backoff = int(match[3]), int(match[4]), float(match[5])
        assert 0.0 <= backoff <= base * 2 ** (attempt - 1)  # full jitter under its cap
        tries = [r for r in gets if r.range is not None and r.range[1] == last]
        failed, retry = tries[attempt - 1], tries[attempt]
        assert failed.applied and failed.answered_at > 0
        # The retry left the client a backoff after the error was written (timer slack 1 ms).
        assert retry.received_at - failed.answered_at >= backoff - 0.001
    assert any(float(m[5]) > 0 for m in retries)


# -- endpoints that do not answer -------------------------------------------------------


@pytest.fixture
def own_proxy(s3_server: LocalS3) -> Iterator[FaultProxy]:
    """A proxy of this test's own (it may stop listening)."""
    upstream = urlsplit(s3_server.endpoint_url)
    with FaultProxy(upstream.hostname or "127.0.0.1", upstream.port or 80) as proxy:
        yield proxy


@pytest.mark.parametrize("plane", PLANES)
def test_connection_refused_mid_download_exhausts_retries(
    own_proxy: FaultProxy, object_4_parts: Any, tmp_path: Any, plane: str
) -> None:
    """After HEAD, the endpoint stops listening and the open connection is reset: every
    reconnect is refused, retried, and the run ends with RetriesExhausted (exit 3)."""
    uri, _, _ = object_4_parts
    proxy = own_proxy

    def plan(n: int, request: Request) -> Fault | None:
        proxy.refuse_new_connections()
        return Fault("reset", after_bytes=0)

    proxy.reset(plan)
    with pytest.raises(fastpipe.RetriesExhausted) as info:
        fastpipe.run(
            uri, dest=tmp_path, config=config(proxy.url, plane, max_attempts=3, max_concurrency=1)
        )
    assert info.value.exit_code == 3
    assert len(proxy.gets()) == 1  # the next attempts never reached the endpoint
    assert "3 attempts" in str(info.value)
    text = str(info.value.last_error).lower()
    assert "connect" in text, text
    assert os.listdir(tmp_path) == []


def _never_accepting_socket(port: int = 0) -> tuple[socket.socket, socket.socket]:
    """A listener on ``port`` whose accept queue is full (one queued connection), so that
    the kernel drops new SYNs and connecting times out; and the connection that fills it."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(0)
    filler = socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=5)
    return server, filler


@pytest.mark.parametrize("plane", PLANES)
def test_connect_timeout_mid_download_exhausts_retries(
    own_proxy: FaultProxy, object_4_parts: Any, tmp_path: Any, plane: str
) -> None:
    """After HEAD, the endpoint's port stops accepting (a full accept queue) and the open
    connection is reset: every reconnect times out, is retried, and the run ends with
    RetriesExhausted (exit 3)."""
    uri, _, _ = object_4_parts
    proxy = own_proxy
    held: list[socket.socket] = []

    def plan(n: int, request: Request) -> Fault | None:
        if not held:
            proxy.refuse_new_connections()  # in the proxy's loop: the listener closes now
            held.extend(_never_accepting_socket(proxy.port))
        return Fault("reset", after_bytes=0)

    proxy.reset(plan)
    try:
        with pytest.raises(fastpipe.RetriesExhausted) as info:
            fastpipe.run(
                uri,
                dest=tmp_path,
                config=config(
                    proxy.url, plane, max_attempts=3, max_concurrency=1, connect_timeout=0.2
                ),
            )
    finally:
        for sock in held:
            sock.close()
    assert info.value.exit_code == 3
    assert len(proxy.gets()) == 1  # the next attempts never got through
    text = str(info.value.last_error).lower()
    assert "timeout" in text or "timed out" in text, text
    assert os.listdir(tmp_path) == []


@pytest.fixture
def never_accepting() -> Iterator[str]:
    """An endpoint whose accept queue is full: new connections are never accepted (the
    kernel drops their SYNs), so connecting times out."""
    server, filler = _never_accepting_socket()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        filler.close()
        server.close()


def test_connect_timeout_is_endpoint_unreachable(never_accepting: str, bucket: str) -> None:
    with pytest.raises(fastpipe.EndpointUnreachable) as info:
        fastpipe.run(
            f"s3://{bucket}/retries/four-parts.bin",
            config=Config(endpoint_url=never_accepting, connect_timeout=0.2),
        )
    assert info.value.exit_code == 3
    assert "unreachable" in str(info.value)
    assert info.value.__cause__ is not None  # botocore's own error, for the traceback
    report = info.value.report
    assert report is not None and report.error_type == "EndpointUnreachable"
