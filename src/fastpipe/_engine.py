"""One object end to end: HEAD, plan, fetch + stream stages, file stages, report.

Later stages run only when earlier ones pass (gating); a failed stream stage cancels the
download at once. Nothing is left under the destination name unless the whole object
arrived and every stage passed; the temp file is removed on every other path, including
cancellation by the caller.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from types import TracebackType
from typing import Any

import anyio

from ._config import Config
from ._exceptions import FastpipeError, ObjectNotFound, SourceError, StageFailed, UsageError
from ._fetch import Fetcher, proxy_configured
from ._file import Watermark
from ._groups import unwrap_groups
from ._job import Job, ProgressCallback, ProgressSink, check_info
from ._objectinfo import ObjectInfo
from ._onepass import OnePass
from ._placement import ObjectPlacement, Placement
from ._report import Plane, Report, StageReport, Status
from ._s3 import S3Control
from ._source import LocalLocation, S3Location, parse_source
from .stages._base import FileStage, Stage, StreamStage

#: What ``process_many`` takes as its stages: a factory called once per object, or a
#: sequence of ``--stage`` spec strings and stage classes, built afresh for each object.
StagesPerObject = Callable[[], Sequence[Stage]] | Sequence[str | type[Stage]] | str

logger = logging.getLogger(__name__)


class _HeldOnce:
    """Holds a lock from ``async with`` until :meth:`release` or the block's end."""

    def __init__(self, lock: anyio.Lock) -> None:
        self.lock = lock
        self.held = False

    async def __aenter__(self) -> _HeldOnce:
        await self.lock.acquire()
        self.held = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        if self.held:
            self.held = False
            self.lock.release()


def default_stages() -> list[Stage]:
    """The stages run when none are given: ``checksum`` (xxh3_128) and ``verify:etag=false``.

    ``verify`` compares the bytes with a checksum S3 stored (x-amz-checksum-*: a CRC or a
    SHA, cheap in the same pass); it skips the ETag, whose MD5 would cost more than the
    download. When S3 stored no checksum nothing is verified, and the report's
    ``verified`` field is None.
    """
    from .stages.checksum import Checksum
    from .stages.verify import Verify

    return [Checksum(), Verify(etag=False)]


def _verified(stages: Sequence[Stage], report: Report) -> str | None:
    """What the passed stages compared the bytes with (``; `` between them), or None."""
    found = []
    for stage, stage_report in zip(stages, report.stages, strict=True):
        if stage_report.status is Status.PASSED:
            try:
                what = stage.verified(stage_report.result)
            except Exception:  # noqa: BLE001 - a user stage's hook must not lose the report
                what = None
            if what:
                found.append(f"{stage.name}: {what}")
    return "; ".join(found) or None


def _attach(exc: FastpipeError, report: Report) -> FastpipeError:
    report.error = str(exc)
    report.error_type = type(exc).__name__
    exc.report = report
    return exc


class Engine:
    """Processes objects with one reusable S3 client (use ``async with Engine() as e``).

    Creating the client is the largest fixed cost of a run (about 0.7 s), so a service
    that checks many objects keeps one engine.
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self._s3 = S3Control(self.config)

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
        """Close the S3 client."""
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
        stage_list = list(default_stages() if stages is None else stages)
        for stage in stage_list:
            if not isinstance(stage, (StreamStage, FileStage)):
                raise UsageError(f"not a stage: {stage!r} (subclass StreamStage or FileStage)")
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
            raise _attach(exc, report) from exc.__cause__
        finally:
            report.seconds = time.perf_counter() - started
            report.verified = _verified(stage_list, report)
            _log_done(report)
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
        factory = _stage_factory(stages)
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

    # -- sources --------------------------------------------------------------------------

    async def _process_local(
        self,
        location: LocalLocation,
        stages: list[Stage],
        report: Report,
        progress: ProgressSink | None,
    ) -> None:
        info = _stat_local(location)
        report.size = info.size
        report.download.plane = Plane.LOCAL
        if not check_info(stages, info, report):
            return
        watermark = Watermark(info.size, self.config.part_size)
        watermark.complete_all()
        watermark.close()
        assert info.local_path is not None
        job = Job(location, info, stages, report, info.local_path, watermark, Plane.LOCAL)
        job.progress = progress
        one = OnePass(job, self.config, None)
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
            if gate is None:
                await self._fetch_and_check(location, stages, placed, report, progress)
                return
            # process_many: one object downloads at a time (at full concurrency) while the
            # file stages of the one before run; the gate is released when the bytes are in.
            async with _HeldOnce(gate) as held:
                await self._fetch_and_check(location, stages, placed, report, progress, held)
        finally:
            with anyio.CancelScope(shield=True):  # cleans up after a cancel too
                await anyio.to_thread.run_sync(placed.close)

    async def _fetch_and_check(
        self,
        location: S3Location,
        stages: list[Stage],
        placed: ObjectPlacement,
        report: Report,
        progress: ProgressSink | None,
        gate: _HeldOnce | None = None,
    ) -> None:
        info = await self._s3.head(location)
        report.size, report.etag, report.version_id = info.size, info.etag, info.version_id
        if not check_info(stages, info, report):
            return
        job = await self._admit(location, info, stages, placed, report)
        job.progress = progress
        fetcher = Fetcher(self._s3, self.config, job)
        one = OnePass(job, self.config, fetcher)
        try:
            ok = await one.stream()
        except BaseException as exc:
            placed.interrupted(exc)
            raise
        finally:
            fetcher.stats.fill(report.download)
            placed.record(job.watermark.completed_parts())
        job.temp.close()
        if gate is not None:
            gate.release()  # the next object may download while the file stages run
        if ok and await one.file_stages():
            report.dest = await anyio.to_thread.run_sync(placed.commit)
            report.passed = True

    async def _admit(
        self,
        location: S3Location,
        info: ObjectInfo,
        stages: list[Stage],
        placed: ObjectPlacement,
        report: Report,
    ) -> Job:
        """Make the job once HEAD said what the object is: data plane, part plan, temp file.

        The single place where an object is admitted after HEAD (its size is known here).
        """
        config = self.config
        plane = _choose_plane(config, location)
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
        return Job(location, info, stages, report, placed.temp.path, watermark, plane, placed)


def _stat_local(location: LocalLocation) -> ObjectInfo:
    """What a local source is (its ``stat``), or the error that says why it cannot be read."""
    path = os.path.abspath(location.path)
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise ObjectNotFound(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise SourceError(f"{path}: permission denied") from exc
    if not os.path.isfile(path):
        raise SourceError(f"{path}: not a regular file")
    return ObjectInfo(source=path, size=st.st_size, local_path=path)


def _choose_plane(config: Config, location: S3Location) -> Plane:
    """The configured data plane; ``auto`` is ``raw`` unless a proxy applies."""
    plane = config.data_plane
    if plane == "auto":
        endpoint = config.resolved_endpoint() or "https://s3.amazonaws.com"
        plane = "botocore" if proxy_configured(endpoint) else "raw"
    logger.debug("%s: data plane %s (configured: %s)", location, plane, config.data_plane)
    return Plane(plane)


def _stage_factory(stages: StagesPerObject | None) -> Callable[[], list[Stage]] | None:
    """A function that builds a fresh stage list for one object (see ``process_many``)."""
    if stages is None:
        return None
    if callable(stages) and not isinstance(stages, type):
        factory = stages
        return lambda: list(factory())
    items: list[Any] = [stages] if isinstance(stages, (str, type)) else list(stages)
    for item in items:
        if isinstance(item, Stage):
            raise UsageError(
                f"process_many got a stage instance ({item.name}); stages keep per-object "
                "state, so it needs a factory (stages=lambda: [Checksum(), ...]), spec "
                "strings ('checksum:algo=sha256') or stage classes"
            )
        if not isinstance(item, str) and not (isinstance(item, type) and issubclass(item, Stage)):
            raise UsageError(
                f"not a stage spec or stage class: {item!r} (process_many takes a factory, "
                "spec strings or stage classes)"
            )

    def build() -> list[Stage]:
        from .stages import parse_spec

        return [parse_spec(item) if isinstance(item, str) else item() for item in items]

    build()  # a bad spec is a usage error before the first object, not one per object
    return build


def _log_done(report: Report) -> None:
    """One INFO line per object: the source, the outcome, the time, the bytes."""
    if report.passed:
        outcome = "passed"
    elif report.failed_stage is not None:
        outcome = f"stage {report.failed_stage} failed"
    else:
        outcome = f"{report.error_type or 'error'}: {report.error}"
    logger.info(
        "%s: %s in %.3fs (%d bytes fetched, %d retries)",
        report.source,
        outcome,
        report.seconds,
        report.download.bytes,
        report.download.retries,
    )


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


def run_async(fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``fn`` on asyncio, with uvloop when it is installed."""
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:
        options = {}
    return anyio.run(fn, backend="asyncio", backend_options=options)


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
    return run_async(  # type: ignore[no-any-return]
        partial(many, sources, stages, dest, config, max_in_flight, progress)
    )


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
    return run_async(partial(one, source, stages, dest, config, progress))  # type: ignore[no-any-return]


__all__ = ["Engine", "process", "process_many", "run", "run_many"]
