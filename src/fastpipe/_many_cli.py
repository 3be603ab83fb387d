"""``fastpipe run`` over many objects: sources, budgets, sinks, progress, the summary.

A run is "many" when it has several sources, ``--recursive`` or ``--from``. Reports are
printed as objects finish (JSON lines with ``--json``), written to ``--results`` and
``--tag``, and a summary line ends the run. Exit code: 0 when every object passed;
otherwise the highest exit code of the errors seen (2 usage, 3 source, 4 integrity,
5 local I/O, 6 budget), or 1 when only stages failed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TextIO

from ._config import DOWNLOAD_ORDERS, Config, format_size
from ._console import StatusLine, positive_int, printable, size_arg, write_stdout
from ._exceptions import FastpipeError, UsageError
from ._report import Phase, Progress, Report

if TYPE_CHECKING:
    from ._engine import Engine
    from ._sinks import Sink
    from .stages import Stage

EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def add_budget_arguments(parser: argparse.ArgumentParser, objects: bool = True) -> None:
    """``--max-connections``, ``--disk-budget``, ``--file-stage-slots``, ``--max-objects``,
    ``--download-order`` (their defaults for this machine shown by ``--help``; the disk
    budget's only as the rule, since it reads the disk when the engine starts).
    ``objects`` False: the parser has its own ``--max-objects`` (the worker's)."""
    from ._budgets import DISK_SHARE, default_file_stage_slots

    defaults = Config()
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=None,
        help=f"ranged GETs in flight across objects (default {defaults.max_connections})",
    )
    parser.add_argument(
        "--disk-budget",
        type=size_arg,
        default=None,
        # Not computed here: free space and /proc/vmstat are read when the engine starts.
        help=f"bytes of temp files at once (default: {DISK_SHARE:.0%} of the free space "
        "where the temp files go (--dest's folder, else --temp-dir, else the system temp "
        "folder), at most the kernel's writeback threshold; measured at start)"
        .replace("%", "%%"),
    )
    parser.add_argument(
        "--file-stage-slots",
        type=positive_int,
        default=None,
        help=f"file stages running at once (default: the CPU count, {default_file_stage_slots()})",
    )
    parser.add_argument(
        "--download-order",
        choices=DOWNLOAD_ORDERS,
        default=None,
        help="admission (default): objects download in turn, each starting as the one "
        "before it reaches its tail, so an object's time depends on those ahead of it; "
        "pass: in turn, each starting once the one before has read all its bytes through "
        "its stream stages and early file stage; shared: every admitted object downloads "
        "at once",
    )
    parser.add_argument(
        "--reuse-connections",
        action="store_true",
        default=None,
        help="keep the connections of a download for the next one (faster streams of "
        "small objects; each object's time spreads more)",
    )
    if objects:
        parser.add_argument(
            "--max-objects",
            type=positive_int,
            default=None,
            help=f"objects in progress at once (default {defaults.max_objects})",
        )


def budget_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Config`` fields the budget flags set (those given)."""
    names = (
        "max_connections",
        "disk_budget",
        "file_stage_slots",
        "max_objects",
        "download_order",
        "reuse_connections",
    )
    settings = {name: getattr(args, name, None) for name in names}
    return {name: value for name, value in settings.items() if value is not None}


def add_many_arguments(run: argparse.ArgumentParser) -> None:
    """The sources and sinks of a many-object run, and the budgets."""
    run.add_argument(
        "--recursive",
        action="store_true",
        help="SOURCE is an S3 prefix (s3://bucket/prefix/): process every object under it",
    )
    run.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="with --recursive/--from: only keys matching one of these globs (repeatable)",
    )
    run.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip keys matching any of these globs (repeatable; an exclude wins)",
    )
    run.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="read sources from FILE, one a line ('-': stdin; blank lines, # comments skipped)",
    )
    run.add_argument("--results", metavar="FILE", help="append each report to FILE as a JSON line")
    run.add_argument(
        "--tag",
        action="store_true",
        help="tag each S3 object with its verdict (fastpipe-status, -stage, -xxh3, -etag)",
    )
    add_budget_arguments(run)


def is_many(args: argparse.Namespace) -> bool:
    """Whether ``fastpipe run`` processes many objects (several sources, a prefix, a list)."""
    return bool(args.recursive or args.from_file or len(args.sources) != 1)


def check_many(args: argparse.Namespace) -> None:
    """Refuse combinations that make no sense (a :class:`UsageError`)."""
    if args.recursive and len(args.sources) != 1:
        raise UsageError("--recursive takes one S3 prefix (s3://bucket/prefix/)")
    if args.recursive and args.from_file:
        raise UsageError("--recursive and --from exclude each other")
    if not args.sources and not args.from_file:
        raise UsageError("no source: give s3://bucket/key, a path, or --from FILE")
    if args.resume and is_many(args):
        raise UsageError("--resume applies to one object")


def make_sinks(args: argparse.Namespace, engine: Engine) -> list[Sink]:
    """The sinks the flags ask for: tags first (their failure shows in the lines after)."""
    from ._sinks import JsonLinesSink

    sinks: list[Sink] = []
    if args.tag:
        sinks.append(engine.tag_sink())
    if args.results:
        sinks.append(JsonLinesSink(args.results))
    return sinks


class Tally:
    """What the run came to: counts, bytes, the exit code."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.objects = self.passed = self.failed = self.errors = self.sink_errors = 0
        self.bytes = 0
        self.worst_error = 0

    def add(self, report: Report) -> None:
        self.objects += 1
        self.bytes += report.size or 0
        self.sink_errors += len(report.sink_errors)
        if report.passed:
            self.passed += 1
        elif report.failed_stage is not None or report.error_type is None:
            self.failed += 1
        else:
            self.errors += 1
            self.worst_error = max(self.worst_error, report.exit_code)

    @property
    def exit_code(self) -> int:
        """0 all passed; the highest error's code; else 1 when a stage failed."""
        if self.worst_error:
            return self.worst_error
        return 1 if self.failed else 0

    def line(self) -> str:
        seconds = time.perf_counter() - self.started
        rate = self.bytes / seconds / (1 << 30) if seconds > 0 else 0.0
        text = (
            f"objects {self.objects}, passed {self.passed}, failed {self.failed}, "
            f"errors {self.errors}, bytes {self.bytes} ({format_size(self.bytes)}), "
            f"seconds {seconds:.2f}, {rate:.3f} GiB/s"
        )
        return text + (f", sink errors {self.sink_errors}" if self.sink_errors else "")


def report_line(report: Report) -> str:
    """One line per finished object (control characters escaped)."""
    size = format_size(report.size) if report.size is not None else "?"
    text = (
        f"{'PASSED' if report.passed else 'FAILED'}  {report.source}  {size}  {report.seconds:.2f}s"
    )
    if report.failed_stage:
        text += f"  stage {report.failed_stage}: {report.error}"
    elif report.error:
        text += f"  {report.error_type}: {report.error}"
    for error in report.sink_errors:
        text += f"  (sink: {error})"
    return printable(text)


class ManyProgress(StatusLine):
    """One status line on a terminal: objects done/total, bytes, aggregate rate, and the
    objects in progress."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.started = time.monotonic()
        self.done = 0
        self.total: int | None = None
        self.bytes_finished = 0
        self.current: dict[str, int] = {}

    def for_object(self, source: str) -> Callable[[Progress], None]:
        """The progress callback of one object."""
        from ._source import parse_source

        try:
            source = str(parse_source(source))  # as its report will name it
        except UsageError:
            pass
        self.current[source] = 0

        def callback(event: Progress) -> None:
            if event.phase is not Phase.FILE:
                self.current[source] = event.bytes_done
            self.draw()

        return callback

    def finished(self, report: Report) -> None:
        self.current.pop(report.source, None)
        self.done += 1
        self.bytes_finished += report.download.bytes
        self.draw(force=True)

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        done_bytes = self.bytes_finished + sum(self.current.values())
        elapsed = max(now - self.started, 1e-9)
        total = "?" if self.total is None else str(self.total)
        names = ", ".join(s.rsplit("/", 1)[-1] for s in list(self.current)[:3])
        line = (
            f"{self.done}/{total} objects  {format_size(done_bytes)}  "
            f"{format_size(done_bytes / elapsed)}/s  {printable(names)}"
        )
        self._write(line)


async def _sources(
    args: argparse.Namespace, engine: Engine, emit: Callable[[Report], Any]
) -> AsyncIterator[str]:
    from . import _listing

    async def bad_line(text: str, exc: UsageError) -> None:
        await emit(Report(source=text, error=str(exc), error_type="UsageError"))

    if args.recursive:
        bucket, prefix = _listing.parse_prefix(args.sources[0])
        found: AsyncIterator[str] = engine.list_prefix(bucket, prefix)
    elif args.from_file:
        found = _listing.read_sources(args.from_file, bad_line)
    else:
        found = _listing.from_list(args.sources)
    if args.include or args.exclude:
        found = _listing.filtered(found, _listing.key_filter(args.include, args.exclude))
    async for source in found:
        yield source


async def _run(
    args: argparse.Namespace,
    stages: list[Stage] | None,
    config: Config,
    tally: Tally,
    bar: ManyProgress | None,
) -> None:
    from ._engine import Engine
    from ._many import write_sinks
    from ._sinks import JsonLinesSink

    async with Engine(config) as engine:
        sinks = make_sinks(args, engine)
        out: list[Sink] = [*sinks, JsonLinesSink(sys.stdout)] if args.json else sinks
        # Spec strings: engine.map builds a fresh stage list from them for each object.
        factory = None if stages is None else args.stage

        async def emit(report: Report) -> None:
            """A report made outside the engine (a malformed line): same way out."""
            await write_sinks(report, out)
            _shown(report, args, tally, bar)

        try:
            counted = _counted(_sources(args, engine, emit), bar)
            reports = engine.map(
                counted,
                factory,
                dest=args.dest,
                force=args.force,
                temp_dir=args.temp_dir,
                sinks=out,
                progress_for=None if bar is None else bar.for_object,
            )
            async for report in reports:
                _shown(report, args, tally, bar)
        finally:
            for sink in sinks:
                await sink.aclose()


async def _counted(sources: AsyncIterator[str], bar: ManyProgress | None) -> AsyncIterator[str]:
    count = 0
    async for source in sources:
        count += 1
        yield source
    if bar is not None:
        bar.total = count


def _shown(
    report: Report, args: argparse.Namespace, tally: Tally, bar: ManyProgress | None
) -> None:
    tally.add(report)
    if bar is not None:
        bar.finished(report)
    if not args.json:
        if bar is not None and bar._shown:
            bar.stream.write("\r\x1b[K")
        write_stdout(report_line(report))


def run_until_signal(work: Callable[[], Awaitable[None]], outcome: dict[str, Any]) -> None:
    """Run ``work`` in the event loop; SIGINT or SIGTERM cancels it and is put in
    ``outcome["signal"]`` (``fastpipe run``, one object or many)."""
    import anyio

    from ._groups import run_async

    async def main() -> None:
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        outcome["signal"] = signum
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_signals)
            try:
                await work()
            finally:
                tg.cancel_scope.cancel()

    run_async(main)


def cmd_run_many(args: argparse.Namespace, stages: list[Stage] | None, config: Config) -> int:
    """Run many objects; print each report as it ends and a summary; the exit code."""
    show_progress = not args.no_progress and not args.json and sys.stderr.isatty()
    bar = ManyProgress(sys.stderr) if show_progress else None
    tally = Tally()
    outcome: dict[str, Any] = {}

    async def work() -> None:
        from ._groups import unwrap_groups

        try:
            with unwrap_groups():  # an error of the sources (--from) comes out of map's group
                await _run(args, stages, config, tally, bar)
        except FastpipeError as exc:
            outcome["error"] = exc

    run_until_signal(work, outcome)
    if bar is not None:
        bar.close()
    summary = "fastpipe: " + tally.line()
    if args.json:
        print(summary, file=sys.stderr)
    else:
        write_stdout(tally.line())
    if "signal" in outcome:
        print("fastpipe: interrupted", file=sys.stderr)
        return EXIT_SIGINT if outcome["signal"] == signal.SIGINT else EXIT_SIGTERM
    if "error" in outcome:
        error: FastpipeError = outcome["error"]
        print(f"fastpipe: error: {printable(error)}", file=sys.stderr)
        return max(error.exit_code, tally.exit_code)
    return tally.exit_code


async def write_sinks(outcome: dict[str, Any], sinks: list[Sink]) -> None:
    """One object's report (or its error's) to the sinks, then close them."""
    from ._many import write_sinks as write

    error = outcome.get("error")
    report = outcome.get("report") or (error.report if error is not None else None)
    try:
        if report is not None and sinks:
            await write(report, sinks)
            for message in report.sink_errors:
                print(f"fastpipe: error: {printable(message)}", file=sys.stderr)
    finally:
        for sink in sinks:
            await sink.aclose()
