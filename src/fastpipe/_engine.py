"""The engine: one S3 client, and each object from its source to its report.

This module only orchestrates: the job (``_job``), the one pass (``_onepass``) and where
the bytes go (``_placement``) do the work. Nothing is left under the destination name
unless the whole object arrived and every stage passed; the temp file is removed on
every other path, including cancellation by the caller.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from functools import partial, wraps
from types import TracebackType
from typing import ParamSpec, TypeVar

import anyio

from . import _listing, _many, _stagelist
from ._budgets import Budgets, Turn
from ._config import Config
from ._exceptions import FastpipeError, StageFailed, UsageError
from ._fetch import Fetcher, choose_plane
from ._groups import run_async
from ._job import Job, ProgressCallback, ProgressSink, check_info, open_download
from ._model import EngineModel, settle_eta_readings
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
        event loop that runs the engine; see :meth:`budgets_at`)."""
        return self.budgets_at(None)

    def budgets_at(self, temp_folder: str | os.PathLike[str] | None) -> Budgets:
        """The engine's budgets; made on first use, with the default disk budget measured
        where ``temp_folder`` is (None: the system temp folder).

        The first object's placement makes them (its ``dest``, else its ``temp_dir``), so
        the default measures the file system the temp files go to; later calls with
        another folder share the same budget.
        """
        if self._budgets is None:
            self._budgets = Budgets(self.config, temp_folder)
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
            budgets = self.budgets_at(placement.temp_folder)  # the first call makes them
            async with budgets.object_slot(report.source) as waited:
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
            settle_eta_readings(report, started + report.seconds)
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
        given, makes each object's own progress callback (instead of ``progress``). An
        error of ``sources`` itself stops the run and is raised as is (not in an exception
        group), its cause kept. To stop early, break out of a loop inside
        ``async with contextlib.aclosing(engine.map(...)) as reports:``.
        """
        placement = Placement(dest, force=force, resume=resume, temp_dir=temp_dir)
        one = _many.PerObject.of(self.process, stages, placement, progress, progress_for)
        return _many.reports_only(_many.map_indexed(sources, one, self.config.max_objects, sinks))

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
        placement = Placement(dest, force=force, resume=resume, temp_dir=temp_dir)
        one = _many.PerObject.of(self.process, stages, placement, progress)
        slots = min(max_in_flight or self.config.max_objects, self.config.max_objects)
        return await _many.in_order(_many.map_indexed(items, one, slots, sinks), len(items))

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
        job = Job.local(location, info, stages, report, progress, self.config.part_size)
        await OnePass(job, self.config, None, self._model, self.budgets.file_stage).in_place()

    async def _process_s3(
        self,
        location: S3Location,
        stages: list[Stage],
        placement: Placement,
        report: Report,
        progress: ProgressSink | None,
    ) -> None:
        """HEAD the object, admit it, download it while the stream stages run, then the
        file stages, then commit.

        The single place where an object is admitted after HEAD (its size is known here):
        a stage may refuse it from its metadata, then its size must fit the disk budget.
        """
        # Before HEAD: a bad destination, or one another resumable run holds, fails at once.
        # Resolving it makes folders, stats and may take the resume lock: file-system calls
        # that must not stall the loop other objects' transfers run on.
        if placement.dest is None:  # nothing to resolve or lock: no call to hand off
            placed = ObjectPlacement(placement, location.key)
        else:
            with anyio.CancelScope(shield=True):  # a lock taken is not lost to a cancel
                placed = await anyio.to_thread.run_sync(ObjectPlacement, placement, location.key)
        async with self.budgets.disk_hold() as disk:  # given back once the temp file is gone
            try:
                report.download.control_plane = self._s3.control_plane(location)
                info = await self._s3.head(location)
                report.size, report.etag, report.version_id = info.size, info.etag, info.version_id
                if not check_info(stages, info, report):
                    return
                report.queued_seconds += await disk.take(info.size, report.source)
                turns, tracker = self.budgets.turns, self.budgets.in_flight
                with turns.take() if turns is not None else contextlib.nullcontext() as turn:
                    weight = self.config.download_connections(info.size)
                    plane = choose_plane(self.config, location)
                    with tracker.coming(info.size, weight, turn.number if turn else None):
                        job = await open_download(
                            location, info, stages, report, placed, progress, plane, self.config
                        )
                    await self._admitted(job, turn)
            finally:
                # Cleans up after a cancel too; once the stay closed it, nothing is left
                # (and the hand-off to a thread would only add to the object's seconds).
                if not placed.closed:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(placed.close)


    async def _admitted(self, job: Job, turn: Turn | None) -> None:
        """An admitted object whose temp file is open (``turn``: its place in the
        download order): the pass and the temp file's removal, counted among the objects
        in flight."""
        report, tracker = job.report, self.budgets.in_flight
        assert job.placed is not None
        job.admission_wait = report.queued_seconds  # what the time model adds
        job.in_flight = self.budgets.admitted
        job.heavy_slots = self.budgets.file_stage_slots
        job.tracker, job.turn = tracker, turn
        fetcher = Fetcher(self._s3, self.config, job, self.budgets.connection, turn)
        one = OnePass(job, self.config, fetcher, self._model, self.budgets.file_stage)
        weight = self.config.download_connections(job.info.size)
        stats = fetcher.stats  # read as bytes arrive: its bytes left, for the others
        number = None if turn is None else turn.number
        with tracker.stay(report, job.info.size, weight, lambda: stats.bytes, number) as job.ticket:
            await one.download_and_commit()
            # Within the stay, so that its seconds after the download (what the ETA adds
            # once the bytes are in) hold the temp file's removal, which frees its pages.
            # Every other way out closes it in _process_s3 (close is idempotent).
            await anyio.to_thread.run_sync(job.placed.close)


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


P = ParamSpec("P")
T = TypeVar("T")


def _sync(coro_fn: Callable[P, Awaitable[T]], name: str, doc: str) -> Callable[P, T]:
    """A synchronous twin of ``coro_fn``: the same parameters, run on its own event loop."""

    @wraps(coro_fn)
    def sync(*args: P.args, **kwargs: P.kwargs) -> T:
        return run_async(partial(coro_fn, *args, **kwargs))

    sync.__name__ = sync.__qualname__ = name
    sync.__doc__ = doc
    return sync


run_many = _sync(process_many, "run_many", "Synchronous :func:`process_many`.")
run = _sync(
    process, "run", "Synchronous :func:`process` (runs its own event loop; uvloop when installed)."
)


__all__ = ["Engine", "process", "process_many", "run", "run_many"]
