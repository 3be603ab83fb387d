"""The one pass over one object: download, stream stages, the early file stage, file stages.

While the fetchers write the temp file, the stream stages read its contiguous prefix in
one worker thread, and the first file stage may start early when it reads in order. A
failed stream stage cancels the download at once (gating); the file stages then run one
after another on the complete file. Progress events and the resume journal are kept
meanwhile.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ._config import Config
from ._exceptions import StageFailed, StageTimeout
from ._fetch import Fetcher
from ._groups import unwrap_groups
from ._job import Job
from ._model import EngineModel, Load, Position, eta_bucket
from ._progress import Milestones
from ._report import Phase, Plane, Progress, Status
from ._stream import StreamRunner
from .stages._base import FileStage, LocalFile

logger = logging.getLogger(__name__)

#: Seconds between writes of the resume journal.
_JOURNAL_EVERY = 0.5


class _EarlyStopped(Exception):
    """Raised inside an early file stage's window when its run is called off. Internal."""


class _EarlyRun:
    """The first file stage, started while the download runs (it reads in order).

    Its windows wait for their bytes; the last one waits, too, until every stream stage
    passed, so that it finishes (and has side effects) only on an accepted object.
    """

    def __init__(self, index: int, stage: FileStage, job: Job) -> None:
        self.index = index
        self.stage = stage
        self.local = LocalFile(
            path=job.path, size=job.info.size, info=job.info, wait_until=self._wait
        )
        self._watermark = job.watermark
        self.stream_passed = threading.Event()
        self._stopped = threading.Event()
        self._running = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        #: Seconds spent waiting for bytes or for the stream stages (not working), and
        #: the bytes the stage has consumed: what the time model learns and the ETA uses.
        self.waited = 0.0
        self.consumed = 0
        self._asked = 0

    @classmethod
    def plan(cls, job: Job) -> _EarlyRun | None:
        """An early run for the first file stage, when it reads in order (else None)."""
        stages = job.stages
        first = next((i for i, s in enumerate(stages) if isinstance(s, FileStage)), None)
        if first is None or job.info.size == 0:
            return None
        stage = stages[first]
        assert isinstance(stage, FileStage)
        if not stage.reads_in_order or stage.timeout is not None:
            return None
        return cls(first, stage, job)

    def stop(self) -> None:
        """Call the run off: its next (or current) wait raises, and the stage is told."""
        self._stopped.set()
        if self._running:
            self.stage.cancel()

    def _wait(self, end: int) -> None:
        self.consumed, self._asked = self._asked, end  # the window before this one is done
        started = time.perf_counter()
        try:
            self._wait_for(end)
        finally:
            self.waited += time.perf_counter() - started

    def _wait_for(self, end: int) -> None:
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
        """Run the stage; a cancel calls the run off (:meth:`stop`) and waits for it."""
        started = time.perf_counter()
        self._running = True
        try:
            self.result = await run_file_stage(self.stage, self.local, on_cancel=self.stop)
        except _EarlyStopped:
            pass
        except Exception as exc:  # noqa: BLE001 - user stages may raise anything
            if not self._stopped.is_set():
                self.error = exc
        finally:
            self._running = False
            self.seconds = time.perf_counter() - started


class OnePass:
    """Runs one job's stages over its bytes, downloading them first if ``fetcher``."""

    def __init__(
        self,
        job: Job,
        config: Config,
        fetcher: Fetcher | None,
        model: EngineModel | None = None,
        file_stage_slot: Callable[[str], AbstractAsyncContextManager[None]] | None = None,
    ) -> None:
        self.job = job
        #: One of the engine's ``file_stage_slots`` around each file stage.
        self._slot = file_stage_slot or (lambda _what: contextlib.nullcontext())
        self.config = config
        self.fetcher = fetcher
        self.model = model
        self.runner = StreamRunner(job, config.stream_buffer)
        self.early = _EarlyRun.plan(job) if config.early_file_stages else None
        self._started = time.perf_counter()
        self.milestones = self._plan_milestones()

    def _plan_milestones(self) -> Milestones | None:
        """Progress events as the bytes cross each twentieth of the object: counted by
        the fetchers (a download) or by the stream reader (a local file)."""
        job = self.job
        if job.progress is None:
            return None
        if self.fetcher is not None:
            reused = job.report.download.reused_bytes
            milestones = self.fetcher.milestones = Milestones(job.info.size, base=reused)
        else:
            milestones = self.runner.milestones = Milestones(job.info.size, threaded=True)
        return milestones

    # -- the stream phase -------------------------------------------------------------

    async def stream(self) -> bool:
        """Download (if there is a fetcher) while the stream stages read the prefix.

        True when every stream stage passed; the first file stage may have run meanwhile
        (:attr:`FileStage.reads_in_order`), and :meth:`file_stages` records its outcome.
        """
        await self._predict()
        self._started = time.perf_counter()
        with unwrap_groups():
            async with anyio.create_task_group() as outer:
                if self.milestones is not None:
                    outer.start_soon(self.milestones.report, self._emit_progress)
                if self.job.placed is not None and self.fetcher is not None:
                    outer.start_soon(self._keep_journal)
                async with anyio.create_task_group() as tg:
                    self._start_readers(tg)
                    if self.fetcher is not None:
                        await self._download(self.fetcher)
                outer.cancel_scope.cancel()  # stops the progress and journal tasks
        if self.job.turn is not None:  # every byte read (order "pass": the next starts)
            self.job.turn.pass_over()
        self.job.emit(self._progress_event())  # the phase's true end (all bytes, unless gated)
        runner = self.runner
        if runner.failed:
            assert runner.failed_index is not None and runner.error is not None
            self.job.record_failure(self.job.stream_indices[runner.failed_index], runner.error)
            self.early = None
            return False
        return True

    def _start_readers(self, tg: TaskGroup) -> None:
        early = self.early
        if self.job.stream_indices:
            tg.start_soon(self._stream_stages, tg)
        elif early is not None:
            early.stream_passed.set()  # no stream stage can fail
        if early is not None:
            tg.start_soon(early.run)

    async def _stream_stages(self, tg: TaskGroup) -> None:
        runner, early, size = self.runner, self.early, self.job.info.size
        try:
            await _stoppable(partial(anyio.to_thread.run_sync, runner.run), runner.stop)
        finally:
            if early is not None and (runner.failed or runner.position < size):
                early.stop()
            if runner.failed:
                tg.cancel_scope.cancel()  # gating: no more bytes are fetched
            elif early is not None and runner.position >= size:
                early.stream_passed.set()  # the early stage may take its last window

    async def _download(self, fetcher: Fetcher) -> None:
        job = self.job
        try:
            if job.turn is not None:  # the objects ahead of it first (their tails overlap)
                job.report.download.turn_wait_seconds = await job.turn.wait()
            if job.tracker is not None and job.ticket is not None:
                job.tracker.begin(job.ticket)  # its share of the engine starts
            await fetcher.run(self.config.max_concurrency)
            if self.job.tracker is not None and self.job.ticket is not None:
                self.job.tracker.downloaded(self.job.ticket)  # its share of the engine ends
        except BaseException:
            self.runner.stop()
            if self.early is not None:
                self.early.stop()
            raise
        self.job.watermark.close()

    async def _predict(self) -> None:
        """The time model's prediction, before the first byte: into the job and report."""
        job = self.job
        if self.model is None:
            return
        plane = None if job.plane is Plane.LOCAL else f"download:{job.plane.value}"
        try:
            job.prediction = prediction = await self.model.predict(
                job.stages,
                job.info,
                download_key=plane,
                early_file_stages=self.config.early_file_stages,
                load=self._load(),
            )
        except Exception:  # noqa: BLE001 - a user stage's cost_key must not fail the object
            logger.warning("%s: no time prediction", job.info.source, exc_info=True)
            return
        job.report.predicted_seconds = prediction.seconds
        job.report.model = prediction.describe()

    def _load(self) -> Load:
        """What the object shares the engine with: the count admitted, its weight and
        the neighbours downloading now."""
        job = self.job
        load = Load.shared(job.in_flight, job.heavy_slots, job.admission_wait)
        tracker, ticket = job.tracker, job.ticket
        if tracker is None or ticket is None:
            return load
        return replace(
            load,
            weight=ticket.connections,
            neighbours=tracker.neighbours(ticket),
            in_turn=ticket.turn is not None,
        )

    def _progress_event(self) -> Progress:
        size = self.job.info.size
        if self.fetcher is not None:
            done = self.fetcher.stats.bytes + self.job.report.download.reused_bytes
        else:
            done = self.runner.position
        elapsed = time.perf_counter() - self._started
        phase = Phase.DOWNLOAD if self.fetcher is not None else Phase.STREAM
        return Progress(done, size, elapsed, self._eta(done, elapsed), phase)

    def _eta(self, done: int, elapsed: float) -> float | None:
        """Seconds to the end of the object: the download and stream work left, the early
        file stage and the file stages after (the model's, blended with this object's own
        rates so far), weighed against the prediction less the seconds gone
        (:meth:`Prediction.blend_eta`); without a prediction, the download's rate so far."""
        job, early = self.job, self.early
        prediction = job.prediction
        if prediction is None:
            rate = done / elapsed if elapsed > 0 else 0.0
            left = job.info.size - done
            return 0.0 if left <= 0 else (left / rate if rate > 0 else None)
        stream_busy = sum(job.report.stages[i].seconds for i in job.stream_indices)
        position = Position(
            downloaded=done if self.fetcher is not None else job.info.size,
            streamed=self.runner.position,
            stream_busy=stream_busy,
            download_seconds=elapsed,
            early_done=early.consumed if early is not None else 0,
        )
        tracker, ticket = job.tracker, job.ticket
        if tracker is not None and ticket is not None:
            position = replace(
                position,
                neighbours=tracker.neighbours(ticket),
                share_so_far=tracker.share_so_far(ticket),
                after_download=tracker.since_download(ticket),
            )
        raw = prediction.remaining(position, corrected=False)
        if self.fetcher is not None:
            self._note_eta(done, raw)
        eta = raw * prediction.eta_factor(position.downloaded)
        return eta if job.progress is None else prediction.blend_eta(eta, job.progress.elapsed())

    def _note_eta(self, done: int, raw: float) -> None:
        """Keep the first raw ETA read in each tenth of the bytes (with the clock) in the
        report's ``model["eta"]``: the engine settles them against the object's end, and
        the model learns from them what its ETA errs by."""
        bucket = eta_bucket(done, self.job.info.size)
        eta = (self.job.report.model or {}).get("eta")
        if bucket is None or eta is None:
            return
        readings = eta["readings"]
        if not readings or readings[-1][0] < bucket:  # the bytes only grow: one per tenth
            readings.append([bucket, time.perf_counter(), raw])

    def _file_stage_eta(self, index: int, finished: bool) -> float | None:
        """The ETA at the start (or end) of file stage ``index``: the tail stages left."""
        job = self.job
        if job.prediction is None:
            return 0.0 if finished and index == _last_file_stage(job) else None
        early = self.early.index if self.early is not None else None
        tail_before = sum(
            1 for i, s in enumerate(job.stages[:index]) if isinstance(s, FileStage) and i != early
        )
        done = tail_before + (1 if finished and index != early else 0)
        size = job.info.size
        position = Position(size, size, 0.0, 1.0, early_done=size, file_stages_done=done)
        return job.prediction.remaining(position)

    def _emit_progress(self) -> None:
        self.job.emit(self._progress_event())

    async def _keep_journal(self) -> None:
        placed, watermark = self.job.placed, self.job.watermark
        assert placed is not None
        if placed.journal is None:
            return
        while True:
            await anyio.to_thread.run_sync(placed.journal.write, watermark.completed_parts())
            await anyio.sleep(_JOURNAL_EVERY)

    # -- the whole pass -----------------------------------------------------------------

    async def in_place(self) -> None:
        """A local file's pass: the stream stages, then the file stages, on the file."""
        if await self.stream():
            self.job.report.passed = await self.file_stages()

    async def download_and_commit(self) -> None:
        """An S3 object's pass: download while the stream stages run, then the file
        stages, then commit. The journal records the parts in, also when interrupted."""
        job, fetcher = self.job, self.fetcher
        placed, report = job.placed, job.report
        assert placed is not None and fetcher is not None
        try:
            ok = await self.stream()
        except BaseException as exc:
            placed.interrupted(exc)
            raise
        finally:
            fetcher.stats.fill(report.download)
            placed.record(job.watermark.completed_parts())
        job.temp.close()
        if ok and await self.file_stages():
            # A hand-off to a worker thread and back costs 5-40 ms on a loaded 2-core
            # machine (the GIL's turn): none when there is nothing to move.
            if placed.dest_path is not None:
                report.dest = await anyio.to_thread.run_sync(placed.commit)
            report.passed = True

    # -- the file stages ----------------------------------------------------------------

    async def file_stages(self) -> bool:
        """Run the file stages one after another on the local file. True: all passed.

        A stage that the early run already ran (while the download went on) is not run
        again: its outcome is recorded in its turn.
        """
        job = self.job
        local = LocalFile(path=job.path, size=job.info.size, info=job.info)
        for i, stage in enumerate(job.stages):
            if not isinstance(stage, FileStage):
                continue
            if self.early is not None and self.early.index == i:
                passed = self._early_outcome(self.early)
            else:
                passed = await self._file_stage(i, stage, local)
            if not passed:
                return False
        return True

    def _early_outcome(self, early: _EarlyRun) -> bool:
        stage_report = self.job.report.stages[early.index]
        stage_report.seconds = early.seconds
        if early.error is not None:
            self.job.record_failure(early.index, early.error)
            return False
        stage_report.status, stage_report.result = Status.PASSED, early.result
        model = self.job.report.model
        if model is not None:  # what it worked, not waiting for bytes: what the model learns
            busy = max(0.0, early.seconds - early.waited)
            model["stages"][early.index]["busy_seconds"] = busy
        # it ran during the download
        self.job.file_stage_event(early.stage.name, self._file_stage_eta(early.index, True))
        return True

    async def _file_stage(self, index: int, stage: FileStage, local: LocalFile) -> bool:
        # The single place where a file stage runs after the download: a limit on heavy
        # stages running at once across objects is taken around this call.
        job = self.job
        stage_report = job.report.stages[index]
        job.file_stage_event(stage.name, self._file_stage_eta(index, False))
        started = time.perf_counter()
        scope: anyio.CancelScope | None = None
        try:
            async with self._slot(job.report.source):
                with anyio.fail_after(stage.timeout) as scope:
                    result = await run_file_stage(stage, local, on_cancel=cancel_hook(stage))
        except Exception as exc:  # noqa: BLE001 - user stages may raise anything
            stage_report.seconds = time.perf_counter() - started
            job.record_failure(index, _our_timeout(exc, scope, job, stage))
            return False
        stage_report.seconds = time.perf_counter() - started
        stage_report.status, stage_report.result = Status.PASSED, result
        job.file_stage_event(stage.name, self._file_stage_eta(index, True))
        return True


def _last_file_stage(job: Job) -> int | None:
    return max((i for i, s in enumerate(job.stages) if isinstance(s, FileStage)), default=None)


def _our_timeout(
    exc: Exception, scope: anyio.CancelScope | None, job: Job, stage: FileStage
) -> Exception:
    """Only our deadline is "ran past its timeout": a stage's own StageTimeout (a
    TimeoutError too) keeps its message and result."""
    if (
        isinstance(exc, TimeoutError)
        and not isinstance(exc, StageFailed)
        and scope is not None
        and scope.cancelled_caught
    ):
        return StageTimeout(
            f"{job.info.source}: stage {stage.name} ran past its timeout of {stage.timeout:g} s"
        )
    return exc


def cancel_hook(stage: FileStage) -> Callable[[], None] | None:
    """The stage's ``cancel`` when it overrides the hook, else None (nothing to tell)."""
    return None if type(stage).cancel is FileStage.cancel else stage.cancel


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


async def run_file_stage(
    stage: FileStage, local: LocalFile, on_cancel: Callable[[], None] | None
) -> Any:
    """Run ``stage.run(local)``: awaited when it is async, else in a worker thread.

    The cancel policy (a timeout, the caller's cancel scope, Ctrl-C): with ``on_cancel``
    None the thread is abandoned (it finishes on its own); else ``on_cancel`` is called at
    once (kill a child process, remove a temp file, call an early run off) and the thread
    waited for, so that nothing of the stage outlives the object, and the cancel goes on.
    """
    if inspect.iscoroutinefunction(stage.run):
        return await stage.run(local)
    if on_cancel is None:
        return await anyio.to_thread.run_sync(stage.run, local, abandon_on_cancel=True)
    called_off = False
    finished = False

    async def cancel_on_cancel() -> None:
        nonlocal called_off
        try:
            await anyio.sleep_forever()
        finally:
            if not finished:
                called_off = True
                on_cancel()

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
