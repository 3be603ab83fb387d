"""One exception hierarchy under :class:`FastpipeError`.

Each error mixes in the built-in that fits, so that callers may catch either: a missing
object is also a ``FileNotFoundError``, a denied one a ``PermissionError``. The CLI maps
each family to one exit code (``exit_code`` on the class).
"""

from __future__ import annotations

import re

from ._report import EXIT_CODES, Report

# Query strings of presigned URLs, and the values that sign a request wherever they show
# (a query string, an echoed Authorization header, a request line quoted by a server).
_SIGNED_QUERY = re.compile(
    r"\?[^\s\"'<>]*?(?:X-Amz-(?:Credential|Signature|Security-Token)|Signature|AWSAccessKeyId)"
    r"(?:=|%3D)[^\s\"'<>]*",
    re.IGNORECASE,
)
_SIGNED_VALUE = re.compile(
    r"\b(?:X-Amz-Credential|X-Amz-Signature|X-Amz-Security-Token|Signature|AWSAccessKeyId|"
    r"Credential)(?:=|%3D)[^&,;\s\"'<>]*",
    re.IGNORECASE,
)


def redact_secrets(text: str) -> str:
    """``text`` without presigned query strings or signing values (credential ids,
    signatures, session tokens).

    Servers and proxies may quote the request line or headers in an error message; every
    message that holds server text passes through here (every :class:`FastpipeError`
    message does), so that neither stderr nor a report ever shows them.
    """
    text = _SIGNED_QUERY.sub("?<redacted>", text)
    return _SIGNED_VALUE.sub("<redacted>", text)


class FastpipeError(Exception):
    """Base of every error fastpipe raises on purpose.

    The message is one line and never holds credentials or presigned query strings
    (:func:`redact_secrets` is applied to it).
    """

    exit_code: int = 1
    #: What was known about the object when the error ended its processing (set by the
    #: engine on the errors that :func:`fastpipe.process` raises), else None.
    report: Report | None = None
    #: S3's request id of the answer that caused the error, when S3 gave one.
    request_id: str | None = None

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(redact_secrets(str(message)), *args)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        EXIT_CODES[cls.__name__] = cls.exit_code

    def report_for(self, source: str) -> Report:
        """The object's report: the one the error carries, else one that holds only it."""
        return self.report or Report(source=source, error=str(self), error_type=type(self).__name__)


class UsageError(FastpipeError, ValueError):
    """Bad arguments: a malformed source, an unknown stage or option, a bad size."""

    exit_code = 2


class DestinationError(FastpipeError, OSError):
    """The destination cannot be used (missing folder, not writable, already exists)."""

    exit_code = 2


class SourceError(FastpipeError):
    """The source is missing, denied or unreachable."""

    exit_code = 3


class ObjectNotFound(SourceError, FileNotFoundError):
    """The bucket or the key (or the local file) does not exist."""


class AccessDenied(SourceError, PermissionError):
    """The credentials may not read the object."""


class EndpointUnreachable(SourceError, ConnectionError):
    """The S3 endpoint did not answer."""


class RetriesExhausted(SourceError):
    """A transient fault repeated past the attempt limit; ``last_error`` is the last cause."""

    def __init__(self, message: str, last_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.last_error = last_error
        if isinstance(last_error, FastpipeError):
            self.request_id = last_error.request_id


class IntegrityError(FastpipeError):
    """The bytes received cannot be trusted: object changed mid-download, short body."""

    exit_code = 4


class ObjectChanged(IntegrityError):
    """The object was replaced while it was being read (its ETag no longer matches)."""


class LocalIOError(FastpipeError, OSError):
    """Writing the local file failed (disk full, file size limit)."""

    exit_code = 5


class BudgetExceeded(FastpipeError):
    """The object is larger than the engine's whole disk budget: it could never be
    admitted (the message names both sizes)."""

    exit_code = 6


class StageFailed(FastpipeError):
    """A stage rejected the object. Raised by stages; ``stage`` names it."""

    exit_code = 1

    def __init__(self, message: str, stage: str | None = None, result: object = None) -> None:
        super().__init__(message)
        self.stage = stage
        #: What the stage found before it rejected the object (shown in the report).
        self.result = result


class StageTimeout(StageFailed, TimeoutError):
    """A stage ran past its timeout."""
