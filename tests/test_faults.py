"""Faults between fastpipe and a real SeaweedFS: retries lose nothing, limits hold.

A fault-injecting proxy (tests/faultproxy.py) sits on loopback between the engine and the
server; it resets, closes and stalls responses, answers 503 SlowDown / 500 InternalError,
holds requests, and logs every GET's Range so that attempts and resume offsets can be
checked per part.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest
from faultproxy import (
    Fault,
    FaultProxy,
    always,
    capped,
    fast_retry_config,
    internal_error,
    share,
    slow_down,
)

import fastpipe
import fastpipe.cli
from fastpipe import Config
from fastpipe.stages import Checksum

PART = 256 * 1024
PLANES = ["raw", "botocore"]
SECRETS_MARKERS = ["X-Amz-Signature", "X-Amz-Credential", "Signature="]
REPO_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def config(proxy: FaultProxy, plane: str, **kwargs: Any) -> Config:
    config: Config = fast_retry_config(proxy.url, PART, plane, **kwargs)
    return config


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def while_held(
    proxy: FaultProxy, work: Callable[[], Any], during: Callable[[], Any]
) -> dict[str, Any]:
    """Run ``work`` in a thread; once the proxy holds a GET, run ``during``, then release.

    Returns ``{"result": ...}`` or ``{"error": exception}``.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - examined by the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    try:
        wait_until(lambda: proxy.held() >= 1)
        during()
    finally:
        proxy.release()
        thread.join(60)
    assert not thread.is_alive()
    return outcome


def attempts_per_part(proxy: FaultProxy) -> Counter[int]:
    """GETs per part, keyed by the range's last byte (a resumed part keeps its end)."""
    return Counter(r.range[1] for r in proxy.gets() if r.range is not None)


def check_resumes(proxy: FaultProxy) -> int:
    """Each cut response is retried after the bytes it delivered; returns the cuts seen."""
    gets = proxy.gets()
    cuts = 0
    for i, request in enumerate(gets):
        if not request.applied or request.fault is None or request.range is None:
            continue
        first, last = request.range
        later = [r for r in gets[i + 1 :] if r.range is not None and r.range[1] == last]
        assert later, f"no retry of bytes {first}-{last}"
        retry_first = later[0].range[0]  # type: ignore[index]
        if request.fault.kind in ("reset", "close", "stall"):
            cuts += 1
            assert first + request.fault.after_bytes <= retry_first <= last
        else:
            assert retry_first == first  # an error response delivered nothing
    return cuts


def temp_leftovers(folder: Any) -> list[str]:
    return [p for p in os.listdir(folder) if p.endswith(".fastpipe-tmp")]


def assert_no_secrets(*texts: str, extra: tuple[str, ...] = ()) -> None:
    from fastpipe.tools.locals3 import DEFAULT_SECRET_KEY

    for text in texts:
        for marker in (*SECRETS_MARKERS, DEFAULT_SECRET_KEY, *extra):
            assert marker not in text, f"{marker!r} leaked"


@pytest.fixture(scope="module")
def big_object(s3_client: Any, bucket: str) -> tuple[str, bytes]:
    data = os.urandom(3 * 1024 * 1024 + 12345)
    key = "faults/three-mib.bin"
    s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}", data


# -- retries lose nothing ---------------------------------------------------------------


MIXED_FAULTS = [
    Fault("reset", after_bytes=100_000),
    slow_down(),
    Fault("close", after_bytes=37_000),
    internal_error(),
    Fault("reset", after_bytes=1),
]


@pytest.mark.parametrize("plane", PLANES)
def test_faults_on_a_share_of_gets_lose_nothing(
    proxy: FaultProxy, big_object: tuple[str, bytes], tmp_path: Any, plane: str
) -> None:
    uri, data = big_object
    max_attempts = 4
    # ~40% of GETs fail, but never one part more than max_attempts - 1 times.
    proxy.reset(capped(share(0.4, MIXED_FAULTS, seed=7), max_attempts - 1))
    dest = tmp_path / "out.bin"
    report = fastpipe.run(
        uri,
        stages=[Checksum("sha256")],
        dest=dest,
        config=config(proxy, plane, max_attempts=max_attempts),
    )
    assert report.passed, report.error
    assert report.download.plane == plane
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert report.stage("checksum").result["hexdigest"] == hashlib.sha256(data).hexdigest()
    injected = sum(proxy.faults.values())
    assert injected > 0
    assert report.download.retries == injected
    assert set(proxy.faults) >= {"reset", "error"}
    assert check_resumes(proxy) > 0
    assert max(attempts_per_part(proxy).values()) <= max_attempts
    # Bytes fetched: each byte once, plus what the cut responses delivered and were kept.
    assert report.download.bytes == len(data)
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("plane", PLANES)
def test_stalled_response_times_out_and_resumes(
    proxy: FaultProxy, big_object: tuple[str, bytes], tmp_path: Any, plane: str
) -> None:
    uri, data = big_object
    stall = Fault("stall", after_bytes=200_000)
    proxy.reset(lambda n, request: stall if n == 2 else None)
    dest = tmp_path / "out.bin"
    report = fastpipe.run(uri, stages=[], dest=dest, config=config(proxy, plane, read_timeout=0.5))
    assert report.passed
    assert dest.read_bytes() == data
    assert proxy.faults == Counter({"stall": 1})
    assert report.download.retries == 1
    assert check_resumes(proxy) == 1


# -- retry limit ------------------------------------------------------------------------


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize(
    "fault", [slow_down(), Fault("reset", after_bytes=5000)], ids=["503", "reset"]
)
def test_retries_exhausted(
    proxy: FaultProxy, big_object: tuple[str, bytes], tmp_path: Any, plane: str, fault: Fault
) -> None:
    uri, _ = big_object
    proxy.reset(always(fault))
    with pytest.raises(fastpipe.RetriesExhausted) as info:
        fastpipe.run(
            uri, dest=tmp_path / "x", config=config(proxy, plane, max_attempts=3, max_concurrency=1)
        )
    error = info.value
    assert error.last_error is not None
    assert not isinstance(error.last_error, fastpipe.RetriesExhausted)
    assert error.__cause__ is error.last_error  # the chain survives the task groups
    assert "3 attempts" in str(error)
    assert error.report is not None and error.report.error_type == "RetriesExhausted"
    assert error.exit_code == 3
    assert attempts_per_part(proxy) == Counter({PART - 1: 3})  # one fetcher: part 0 only
    assert os.listdir(tmp_path) == []
    assert_no_secrets(str(error), repr(error.last_error))


def test_retries_exhausted_cli(
    proxy: FaultProxy, big_object: tuple[str, bytes], tmp_path: Any, capsys: Any
) -> None:
    uri, _ = big_object
    proxy.reset(always(internal_error()))
    for as_json in (True, False):
        argv = ["run", uri, "--endpoint-url", proxy.url, "--dest", str(tmp_path)]
        argv += ["--part-size", "256KiB", "--concurrency", "4", "--max-attempts", "2"]
        code = fastpipe.cli.main(argv + (["--json"] if as_json else []))
        out, err = capsys.readouterr()
        assert code == 3
        assert err.count("\n") == 1 and "failed after 2 attempts" in err
        if as_json:
            assert json.loads(out)["error_type"] == "RetriesExhausted"
        assert_no_secrets(out, err)
        assert os.listdir(tmp_path) == []


# -- object replaced mid-download -------------------------------------------------------


def _hold_after_first(n: int, request: Any) -> Fault | None:
    return Fault("hold") if n >= 1 else None


@pytest.mark.parametrize("plane", PLANES)
def test_object_replaced_during_download(
    proxy: FaultProxy, s3_client: Any, bucket: str, tmp_path: Any, plane: str
) -> None:
    key = f"faults/replaced-{plane}.bin"
    s3_client.put_object(Bucket=bucket, Key=key, Body=os.urandom(2 << 20))
    proxy.reset(_hold_after_first)
    outcome = while_held(
        proxy,
        lambda: fastpipe.run(f"s3://{bucket}/{key}", dest=tmp_path, config=config(proxy, plane)),
        lambda: s3_client.put_object(Bucket=bucket, Key=key, Body=os.urandom(2 << 20)),
    )
    error = outcome.get("error")
    assert isinstance(error, fastpipe.ObjectChanged), repr(error)
    assert key in str(error)
    assert error.exit_code == 4
    assert os.listdir(tmp_path) == []


def _cli_process(args: list[str], **kwargs: Any) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=REPO_SRC, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "fastpipe.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_object_replaced_cli_exit_4(
    proxy: FaultProxy, s3_client: Any, bucket: str, tmp_path: Any
) -> None:
    key = "faults/replaced-cli.bin"
    s3_client.put_object(Bucket=bucket, Key=key, Body=os.urandom(2 << 20))
    proxy.reset(_hold_after_first)
    argv = ["run", f"s3://{bucket}/{key}", "--endpoint-url", proxy.url, "--dest", str(tmp_path)]
    proc = _cli_process(argv + ["--part-size", "256KiB", "--concurrency", "2", "--json"])
    try:
        wait_until(lambda: proxy.held() >= 1)
        s3_client.put_object(Bucket=bucket, Key=key, Body=os.urandom(3 << 20))  # other size
    finally:
        proxy.release()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err
    assert key in err and "changed" in err
    assert json.loads(out)["error_type"] == "ObjectChanged"
    assert_no_secrets(out, err)
    assert os.listdir(tmp_path) == []


# -- interruption -----------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_interrupted(
    proxy: FaultProxy, big_object: tuple[str, bytes], tmp_path: Any, signum: int, code: int
) -> None:
    uri, _ = big_object
    proxy.reset(always(Fault("hold")))
    argv = ["run", uri, "--endpoint-url", proxy.url, "--dest", str(tmp_path / "o.bin")]
    proc = _cli_process(argv + ["--part-size", "256KiB", "--concurrency", "4"])
    try:
        wait_until(lambda: proxy.held() >= 1)
        assert len(temp_leftovers(tmp_path)) == 1  # the download is under way
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert "interrupted" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("plane", PLANES)
def test_caller_cancel_leaves_nothing(
    proxy: FaultProxy, big_object: tuple[str, bytes], tmp_path: Any, plane: str
) -> None:
    uri, _ = big_object
    proxy.reset(lambda n, request: Fault("hold") if n >= 2 else None)
    baseline = threading.active_count()

    async def main() -> bool:
        async def cancel_when_held(scope: anyio.CancelScope) -> None:
            while proxy.held() < 1:
                await anyio.sleep(0.02)
            scope.cancel()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as scope:
                    tg.start_soon(cancel_when_held, scope)
                    await fastpipe.process(
                        uri, stages=[Checksum()], dest=tmp_path, config=config(proxy, plane)
                    )
        return scope.cancelled_caught

    assert anyio.run(main)
    assert os.listdir(tmp_path) == []
    proxy.release()
    wait_until(lambda: threading.active_count() <= baseline, timeout=10)


# -- a presigned URL that expires mid-download ------------------------------------------


def _expired(target: str) -> bool:
    """The presigned ``target`` is past its expiry by the clock (whole seconds, as S3 has)."""
    import calendar
    from urllib.parse import parse_qs

    query = parse_qs(urlsplit(target).query)
    signed = calendar.timegm(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
    return time.time() >= signed + int(query["X-Amz-Expires"][0]) + 1


def test_expired_presigned_url_is_signed_again(
    proxy: FaultProxy, big_object: tuple[str, bytes], tmp_path: Any
) -> None:
    """A GET held past its URL's expiry gets 403 'Request has expired': the engine signs
    again and retries that range; nothing is lost and the URL never shows in the report."""
    uri, data = big_object
    proxy.reset(lambda n, request: Fault("hold") if n == 2 else None)
    outcome = while_held(
        proxy,
        lambda: fastpipe.run(
            uri,
            stages=[Checksum("sha256")],
            dest=tmp_path / "o.bin",
            config=config(proxy, "raw", max_concurrency=1, presign_expires=1),
        ),
        lambda: wait_until(lambda: _expired(proxy.gets()[2].target), timeout=60),
    )
    assert "error" not in outcome, repr(outcome.get("error"))
    report = outcome["result"]
    assert report.passed
    assert report.stage("checksum").result["hexdigest"] == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "o.bin").read_bytes() == data
    gets = proxy.gets()
    held = gets[2]
    again = [r for r in gets[3:] if r.range == held.range]
    assert again, "the expired range was not requested again"
    assert urlsplit(again[0].target).query != urlsplit(held.target).query  # signed anew
    text = json.dumps(report.to_dict(), default=str)
    assert not any(marker in text for marker in SECRETS_MARKERS)


@pytest.mark.parametrize("plane", PLANES)
def test_connections_are_kept_alive(
    proxy: FaultProxy, big_object: tuple[str, bytes], plane: str
) -> None:
    """Each fetcher reuses one connection for all its parts (plus one for HEAD)."""
    uri, data = big_object
    parts = -(-len(data) // PART)
    report = fastpipe.run(uri, config=config(proxy, plane, max_concurrency=2))
    assert report.passed
    assert len(proxy.gets()) == parts
    assert proxy.connections <= 2 + 1


# -- a server that echoes the request in its error message -------------------------------


def _signing_values(request: Any) -> list[str]:
    """The values that sign ``request``: presigned query values or Authorization parts."""
    from urllib.parse import parse_qs

    query = parse_qs(urlsplit(request.target).query)
    values = [query[name][0] for name in ("X-Amz-Signature", "X-Amz-Credential") if name in query]
    auth = request.headers.get("authorization", "")
    values += re.findall(r"(?:Credential|Signature)=([^,\s]+)", auth)
    values += [v.split("/")[0] for v in values if "/" in v]  # the access key id alone
    assert values, "the request carried no signature"
    return values


def _traceback_chain(error: BaseException) -> list[str]:
    """The messages of every exception a traceback of ``error`` shows."""
    import traceback

    return ["".join(traceback.format_exception(error))]


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize(
    "fault",
    [
        Fault("error", status=400, code="InvalidRequest", echo=True),
        Fault("error", status=503, code="SlowDown", echo=True),
    ],
    ids=["400", "503-retried"],
)
def test_echoed_request_never_shows_its_signature(
    proxy: FaultProxy, big_object: tuple[str, bytes], tmp_path: Any, plane: str, fault: Fault
) -> None:
    """Some servers quote the request line (presigned query included) in <Message>: the
    library's error, its cause and the report hold the message without the signature."""
    uri, _ = big_object
    proxy.reset(always(fault))
    with pytest.raises(fastpipe.SourceError) as info:
        fastpipe.run(
            uri, dest=tmp_path, config=config(proxy, plane, max_attempts=2, max_concurrency=1)
        )
    error = info.value
    assert error.report is not None
    texts = [str(error), repr(error), json.dumps(error.report.to_dict(), default=str)]
    if isinstance(error, fastpipe.RetriesExhausted):
        texts.append(str(error.last_error))
    texts += _traceback_chain(error)  # what a traceback would print
    assert "cannot serve GET" in texts[0]  # the server's text is kept, minus the secrets
    assert "<redacted>" in texts[0]
    for value in _signing_values(proxy.gets()[0]):
        for text in texts:
            assert value not in text
    assert_no_secrets(*texts)


def test_echoed_request_never_shows_its_signature_cli(
    proxy: FaultProxy, big_object: tuple[str, bytes], tmp_path: Any, capsys: Any
) -> None:
    uri, _ = big_object
    proxy.reset(always(Fault("error", status=400, code="InvalidRequest", echo=True)))
    argv = ["run", uri, "--endpoint-url", proxy.url, "--dest", str(tmp_path), "--json"]
    code = fastpipe.cli.main(argv + ["--part-size", "256KiB", "--data-plane", "raw"])
    out, err = capsys.readouterr()
    assert code == 3
    assert err.count("\n") == 1 and "cannot serve GET" in err
    report = json.loads(out)
    assert "cannot serve GET" in report["error"]
    for request in proxy.gets():
        for value in _signing_values(request):
            assert value not in out and value not in err
    assert_no_secrets(out, err)
