"""The raw data plane's connection pool: the fetchers of later parts and later objects
take the connections earlier ones gave back; at most one object's connections wait, none
for longer than the pool's idle limit, and one the server closed is never reused.

The engine talks to SeaweedFS through the fault proxy (tests/faultproxy.py), which
counts the client connections it accepted and the ones still open.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from faultproxy import Fault, FaultProxy, always, fast_retry_config

from fastpipe import Config, Engine
from fastpipe._http import ConnectionPool, RawConnection
from fastpipe._many_cli import add_budget_arguments, budget_settings

PART = 256 * 1024
CONCURRENCY = 4


def config(proxy: FaultProxy, **kwargs: Any) -> Config:
    options: dict[str, Any] = {
        "max_concurrency": CONCURRENCY,
        "reuse_connections": True,
        **kwargs,
    }
    config: Config = fast_retry_config(proxy.url, PART, "raw", **options)
    return config


def upload(put_object: Any, count: int, size: int) -> tuple[list[bytes], list[str]]:
    """``count`` random objects of ``size`` bytes: their bytes and their URIs."""
    blobs = [os.urandom(size) for _ in range(count)]
    return blobs, [put_object(blob) for blob in blobs]


async def until(predicate: Any, what: str) -> None:
    """Poll the proxy's counters (its thread updates them) until ``predicate`` holds;
    fail naming ``what`` after 10 s."""
    with anyio.move_on_after(10):
        while not predicate():
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting until {what}")


@pytest.mark.anyio
async def test_later_objects_take_the_connections_earlier_ones_gave_back(
    proxy: FaultProxy, put_object: Any, tmp_path: Path
) -> None:
    blobs, uris = upload(put_object, 3, 6 * PART + 17)
    async with Engine(config(proxy)) as engine:
        first = await engine.process(uris[0], [], dest=tmp_path / "0")
        opened = proxy.connections  # its HEAD's and its fetchers'
        assert 2 <= opened <= 1 + CONCURRENCY
        for i, uri in enumerate(uris[1:], 1):
            report = await engine.process(uri, [], dest=tmp_path / str(i))
            assert report.passed and report.download.retries == 0
        assert first.passed
        assert proxy.connections == opened  # no object after the first connected again
        assert len(proxy.gets()) == 3 * 7  # every part of every object, once
    for i, blob in enumerate(blobs):
        assert (tmp_path / str(i)).read_bytes() == blob
    # The engine's end closed the connections it kept.
    await until(lambda: proxy.open_connections() == 0, "the connections closed")


@pytest.mark.anyio
async def test_off_by_default_every_object_connects(proxy: FaultProxy, put_object: Any) -> None:
    assert Config().reuse_connections is False
    _, uris = upload(put_object, 2, 6 * PART + 17)
    async with Engine(config(proxy, reuse_connections=False)) as engine:
        assert (await engine.process(uris[0], [])).passed
        first = proxy.connections
        assert (await engine.process(uris[1], [])).passed
    # The HEAD's connection is kept by the control plane; the fetchers' are not.
    assert proxy.connections - first == first - 1


def test_the_command_line_turns_it_on() -> None:
    parser = argparse.ArgumentParser()
    add_budget_arguments(parser)
    assert budget_settings(parser.parse_args(["--reuse-connections"])) == {
        "reuse_connections": True
    }
    assert budget_settings(parser.parse_args([])) == {}


@pytest.mark.anyio
async def test_the_pool_keeps_at_most_one_objects_connections(
    proxy: FaultProxy, put_object: Any
) -> None:
    _, uris = upload(put_object, 3, 8 * PART)
    busy = len(uris) * CONCURRENCY
    proxy.reset(always(Fault("hold")))  # every GET waits: all three objects' fetchers connect
    async with Engine(config(proxy, download_order="shared")) as engine:
        reports: list[Any] = []

        async def run() -> None:
            reports.extend(await engine.process_many(uris))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await until(lambda: proxy.held() == busy, "every fetcher's GET held")
            proxy.release()
        assert all(r.passed for r in reports)
        # Of the 12 connections of the parts, 4 stay (and the HEADs', which the control
        # plane keeps: one per HEAD at once).
        heads = proxy.connections - busy
        assert 1 <= heads <= len(uris)
        await until(lambda: proxy.open_connections() == heads + CONCURRENCY, "the rest closed")
    await until(lambda: proxy.open_connections() == 0, "the connections closed")


@pytest.mark.anyio
async def test_a_connection_the_server_closed_is_not_reused(
    proxy: FaultProxy, put_object: Any, tmp_path: Path
) -> None:
    blobs, uris = upload(put_object, 2, 4 * PART + 5)
    async with Engine(config(proxy)) as engine:
        assert (await engine.process(uris[0], [])).passed
        before = proxy.connections
        proxy.drop_connections()  # as a server closes its idle keep-alive connections
        await until(lambda: proxy.open_connections() == 0, "the proxy closed them")
        await anyio.sleep(0.05)  # the engine's loop reads the close
        report = await engine.process(uris[1], [], dest=tmp_path / "b")
    assert report.passed
    assert report.download.retries == 0  # a closed connection is not a failed GET
    assert proxy.connections > before
    assert (tmp_path / "b").read_bytes() == blobs[1]


# -- the pool on its own, with connections to a small keep-alive HTTP server ------------


@pytest.fixture
async def http_url() -> AsyncIterator[str]:
    """A loopback server that answers every request ``200`` with no body, keep-alive."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/"


async def connected(url: str) -> RawConnection:
    conn = RawConnection(
        url, buffer_size=64 * 1024, connect_timeout=5, read_timeout=5, ssl_context=None
    )
    response = await conn.head("/", {})
    assert response.status == 200 and conn.reusable
    return conn


@pytest.mark.anyio
async def test_the_pool_gives_back_a_connection_to_the_same_endpoint_only(http_url: str) -> None:
    pool = ConnectionPool(limit=2)
    conn = await connected(http_url)
    pool.give(conn)
    assert pool.take("http://127.0.0.1:1/other") is None  # another endpoint
    assert pool.take(http_url + "key?x=1") is conn  # the same endpoint, any path
    assert pool.take(http_url) is None
    assert (await conn.head("/", {})).status == 200  # still open: no new connection
    conn.close()


@pytest.mark.anyio
async def test_the_pool_closes_what_it_cannot_keep(http_url: str) -> None:
    pool = ConnectionPool(limit=1)
    kept, extra = await connected(http_url), await connected(http_url)
    pool.give(kept)
    pool.give(extra)  # no room
    assert len(pool) == 1 and not extra.reusable
    broken = await connected(http_url)
    broken.close()
    pool.close()
    assert len(pool) == 0 and not kept.reusable
    pool.give(broken)  # closed: never kept
    assert len(pool) == 0


@pytest.mark.anyio
async def test_idle_connections_expire(http_url: str) -> None:
    pool = ConnectionPool(limit=4, idle_seconds=0.0)
    conn = await connected(http_url)
    pool.give(conn)
    await anyio.sleep(0.01)
    assert pool.take(http_url) is None
    assert not conn.reusable  # closed, not left open
