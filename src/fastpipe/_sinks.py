"""Result sinks: where reports go besides the caller (a JSON lines file, S3 object tags).

A sink has ``async write(report)`` and ``async aclose()``. ``Engine.map`` (and so
``process_many`` and the CLI) writes each report to its sinks before yielding it; a sink
that fails is recorded in ``report.sink_errors`` and logged, never silent.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import TYPE_CHECKING, Protocol, TextIO, runtime_checkable

import anyio

from ._exceptions import FastpipeError, LocalIOError
from ._report import Report
from ._source import S3Location, parse_source

if TYPE_CHECKING:
    from ._s3 import S3Control


@runtime_checkable
class Sink(Protocol):
    """Receives each finished report (``write``), then ``aclose`` once at the end."""

    async def write(self, report: Report) -> None:
        """Deliver one report; raise to have the failure recorded in the report."""

    async def aclose(self) -> None:
        """Flush and release what the sink holds."""


def report_line(report: Report, exit_code: int | None = None) -> str:
    """One report as one JSON line (no newline inside: ``json.dumps`` escapes them)."""
    data = report.to_dict()
    if exit_code is not None:
        data["exit_code"] = exit_code
    return json.dumps(data, default=str)


class JsonLinesSink:
    """Appends one JSON line per report to a file (or writes them to a text stream).

    To a path: the file is opened with ``O_APPEND`` (created 0600) and each line is
    written with one ``os.write``, so that concurrent writers and a crash never leave
    half a line. A stream (stdout) gets each line and a flush.
    """

    def __init__(self, target: str | os.PathLike[str] | TextIO) -> None:
        self._stream: TextIO | None = None
        self._fd: int | None = None
        if isinstance(target, (str, os.PathLike)):
            self.name = os.fspath(target)
            try:
                self._fd = os.open(
                    self.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            except OSError as exc:
                raise LocalIOError(
                    f"results file {self.name}: cannot open: {exc.strerror or exc}"
                ) from exc
        else:
            self._stream, self.name = target, getattr(target, "name", "stream")

    async def write(self, report: Report) -> None:
        """Write the report's line (with its ``exit_code``) whole."""
        line = report_line(report, report.exit_code) + "\n"
        if self._stream is not None:
            self._stream.write(line)
            self._stream.flush()
            return
        assert self._fd is not None
        data = line.encode("utf-8", "surrogateescape")
        try:
            written = await anyio.to_thread.run_sync(os.write, self._fd, data)
        except OSError as exc:
            raise LocalIOError(
                f"results file {self.name}: write failed: {exc.strerror or exc}"
            ) from exc
        if written != len(data):  # a regular file takes all of it, or fails (ENOSPC)
            raise LocalIOError(f"results file {self.name}: short write ({written} of {len(data)})")

    async def aclose(self) -> None:
        """Close the file (a stream is left open: it is the caller's)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


#: S3 allows 10 tags on an object; ours are the first dropped when there is no room.
MAX_TAGS = 10
TAG_PREFIX = "fastpipe-"
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9 +\-=._:/@]")


def verdict_tags(report: Report) -> dict[str, str]:
    """The tags a report writes: status, failed stage, xxh3 digest, ETag."""
    tags = {"fastpipe-status": "passed" if report.passed else "failed"}
    if report.failed_stage:
        tags["fastpipe-stage"] = _TAG_UNSAFE.sub("_", report.failed_stage)[:256]
    elif not report.passed and report.error_type:
        tags["fastpipe-stage"] = _TAG_UNSAFE.sub("_", report.error_type)[:256]
    for stage in report.stages:
        result = stage.result
        if (
            stage.status == "passed"
            and isinstance(result, dict)
            and str(result.get("algorithm", "")).startswith("xxh3")
            and result.get("hexdigest")
        ):
            tags["fastpipe-xxh3"] = str(result["hexdigest"])
            break
    if report.etag:
        tags["fastpipe-etag"] = _TAG_UNSAFE.sub("_", report.etag)[:256]
    return tags


def merge_tags(existing: dict[str, str], ours: dict[str, str], what: str) -> dict[str, str]:
    """The object's own tags plus ours (our earlier ones replaced); a
    :class:`FastpipeError` when its own tags leave no room for ours."""
    own = {k: v for k, v in existing.items() if not k.startswith(TAG_PREFIX)}
    if len(own) + len(ours) > MAX_TAGS:
        raise FastpipeError(
            f"{what}: cannot tag: the object has {len(own)} tags of its own and S3 allows "
            f"{MAX_TAGS}, no room for fastpipe's {len(ours)}"
        )
    return {**own, **ours}


class TagSink:
    """Writes each S3 object's verdict onto it as object tags (merged with its own).

    Tags: ``fastpipe-status`` (``passed``/``failed``), ``fastpipe-stage`` (the failed
    stage, or the error's class), ``fastpipe-xxh3`` (when an xxh3 checksum passed) and
    ``fastpipe-etag`` (the ETag that was read, so that a reader can tell a verdict for the
    current version). The version read is tagged when it has a version id. Local sources
    are not tagged.
    """

    def __init__(self, s3: S3Control) -> None:
        self._s3 = s3

    async def write(self, report: Report) -> None:
        """Merge the report's tags into the object's (GetObjectTagging, PutObjectTagging)."""
        location = parse_source(report.source)
        if not isinstance(location, S3Location):
            return
        if report.error_type == "ObjectNotFound":
            raise FastpipeError(f"{location}: not tagged: the object does not exist")
        version = report.version_id
        existing = await self._s3.get_tags(location, version)
        tags = merge_tags(existing, verdict_tags(report), str(location))
        await self._s3.put_tags(location, version, tags)

    async def verdict(self, location: S3Location, etag: str | None = None) -> str | None:
        """The ``fastpipe-status`` the object is tagged with for ``etag`` (without quotes;
        None: its current ETag, by HEAD), or None when its tags hold no verdict for it."""
        if etag is None:
            etag = (await self._s3.head(location)).etag
            if etag is None:
                return None
        tags = await self._s3.get_tags(location, location.version_id)
        if tags.get("fastpipe-etag") != _TAG_UNSAFE.sub("_", etag)[:256]:
            return None  # untagged, or tagged for another version of the object
        return tags.get("fastpipe-status")

    async def aclose(self) -> None:
        """Nothing to release (the engine owns the client)."""


def stdout_sink() -> JsonLinesSink:
    """JSON lines on stdout."""
    return JsonLinesSink(sys.stdout)
