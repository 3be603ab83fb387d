"""``fastpipe worker`` and ``fastpipe enqueue``: the service commands (see :mod:`fastpipe.cli`).

Exit codes: 0 after a clean stop (``--once`` found the queue empty, or SIGTERM/SIGINT
drained), 2 usage, 3 the queue or S3 cannot be reached or is denied, 130/143 when a second
signal cut the drain short.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._config import Config
from ._console import positive_int, printable
from ._exceptions import FastpipeError, UsageError
from ._source import S3Location, parse_source

if TYPE_CHECKING:  # the worker and its sinks are imported when the command runs
    from ._sinks import Sink
    from ._worker import Worker

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_USAGE = 0, 2


def add_parsers(sub: Any) -> None:
    """Add ``worker`` and ``enqueue`` to the CLI's subcommands."""
    worker = sub.add_parser(
        "worker",
        help="process the objects that S3 events on an SQS queue announce",
        description="Take S3 event messages off an SQS queue and process each object; "
        "SIGTERM drains (in-flight objects finish within --drain-timeout), a second "
        "signal stops at once.",
    )
    worker.add_argument("--queue", required=True, help="SQS queue URL")
    worker.add_argument(
        "--stage", action="append", default=None, metavar="SPEC", help="as for run (repeatable)"
    )
    worker.add_argument("--dest", help="keep each object that passed in this folder")
    worker.add_argument("--temp-dir", help="parent of this worker's temp folder (default TMPDIR)")
    worker.add_argument("--results", help="append one JSON line per result to this file")
    worker.add_argument("--results-queue", help="send one message per result to this queue URL")
    worker.add_argument(
        "--tag",
        action="store_true",
        help="tag each object with its verdict (fastpipe-status, -stage, -etag); skip "
        "objects already tagged with a verdict for their ETag",
    )
    worker.add_argument(
        "--max-objects", type=positive_int, default=2, help="messages held at once (default 2)"
    )
    from ._many_cli import add_budget_arguments

    add_budget_arguments(worker, objects=False)  # the engine's budgets, as for run
    worker.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight objects get after SIGTERM (default 30)",
    )
    worker.add_argument(
        "--once", action="store_true", help="exit when a poll finds nothing and nothing runs"
    )
    worker.add_argument(
        "--wait-seconds", type=int, default=20, help="long-poll seconds, 0..20 (default 20)"
    )
    worker.add_argument(
        "--visibility-timeout",
        type=positive_int,
        default=None,
        help="seconds a heartbeat extends visibility by (default: the queue's own)",
    )
    worker.add_argument(
        "--max-attempts", type=positive_int, default=5, help="attempts per part (default 5)"
    )
    worker.add_argument("--metrics-port", type=int, default=None, help="serve /metrics here")
    worker.add_argument("--metrics-addr", default="127.0.0.1", help="default 127.0.0.1")
    _add_endpoints(worker)
    worker.add_argument("-v", "--verbose", action="count", default=0)
    worker.set_defaults(service="worker")

    enqueue = sub.add_parser(
        "enqueue",
        help="send S3 event messages for existing objects (a prefix, or --from FILE)",
    )
    enqueue.add_argument("prefix", nargs="?", help="s3://bucket/prefix/ to list")
    enqueue.add_argument("--queue", required=True, help="SQS queue URL")
    enqueue.add_argument(
        "--from",
        dest="from_file",
        help="one s3:// URI a line ('-': stdin); a bad line is reported and skipped (exit 2)",
    )
    _add_endpoints(enqueue)
    enqueue.add_argument("-v", "--verbose", action="count", default=0)
    enqueue.set_defaults(service="enqueue")


def _add_endpoints(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    parser.add_argument(
        "--sqs-endpoint-url", help="SQS endpoint (default: AWS_ENDPOINT_URL_SQS, or the queue's)"
    )
    parser.add_argument("--region", help="AWS region (default: the profile's, else us-east-1)")


def run_command(args: argparse.Namespace) -> int:
    """Run ``worker`` or ``enqueue``; return the exit code (the CLI has set up logging)."""
    try:
        if args.service == "worker":
            return _cmd_worker(args)
        return _cmd_enqueue(args)
    except FastpipeError as exc:
        print(f"fastpipe: error: {printable(exc)}", file=sys.stderr)
        return exc.exit_code


def _worker_sinks(args: argparse.Namespace) -> list[Sink]:
    """The result sinks that ``--results`` and ``--results-queue`` ask for."""
    from ._queue import Queue
    from ._sinks import JsonLinesSink
    from ._worker import QueueSink

    sinks: list[Sink] = []
    if args.results:
        sinks.append(JsonLinesSink(args.results))
    if args.results_queue:
        sinks.append(
            QueueSink(
                Queue(args.results_queue, endpoint_url=args.sqs_endpoint_url, region=args.region)
            )
        )
    return sinks


def _serve(worker: Worker, sinks: Sequence[Sink]) -> dict[str, Any]:
    """Run ``worker`` until it ends; the first SIGINT/SIGTERM drains, a second aborts."""
    import anyio

    from ._groups import run_async, unwrap_groups

    outcome: dict[str, Any] = {}

    async def watch_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if "signal" in outcome:
                    outcome["abort"] = signum
                    worker.abort()
                    return
                outcome["signal"] = signum
                logger.warning("%s: draining", signal.Signals(signum).name)
                worker.stop()

    async def main() -> None:
        with unwrap_groups():
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_signals)
                try:
                    outcome["stats"] = await worker.run()
                finally:
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        for sink in sinks:
                            await sink.aclose()

    run_async(main)
    return outcome


def _cmd_worker(args: argparse.Namespace) -> int:
    from ._metrics import WorkerMetrics
    from ._worker import Worker

    if not 0 <= args.wait_seconds <= 20:
        raise UsageError(f"--wait-seconds must be 0..20, got {args.wait_seconds}")
    from ._many_cli import budget_settings

    config = Config(
        endpoint_url=args.endpoint_url,
        region=args.region,
        max_attempts=args.max_attempts,
        **budget_settings(args),
    )
    sinks = _worker_sinks(args)
    metrics = WorkerMetrics()
    worker = Worker(
        args.queue,
        args.stage,
        config=config,
        dest=args.dest,
        temp_dir=args.temp_dir,
        sinks=sinks,
        max_objects=args.max_objects,
        drain_timeout=args.drain_timeout,
        once=args.once,
        wait_seconds=args.wait_seconds,
        visibility_timeout=args.visibility_timeout,
        sqs_endpoint_url=args.sqs_endpoint_url,
        region=args.region,
        metrics=metrics,
        results_file=args.results,
        tag=args.tag,
    )
    if args.metrics_port is not None:
        try:
            metrics.serve(args.metrics_port, args.metrics_addr)
        except OSError as exc:
            raise UsageError(
                f"--metrics-port {args.metrics_port}: {exc.strerror or exc}"
            ) from None
    try:
        outcome = _serve(worker, sinks)
    finally:
        metrics.close()
    if "abort" in outcome:
        print("fastpipe: worker stopped at once", file=sys.stderr)
        return 130 if outcome["abort"] == signal.SIGINT else 143
    stats = outcome.get("stats")
    if stats is not None:
        print(
            f"fastpipe worker: {stats.received} received, {stats.deleted} deleted, "
            f"{stats.released} released, {stats.skipped} skipped, {stats.left} left; "
            f"outcomes {json.dumps(stats.outcomes, sort_keys=True)}",
            file=sys.stderr,
        )
    return EXIT_OK


def _cmd_enqueue(args: argparse.Namespace) -> int:
    from ._groups import run_async

    if (args.prefix is None) == (args.from_file is None):
        raise UsageError("enqueue takes either s3://bucket/prefix/ or --from FILE")
    outcome = {"sent": 0, "bad": 0}

    async def main() -> None:
        await _enqueue(args, outcome)

    run_async(main)
    bad = f", {outcome['bad']} bad line(s) skipped" if outcome["bad"] else ""
    print(f"fastpipe enqueue: {outcome['sent']} message(s) sent{bad}", file=sys.stderr)
    return EXIT_USAGE if outcome["bad"] else EXIT_OK


async def _enqueue(args: argparse.Namespace, outcome: dict[str, int]) -> None:
    """Send the events in batches; count them (``sent``) and the skipped lines (``bad``)."""
    from ._events import s3_event
    from ._queue import MAX_RECEIVE, Queue

    async def bad_line(text: str, exc: UsageError) -> None:
        # As ``run --from``: the line is reported and skipped, the rest is sent.
        print(f"fastpipe: error: {printable(exc)}", file=sys.stderr)
        outcome["bad"] += 1

    async with Queue(args.queue, endpoint_url=args.sqs_endpoint_url, region=args.region) as queue:
        batch: list[str] = []
        async for event in _events_to_send(args, bad_line):
            batch.append(json.dumps(s3_event(**event)))
            if len(batch) == MAX_RECEIVE:
                await queue.send_batch(batch)
                outcome["sent"] += len(batch)
                batch = []
        if batch:
            await queue.send_batch(batch)
            outcome["sent"] += len(batch)


async def _events_to_send(
    args: argparse.Namespace, bad_line: Callable[[str, UsageError], Awaitable[None]]
) -> AsyncIterator[dict[str, Any]]:
    """The objects to announce: listed under the prefix, or read from --from."""
    if args.from_file is not None:
        from ._listing import read_sources

        async for text in read_sources(args.from_file, bad_line, s3_only=True):
            location = parse_source(text)
            assert isinstance(location, S3Location)  # read_sources passes S3 URIs only
            yield {"bucket": location.bucket, "key": location.key,
                   "version_id": location.version_id}
        return
    async for event in _list_prefix(args):
        yield event


async def _list_prefix(args: argparse.Namespace) -> AsyncIterator[dict[str, Any]]:
    from ._s3 import S3Control

    text = args.prefix
    if not text.lower().startswith("s3://"):
        raise UsageError(f"enqueue lists s3://bucket/prefix/, not {text!r}")
    bucket, _, prefix = text[5:].partition("/")
    if not bucket:
        raise UsageError(f"malformed S3 URI {text!r}: no bucket")
    control = S3Control(Config(endpoint_url=args.endpoint_url, region=args.region))
    try:
        async for item in control.list_objects(bucket, prefix):
            yield {
                "bucket": bucket,
                "key": item["Key"],
                "size": int(item.get("Size", 0)),
                "etag": str(item.get("ETag", "")).strip('"') or None,
            }
    finally:
        await control.close()
