"""The ``fastpipe`` command line: a thin shell over the library.

Exit codes: 0 all stages passed, 1 a stage failed, 2 usage error (bad arguments,
unusable destination), 3 source missing, denied or unreachable (or retries exhausted),
4 integrity error (object changed mid-download, short body), 5 local I/O error (disk
full), 6 object larger than the disk budget, 130 interrupted (SIGINT), 143 terminated
(SIGTERM). Many objects: 0 all passed, else the highest error's code, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import __version__, _many_cli, _worker_cli
from ._config import DOWNLOAD_ORDERS, Config
from ._console import (
    ProgressBar,
    StdoutFailed,
    positive_int,
    printable,
    report_json,
    size_arg,
    summary,
    write_stdout,
)
from ._exceptions import FastpipeError, UsageError
from ._report import Report
from ._source import S3Location, parse_source

if TYPE_CHECKING:
    from .stages import Stage

EXIT_OK, EXIT_STAGE, EXIT_USAGE, EXIT_SOURCE, EXIT_INTEGRITY, EXIT_LOCAL_IO = 0, 1, 2, 3, 4, 5
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class _UsageExit(SystemExit):
    """argparse refused the command line; ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_USAGE)
        self.message = message


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 too; keep our wording
        self.print_usage(sys.stderr)
        print(f"fastpipe: error: {printable(message)}", file=sys.stderr)
        raise _UsageExit(message)


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether ``--json`` (or a prefix argparse accepts) is among the options."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return any(len(a) >= 3 and "--json".startswith(a) for a in options if a.startswith("--j"))


def _source_for_report(source: str | None) -> str | None:
    """The report's ``source``: as the engine writes it when ``source`` parses."""
    if source is None:
        return None
    try:
        return str(parse_source(source))
    except UsageError:
        return source


def _error_json(source: str | None, message: str, error_type: str, code: int) -> str:
    """A JSON report for a run that never produced one (usage error, interrupt)."""
    data = Report(source="", error=message, error_type=error_type).to_dict()
    data["source"] = _source_for_report(source)
    data["exit_code"] = code
    return json.dumps(data, default=str)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _ArgumentParser(
        prog="fastpipe",
        description="Process large S3 objects in one pass: download once, check while the "
        "bytes arrive, run the heavy stage on the local file.",
        epilog="Exit codes: 0 passed, 1 a stage failed, 2 usage, 3 source missing/denied/"
        "unreachable, 4 integrity, 5 local I/O, 6 over the disk budget, 130 SIGINT, 143 "
        "SIGTERM. Many objects: 0 all passed, else the highest error's code, else 1.",
    )
    parser.add_argument("--version", action="version", version=f"fastpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)

    run = sub.add_parser(
        "run", help="process objects (s3://bucket/key, local paths, a prefix, a list)"
    )
    run.add_argument("sources", nargs="*", metavar="SOURCE", help="s3://bucket/key or a path")
    run.add_argument("--dest", help="keep the object here (a file path or a folder)")
    run.add_argument(
        "-v", "--verbose", action="count", default=0, help="log to stderr: -v INFO, -vv DEBUG"
    )
    run.add_argument(
        "--stage",
        action="append",
        default=None,
        metavar="SPEC",
        help="name or name:key=value,... (repeatable; default: checksum)",
    )
    run.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    run.add_argument("--region", help="S3 region (default: the AWS profile's, else us-east-1)")
    run.add_argument("--part-size", type=size_arg, default=8 << 20, help="e.g. 8MiB")
    run.add_argument(
        "--concurrency", type=positive_int, default=16, help="ranged GETs in flight (default 16)"
    )
    run.add_argument("--max-attempts", type=positive_int, default=5)
    run.add_argument("--data-plane", choices=["auto", "raw", "botocore"], default="auto")
    run.add_argument(
        "--control-plane",
        choices=["auto", "botocore"],
        default="auto",
        help="HEAD and signing: auto (without botocore when the setup is simple) or botocore",
    )
    run.add_argument("--no-verify-tls", action="store_true", help="do not verify TLS certificates")
    run.add_argument("--force", action="store_true", help="replace an existing destination")
    run.add_argument(
        "--temp-dir", help="folder of the temp file when there is no --dest (default: TMPDIR)"
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="with --dest: keep a journal so that an interrupted run continues where it stopped",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON on stdout (many objects: one JSON line each)",
    )
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar on stderr (there is none when stderr is not a terminal)",
    )

    _many_cli.add_many_arguments(run)

    sub.add_parser("stages", help="list the built-in stages and their options")

    _add_tool_parsers(sub)
    _worker_cli.add_parsers(sub)  # worker, enqueue
    return parser


def _add_tool_parsers(sub: Any) -> None:
    """``demo`` and ``bench``: their code lives in :mod:`fastpipe.tools`, imported only
    when one of them runs (``fastpipe run`` never loads it); ``calibrate`` and
    ``estimate`` in :mod:`fastpipe._calibrate`."""
    demo = sub.add_parser("demo", help="run the main job on an embedded local S3 server")
    demo.add_argument(
        "what", nargs="?", choices=["service"], help="service: workers on a local SQS queue"
    )
    demo.add_argument(
        "--size", type=size_arg, default=None, help="default 256MiB (service: largest, 32MiB)"
    )
    demo.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    demo.set_defaults(tool="demo")

    bench = sub.add_parser(
        "bench",
        help="time fastpipe against sequential, three-services and peer tools by size",
        description=(
            "Upload objects of each size and time checksum + scan + chunk done by fastpipe "
            "in one pass, sequentially, and as three services, plus download-only and "
            "chunk-only peers. Writes DIR/results.json and DIR/time_vs_size.png."
        ),
    )
    bench.add_argument(
        "--sizes", type=_sizes, default=None, help="comma-separated (default 64MiB,256MiB,1GiB)"
    )
    bench.add_argument("--repeat", type=positive_int, default=3, help="runs per variant (median)")
    bench.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first (default 1)")
    bench.add_argument(
        "--endpoint-url", help="use this S3 endpoint (credentials from the environment)"
    )
    bench.add_argument("--bucket", help="bucket for the objects (default fastpipe-bench)")
    bench.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    bench.add_argument(
        "--variants",
        type=_names,
        default=None,
        help="comma-separated subset of: fastpipe, sequential, three-services, "
        "fastpipe-download, fastpipe-library, s5cmd, boto3, local-stages, fastpipe-chunk, "
        "pyfastcdc",
    )
    bench.add_argument("--no-low-entropy", action="store_true", help="skip the low-entropy object")
    bench.add_argument(
        "--many",
        action="store_true",
        help="only the many-objects case: 16 x 64MiB through one engine vs one 1GiB object",
    )
    bench.add_argument(
        "--workers",
        action="store_true",
        help="only the service case: 1 then 2 `fastpipe worker` processes on a local SQS "
        "queue over --objects objects of --object-size (checksum + scan + chunk)",
    )
    bench.add_argument(
        "--objects", type=positive_int, default=32, help="--workers: objects (default 32)"
    )
    bench.add_argument(
        "--object-size", type=size_arg, default=64 << 20, help="--workers: default 64MiB"
    )
    bench.add_argument(
        "--predictability",
        action="store_true",
        help="instead: the time model's prediction errors and the spread of the end-to-end "
        "time (library path, one engine; use --repeat 10)",
    )
    bench.add_argument(
        "--in-flight",
        type=positive_int,
        default=1,
        help="--predictability: objects at once through the engine (default 1)",
    )
    bench.add_argument(
        "--download-order",
        choices=DOWNLOAD_ORDERS,
        default="admission",
        help="--predictability, --many: the engine's download order (default admission)",
    )
    bench.add_argument(
        "--reuse-connections",
        action="store_true",
        help="--predictability, --many: Config.reuse_connections on",
    )
    bench.add_argument(
        "--disk-budget",
        type=size_arg,
        default=None,
        help="--predictability: Config.disk_budget (default: the engine's rule)",
    )
    bench.add_argument(
        "--predict-warmup", type=int, default=3, help="unrecorded objects first (default 3)"
    )
    bench.add_argument(
        "--link-rate",
        type=_link_rates,
        default=None,
        metavar="RATE[,RATE...]",
        help="shape the embedded server's traffic on lo to this rate with tc (root): e.g. "
        "2.4Gbit, 800Mbit; a list such as unlimited,2.4Gbit,800Mbit runs each in turn "
        "(--predictability: one rate; default unlimited)",
    )
    bench.set_defaults(tool="bench")

    from ._calibrate import add_parsers  # the time model: calibrate, estimate

    add_parsers(sub, size_arg)


def _sizes(text: str) -> list[int]:
    return [size_arg(part) for part in text.split(",") if part.strip()]


def _link_rates(text: str) -> list[int | None]:
    from .tools.shaping import parse_rates  # only when --link-rate is given

    try:
        return parse_rates(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _cmd_stages() -> int:
    from .stages import builtin_stages
    from .stages._registry import COMMON_OPTIONS

    lines = []
    for name, (cls, options, about) in sorted(builtin_stages().items()):
        lines.append(f"{name} ({cls.kind}): {about}")
        lines.extend(f"    {key:14} {option.help}" for key, option in sorted(options.items()))
    lines.append("\nevery stage also takes:")
    lines.extend(f"    {key:14} {option.help}" for key, option in sorted(COMMON_OPTIONS.items()))
    write_stdout("\n".join(lines))
    return EXIT_OK


def _print_report(report: Report, as_json: bool, code: int | None = None) -> None:
    """The report on stdout: one JSON object (with the exit code) or the summary."""
    if as_json:
        write_stdout(report_json(report, code))
    else:
        write_stdout(summary(report))


def _error(message: object) -> None:
    """One ``fastpipe: error:`` line on stderr, control characters escaped."""
    print(f"fastpipe: error: {printable(message)}", file=sys.stderr)


def _run_setup(args: argparse.Namespace) -> tuple[list[Stage] | None, Config] | int:
    """The stages and the config of ``fastpipe run``, or the usage exit code (said why)."""
    from .stages import parse_spec

    try:
        stages = [parse_spec(spec) for spec in args.stage] if args.stage else None
        config = Config(
            part_size=args.part_size,
            max_concurrency=args.concurrency,
            max_attempts=args.max_attempts,
            endpoint_url=args.endpoint_url,
            region=args.region,
            verify_tls=not args.no_verify_tls,
            data_plane=args.data_plane,
            control_plane=args.control_plane,
            **_many_cli.budget_settings(args),
        )
        _many_cli.check_many(args)
    except UsageError as exc:
        if args.json:
            write_stdout(_error_json(args.source, str(exc), type(exc).__name__, EXIT_USAGE))
        _error(exc)
        return EXIT_USAGE
    return stages, config


def _cmd_run(args: argparse.Namespace) -> int:
    from ._engine import Engine

    _log_to_stderr(args.verbose)
    args.source = args.sources[0] if len(args.sources) == 1 else None
    setup = _run_setup(args)
    if isinstance(setup, int):
        return setup
    stages, config = setup
    if _many_cli.is_many(args):
        _import_botocore_without_crt(args.sources[0] if args.sources else "s3://")
        return _many_cli.cmd_run_many(args, stages, config)
    show_progress = not args.no_progress and not args.json and sys.stderr.isatty()
    bar = ProgressBar(sys.stderr) if show_progress else None
    outcome: dict[str, Any] = {}

    async def work() -> None:
        async with Engine(config) as engine:
            sinks = _many_cli.make_sinks(args, engine)
            try:
                # Placement is per call, validated by the library (a UsageError, exit 2).
                outcome["report"] = await engine.process(
                    args.source,
                    stages,
                    args.dest,
                    bar,
                    force=args.force,
                    resume=args.resume,
                    temp_dir=args.temp_dir,
                )
            except FastpipeError as exc:
                outcome["error"] = exc
            await _many_cli.write_sinks(outcome, sinks)

    if not _light_serves(config, args.source):
        _import_botocore_without_crt(args.source)
    _many_cli.run_until_signal(work, outcome)
    if bar is not None:
        bar.close()
    return _run_outcome(args, outcome)


def _run_outcome(args: argparse.Namespace, outcome: dict[str, Any]) -> int:
    """Print what ``fastpipe run`` came to (report, error or signal); its exit code."""
    if "signal" in outcome:
        return _interrupted(args, outcome["signal"])
    if "error" in outcome:
        error: FastpipeError = outcome["error"]
        failed: Report = error.report or Report(
            source=_source_for_report(args.source) or args.source,
            error=str(error),
            error_type=type(error).__name__,
        )
        _error(error)
        if args.json:
            _print_report(failed, True, error.exit_code)
        return error.exit_code
    report: Report = outcome["report"]
    _print_report(report, args.json)
    if not report.passed and not args.json:
        print(f"fastpipe: {printable(report.error)}", file=sys.stderr)
    return report.exit_code


def _light_serves(config: Config, source: str) -> bool:
    """True when the light control plane will HEAD and sign ``source``: no botocore."""
    from ._lightsetup import light_setup, plain_bucket

    try:
        location = parse_source(source)  # as the engine reads it (S3:// too)
        if not isinstance(location, S3Location) or not plain_bucket(location.bucket):
            return False
        return light_setup(config)[0] is not None
    except FastpipeError:
        return False  # a bad URI or AWS_ENDPOINT_URL: the engine says so in its own words


def _import_botocore_without_crt(source: str) -> None:
    """Import botocore so that it does not load awscrt (about 40 ms of a 0.35 s run).

    botocore imports awscrt whenever it is installed, and then signs with it; without it,
    it signs SigV4 in Python, the same headers. fastpipe installs awscrt for the verify
    stage (CRC64NVME), which imports it itself when it needs it. Only the CLI does this:
    its process is its own, while a library caller may want botocore's CRT elsewhere. ARN
    buckets (access points, Outposts) may need SigV4a, which only the CRT signs: they keep
    it.
    """
    if not source.startswith("s3://") or source.startswith("s3://arn:"):
        return  # a local file needs no botocore; an ARN may need the CRT
    if "botocore.compat" in sys.modules or "awscrt" in sys.modules:
        return
    sys.modules["awscrt"] = None  # type: ignore[assignment]  # `import awscrt` fails
    try:
        import botocore.compat  # noqa: F401  (reads HAS_CRT once, at its import)
    except ImportError:
        pass  # no botocore: the engine says so in its own words
    finally:
        if "awscrt" in sys.modules and sys.modules["awscrt"] is None:
            del sys.modules["awscrt"]  # the verify stage may import it later


def _interrupted(args: argparse.Namespace, signum: int) -> int:
    """Say that a signal stopped the run (and print its JSON report with ``--json``)."""
    code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
    name = signal.Signals(signum).name
    if getattr(args, "json", False):
        source = getattr(args, "source", None)
        write_stdout(_error_json(source, f"interrupted by {name}", "Interrupted", code))
    print("fastpipe: interrupted", file=sys.stderr)
    return code


def _log_to_stderr(verbosity: int) -> None:
    """fastpipe's warnings go to stderr; with -v its INFO lines too, with -vv DEBUG."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    if verbosity <= 0:
        handler.setFormatter(logging.Formatter("fastpipe: %(levelname)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("fastpipe: %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("fastpipe")
    logger.addHandler(handler)
    levels = {0: logging.WARNING, 1: logging.INFO}
    logger.setLevel(levels.get(verbosity, logging.DEBUG))


def _cmd_tool(args: argparse.Namespace) -> int:
    """``demo``, ``bench``: the tools are imported here, not before."""
    if args.tool == "demo" and args.what == "service":
        from .tools.demo_service import run_demo_service

        return run_demo_service(args.size or 32 << 20)
    if args.tool == "demo":
        from .tools.demo import run_demo

        return run_demo(args.size or 256 << 20, as_json=args.json)
    if getattr(args, "workers", False):
        from .tools.bench_workers import cmd_bench_workers

        return cmd_bench_workers(args)
    from .tools import bench

    return bench.cmd_bench(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastpipe`` console script; returns the exit code.

    With ``--json`` stdout holds exactly one JSON report whatever happens (a usage error,
    an interrupt), unless stdout itself cannot be written.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except _UsageExit as exc:
            if _wants_json(argv):
                write_stdout(_error_json(None, exc.message, "UsageError", EXIT_USAGE))
            return EXIT_USAGE
        except SystemExit as exc:  # --help, --version
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        return _dispatch(args)
    except KeyboardInterrupt:
        try:
            return _interrupted(args or argparse.Namespace(json=_wants_json(argv)), signal.SIGINT)
        except StdoutFailed:
            return EXIT_SIGINT
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_OK
    except StdoutFailed as exc:
        _drop_stdout()
        _error(exc)
        return EXIT_LOCAL_IO


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is left cannot fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _cmd_run(args)
    if args.command == "stages":
        return _cmd_stages()
    if args.command in ("calibrate", "estimate"):
        from ._calibrate import run_command

        return run_command(args)
    if args.command in ("demo", "bench"):
        return _cmd_tool(args)
    if args.command in ("worker", "enqueue"):
        _log_to_stderr(args.verbose)
        return _worker_cli.run_command(args)
    raise AssertionError(args.command)


def entry() -> None:
    """The console script: run :func:`main`, then leave without interpreter teardown.

    Finalizing the modules botocore and aiohttp load took about 0.1 s of a 0.5 s run on a
    small object; every file is closed and renamed by then, so only the streams need a
    flush. ``main`` itself returns normally, for callers that embed it.
    """
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    except OSError as exc:
        _error(f"cannot write to stdout: {exc.strerror or exc}")
        code = code or EXIT_LOCAL_IO
    try:
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(code)


if __name__ == "__main__":
    entry()
