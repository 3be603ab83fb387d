"""Many objects as a stream: pull sources as slots free up, yield reports as they end.

Memory stays bounded whatever the number of sources: at most ``slots`` objects are in
progress (or waiting for their report to be taken), and the next source is pulled from
the iterable only when one of them ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence

import anyio

from ._report import Report
from ._sinks import Sink

logger = logging.getLogger(__name__)

Source = str | os.PathLike[str]


async def _aiter(sources: Iterable[Source] | AsyncIterable[Source]) -> AsyncIterator[Source]:
    if isinstance(sources, AsyncIterable):
        async for source in sources:
            yield source
    else:
        for source in sources:
            yield source


async def write_sinks(report: Report, sinks: Sequence[Sink]) -> None:
    """Write ``report`` to each sink; a sink's failure goes into ``report.sink_errors``
    (and the log), never silently and never in the way of the next sink."""
    for sink in sinks:
        try:
            await sink.write(report)
        except Exception as exc:  # noqa: BLE001 - a sink may fail in any way; reported
            message = f"{type(sink).__name__}: {exc}"
            report.sink_errors.append(message)
            logger.warning("%s: result sink failed: %s", report.source, message)


async def map_indexed(
    sources: Iterable[Source] | AsyncIterable[Source],
    process: Callable[[Source], Awaitable[Report]],
    slots: int,
    sinks: Sequence[Sink] = (),
) -> AsyncIterator[tuple[int, Report]]:
    """Run ``process`` on each source, ``slots`` at a time; yield (index, report) in
    completion order, each report written to the sinks first."""
    limit = anyio.Semaphore(slots)
    send, receive = anyio.create_memory_object_stream[tuple[int, Report]](0)

    async def one(index: int, source: Source) -> None:
        try:
            report = await process(source)
            await write_sinks(report, sinks)
            with contextlib.suppress(anyio.BrokenResourceError):  # the caller stopped
                await send.send((index, report))
        finally:
            limit.release()

    async def feed() -> None:
        async with send, anyio.create_task_group() as tg:
            index = 0
            async for source in _aiter(sources):
                await limit.acquire()  # pull the next source only when a slot is free
                tg.start_soon(one, index, source)
                index += 1

    with receive:
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed)
            try:
                async for item in receive:
                    yield item
            finally:
                tg.cancel_scope.cancel()  # the caller stopped early: stop the objects too


async def reports_only(indexed: AsyncIterator[tuple[int, Report]]) -> AsyncIterator[Report]:
    """The reports of :func:`map_indexed`, without their index."""
    try:
        async for _, report in indexed:
            yield report
    finally:
        await indexed.aclose()  # type: ignore[attr-defined]
