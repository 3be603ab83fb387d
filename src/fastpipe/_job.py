"""One object being processed: the values every piece of the engine shares.

A :class:`Job` is made once HEAD (or ``stat``) said what the object is and the temp file
is planned; the fetchers, the stream runner, the one pass and the placement read it
instead of passing the same handful of values from call to call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from ._budgets import Turn
from ._config import Config
from ._exceptions import StageFailed, StageTimeout
from ._file import TempFile, Watermark
from ._model import Prediction
from ._objectinfo import ObjectInfo, PinnedObject
from ._placement import ObjectPlacement
from ._report import Phase, Plane, Progress, Report, Status
from ._sharing import InFlight, Ticket
from ._source import LocalLocation, S3Location
from .stages._base import Stage, StreamStage

ProgressCallback = Callable[[Progress], None]


class ProgressSink:
    """The caller's progress callback, with the clock of one object (file-stage events
    carry the seconds since the object started)."""

    def __init__(self, callback: ProgressCallback, started: float) -> None:
        self.callback = callback
        self.started = started

    def __call__(self, event: Progress) -> None:
        self.callback(event)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass(eq=False)
class Job:
    """One object after HEAD: where it is, what it is, where its bytes go, what is known.

    ``path`` is the file the stages read (the temp file, or the local source itself);
    ``watermark`` tracks which of its bytes are in; ``placed`` (S3 objects only) owns the
    temp file, the resume journal and the commit; ``report`` is filled as the job goes.
    """

    location: S3Location | LocalLocation
    info: ObjectInfo
    stages: list[Stage]
    report: Report
    path: str
    watermark: Watermark
    plane: Plane
    placed: ObjectPlacement | None = None
    progress: ProgressSink | None = None
    stream_indices: list[int] = field(init=False)
    #: Seconds the object waited to be admitted (the engine's object slot and disk budget).
    admission_wait: float = field(default=0.0, init=False)
    #: Objects admitted beside it (itself included) and the engine's heavy-stage slots,
    #: when it was admitted: the time model's shares of connections and slots.
    in_flight: int = field(default=1, init=False)
    heavy_slots: int | None = field(default=None, init=False)
    #: The engine's objects in flight (the ETA re-plans as they come and go).
    tracker: InFlight | None = field(default=None, init=False)
    #: The time model's prediction, made before the first byte (None: no model).
    prediction: Prediction | None = field(default=None, init=False)
    #: Its stay among the objects in flight (None: not counted, e.g. a local file).
    ticket: Ticket | None = field(default=None, init=False)
    #: Its place in the download order (None: downloads are not in turn).
    turn: Turn | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.stream_indices = [i for i, s in enumerate(self.stages) if isinstance(s, StreamStage)]

    @classmethod
    def local(
        cls,
        location: LocalLocation,
        info: ObjectInfo,
        stages: list[Stage],
        report: Report,
        progress: ProgressSink | None,
        part_size: int,
    ) -> Job:
        """The job of a local file: processed in place, every byte already in."""
        watermark = Watermark(info.size, part_size)
        watermark.complete_all()
        watermark.close()
        path = info.source  # the absolute path
        return cls(location, info, stages, report, path, watermark, Plane.LOCAL, None, progress)

    @property
    def pinned(self) -> PinnedObject:
        """The S3 object version every ranged GET must match."""
        assert isinstance(self.location, S3Location)
        return PinnedObject(self.location, self.info)

    @property
    def temp(self) -> TempFile:
        """The temp file the fetchers write (S3 objects only)."""
        assert self.placed is not None and self.placed.temp is not None
        return self.placed.temp

    def emit(self, event: Progress) -> None:
        """Send a progress event to the caller, if it asked for them."""
        if self.progress is not None:
            self.progress(event)

    def file_stage_event(self, name: str, eta: float | None = None) -> None:
        """A file stage's event (at its start and its end): all bytes are in."""
        if self.progress is not None:
            size = self.info.size
            self.progress(Progress(size, size, self.progress.elapsed(), eta, Phase.FILE, name))

    def record_failure(self, index: int, exc: BaseException) -> None:
        """Write stage ``index``'s failure into the report."""
        record_failure(self.report, index, exc)


async def open_download(
    location: S3Location,
    info: ObjectInfo,
    stages: list[Stage],
    report: Report,
    placed: ObjectPlacement,
    progress: ProgressSink | None,
    plane: Plane,
    config: Config,
) -> Job:
    """Plan the parts and open the temp file (resuming: reopen it) of an admitted S3
    object; its job, with the part plan in the report."""
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


def describe_exception(exc: BaseException) -> str:
    """A one-line message for a stage's exception (its type when it is not ours)."""
    if isinstance(exc, StageFailed):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def record_failure(report: Report, index: int, exc: BaseException) -> None:
    """Write stage ``index``'s failure into ``report`` (it becomes the object's verdict)."""
    stage_report = report.stages[index]
    stage_report.status = Status.FAILED
    stage_report.error = describe_exception(exc)
    if isinstance(exc, StageFailed) and exc.result is not None:
        stage_report.result = exc.result
    report.failed_stage = stage_report.name
    report.error = f"stage {stage_report.name} failed: {stage_report.error}"
    report.error_type = "StageTimeout" if isinstance(exc, StageTimeout) else "StageFailed"


def check_info(stages: list[Stage], info: ObjectInfo, report: Report) -> bool:
    """Run every stage's metadata check (before any byte is read). True: all accepted."""
    for i, stage in enumerate(stages):
        try:
            stage.check_info(info)
        except BaseException as exc:  # noqa: BLE001 - user stages may raise anything
            record_failure(report, i, exc)
            return False
    return True
