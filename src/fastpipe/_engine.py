"""The engine: one S3 client, and each object from its source to its report.

This module only orchestrates: the job (``_job``), the one pass (``_onepass``) and where
the bytes go (``_placement``) do the work. Nothing is left under the destination name
unless the whole object arrived and every stage passed; the temp file is removed on
every other path, including cancellation by the caller.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from types import TracebackType

import anyio

from . import _listing, _many, _stagelist
from ._budgets import Budgets
from ._config import Config
from ._exceptions import FastpipeError, StageFailed, UsageError
from ._fetch import Fetcher, choose_plane
from ._file import Watermark
from ._groups import run_async
from ._job import Job, ProgressCallback, ProgressSink, check_info
from ._model import EngineModel
from ._objectinfo import local_object_info
from ._onepass import OnePass
from ._placement import ObjectPlacement, Placement
from ._report import Plane, Report, StageReport, log_done
from ._s3 import S3Control
from ._sinks import Sink, TagSink
from ._source import LocalLocation, S3Location, parse_source
from ._stagelist import StagesPerObject
from ._stagelist import default_stages as default_stages
from .stages._base import Stage


@dataclass
class _DiskHold:
    """Bytes of the disk budget one object holds (given back when its temp file is gone)."""

    size: int = 0


class Engine:
    """Processes objects with one reusable S3 client (use ``async with Engine() as e``).

    Creating the client is the largest fixed cost of a run (about 0.7 s), so a service
    that checks many objects keeps one engine.
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self._s3 = S3Control(self.config)
        self._budgets: Budgets | None = None
        self._model = EngineModel(self.config.resolved_model_path())  # loaded on first use

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def list_prefix(self, bucket: str, prefix: str) -> AsyncIterator[str]:
        """The ``s3://`` URIs of every object under ``prefix``, streamed as listed."""
        return _listing.list_uris(self._s3, bucket, prefix)

    def tag_sink(self) -> TagSink:
        """A :class:`TagSink` that tags objects through this engine's S3 client."""
        return TagSink(self._s3)

    async def aclose(self) -> None:
        """Save what the time model learned (off the loop), then close the S3 client."""
        with anyio.CancelScope(shield=True):  # also when the caller is being cancelled
            await self._model.save()
        await self._s3.close()

    @property
    def budgets(self) -> Budgets:
        """The budgets every object of this engine shares (made on first use, in the
        event loop that runs the engine)."""
        if self._budgets is None:
            self._budgets = Budgets(self.config)
        return self._budgets

    async def process(
        self,
        source: str | os.PathLike[str],
        stages: Sequence[Stage] | None = None,
        dest: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
        *,
        force: bool = False,
        resume: bool = False,
        temp_dir: str | os.PathLike[str] | None = None,
        key_paths: bool = False,
    ) -> Report:
        """Process one object; see :func:`fastpipe.process`.

        ``key_paths``: ``dest`` is a folder and the object is kept under a path made
        from its whole key (folders recreated, never leaving ``dest``), as ``map`` does.
        """
        location = parse_source(source)
        placement = Placement(dest, force=force, resume=resume, temp_dir=temp_dir)
        if key_paths:
            placement = placement.with_key_paths()
        stage_list = _stagelist.stage_list(stages)
        report = Report(source=str(location))
        report.stages = [StageReport(s.name, s.kind) for s in stage_list]
        started = time.perf_counter()
        sink = None if progress is None else ProgressSink(progress, started)
        try:
            async with self.budgets.object_slot(report.source) as waited:
                report.queued_seconds = waited
                if isinstance(location, LocalLocation):
                    placement.check_local_source()
                    await self._process_local(location, stage_list, report, sink)
                else:
                    await self._process_s3(location, stage_list, placement, report, sink)
        except FastpipeError as exc:
            if isinstance(exc, StageFailed):
                raise  # internal invariant: stage failures are recorded, not raised
            report.error, report.error_type = str(exc), type(exc).__name__
            exc.report = report
            raise exc from exc.__cause__
        finally:
            report.seconds = time.perf_counter() - started
            report.verified = _stagelist.verified(stage_list, report)
            log_done(report)
        await self._model.learn(report)
        return report

    def map(
        self,
        sources: Iterable[str | os.PathLike[str]] | AsyncIterable[str | os.PathLike[str]],
        stages: StagesPerObject | None = None,
        *,
        dest: str | os.PathLike[str] | None = None,
        force: bool = False,
        resume: bool = False,
        temp_dir: str | os.PathLike[str] | None = None,
        progress: ProgressCallback | None = None,
        sinks: Sequence[Sink] = (),
        progress_for: Callable[[str], ProgressCallback | None] | None = None,
    ) -> AsyncIterator[Report]:
        """Process a stream of objects; yield each one's report as it finishes.

        ``sources`` is any iterable or async iterable (a generator, a listing); the next
        source is pulled only when one of the engine's ``max_objects`` slots is free, so
        memory does not grow with the number of sources. ``stages`` is built afresh for
        each object, as in :meth:`process_many`. ``dest``, if given, is a folder: each
        object is kept under a path made from its key (``key_paths``). An object that
        fails with an error does not stop the others: its report carries the error. Each
        report is written to every sink before it is yielded (a sink's failure lands in
        ``report.sink_errors``); the caller closes its sinks. ``progress_for(source)``, if
        given, makes each object's own progress callback (instead of ``progress``). To stop
        early, break out of a loop inside ``async with contextlib.aclosing(engine.map(...))
        as reports:``.
        """
        return _many.reports_only(
            self._map_indexed(
                sources, stages, dest, force, resume, temp_dir, progress, sinks, None, progress_for
            )
        )

    def _map_indexed(
        self,
        sources: Iterable[str | os.PathLike[str]] | AsyncIterable[str | os.PathLike[str]],
        stages: StagesPerObject | None,
        dest: str | os.PathLike[str] | None,
        force: bool,
        resume: bool,
        temp_dir: str | os.PathLike[str] | None,
        progress: ProgressCallback | None,
        sinks: Sequence[Sink],
        limit: int | None = None,
        progress_for: Callable[[str], ProgressCallback | None] | None = None,
    ) -> AsyncIterator[tuple[int, Report]]:
        Placement(dest, force=force, resume=resume, temp_dir=temp_dir).check_many()
        factory = _stagelist.stage_factory(stages)

        async def one(source: str | os.PathLike[str]) -> Report:
            stage_list = None if factory is None else factory()
            callback = progress if progress_for is None else progress_for(str(source))
            try:
                return await self.process(
                    source,
                    stage_list,
                    dest,
                    callback,
                    force=force,
                    resume=resume,
                    temp_dir=temp_dir,
                    key_paths=dest is not None,
                )
            except FastpipeError as exc:
                return exc.report or Report(
                    source=str(source), error=str(exc), error_type=type(exc).__name__
                )

        slots = min(limit or self.config.max_objects, self.config.max_objects)
        return _many.map_indexed(sources, one, slots, sinks)

    async def process_many(
        self,
        sources: Iterable[str | os.PathLike[str]],
        stages: StagesPerObject | None = None,
        dest: str | os.PathLike[str] | None = None,
        max_in_flight: int | None = None,
        progress: ProgressCallback | None = None,
        *,
        force: bool = False,
        resume: bool = False,
        temp_dir: str | os.PathLike[str] | None = None,
        sinks: Sequence[Sink] = (),
    ) -> list[Report]:
        """Process many objects; return their reports in the order given (see :meth:`map`).

        The engine's budgets decide how many objects are in progress and how their
        downloads and file stages overlap (the download of object k+1 overlaps the file
        stages of object k). Stages keep per-object state, so ``stages`` is built afresh
        for each object: either a factory (``lambda: [Checksum(), Scan()]``) or a sequence
        of spec strings and stage classes (``["checksum:algo=sha256", Scan]``); a sequence
        of stage instances is refused. ``dest``, if given, is a folder that receives each
        object under a path made from its key; ``force``, ``resume`` and ``temp_dir``
        apply to each object as in :meth:`process`. ``max_in_flight`` (deprecated: use
        ``Config.max_objects``) caps this call's objects in progress further. An object
        that fails with an error (missing, denied, changed) does not stop the others: its
        report carries the error.
        """
        if max_in_flight is not None and max_in_flight < 1:
            raise UsageError(f"max_in_flight must be at least 1, got {max_in_flight}")
        items = list(sources)
        reports: list[Report | None] = [None] * len(items)
        indexed = self._map_indexed(
            items, stages, dest, force, resume, temp_dir, progress, sinks, max_in_flight
        )
        async for index, report in indexed:
            reports[index] = report
        return [r for r in reports if r is not None]

    async def _process_local(
        self,
        location: LocalLocation,
        stages: list[Stage],
        report: Report,
        progress: ProgressSink | None,
    ) -> None:
        info = local_object_info(location)
        report.size = info.size
        report.download.plane = Plane.LOCAL
        if not check_info(stages, info, report):
            return
        watermark = Watermark(info.size, self.config.part_size)
        watermark.complete_all()
        watermark.close()
        path = info.source  # the absolute path
        job = Job(location, info, stages, report, path, watermark, Plane.LOCAL, None, progress)
        one = OnePass(job, self.config, None, self._model, self.budgets.file_stage)
        if await one.stream():
            report.passed = await one.file_stages()

    async def _process_s3(
        self,
        location: S3Location,
        stages: list[Stage],
        placement: Placement,
        report: Report,
        progress: ProgressSink | None,
    ) -> None:
        # Before HEAD: a bad destination, or one another resumable run holds, fails at once.
        placed = ObjectPlacement(placement, location.key)
        disk = _DiskHold()
        try:
            job = await self._admit(location, stages, placed, report, progress, disk)
            if job is not None:
                job.admission_wait = report.queued_seconds  # what the time model adds
                await self._fetch_and_check(job)
        finally:
            with anyio.CancelScope(shield=True):  # cleans up after a cancel too
                await anyio.to_thread.run_sync(placed.close)
                self.budgets.give_disk(disk.size)  # the temp file is gone (or committed)

    async def _fetch_and_check(self, job: Job) -> None:
        """Download while the stream stages run, then the file stages, then commit."""
        placed, report = job.placed, job.report
        assert placed is not None
        budgets = self.budgets
        fetcher = Fetcher(self._s3, self.config, job, budgets.connection)
        one = OnePass(job, self.config, fetcher, self._model, budgets.file_stage)
        try:
            ok = await one.stream()
        except BaseException as exc:
            placed.interrupted(exc)
            raise
        finally:
            fetcher.stats.fill(report.download)
            placed.record(job.watermark.completed_parts())
        job.temp.close()
        if ok and await one.file_stages():
            report.dest = await anyio.to_thread.run_sync(placed.commit)
            report.passed = True

    async def _admit(
        self,
        location: S3Location,
        stages: list[Stage],
        placed: ObjectPlacement,
        report: Report,
        progress: ProgressSink | None,
        disk: _DiskHold,
    ) -> Job | None:
        """HEAD the object and make its job: data plane, part plan, temp file (None: a
        stage refused it from its metadata).

        The single place where an object is admitted after HEAD (its size is known here).
        """
        info = await self._s3.head(location)
        report.size, report.etag, report.version_id = info.size, info.etag, info.version_id
        if not check_info(stages, info, report):
            return None
        # Admission: the temp file's bytes must fit the disk budget (FIFO; may wait).
        waited, disk.size = await self.budgets.take_disk(info.size, report.source)
        report.queued_seconds += waited
        config = self.config
        plane = choose_plane(config, location)
        # Preallocating (and later unlinking) a large file can take a while: not on the loop.
        part_size, reuse = await anyio.to_thread.run_sync(
            placed.open_temp, str(location), info, config.plan_part_size(info.size)
        )
        assert placed.temp is not None
        watermark = Watermark(info.size, part_size)
        dl = report.download
        dl.part_size, dl.concurrency, dl.plane = part_size, config.max_concurrency, plane
        dl.parts = watermark.parts
        dl.reused_bytes = watermark.preset(reuse) if reuse else 0
        path = placed.temp.path
        return Job(location, info, stages, report, path, watermark, plane, placed, progress)


async def process(
    source: str | os.PathLike[str],
    stages: Sequence[Stage] | None = None,
    dest: str | os.PathLike[str] | None = None,
    config: Config | None = None,
    progress: ProgressCallback | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    temp_dir: str | os.PathLike[str] | None = None,
) -> Report:
    """Process one object in one pass and return its :class:`Report`.

    ``source`` is ``s3://bucket/key`` or a local path. ``stages`` run in order (default:
    :func:`default_stages`); a failed stage is reported (``report.passed`` False) and skips the
    rest. Where the bytes go is decided per call: with ``dest`` (a file path, or a folder
    that receives the object under a name made from its key) the object is kept there,
    atomically and only when every stage passed; ``force`` replaces an existing file;
    ``resume`` (needs ``dest``) continues an interrupted run from its journal;
    ``temp_dir`` holds the temp file when there is no ``dest``. Errors that are not a
    stage's verdict (missing object, access denied, object changed mid-download, ...)
    raise a :class:`FastpipeError` whose ``report`` attribute holds what was known.
    """
    async with Engine(config) as engine:
        return await engine.process(
            source, stages, dest, progress, force=force, resume=resume, temp_dir=temp_dir
        )


async def process_many(
    sources: Iterable[str | os.PathLike[str]],
    stages: StagesPerObject | None = None,
    dest: str | os.PathLike[str] | None = None,
    config: Config | None = None,
    max_in_flight: int | None = None,
    progress: ProgressCallback | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    temp_dir: str | os.PathLike[str] | None = None,
) -> list[Report]:
    """Process many objects with one engine, pipelined; see :meth:`Engine.process_many`."""
    async with Engine(config) as engine:
        return await engine.process_many(
            sources,
            stages,
            dest,
            max_in_flight,
            progress,
            force=force,
            resume=resume,
            temp_dir=temp_dir,
        )


def run_many(
    sources: Iterable[str | os.PathLike[str]],
    stages: StagesPerObject | None = None,
    dest: str | os.PathLike[str] | None = None,
    config: Config | None = None,
    max_in_flight: int | None = None,
    progress: ProgressCallback | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    temp_dir: str | os.PathLike[str] | None = None,
) -> list[Report]:
    """Synchronous :func:`process_many`."""
    many = partial(process_many, force=force, resume=resume, temp_dir=temp_dir)
    return run_async(partial(many, sources, stages, dest, config, max_in_flight, progress))


def run(
    source: str | os.PathLike[str],
    stages: Sequence[Stage] | None = None,
    dest: str | os.PathLike[str] | None = None,
    config: Config | None = None,
    progress: ProgressCallback | None = None,
    *,
    force: bool = False,
    resume: bool = False,
    temp_dir: str | os.PathLike[str] | None = None,
) -> Report:
    """Synchronous :func:`process` (runs its own event loop; uvloop when installed)."""
    one = partial(process, force=force, resume=resume, temp_dir=temp_dir)
    return run_async(partial(one, source, stages, dest, config, progress))


__all__ = ["Engine", "process", "process_many", "run", "run_many"]
