"""Many objects as a stream: pull sources as slots free up, yield reports as they end.

Memory stays bounded whatever the number of sources: at most ``slots`` objects are in
progress (or waiting for their report to be taken), and the next source is pulled from
the iterable only when one of them ends. :class:`PerObject` is how each source is
processed (its own stages and progress callback; its error as its report).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import anyio

from ._exceptions import FastpipeError
from ._groups import unwrap_groups
from ._job import ProgressCallback
from ._placement import Placement
from ._report import Report
from ._sinks import Sink
from ._stagelist import StagesPerObject, stage_factory
from .stages._base import Stage

logger = logging.getLogger(__name__)

Source = str | os.PathLike[str]


async def _aiter(sources: Iterable[Source] | AsyncIterable[Source]) -> AsyncIterator[Source]:
    if isinstance(sources, AsyncIterable):
        async for source in sources:
            yield source
    else:
        for source in sources:
            yield source


class _ProcessOne(Protocol):
    """``Engine.process``."""

    def __call__(
        self,
        source: Source,
        stages: Sequence[Stage] | None,
        dest: str | os.PathLike[str] | None,
        progress: ProgressCallback | None,
        *,
        force: bool,
        resume: bool,
        temp_dir: str | os.PathLike[str] | None,
        key_paths: bool,
    ) -> Awaitable[Report]: ...


@dataclass(frozen=True)
class PerObject:
    """How a many-object call processes each of its sources: stages built afresh
    (``factory``), the object's own progress callback (``progress_for``, else
    ``progress``), kept under its key's path when ``placement`` has a ``dest``; an error
    (missing, denied, changed) becomes the object's report, so that the others go on."""

    process: _ProcessOne
    factory: Callable[[], Sequence[Stage]] | None
    placement: Placement
    progress: ProgressCallback | None
    progress_for: Callable[[str], ProgressCallback | None] | None = None

    @classmethod
    def of(
        cls,
        process: _ProcessOne,
        stages: StagesPerObject | None,
        placement: Placement,
        progress: ProgressCallback | None,
        progress_for: Callable[[str], ProgressCallback | None] | None = None,
    ) -> PerObject:
        """Check the call's arguments (``dest`` must be a folder; ``stages`` must build
        each object's own stages) before any object starts."""
        placement.check_many()
        return cls(process, stage_factory(stages), placement, progress, progress_for)

    async def __call__(self, source: Source) -> Report:
        stages = None if self.factory is None else self.factory()
        callback = self.progress if self.progress_for is None else self.progress_for(str(source))
        where = self.placement
        keyed = where.dest is not None  # each object under its key's path in the folder
        process = partial(
            self.process, force=where.force, resume=where.resume, temp_dir=where.temp_dir
        )
        try:
            return await process(source, stages, where.dest, callback, key_paths=keyed)
        except FastpipeError as exc:
            return exc.report_for(str(source))


async def in_order(indexed: AsyncIterator[tuple[int, Report]], count: int) -> list[Report]:
    """The reports of :func:`map_indexed` over ``count`` sources, in the sources' order."""
    reports: list[Report | None] = [None] * count
    async for index, report in indexed:
        reports[index] = report
    return [r for r in reports if r is not None]


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
    completion order, each report written to the sinks first.

    An error that stops the run (the caller's ``sources`` raising, say) comes out as
    itself, not inside the task group's exception group, as the rest of the API raises.
    """
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

    with receive, unwrap_groups():
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
