"""The queue-fed worker: takes S3 events off SQS and processes each object once.

SQS is the distributed engine: visibility timeouts and the queue's redrive policy give
at-least-once delivery across any number of workers; a worker is one of its consumers.

- At most ``max_objects`` messages are held at once: the worker asks SQS only for as many
  as it has free slots (long polling), so no message waits invisible behind a slow object.
- While a message's objects are processed, a heartbeat extends its visibility every third
  of the visibility timeout, so a long object is never handed to a second worker.
- Terminal outcomes (all stages passed, a stage failed, the object is gone) are written to
  the result sinks, then the message is deleted. Transient ones (retries exhausted,
  endpoint unreachable, local I/O such as a full disk, the object changing mid-read) make
  the message visible again after a backoff that doubles with its receive count. Access
  denied, and a message that cannot be parsed, are left alone: the visibility timeout
  hands them out again and the redrive policy moves them to the dead-letter queue.
- A delivery of an object whose result this worker already wrote (same bucket, key and
  ETag, remembered in a bounded LRU loaded from the results file at start) is
  acknowledged without processing; with ``tag``, so is one whose S3 tags already hold a
  verdict for that ETag (``fastpipe-etag`` equal, ``fastpipe-status`` present), whichever
  worker wrote it.
- :meth:`Worker.stop` drains (no more receives; in-flight objects get ``drain_timeout``
  seconds, then are cancelled, their temp files removed and their messages made visible
  at once); :meth:`Worker.abort` cancels everything and leaves the messages to reappear.

Temp files live in a folder of this worker's own under ``temp_dir``, beside a lock file
held (``flock``) while the worker lives; a worker that starts removes the folders of the
dead workers of the same ``temp_dir``. With ``dest`` the temp files are made in ``dest``
(the rename into place stays on one file system), each held while it is written; a
worker that starts removes those no live process holds (a killed worker's).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import anyio

from ._engine import Engine
from ._events import Malformed, ObjectEvent, Skipped, parse_message
from ._exceptions import (
    AccessDenied,
    FastpipeError,
    ObjectNotFound,
    UsageError,
)
from ._groups import unwrap_groups
from ._placement import sweep_once
from ._queue import MAX_WAIT_SECONDS, Message, Queue
from ._report import Report
from ._sinks import Sink, TagSink, report_line
from ._source import S3Location
from ._stagelist import StagesPerObject, stage_factory

if TYPE_CHECKING:
    from ._metrics import WorkerMetrics

logger = logging.getLogger(__name__)

#: What a message's processing decides: delete it, release it (visible after a backoff),
#: or leave it for the visibility timeout and the redrive policy. Worst wins.
DELETE, RELEASE, LEAVE = 0, 1, 2
_LOCK_PREFIX = ".fastpipe-worker-"
_LOCK_SUFFIX = ".lock"


@dataclass
class WorkerResult(Report):
    """A worker's terminal result: the object's :class:`Report` plus what the queue said.

    It is a ``Report``, so any :class:`fastpipe.Sink` takes it (``JsonLinesSink`` writes
    these fields too, which the duplicate check reads back from the results file).
    """

    #: ``passed``, ``failed`` (a stage failed) or ``gone`` (the object no longer exists).
    outcome: str = ""
    bucket: str = ""
    key: str = ""
    event_etag: str | None = None
    event_version_id: str | None = None
    #: True when the object in S3 had another ETag than the event's (a newer event follows).
    newer_than_event: bool = False
    note: str | None = None
    worker: str = ""
    message_id: str = ""
    receive_count: int = 0
    #: From the message's enqueue time (SQS ``SentTimestamp``) to this result.
    end_to_end_seconds: float = 0.0

    @classmethod
    def of(cls, report: Report, **queue_fields: Any) -> WorkerResult:
        """``report``'s fields plus ``queue_fields``."""
        base = {f.name: getattr(report, f.name) for f in fields(Report)}
        return cls(**base, **queue_fields)


class QueueSink:
    """A :class:`fastpipe.Sink` that sends each report as one JSON message to an SQS queue
    (``--results-queue``)."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    async def write(self, report: Report) -> None:
        """Send the report's JSON line (with its ``exit_code``) as a message."""
        await self.queue.send(report_line(report, report.exit_code))

    async def aclose(self) -> None:
        """Close the queue's client."""
        await self.queue.aclose()


@dataclass
class WorkerStats:
    """What a worker did during :meth:`Worker.run`."""

    received: int = 0
    deleted: int = 0
    released: int = 0
    skipped: int = 0
    left: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class _TempFolder:
    """This worker's temp folder under ``base``, and the cleanup of dead workers' folders."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.path = ""
        self._lock_fd: int | None = None

    def claim(self) -> list[str]:
        """Remove dead workers' folders (return them), then create and lock our own."""
        removed = self._remove_dead()
        self.path = tempfile.mkdtemp(prefix=_LOCK_PREFIX, dir=self.base)
        fd = os.open(
            self.path + _LOCK_SUFFIX,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return removed

    def _remove_dead(self) -> list[str]:
        removed = []
        try:
            names = os.listdir(self.base)
        except OSError as exc:
            raise UsageError(f"temp_dir {self.base!r}: {exc.strerror or exc}") from None
        for name in names:
            if not (name.startswith(_LOCK_PREFIX) and name.endswith(_LOCK_SUFFIX)):
                continue
            lock_path = os.path.join(self.base, name)
            try:
                fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # held: that worker is alive
                folder = lock_path[: -len(_LOCK_SUFFIX)]
                shutil.rmtree(folder, ignore_errors=True)
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
                removed.append(folder)
                logger.info("removed the temp folder of a dead worker: %s", folder)
            finally:
                os.close(fd)
        return removed

    def release(self) -> None:
        """Remove our folder and lock file."""
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(self.path + _LOCK_SUFFIX)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class Worker:
    """Consumes S3 events from an SQS queue and processes each object (``await run()``).

    ``stages`` is a factory of fresh stage lists, or spec strings and stage classes
    built afresh for each object, as for ``process_many`` (default: the engine's default
    stages). ``dest`` is a folder that keeps each object that passed
    (replacing an older copy); without it the bytes go to this worker's temp folder under
    ``temp_dir`` and are removed. ``sinks`` receive each terminal result (the caller closes
    them). ``engine`` may be shared with the caller (else one is created from ``config``).
    ``tag`` writes each verdict onto its object as tags (the engine's
    :class:`~fastpipe.TagSink`, before the other sinks) and skips an object whose tags
    already hold a verdict for the event's ETag, whichever worker wrote it.
    See the module docstring for the delivery rules.
    """

    def __init__(
        self,
        queue_url: str,
        stages: StagesPerObject | None = None,
        *,
        engine: Engine | None = None,
        config: Any = None,
        dest: str | os.PathLike[str] | None = None,
        temp_dir: str | os.PathLike[str] | None = None,
        sinks: Sequence[Sink] = (),
        max_objects: int = 2,
        drain_timeout: float = 30.0,
        once: bool = False,
        wait_seconds: int = MAX_WAIT_SECONDS,
        visibility_timeout: int | None = None,
        release_backoff: float = 5.0,
        sqs_endpoint_url: str | None = None,
        region: str | None = None,
        metrics: WorkerMetrics | None = None,
        seen_capacity: int = 100_000,
        results_file: str | os.PathLike[str] | None = None,
        name: str | None = None,
        tag: bool = False,
    ) -> None:
        if max_objects < 1:
            raise UsageError(f"max_objects must be at least 1, got {max_objects}")
        if drain_timeout < 0:
            raise UsageError(f"drain_timeout must be at least 0, got {drain_timeout}")
        if dest is not None and not os.path.isdir(dest):
            raise UsageError(f"worker dest {os.fspath(dest)!r} must be an existing folder")
        base = os.fspath(temp_dir) if temp_dir is not None else tempfile.gettempdir()
        if not os.path.isdir(base):
            raise UsageError(f"temp_dir {base!r} is not a folder")
        self.queue = Queue(queue_url, endpoint_url=sqs_endpoint_url, region=region)
        self._factory = stage_factory(stages, "Worker")
        self._engine = engine
        self._config = config
        self.dest = os.fspath(dest) if dest is not None else None
        self._temp = _TempFolder(base)
        self.sinks = list(sinks)
        self.tag = tag
        self._tags: TagSink | None = None
        self.max_objects = max_objects
        self.drain_timeout = drain_timeout
        self.once = once
        self.wait_seconds = wait_seconds
        self._visibility = visibility_timeout
        self.release_backoff = release_backoff
        if metrics is None:
            from ._metrics import WorkerMetrics  # prometheus-client loads only for a worker

            metrics = WorkerMetrics()
        self.metrics = metrics
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.stats = WorkerStats()
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._seen_capacity = seen_capacity
        # Read at the start of run, in a worker thread: a long file is blocking I/O.
        self._results_to_load = os.fspath(results_file) if results_file is not None else None
        self._stopping = False
        self._aborting = False
        self._loop_scope: anyio.CancelScope | None = None
        self._main_scope: anyio.CancelScope | None = None
        self._in_flight: dict[str, anyio.CancelScope] = {}
        self._idle: anyio.Event | None = None

    # -- control ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Drain: receive nothing more, let in-flight objects finish within the drain
        timeout, then release the rest. Safe to call from a signal handler's task."""
        self._stopping = True
        if self._loop_scope is not None:
            self._loop_scope.cancel()

    def abort(self) -> None:
        """Stop at once: cancel everything; unfinished messages reappear after their
        visibility timeout (nothing is released)."""
        self._aborting = True
        self.stop()
        if self._main_scope is not None:
            self._main_scope.cancel()

    @property
    def temp_folder(self) -> str:
        """This worker's temp folder (empty before :meth:`run` starts)."""
        return self._temp.path

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> WorkerStats:
        """Consume until :meth:`stop` (or, with ``once``, until a long poll returns nothing
        and nothing is in flight); return what was done."""
        self._idle = anyio.Event()
        self._idle.set()
        removed = await anyio.to_thread.run_sync(self._start_up)
        if removed:
            logger.warning("removed %d temp folder(s) of dead workers", len(removed))
        own_engine = self._engine is None
        engine = self._engine or Engine(self._config)
        self._tags = engine.tag_sink() if self.tag else None
        # Made here, in the loop that runs the engine, and measured where the temp files go.
        self.metrics.track(engine.budgets_at(self.dest or self._temp.path))
        try:
            visibility = self._visibility or await self.queue.visibility_timeout()
            with anyio.CancelScope() as main_scope:
                self._main_scope = main_scope
                if self._aborting:
                    main_scope.cancel()
                with unwrap_groups():
                    async with anyio.create_task_group() as tg:
                        await self._receive_loop(tg, engine, visibility)
                        await self._drain()
        finally:
            with anyio.CancelScope(shield=True):
                if own_engine:
                    await engine.aclose()
                await self.queue.aclose()
                # rmtree of a folder of partial downloads: not on the event loop.
                await anyio.to_thread.run_sync(self._temp.release)
        return self.stats

    def _start_up(self) -> list[str]:
        """The blocking setup (a worker thread): read the results file once, remove the
        temp files dead runs left in ``dest``, then claim the temp folder; return the
        dead workers' folders removed."""
        if self._results_to_load is not None:
            self._load_seen(self._results_to_load)
            self._results_to_load = None
        if self.dest is not None:
            sweep_once(self.dest)  # a killed worker's partial download there is nobody's
        return self._temp.claim()

    async def _receive_loop(self, tg: Any, engine: Engine, visibility: int) -> None:
        slots = anyio.Semaphore(self.max_objects)
        failures = 0
        while not self._stopping:
            acquired = False
            messages: list[Message] = []
            # stop() cancels this scope: a wait for a free slot or a long poll ends at once
            # (a message caught mid-poll reappears after its visibility timeout).
            with anyio.CancelScope() as scope:
                self._loop_scope = scope
                await slots.acquire()
                acquired = True
                try:
                    messages = await self.queue.receive(slots.value + 1, self.wait_seconds)
                    failures = 0
                except FastpipeError as exc:
                    failures += 1
                    delay = min(30.0, 0.5 * 2**failures)
                    logger.warning("receive failed (retry in %.1fs): %s", delay, exc)
                    await anyio.sleep(delay)
            self._loop_scope = None
            if not messages:
                if acquired:
                    slots.release()
                if self.once and not self._in_flight:
                    break
                continue
            for index, message in enumerate(messages):
                if index > 0:
                    slots.acquire_nowait()  # asked for no more than the free slots
                if self._idle is None or self._idle.is_set():
                    self._idle = anyio.Event()
                self._in_flight[message.message_id + message.receipt_handle] = anyio.CancelScope()
                tg.start_soon(self._handle, engine, message, visibility, slots)

    async def _drain(self) -> None:
        """Give in-flight messages ``drain_timeout`` seconds, then cancel them."""
        if not self._in_flight:
            return
        logger.info("draining %d in-flight message(s)", len(self._in_flight))
        assert self._idle is not None
        with anyio.move_on_after(self.drain_timeout):
            await self._idle.wait()
        for scope in list(self._in_flight.values()):
            scope.cancel()

    # -- one message ------------------------------------------------------------------------

    async def _handle(
        self, engine: Engine, message: Message, visibility: int, slots: anyio.Semaphore
    ) -> None:
        handle_key = message.message_id + message.receipt_handle
        scope = self._in_flight[handle_key]
        self.stats.received += 1
        self.metrics.messages.labels("received").inc()
        decision = RELEASE
        try:
            with scope:
                async with anyio.create_task_group() as beat:
                    beat.start_soon(self._heartbeat, message, visibility)
                    try:
                        decision = await self._process_message(engine, message)
                    finally:
                        beat.cancel_scope.cancel()
            if scope.cancelled_caught:
                decision = RELEASE
            if not self._aborting:
                with anyio.CancelScope(shield=True):
                    await self._settle(message, decision, drained=scope.cancelled_caught)
        finally:
            del self._in_flight[handle_key]
            slots.release()
            if not self._in_flight and self._idle is not None:
                self._idle.set()

    async def _heartbeat(self, message: Message, visibility: int) -> None:
        """Keep the message invisible while it is processed."""
        interval = max(1.0, visibility / 3)
        while True:
            await anyio.sleep(interval)
            try:
                await self.queue.change_visibility(message, visibility)
            except FastpipeError as exc:
                logger.warning("heartbeat of message %s failed: %s", message.message_id, exc)

    async def _settle(self, message: Message, decision: int, drained: bool) -> None:
        try:
            if decision == DELETE:
                await self.queue.delete(message)
                self.stats.deleted += 1
                self.metrics.messages.labels("deleted").inc()
            elif decision == RELEASE:
                delay = 0.0 if drained else self._backoff(message.receive_count)
                await self.queue.change_visibility(message, int(delay))
                self.stats.released += 1
                self.metrics.messages.labels("released").inc()
                logger.info("released message %s (visible in %ds)", message.message_id, delay)
            else:
                self.stats.left += 1
                self.metrics.messages.labels("left").inc()
        except FastpipeError as exc:
            # The visibility timeout hands it out again: at-least-once still holds.
            logger.warning("message %s: %s", message.message_id, exc)

    def _backoff(self, receive_count: int) -> float:
        return float(min(900.0, self.release_backoff * 2 ** max(0, receive_count - 1)))

    async def _process_message(self, engine: Engine, message: Message) -> int:
        decision = DELETE
        items = parse_message(message.body)
        for item in items:
            if isinstance(item, Malformed):
                logger.warning(
                    "message %s left for the dead-letter queue: %s", message.message_id, item.error
                )
                decision = max(decision, LEAVE)
            elif isinstance(item, Skipped):
                self.stats.skipped += 1
                self.metrics.messages.labels("skipped").inc()
                logger.info("message %s: skipped %s", message.message_id, item.reason)
            else:
                decision = max(decision, await self._process_object(engine, message, item))
        return decision

    def _seen_key(self, event: ObjectEvent) -> tuple[str, str, str] | None:
        return (event.bucket, event.key, event.etag) if event.etag else None

    def _remember(self, key: tuple[str, str, str]) -> None:
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > self._seen_capacity:
            self._seen.popitem(last=False)

    def _load_seen(self, path: str) -> None:
        """Remember the objects whose results the file already holds (a restarted worker
        then acknowledges their redeliveries without processing them)."""
        try:
            f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
        except FileNotFoundError:
            return
        except OSError as exc:
            raise UsageError(f"results file {path!r}: {exc.strerror or exc}") from None
        with f:
            for line in f:
                try:
                    data = json.loads(line)
                    bucket, key, etag = data["bucket"], data["key"], data["etag"]
                except (ValueError, KeyError, TypeError):
                    continue  # another writer's line, or a foreign format: not ours to judge
                if isinstance(bucket, str) and isinstance(key, str) and isinstance(etag, str):
                    self._remember((bucket, key, etag))

    async def _process_object(self, engine: Engine, message: Message, event: ObjectEvent) -> int:
        if await self._already_done(event):
            self.stats.skipped += 1
            self.metrics.messages.labels("skipped").inc()
            return DELETE
        stages = None if self._factory is None else self._factory()
        self.metrics.in_flight.inc()
        started = time.monotonic()
        try:
            report = await engine.process(
                event.source,
                stages,
                self.dest,
                force=self.dest is not None,
                temp_dir=None if self.dest is not None else self._temp.path,
            )
            outcome = "passed" if report.passed else "failed"
        except ObjectNotFound as exc:
            report = exc.report_for(event.source)
            outcome = "gone"
        except AccessDenied as exc:
            self.metrics.objects.labels("denied").inc()
            logger.warning("%s: left for redrive: %s", event.source, exc)
            return LEAVE
        except FastpipeError as exc:
            # Retries exhausted, endpoint unreachable, local I/O, a changed object: try later.
            self.metrics.objects.labels("transient").inc()
            self.metrics.retries.inc(exc.report.download.retries if exc.report else 0)
            logger.warning("%s: transient, released: %s", event.source, exc)
            return RELEASE
        except Exception:
            logger.exception("%s: unexpected error, released", event.source)
            return RELEASE
        finally:
            self.metrics.in_flight.dec()
        result = self._result(event, message, report, outcome, time.monotonic() - started)
        # Tags first: a tag that cannot be written keeps the message, and no results-file
        # line yet that would make the next delivery look done. A gone object has no tags.
        sinks = [*([self._tags] if self._tags and outcome != "gone" else []), *self.sinks]
        try:
            for sink in sinks:
                await sink.write(result)
        except (OSError, FastpipeError) as exc:
            logger.warning("%s: result not written, released: %s", event.source, exc)
            return RELEASE
        self.stats.outcomes[outcome] = self.stats.outcomes.get(outcome, 0) + 1
        self.metrics.objects.labels(outcome).inc()
        self.metrics.bytes.inc(report.download.bytes)
        self.metrics.retries.inc(report.download.retries)
        self.metrics.admission.observe(report.queued_seconds)
        self.metrics.seconds.observe(result.end_to_end_seconds)
        if report.predicted_seconds is not None and report.seconds > 0:
            self.metrics.predicted.observe(report.predicted_seconds)
            self.metrics.prediction_ratio.observe(report.predicted_seconds / report.seconds)
        if report.etag:
            self._remember((event.bucket, event.key, report.etag))
        return DELETE

    async def _already_done(self, event: ObjectEvent) -> bool:
        """Whether this worker wrote the object's result for the event's ETag, or (with
        ``tag``) its tags hold a verdict for it."""
        seen = self._seen_key(event)
        if seen is not None and seen in self._seen:
            logger.info("%s: duplicate delivery of ETag %s, already done", event.source, event.etag)
            return True
        return await self._tagged(event)

    async def _tagged(self, event: ObjectEvent) -> bool:
        """Whether the object's tags hold a verdict for its current ETag (``--tag``)."""
        if self._tags is None:
            return False
        location = S3Location(event.bucket, event.key, event.version_id)
        try:
            status = await self._tags.verdict(location, event.etag)
        except FastpipeError as exc:  # processing meets the same cause and decides
            logger.info("%s: tags not read, processing it: %s", event.source, exc)
            return False
        if status is None:
            return False
        logger.info("%s: already tagged %s for its ETag, skipped", event.source, status)
        if event.etag:
            self._remember((event.bucket, event.key, event.etag))
        return True

    def _result(
        self, event: ObjectEvent, message: Message, report: Report, outcome: str, seconds: float
    ) -> WorkerResult:
        newer = bool(event.etag and report.etag and event.etag != report.etag)
        note = None
        if newer:
            note = (
                f"the object in S3 is newer than the event "
                f"(ETag {event.etag} is now {report.etag}): a newer event will follow"
            )
            logger.info("%s: %s", event.source, note)
        end_to_end = seconds
        if message.sent_at is not None:
            end_to_end = max(seconds, time.time() - message.sent_at)
        return WorkerResult.of(
            report,
            outcome=outcome,
            bucket=event.bucket,
            key=event.key,
            event_etag=event.etag,
            event_version_id=event.version_id,
            newer_than_event=newer,
            note=note,
            worker=self.name,
            message_id=message.message_id,
            receive_count=message.receive_count,
            end_to_end_seconds=round(end_to_end, 6),
        )
