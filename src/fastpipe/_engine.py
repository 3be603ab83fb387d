"""One object end to end: HEAD, plan, fetch + stream stages, file stages, report.

Later stages run only when earlier ones pass (gating); a failed stream stage cancels the
download at once. Nothing is left under the destination name unless the whole object
arrived and every stage passed; the temp file is removed on every other path, including
cancellation by the caller.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from types import TracebackType
from typing import Any

import anyio

from ._config import Config
from ._exceptions import (
    FastpipeError,
    ObjectNotFound,
    SourceError,
    StageFailed,
    StageTimeout,
    UsageError,
)
from ._fetch import Fetcher, proxy_configured
from ._file import Watermark
from ._groups import unwrap_groups
from ._placement import Journal, ObjectPlacement, Placement
from ._report import Progress, Report, StageReport
from ._s3 import S3Control
from ._source import LocalLocation, S3Location, parse_source
from ._stream import StreamRunner, describe_exception
from .stages._base import FileStage, LocalFile, ObjectInfo, Stage, StreamStage

ProgressCallback = Callable[[Progress], None]
#: What ``process_many`` takes as its stages: a factory called once per object, or a
#: sequence of ``--stage`` spec strings and stage classes, built afresh for each object.
StagesPerObject = Callable[[], Sequence[Stage]] | Sequence[str | type[Stage]] | str

logger = logging.getLogger(__name__)


class _ObjectProgress:
    """The caller's progress callback, with the clock of one object (file-stage events
    carry the seconds since the object started)."""

    def __init__(self, callback: ProgressCallback, started: float) -> None:
        self.callback = callback
        self.started = started

    def __call__(self, event: Progress) -> None:
        self.callback(event)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class _EarlyStopped(Exception):
    """Raised inside an early file stage's window when its run is called off. Internal."""


class _EarlyRun:
    """The first file stage, started while the download runs (it reads in order).

    Its windows wait for their bytes; the last one waits, too, until every stream stage
    passed, so that it finishes (and has side effects) only on an accepted object.
    """

    def __init__(
        self, index: int, stage: FileStage, path: str, info: ObjectInfo, watermark: Watermark
    ) -> None:
        self.index = index
        self.stage = stage
        self.local = LocalFile(path=path, size=info.size, info=info, wait_until=self._wait)
        self._watermark = watermark
        self.stream_passed = threading.Event()
        self._stopped = threading.Event()
        self._running = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.seconds = 0.0

    @classmethod
    def plan(
        cls, stages: list[Stage], info: ObjectInfo, path: str, watermark: Watermark
    ) -> _EarlyRun | None:
        """An early run for the first file stage, when it reads in order (else None)."""
        first = next((i for i, s in enumerate(stages) if isinstance(s, FileStage)), None)
        if first is None or info.size == 0:
            return None
        stage = stages[first]
        assert isinstance(stage, FileStage)
        if not stage.reads_in_order or stage.timeout is not None:
            return None
        return cls(first, stage, path, info, watermark)

    def stop(self) -> None:
        """Call the run off: its next (or current) wait raises, and the stage is told."""
        self._stopped.set()
        if self._running:
            self.stage.cancel()

    def _wait(self, end: int) -> None:
        watermark = self._watermark
        while watermark.wait(0, end, timeout=0.2) < end:
            if self._stopped.is_set() or watermark.closed:
                raise _EarlyStopped()
        if end >= self.local.size:
            while not self.stream_passed.wait(0.2):
                if self._stopped.is_set():
                    raise _EarlyStopped()
        if self._stopped.is_set():
            raise _EarlyStopped()

    async def run(self) -> None:
        started = time.perf_counter()
        self._running = True
        try:
            if inspect.iscoroutinefunction(self.stage.run):
                self.result = await self.stage.run(self.local)
            else:
                self.result = await anyio.to_thread.run_sync(self.stage.run, self.local)
        except _EarlyStopped:
            pass
        except Exception as exc:  # noqa: BLE001 - user stages may raise anything
            if not self._stopped.is_set():
                self.error = exc
        finally:
            self._running = False
            self.seconds = time.perf_counter() - started


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
        if stage_report.status == "passed":
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
        if progress is not None:
            progress = _ObjectProgress(progress, started)
        try:
            if isinstance(location, LocalLocation):
                placement.check_local_source()
                await self._process_local(location, stage_list, report, progress)
            else:
                await self._process_s3(
                    location, stage_list, placement, report, progress, _download_gate
                )
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
        progress: ProgressCallback | None,
    ) -> None:
        path = os.path.abspath(location.path)
        try:
            st = os.stat(path)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{path}: no such file") from exc
        except PermissionError as exc:
            raise SourceError(f"{path}: permission denied") from exc
        if not os.path.isfile(path):
            raise SourceError(f"{path}: not a regular file")
        info = ObjectInfo(source=path, size=st.st_size, local_path=path)
        report.size = info.size
        report.download.path = "local"
        if not self._check_info(stages, info, report):
            return
        watermark = Watermark(info.size, self.config.part_size)
        watermark.complete_all()
        watermark.close()
        ok, early = await self._stream(stages, info, path, watermark, report, None, progress)
        if not ok:
            return
        report.passed = await self._file_stages(stages, info, path, report, progress, early)

    async def _process_s3(
        self,
        location: S3Location,
        stages: list[Stage],
        placement: Placement,
        report: Report,
        progress: ProgressCallback | None,
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
        progress: ProgressCallback | None,
        gate: _HeldOnce | None = None,
    ) -> None:
        config = self.config
        info = await self._s3.head(location)
        report.size, report.etag, report.version_id = info.size, info.etag, info.version_id
        if not self._check_info(stages, info, report):
            return
        plane = config.data_plane
        if plane == "auto":
            endpoint = config.resolved_endpoint() or "https://s3.amazonaws.com"
            plane = "botocore" if proxy_configured(endpoint) else "raw"
        logger.debug("%s: data plane %s (configured: %s)", location, plane, config.data_plane)
        # Preallocating (and later unlinking) a large file can take a while: not on the loop.
        part_size, reuse = await anyio.to_thread.run_sync(
            placed.open_temp, str(location), info, config.plan_part_size(info.size)
        )
        tmp = placed.temp
        assert tmp is not None
        dl = report.download
        dl.part_size, dl.concurrency, dl.path = part_size, config.max_concurrency, plane
        watermark = Watermark(info.size, part_size)
        dl.parts = watermark.parts
        dl.reused_bytes = watermark.preset(reuse) if reuse else 0
        fetcher = Fetcher(self._s3, config, location, info, tmp, watermark, plane)
        try:
            ok, early = await self._stream(
                stages, info, tmp.path, watermark, report, fetcher, progress, placed.journal
            )
        except BaseException as exc:
            placed.interrupted(exc)
            raise
        finally:
            dl.bytes, dl.retries = fetcher.stats.bytes, fetcher.stats.retries
            if fetcher.stats.finished:
                dl.seconds = fetcher.stats.finished - fetcher.stats.started
            placed.record(watermark.completed_parts())
        tmp.close()
        if gate is not None:
            gate.release()  # the next object may download while the file stages run
        if not ok:
            return
        if not await self._file_stages(stages, info, tmp.path, report, progress, early):
            return
        report.dest = await anyio.to_thread.run_sync(placed.commit)
        report.passed = True

    # -- phases ---------------------------------------------------------------------------

    def _check_info(self, stages: list[Stage], info: ObjectInfo, report: Report) -> bool:
        """Run every stage's metadata check (before any byte is read)."""
        for i, stage in enumerate(stages):
            try:
                stage.check_info(info)  # type: ignore[attr-defined]
            except BaseException as exc:  # noqa: BLE001 - user stages may raise anything
                self._record_failure(report, i, exc)
                return False
        return True

    def _record_failure(self, report: Report, index: int, exc: BaseException) -> None:
        stage_report = report.stages[index]
        stage_report.status = "failed"
        stage_report.error = describe_exception(exc)
        if isinstance(exc, StageFailed) and exc.result is not None:
            stage_report.result = exc.result
        report.failed_stage = stage_report.name
        report.error = f"stage {stage_report.name} failed: {stage_report.error}"
        report.error_type = "StageTimeout" if isinstance(exc, StageTimeout) else "StageFailed"

    async def _stream(
        self,
        stages: list[Stage],
        info: ObjectInfo,
        path: str,
        watermark: Watermark,
        report: Report,
        fetcher: Fetcher | None,
        progress: ProgressCallback | None,
        journal: Journal | None = None,
    ) -> tuple[bool, _EarlyRun | None]:
        """Download (if ``fetcher``) while the stream stages read the prefix.

        Returns whether the stream stages passed, and the outcome of the first file stage
        when it could start early (:attr:`FileStage.reads_in_order`).
        """
        indices = [i for i, s in enumerate(stages) if isinstance(s, StreamStage)]
        early = (
            _EarlyRun.plan(stages, info, path, watermark) if self.config.early_file_stages else None
        )
        runner = StreamRunner(
            [stages[i] for i in indices],  # type: ignore[misc]
            [report.stages[i] for i in indices],
            info,
            path,
            watermark,
            self.config.stream_buffer,
        )
        started = time.perf_counter()

        async def stream() -> None:
            try:
                await _stoppable(partial(anyio.to_thread.run_sync, runner.run), runner.stop)
            finally:
                if early is not None and (runner.failed or runner.position < info.size):
                    early.stop()
                if runner.failed:
                    tg.cancel_scope.cancel()  # gating: no more bytes are fetched
                elif early is not None and runner.position >= info.size:
                    early.stream_passed.set()  # the early stage may take its last window

        async def download() -> None:
            assert fetcher is not None
            try:
                await fetcher.run(self.config.max_concurrency)
            except BaseException:
                runner.stop()
                if early is not None:
                    early.stop()
                raise
            watermark.close()

        def progress_event() -> Progress:
            if fetcher is not None:
                done = fetcher.stats.bytes + report.download.reused_bytes
            else:
                done = runner.position
            elapsed = time.perf_counter() - started
            rate = done / elapsed if elapsed > 0 else 0.0
            if done >= info.size:
                eta: float | None = 0.0
            else:  # no ETA before the first bytes: there is no rate yet
                eta = (info.size - done) / rate if rate > 0 else None
            return Progress(done, info.size, elapsed, eta, "download" if fetcher else "stream")

        async def report_progress() -> None:
            assert progress is not None
            while True:
                progress(progress_event())
                await anyio.sleep(0.2)

        async def keep_journal() -> None:
            assert journal is not None
            while True:
                await anyio.to_thread.run_sync(journal.write, watermark.completed_parts())
                await anyio.sleep(0.5)

        with unwrap_groups():
            async with anyio.create_task_group() as outer:
                if progress is not None:
                    outer.start_soon(report_progress)
                if journal is not None and fetcher is not None:
                    outer.start_soon(keep_journal)
                async with anyio.create_task_group() as tg:
                    if indices:
                        tg.start_soon(stream)
                    elif early is not None:
                        early.stream_passed.set()  # no stream stage can fail
                    if early is not None:
                        tg.start_soon(_stoppable, early.run, early.stop)
                    if fetcher is not None:
                        await download()
                outer.cancel_scope.cancel()  # stops the progress and journal tasks
        if progress is not None:
            progress(progress_event())  # the phase's true end (all bytes, unless gated)
        if runner.failed:
            assert runner.failed_index is not None and runner.error is not None
            self._record_failure(report, indices[runner.failed_index], runner.error)
            return False, None
        return True, early

    async def _file_stages(
        self,
        stages: list[Stage],
        info: ObjectInfo,
        path: str,
        report: Report,
        progress: ProgressCallback | None,
        early: _EarlyRun | None = None,
    ) -> bool:
        """Run the file stages one after another on the local file. True: all passed.

        A stage that ``early`` already ran (while the download went on) is not run again:
        its outcome is recorded in its turn.
        """
        local = LocalFile(path=path, size=info.size, info=info)
        for i, stage in enumerate(stages):
            if not isinstance(stage, FileStage):
                continue
            stage_report = report.stages[i]
            if early is not None and early.index == i:
                stage_report.seconds = early.seconds
                if early.error is not None:
                    self._record_failure(report, i, early.error)
                    return False
                stage_report.status, stage_report.result = "passed", early.result
                self._file_progress(progress, info, stage.name)  # it ran during the download
                continue
            self._file_progress(progress, info, stage.name)
            started = time.perf_counter()
            scope: anyio.CancelScope | None = None
            try:
                with anyio.fail_after(stage.timeout) as scope:
                    result = await _call_file_stage(stage, local)
            except Exception as exc:  # noqa: BLE001 - user stages may raise anything
                stage_report.seconds = time.perf_counter() - started
                # Only our deadline is "ran past its timeout": a stage's own StageTimeout
                # (a TimeoutError too) keeps its message and result.
                if (
                    isinstance(exc, TimeoutError)
                    and not isinstance(exc, StageFailed)
                    and scope is not None
                    and scope.cancelled_caught
                ):
                    exc = StageTimeout(
                        f"{info.source}: stage {stage.name} ran past its timeout of "
                        f"{stage.timeout:g} s"
                    )
                self._record_failure(report, i, exc)
                return False
            stage_report.seconds = time.perf_counter() - started
            stage_report.status, stage_report.result = "passed", result
            self._file_progress(progress, info, stage.name)
        return True

    @staticmethod
    def _file_progress(progress: ProgressCallback | None, info: ObjectInfo, phase: str) -> None:
        """A file stage's event (at its start and its end): all bytes are in."""
        if progress is not None:
            elapsed = progress.elapsed() if isinstance(progress, _ObjectProgress) else 0.0
            progress(Progress(info.size, info.size, elapsed, None, phase))


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


async def _stoppable(work: Callable[[], Awaitable[Any]], stop: Callable[[], None]) -> None:
    """Await ``work``; when the caller is cancelled, call ``stop`` meanwhile.

    A worker thread cannot be cancelled, so it is asked to return (``stop``) and awaited.
    """

    async def stop_on_cancel() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            stop()

    async with anyio.create_task_group() as watch:
        watch.start_soon(stop_on_cancel)
        await work()
        watch.cancel_scope.cancel()


async def _call_file_stage(stage: FileStage, local: LocalFile) -> Any:
    if inspect.iscoroutinefunction(stage.run):
        return await stage.run(local)
    if type(stage).cancel is FileStage.cancel:
        # No cancel hook: a timeout or the caller's cancel need not wait for the thread.
        return await anyio.to_thread.run_sync(stage.run, local, abandon_on_cancel=True)
    # A stage with a cancel hook (a child process to kill, a temp file to remove) is told
    # at once, then waited for, so that nothing of it outlives the object: the CLI exits
    # right after a Ctrl-C and a library caller goes on after its cancel scope.
    called_off = False
    finished = False

    async def cancel_on_cancel() -> None:
        nonlocal called_off
        try:
            await anyio.sleep_forever()
        finally:
            if not finished:
                called_off = True
                stage.cancel()

    result: Any = None
    error: Exception | None = None
    async with anyio.create_task_group() as watch:
        watch.start_soon(cancel_on_cancel)
        try:
            result = await anyio.to_thread.run_sync(stage.run, local)
        except Exception as exc:  # noqa: BLE001 - raised below, unless called off
            error = exc
        finally:
            finished = True
            watch.cancel_scope.cancel()
    if called_off:
        await anyio.sleep(0)  # re-raises the cancel (or the timeout), not the stage's error
    if error is not None:
        raise error
    return result


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
