"""What the command line and the tools print, and how: shared by ``cli`` and ``tools``.

Nothing in the core imports this module. It holds the argparse types for sizes and
counts, the one-screen summary of a report, the progress bar, the JSON report with the
CLI's exit code, and writes to stdout that fail with a clear error.

Keys, paths and messages may hold any character (an S3 key may hold ESC, BEL or a
newline); :func:`printable` escapes them so that no text from outside drives the user's
terminal or breaks a one-line message. JSON output is never escaped here: ``json.dumps``
escapes control characters itself and keeps the value exact.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any, TextIO

from ._config import format_size, parse_size
from ._exceptions import UsageError
from ._report import Phase, Progress, Report

__all__ = [
    "ProgressBar",
    "StatusLine",
    "StdoutFailed",
    "format_size",
    "positive_int",
    "printable",
    "report_json",
    "size_arg",
    "summary",
    "write_stdout",
]

#: C0 and C1 controls, DEL, line/paragraph separators, bidirectional overrides and
#: isolates (they reorder what the terminal shows), and lone surrogates (undecodable
#: bytes of a local file name; printing them would raise).
_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: object) -> str:
    """``str(text)`` with every control character written as an escape (``\\x1b``, ``\\n``)."""
    return _UNPRINTABLE.sub(_escape, str(text))


class StdoutFailed(Exception):
    """Writing to stdout failed (a full disk, ``> /dev/full``): the CLI exits 5."""


def write_stdout(text: str) -> None:
    """Print ``text`` on stdout now; a failed write raises :class:`StdoutFailed`.

    A closed pipe (``| head``) raises ``BrokenPipeError`` as it is: not an error for the
    CLI, which ends quietly then.
    """
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise StdoutFailed(f"cannot write to stdout: {exc.strerror or exc}") from None


def report_json(report: Report, exit_code: int | None = None) -> str:
    """The report as the CLI's one JSON line: ``to_dict()`` plus ``exit_code``."""
    data = report.to_dict()
    data["exit_code"] = report.exit_code if exit_code is None else exit_code
    return json.dumps(data, default=str)


def size_arg(text: str) -> int:
    """An argparse type: a size of at least one byte (``8MiB``, ``4096``)."""
    try:
        value = parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


class StatusLine:
    """One line on a terminal stream, redrawn in place (the progress displays' base)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._last = 0.0
        self._shown = False

    def _write(self, line: str) -> None:
        # \r back to the line's start, \x1b[K clears what a longer line left behind.
        self.stream.write("\r" + line[:120] + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """End the line (when one was drawn)."""
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()


class ProgressBar(StatusLine):
    """A one-line progress bar on a terminal stream (bytes, rate, ETA)."""

    def __call__(self, event: Progress) -> None:
        now = time.monotonic()
        if event.phase is Phase.FILE:
            # A file stage: the bytes are all there; say which stage runs.
            self._write(f"{'stage':>8} {printable(event.stage or '')} running on the local file")
            return
        if now - self._last < 0.2 and event.bytes_done < event.total:
            return
        self._last = now
        total = max(event.total, 1)
        fraction = min(1.0, event.bytes_done / total)
        width = 24
        bar = "#" * int(fraction * width) + "-" * (width - int(fraction * width))
        rate = event.bytes_done / event.seconds if event.seconds > 0 else 0.0
        eta = f"ETA {event.eta_seconds:5.1f}s" if event.eta_seconds is not None else "ETA -"
        self._write(
            f"{printable(event.phase.value):>8} [{bar}] {format_size(event.bytes_done)} / "
            f"{format_size(event.total)}  {format_size(rate)}/s  {eta}"
        )


def short_value(value: Any) -> str:
    """A result value for the one-line summary (floats rounded, dicts flattened)."""
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {short_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def summary(report: Report) -> str:
    """The few lines ``fastpipe run`` prints for a report (control characters escaped)."""
    lines = []
    verdict = "PASSED" if report.passed else "FAILED"
    size = format_size(report.size) if report.size is not None else "?"
    lines.append(f"{verdict}  {report.source}  {size}  in {report.seconds:.2f}s")
    if report.passed:  # PASSED must not imply a comparison that did not happen
        lines.append(
            f"  verified  {report.verified}"
            if report.verified
            else "  nothing verified: no stage compared the bytes with a stored or expected value"
        )
    dl = report.download
    if dl.seconds > 0 and dl.bytes:
        lines.append(
            f"  download  {format_size(dl.bytes)} in {dl.seconds:.2f}s "
            f"({format_size(dl.bytes / dl.seconds)}/s, {dl.parts} parts of "
            f"{format_size(dl.part_size)}, concurrency {dl.concurrency}, "
            f"retries {dl.retries}, plane {dl.plane})"
        )
    for stage in report.stages:
        detail = ""
        if stage.status == "failed":
            detail = f"  {stage.error}"
        elif isinstance(stage.result, dict):
            keys = [k for k in stage.result if k != "histogram"][:4]
            detail = "  " + ", ".join(f"{k}={short_value(stage.result[k])}" for k in keys)
        lines.append(f"  {stage.status:8} {stage.name:10} {stage.seconds:7.2f}s{detail}")
    if report.dest:
        lines.append(f"  kept at {report.dest}")
    if report.error and not report.failed_stage:
        lines.append(f"  error: {report.error}")
    # Keys, paths and messages may hold control characters: escape them, line by line.
    return "\n".join(printable(line) for line in lines)
