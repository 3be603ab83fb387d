"""This machine's stage rates, measured in memory (``fastpipe calibrate``), and the model
on the command line (``fastpipe estimate``).

Calibration runs each built-in stage's ``update`` (stream stages) or ``run`` (file stages,
through a 0600 temp file) over random and text data, a few seconds in all and no S3, and
stores the rates (bytes/s) in the time model's state file. The download rate cannot be
measured without S3: it stays built-in until the engine has downloaded an object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ._config import Config, format_size
from ._exceptions import FastpipeError, LocalIOError, UsageError
from ._model import Load, TimeModel, stage_costs
from ._objectinfo import ObjectInfo

if TYPE_CHECKING:  # the CLI builds its parser from here: the stages load only when used
    from .stages._base import FileStage, Stage, StreamStage

DEFAULT_SIZE = 64 << 20
#: Bytes per ``update`` call, as the engine's stream buffer.
STEP = 1 << 20
#: Words of the text data set (a few of them non-ASCII, so that UTF-8 checks do work).
_TEXT = (
    "the of and to in is was for on that with as by at from his her it an were are which "
    "this be or has had not but also its first new one after two their who they been over "
    "into time year city school world state number part between système größe café naïve"
)
_WORDS = _TEXT.split()


def text_data(size: int, seed: int = 0) -> bytes:
    """``size`` bytes of UTF-8 lines of words (a 64 KiB block of random lines, repeated)."""
    rng = random.Random(seed)
    lines = []
    length = 0
    while length < min(size, 64 << 10):
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 16))) + "\n"
        lines.append(line)
        length += len(line.encode())
    block = "".join(lines).encode()
    return (block * (size // len(block) + 1))[:size]


def _stream_cases(size: int) -> Iterator[tuple[Callable[[], StreamStage], ObjectInfo]]:
    """Built-in stream stages with the objects that make each of their cost keys."""
    from .stages.checksum import ALGORITHMS, Checksum
    from .stages.limits import Limits
    from .stages.scan import Scan
    from .stages.verify import Verify, new_digest

    plain = ObjectInfo("calibrate", size)
    for algo in ALGORITHMS:
        yield (lambda a=algo: Checksum(a)), plain  # type: ignore[misc]
    yield Scan, plain
    yield Limits, plain
    for name in ("CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256"):
        if new_digest(name) is not None:
            info = ObjectInfo("calibrate", size, checksums={name: "AAAAAA=="})
            yield (lambda: Verify(etag=False)), info
    yield Verify, ObjectInfo("calibrate", size, etag="0" * 32)
    part = max(size // 8, 64 << 10)
    parts = math.ceil(size / part)
    if parts >= 2:
        info = ObjectInfo(
            "calibrate",
            size,
            etag=f"{'0' * 32}-{parts}",
            parts_count=parts,
            multipart_part_size=part,
        )
        yield Verify, info


def _time_stream(stage: StreamStage, info: ObjectInfo, data: memoryview) -> float:
    started = time.perf_counter()
    stage.start(info)
    for offset in range(0, len(data), STEP):
        stage.update(data[offset : offset + STEP])
    with contextlib.suppress(Exception):  # a mismatch is expected: the values are made up
        stage.finish()
    return time.perf_counter() - started


def _time_file(stage: FileStage, path: str, info: ObjectInfo) -> float:
    from .stages._base import LocalFile

    started = time.perf_counter()
    stage.run(LocalFile(path=path, size=info.size, info=info))
    return time.perf_counter() - started


def measure(
    size: int = DEFAULT_SIZE,
    *,
    temp_dir: str | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Rates (bytes/s by cost key) of the built-in stages on ``size`` bytes of random data
    and ``size`` bytes of text (total bytes over total seconds of both)."""
    from .stages.chunk import Chunk

    datasets = [os.urandom(size), text_data(size)]
    seconds: dict[str, float] = {}
    for data in datasets:
        view = memoryview(data)
        for make, info in _stream_cases(size):
            stage = make()
            key = stage.cost_key(info)
            seconds[key] = seconds.get(key, 0.0) + _time_stream(stage, info, view)
        fd, path = tempfile.mkstemp(prefix=".fastpipe-calibrate.", dir=temp_dir)  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            info = ObjectInfo("calibrate", size, local_path=path)
            for file_stage in (Chunk(),):
                key = file_stage.cost_key(info)
                seconds[key] = seconds.get(key, 0.0) + _time_file(file_stage, path, info)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
    rates = {key: len(datasets) * size / s for key, s in seconds.items() if s > 0}
    if say is not None:
        for key, rate in sorted(rates.items()):
            say(f"  {key:22} {format_size(rate)}/s")
    return rates


def calibrate(
    path: str | None = None, size: int = DEFAULT_SIZE, *, temp_dir: str | None = None
) -> TimeModel:
    """Measure this machine's stage rates and store them in the model at ``path``
    (default ``Config().model_path``'s place), keeping what it learned."""
    path = path or Config().resolved_model_path()
    model = TimeModel.load(path) if path else TimeModel()
    model.calibrated = measure(size, temp_dir=temp_dir)
    if path:
        model.save(path)
    return model


# -- the command line (wired in cli.py) -----------------------------------------------------


def add_parsers(sub: Any, size_arg: Callable[[str], int]) -> None:
    """``calibrate`` and ``estimate``."""
    cal = sub.add_parser(
        "calibrate",
        help="measure this machine's stage rates (in memory, a few seconds) for the time model",
    )
    cal.add_argument("--size", type=size_arg, default=DEFAULT_SIZE, help="bytes per data set")
    cal.add_argument("--model", help="state file (default $XDG_CACHE_HOME/fastpipe/model.json)")
    cal.add_argument("--json", action="store_true", help="print the rates as JSON")
    cal.set_defaults(model_cmd="calibrate")
    est = sub.add_parser(
        "estimate", help="predict the end-to-end seconds for an object of SIZE (the time model)"
    )
    est.add_argument("size", type=size_arg, help="object size, e.g. 10GiB")
    est.add_argument(
        "--stage", action="append", default=None, metavar="SPEC", help="as for run (repeatable)"
    )
    est.add_argument("--model", help="state file (default $XDG_CACHE_HOME/fastpipe/model.json)")
    est.add_argument("--in-flight", type=int, default=1, help="objects processed at once")
    est.add_argument("--local", action="store_true", help="a local file: no download")
    est.add_argument("--json", action="store_true", help="print the prediction as JSON")
    est.set_defaults(model_cmd="estimate")


def run_command(args: argparse.Namespace) -> int:
    """Run ``calibrate`` or ``estimate``; the exit code (2 for a bad stage spec, 5 when the
    state file cannot be written)."""
    try:
        return _run(args)
    except FastpipeError as exc:
        print(f"fastpipe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"fastpipe: error: cannot write the time model: {exc}", file=sys.stderr)
        return LocalIOError.exit_code


def _run(args: argparse.Namespace) -> int:
    path = args.model or Config().resolved_model_path()
    if args.model_cmd == "calibrate":
        if not args.json:
            print(f"measuring stage rates on {format_size(args.size)} of random and text data")
        model = calibrate(path, args.size)
        if args.json:
            print(json.dumps({"model_path": path, "calibrated": model.calibrated}, indent=1))
        else:
            for key, rate in sorted(model.calibrated.items()):
                print(f"  {key:22} {format_size(rate)}/s")
            print(f"saved: {path}")
        return 0
    return _estimate(args, path)


def _estimate(args: argparse.Namespace, path: str | None) -> int:
    from ._engine import default_stages
    from .stages import parse_spec

    if args.in_flight < 1:
        raise UsageError("--in-flight must be at least 1")
    stages: Sequence[Stage] = (
        [parse_spec(spec) for spec in args.stage] if args.stage else default_stages()
    )
    model = TimeModel.load(path) if path else TimeModel()
    prediction = model.predict(
        args.size,
        stage_costs(stages),
        download_key=None if args.local else "download:raw",
        load=Load.shared(args.in_flight),
    )
    if args.json:
        print(json.dumps(dict(prediction.describe(), size=args.size, model_path=path), indent=1))
        return 0
    print(
        f"{format_size(args.size)}: about {prediction.seconds:.1f} s end to end "
        f"(model: {prediction.source}, {prediction.objects} objects learned; {path})"
    )
    print(f"  fixed {prediction.fixed:.2f} s", end="")
    if prediction.download_rate is not None:
        r = prediction.download_rate
        print(f", download {prediction.download:.2f} s at {format_size(r.rate)}/s ({r.source})")
    else:
        print(", local file")
    for cost, rate in zip(prediction.stages, prediction.rates, strict=True):
        where = "early" if cost.early else cost.kind
        print(
            f"  {cost.key:22} {where:6} {format_size(rate.rate)}/s ({rate.source}"
            f"{f', {rate.objects} objects' if rate.objects else ''})"
        )
    print(
        f"  pass {max(prediction.stream, prediction.early):.2f} s (bound: {prediction.bound}), "
        f"tail {prediction.tail:.2f} s"
    )
    if prediction.size_line is not None:
        line = prediction.size_line
        print(
            f"  alone: {line.objects} lone objects of these stages lie on "
            f"{line.intercept:.2f} s + {line.seconds_per_gib:.2f} s/GiB, which gives the "
            "prediction (the ETA runs on the phases above)"
        )
    if prediction.source == "builtin":
        print("  built-in rates: run `fastpipe calibrate` for this machine's")
    return 0
