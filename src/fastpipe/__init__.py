"""fastpipe: process large S3 objects in one pass, fast and predictably.

Download once with concurrent ranged GETs, run the streamable stages on the bytes while
they arrive, then the heavy stages on the local file::

    import fastpipe
    from fastpipe.stages import Checksum

    report = fastpipe.run("s3://bucket/key", stages=[Checksum("sha256")])
    print(report.passed, report.stage("checksum").result)

Logging: every module logs to ``logging.getLogger(__name__)`` under the ``fastpipe``
logger, which has a ``NullHandler`` (silent unless the application configures logging):
DEBUG for retries, URL renewals and the data plane chosen, INFO one line per object.
"""

import logging as _logging

from ._config import Config as Config
from ._config import parse_size as parse_size
from ._engine import Engine as Engine
from ._engine import process as process
from ._engine import process_many as process_many
from ._engine import run as run
from ._engine import run_many as run_many
from ._events import s3_event as s3_event
from ._exceptions import AccessDenied as AccessDenied
from ._exceptions import BudgetExceeded as BudgetExceeded
from ._exceptions import DestinationError as DestinationError
from ._exceptions import EndpointUnreachable as EndpointUnreachable
from ._exceptions import FastpipeError as FastpipeError
from ._exceptions import IntegrityError as IntegrityError
from ._exceptions import LocalIOError as LocalIOError
from ._exceptions import ObjectChanged as ObjectChanged
from ._exceptions import ObjectNotFound as ObjectNotFound
from ._exceptions import RetriesExhausted as RetriesExhausted
from ._exceptions import SourceError as SourceError
from ._exceptions import StageFailed as StageFailed
from ._exceptions import StageTimeout as StageTimeout
from ._exceptions import UsageError as UsageError
from ._report import DownloadReport as DownloadReport
from ._report import Kind as Kind
from ._report import Phase as Phase
from ._report import Plane as Plane
from ._report import Progress as Progress
from ._report import Report as Report
from ._report import StageReport as StageReport
from ._report import Status as Status
from ._sinks import JsonLinesSink as JsonLinesSink
from ._sinks import Sink as Sink
from ._sinks import TagSink as TagSink
from ._worker import Worker as Worker

__version__ = "0.1.0"

_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "AccessDenied",
    "BudgetExceeded",
    "Config",
    "DestinationError",
    "DownloadReport",
    "EndpointUnreachable",
    "Engine",
    "FastpipeError",
    "IntegrityError",
    "JsonLinesSink",
    "Kind",
    "LocalIOError",
    "ObjectChanged",
    "ObjectNotFound",
    "Phase",
    "Plane",
    "Progress",
    "Report",
    "RetriesExhausted",
    "Sink",
    "SourceError",
    "StageFailed",
    "StageReport",
    "StageTimeout",
    "Status",
    "TagSink",
    "UsageError",
    "Worker",
    "__version__",
    "parse_size",
    "process",
    "process_many",
    "run",
    "run_many",
    "s3_event",
]
