"""``fastpipe demo``: the main job on an embedded local S3 server, no AWS account needed."""

from __future__ import annotations

import os
import sys
import tempfile
import time

from .. import Config, FastpipeError, run
from .._console import format_size, printable, report_json, summary, write_stdout
from .locals3 import LocalS3
from .s3 import upload_file

DEMO_BUCKET = "fastpipe-demo"
DEMO_KEY = "samples/sample.bin"


def write_sample(path: str, size: int, seed: int = 7) -> None:
    """Write a sample object: random blocks, text, zeros and repeated blocks.

    Written in 4 MiB pieces so that memory stays flat; the repeats give the chunk stage
    duplicates to find.
    """
    import random

    rng = random.Random(seed)
    piece = 4 << 20
    repeated = rng.randbytes(piece)
    text = b"".join(b"line %d of the demo object\n" % i for i in range(200_000))[:piece]
    with open(path, "wb") as f:
        written = 0
        i = 0
        while written < size:
            kind = i % 8
            if kind == 3:
                block = repeated
            elif kind == 5:
                block = text
            elif kind == 7:
                block = bytes(piece // 64) + rng.randbytes(piece - piece // 64)
            else:
                block = rng.randbytes(piece)
            block = block[: size - written]
            f.write(block)
            written += len(block)
            i += 1


def demo_stage_specs() -> list[str]:
    """Every built-in that needs no argument, in pipeline order (trivial -> heavy)."""
    from ..stages import builtin_stages

    available = builtin_stages()
    order = ["limits:min_size=1", "checksum", "verify", "scan", "chunk"]
    return [spec for spec in order if spec.split(":")[0] in available]


def run_demo(size: int, as_json: bool = False) -> int:
    """Start the local S3, upload a sample of ``size`` bytes, process it, print the report.

    The server's credentials are in ``os.environ`` only while the demo runs (restored
    after); the endpoint is passed in the engine's :class:`Config`.
    """
    from ..stages import parse_spec

    specs = demo_stage_specs()
    uri = f"s3://{DEMO_BUCKET}/{DEMO_KEY}"

    def say(text: str) -> None:
        if not as_json:  # with --json stdout holds the report alone
            write_stdout(text)

    with (
        LocalS3() as server,
        server.exported_env(),
        tempfile.TemporaryDirectory(prefix="fastpipe-demo-") as tmp,
    ):
        say(f"local S3 (SeaweedFS) at {server.endpoint_url}")
        sample = os.path.join(tmp, "sample.bin")
        write_sample(sample, size)
        client = server.client()
        try:
            client.create_bucket(Bucket=DEMO_BUCKET)
            started = time.perf_counter()
            upload_file(client, sample, DEMO_BUCKET, DEMO_KEY)
        finally:
            client.close()
        say(f"uploaded {uri} ({format_size(size)}) in {time.perf_counter() - started:.1f}s")
        say(f"stages: {' -> '.join(specs)}")
        try:
            report = run(
                uri,
                [parse_spec(s) for s in specs],
                config=Config(endpoint_url=server.endpoint_url),
            )
        except FastpipeError as exc:
            print(f"fastpipe demo: error: {printable(exc)}", file=sys.stderr)
            report = exc.report_for(uri)
            if not as_json:
                return int(exc.exit_code)
    write_stdout(report_json(report) if as_json else summary(report))
    return report.exit_code
