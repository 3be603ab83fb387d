"""The engine: one S3 client, and each object from its source to its report.

This module only orchestrates: the job (``_job``), the one pass (``_onepass``) and where
the bytes go (``_placement``) do the work. Nothing is left under the destination name
unless the whole object arrived and every stage passed; the temp file is removed on
every other path, including cancellation by the caller.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from functools import partial
from types import TracebackType

import anyio

from . import _stagelist
from ._config import Config
from ._exceptions import FastpipeError, StageFailed, UsageError
from ._fetch import Fetcher, choose_plane
from ._file import Watermark
from ._groups import HeldOnce, run_async, unwrap_groups
from ._job import Job, ProgressCallback, ProgressSink, check_info
from ._model import EngineModel
from ._objectinfo import local_object_info
from ._onepass import OnePass
from ._placement import ObjectPlacement, Placement
from ._report import Plane, Report, StageReport, log_done
from ._s3 import S3Control
from ._source import LocalLocation, S3Location, parse_source
from ._stagelist import StagesPerObject
from ._stagelist import default_stages as default_stages
from .stages._base import Stage


class Engine:
    """Processes objects with one reusable S3 client (use ``async with Engine() as e``).

    Creating the client is the largest fixed cost of a run (about 0.7 s), so a service
    that checks many objects keeps one engine.
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self._s3 = S3Control(self.config)
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

    async def aclose(self) -> None:
        """Save what the time model learned (off the loop), then close the S3 client."""
        with anyio.CancelScope(shield=True):  # also when the caller is being cancelled
            await self._model.save()
        await self._s3.close()

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
        _download_gate: anyio.Lock | None = None,
    ) -> Report:
        """Process one object; see :func:`fastpipe.process`."""
        location = parse_source(source)
        placement = Placement(dest, force=force, resume=resume, temp_dir=temp_dir)
        stage_list = _stagelist.stage_list(stages)
        report = Report(source=str(location))
        report.stages = [StageReport(s.name, s.kind) for s in stage_list]
        started = time.perf_counter()
        sink = None if progress is None else ProgressSink(progress, started)
        try:
            if isinstance(location, LocalLocation):
                placement.check_local_source()
                await self._process_local(location, stage_list, report, sink)
            else:
                gate = _download_gate
                await self._process_s3(location, stage_list, placement, report, sink, gate)
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

    async def process_many(
        self,
        sources: Iterable[str | os.PathLike[str]],
        stages: StagesPerObject | None = None,
        dest: str | os.PathLike[str] | None = None,
        max_in_flight: int = 2,
        progress: ProgressCallback | None = None,
        *,
        force: bool = False,
        resume: bool = False,
        temp_dir: str | os.PathLike[str] | None = None,
    ) -> list[Report]:
        """Process many objects, pipelined; return their reports in the order given.

        The download of object k+1 overlaps the file stages of object k: one object
        downloads at a time (with the engine's full concurrency), and at most
        ``max_in_flight`` objects are in progress, which bounds the disk used by temp files
        to about ``max_in_flight`` objects. Stages keep per-object state, so ``stages`` is
        built afresh for each object: either a factory (``lambda: [Checksum(), Scan()]``)
        or a sequence of spec strings and stage classes (``["checksum:algo=sha256",
        Scan]``); a sequence of stage instances is refused. ``dest``, if given, is a folder
        that receives each object under a name made from its key; ``force``, ``resume`` and
        ``temp_dir`` apply to each object as in :meth:`process`. An object that fails with
        an error (missing, denied, changed) does not stop the others: its report carries
        the error.
        """
        if max_in_flight < 1:
            raise UsageError(f"max_in_flight must be at least 1, got {max_in_flight}")
        Placement(dest, force=force, resume=resume, temp_dir=temp_dir).check_many()
        factory = _stagelist.stage_factory(stages)
        items = list(sources)
        reports: list[Report | None] = [None] * len(items)
        download_gate = anyio.Lock()
        slots = anyio.Semaphore(max_in_flight)

        async def one(index: int, source: str | os.PathLike[str]) -> None:
            try:
                stage_list = None if factory is None else factory()
                reports[index] = await self.process(
                    source,
                    stage_list,
                    dest,
                    progress,
                    force=force,
                    resume=resume,
                    temp_dir=temp_dir,
                    _download_gate=download_gate,
                )
            except FastpipeError as exc:
                reports[index] = exc.report or Report(
                    source=str(source), error=str(exc), error_type=type(exc).__name__
                )
            finally:
                slots.release()

        with unwrap_groups():
            async with anyio.create_task_group() as tg:
                for index, source in enumerate(items):
                    await slots.acquire()  # in order: object k starts before object k+1
                    tg.start_soon(one, index, source)
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
        one = OnePass(job, self.config, None, self._model)
        if await one.stream():
            report.passed = await one.file_stages()

    async def _process_s3(
        self,
        location: S3Location,
        stages: list[Stage],
        placement: Placement,
        report: Report,
        progress: ProgressSink | None,
        gate: anyio.Lock | None = None,
    ) -> None:
        # Before HEAD: a bad destination, or one another resumable run holds, fails at once.
        placed = ObjectPlacement(placement, location.key)
        try:
            # process_many: one object downloads at a time (at full concurrency) while the
            # file stages of the one before run; the gate is released when the bytes are in.
            async with HeldOnce(gate) as held:
                job = await self._admit(location, stages, placed, report, progress)
                if job is not None:
                    job.admission_wait = held.waited
                    await self._fetch_and_check(job, held)
        finally:
            with anyio.CancelScope(shield=True):  # cleans up after a cancel too
                await anyio.to_thread.run_sync(placed.close)

    async def _fetch_and_check(self, job: Job, gate: HeldOnce) -> None:
        """Download while the stream stages run, then the file stages, then commit."""
        placed, report = job.placed, job.report
        assert placed is not None
        fetcher = Fetcher(self._s3, self.config, job)
        one = OnePass(job, self.config, fetcher, self._model)
        try:
            ok = await one.stream()
        except BaseException as exc:
            placed.interrupted(exc)
            raise
        finally:
            fetcher.stats.fill(report.download)
            placed.record(job.watermark.completed_parts())
        job.temp.close()
        gate.release()  # the next object may download while the file stages run
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
    ) -> Job | None:
        """HEAD the object and make its job: data plane, part plan, temp file (None: a
        stage refused it from its metadata).

        The single place where an object is admitted after HEAD (its size is known here).
        """
        info = await self._s3.head(location)
        report.size, report.etag, report.version_id = info.size, info.etag, info.version_id
        if not check_info(stages, info, report):
            return None
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
    max_in_flight: int = 2,
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
    max_in_flight: int = 2,
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
