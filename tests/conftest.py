"""Shared fixtures: one real SeaweedFS S3 server on loopback for the whole session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from faultproxy import FaultProxy

from fastpipe.tools.locals3 import LocalS3


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The engine's time model learns into a cache of the session's own, never the user's."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3]:
    """A SeaweedFS server on free loopback ports; its env is exported for the session."""
    server = LocalS3(extra_identities={"reader-denied": ("denied-secret", ["List"])})
    with server, server.exported_env():
        yield server


@pytest.fixture(scope="session")
def proxy_server(s3_server: LocalS3) -> Iterator[FaultProxy]:
    """The fault-injecting proxy (tests/faultproxy.py) in front of the session's server."""
    upstream = urlsplit(s3_server.endpoint_url)
    with FaultProxy(upstream.hostname or "127.0.0.1", upstream.port or 80) as proxy:
        yield proxy


@pytest.fixture
def proxy(proxy_server: FaultProxy) -> Iterator[FaultProxy]:
    """The proxy with an empty log and no faults; held requests released after the test."""
    proxy_server.reset(None)
    yield proxy_server
    proxy_server.reset(None)


@pytest.fixture(scope="session")
def s3_client(s3_server: LocalS3) -> Any:
    """A plain boto3 client, used by tests to upload (never by the engine)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
    )


@pytest.fixture(scope="session")
def bucket(s3_client: Any) -> str:
    name = "fastpipe-tests"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def put_object(s3_client: Any, bucket: str) -> Any:
    """Upload bytes under a fresh key; returns the ``s3://`` URI."""

    def put(data: bytes, key: str | None = None, **kwargs: Any) -> str:
        key = key or f"obj-{uuid.uuid4().hex}"
        s3_client.put_object(Bucket=bucket, Key=key, Body=data, **kwargs)
        return f"s3://{bucket}/{key}"

    return put


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="asyncio+uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Async tests run on asyncio and on asyncio+uvloop."""
    return request.param


@pytest.fixture(scope="session")
def sqs_server() -> Iterator[Any]:
    """moto's SQS server as a loopback subprocess (fastpipe.tools.localsqs), for the session."""
    from fastpipe.tools.localsqs import LocalSQS

    with LocalSQS() as server:
        yield server
