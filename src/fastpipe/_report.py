"""The report of one processed object, and progress events."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

logger = logging.getLogger(__name__)


class _StrEnum(str, Enum):
    """str-valued (not StrEnum: Python 3.10 is supported): a member compares equal to its
    value, prints as it, and the JSON report holds the same strings as before."""

    def __str__(self) -> str:
        return str(self.value)


class Status(_StrEnum):
    """A stage's outcome in the report."""

    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"


class Kind(_StrEnum):
    """A stage's kind: ``stream`` (fed the bytes in order) or ``file`` (the whole file)."""

    STREAM = "stream"
    FILE = "file"


class Phase(_StrEnum):
    """What a progress event is about: the download, a local file streamed, a file stage."""

    DOWNLOAD = "download"
    STREAM = "stream"
    FILE = "file"


class Plane(_StrEnum):
    """The data plane that read the bytes.

    ``raw``: presigned GETs read by a buffered protocol; ``botocore``: aiobotocore's
    response bodies; ``local``: a local file.
    """

    RAW = "raw"
    BOTOCORE = "botocore"
    LOCAL = "local"


#: Exit code of each error class by name, filled by ``_exceptions`` as its classes are
#: defined, so that a report maps its ``error_type`` without importing the errors (which
#: import this module for their ``report``).
EXIT_CODES: dict[str, int] = {}


@dataclass
class StageReport:
    """One stage's outcome: ``status`` is a :class:`Status`, ``kind`` a :class:`Kind`."""

    name: str
    kind: Kind
    status: Status = Status.SKIPPED
    seconds: float = 0.0
    result: Any = None
    error: str | None = None


@dataclass
class DownloadReport:
    """How the bytes were read.

    ``plane`` is the data plane that ran (a :class:`Plane`: ``raw``, ``botocore`` or
    ``local``). ``bytes`` counts bytes fetched from S3; ``reused_bytes`` those taken from a resumed
    temp file. ``control_plane`` says what sent HEAD and signed the GETs: ``light`` (the
    standard library, no botocore) or ``botocore``; ``None`` for a local file.
    ``turn_wait_seconds``: how long the download waited for the objects admitted before
    it to reach their tails (``Config.download_order`` "admission"), not in ``seconds``.
    """

    seconds: float = 0.0
    bytes: int = 0
    parts: int = 0
    part_size: int = 0
    concurrency: int = 0
    retries: int = 0
    plane: Plane = Plane.RAW
    reused_bytes: int = 0
    control_plane: str | None = None
    turn_wait_seconds: float = 0.0


@dataclass
class Report:
    """The outcome of processing one object (see the README for every field)."""

    source: str
    size: int | None = None
    etag: str | None = None
    version_id: str | None = None
    passed: bool = False
    #: What the passed stages compared the bytes with (a stored or expected value), e.g.
    #: ``verify: checksum-crc32c against the value S3 stored``; None when nothing was.
    verified: str | None = None
    failed_stage: str | None = None
    error: str | None = None
    error_type: str | None = None
    seconds: float = 0.0
    #: Seconds of ``seconds`` spent waiting for admission (the engine's object slots
    #: and disk budget).
    queued_seconds: float = 0.0
    #: The time model's end-to-end seconds for this object, made before its first byte.
    predicted_seconds: float | None = None
    #: What that prediction rests on (``Prediction.describe``): the rates used, where they
    #: came from (``learned``, ``calibrated``, ``builtin``) and from how many objects.
    model: dict[str, Any] | None = None
    dest: str | None = None
    #: What went wrong writing this report to a result sink (``--tag``, ``--results``).
    sink_errors: list[str] = field(default_factory=list)
    download: DownloadReport = field(default_factory=DownloadReport)
    stages: list[StageReport] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """The CLI exit code this outcome maps to (0 passed, 1 a stage failed, ...)."""
        if self.passed:
            return 0
        return EXIT_CODES.get(self.error_type or "", 1)

    def stage(self, name: str) -> StageReport:
        """The report of the stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable data (the CLI's ``--json`` shape).

        The enums are str-valued: ``json.dumps`` writes them as their values.
        """
        return asdict(self)


@dataclass(frozen=True)
class Progress:
    """A progress event.

    ``phase`` is ``download`` (an S3 object's bytes arriving), ``stream`` (a local file
    read by the stream stages) or ``file`` (a file stage, named by ``stage``, at its start
    and its end).

    During the download (or the stream phase) an event comes when it starts, every 0.2 s,
    and as soon as the bytes cross each 5% of the object (sent at the crossing, so the
    event holds the bytes in then: at most one receive buffer past the mark; one buffer
    crossing several marks makes one event), then one at its end; in order, with
    ``bytes_done`` never going back. An object gets at most 19 events beyond the timer's;
    one whose bytes come in a single buffer (a tiny one) at most one.
    """

    bytes_done: int
    total: int
    seconds: float
    eta_seconds: float | None
    phase: Phase
    stage: str | None = None


def log_done(report: Report) -> None:
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
