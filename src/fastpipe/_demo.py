"""``fastpipe demo``: the main job on an embedded local S3 server, no AWS account needed."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

from ._config import Config, format_size
from ._console import printable
from ._engine import Engine, run_async
from ._exceptions import FastpipeError
from ._locals3 import LocalS3
from ._report import Report

DEMO_BUCKET = "fastpipe-demo"
DEMO_KEY = "samples/sample.bin"
UPLOAD_PART = 16 << 20


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


async def upload_file(client: Any, path: str, bucket: str, key: str) -> None:
    """Upload ``path`` with a multipart upload (single PUT below one part)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= UPLOAD_PART:
            await client.put_object(Bucket=bucket, Key=key, Body=f.read())
            return
        upload = await client.create_multipart_upload(Bucket=bucket, Key=key)
        parts = []
        number = 1
        while chunk := f.read(UPLOAD_PART):
            part = await client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number, Body=chunk
            )
            parts.append({"PartNumber": number, "ETag": part["ETag"]})
            number += 1
        await client.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload["UploadId"],
            MultipartUpload={"Parts": parts},
        )


def demo_stage_specs() -> list[str]:
    """Every built-in that needs no argument, in pipeline order (trivial -> heavy)."""
    from .stages import builtin_stages

    available = builtin_stages()
    order = ["limits:min_size=1", "checksum", "verify", "scan", "chunk"]
    return [spec for spec in order if spec.split(":")[0] in available]


def run_demo(size: int, as_json: bool = False) -> int:
    """Start the local S3, upload a sample of ``size`` bytes, process it, print the report."""
    from .cli import _summary
    from .stages import parse_spec

    specs = demo_stage_specs()
    say = (lambda *a: None) if as_json else print
    with LocalS3() as server, tempfile.TemporaryDirectory(prefix="fastpipe-demo-") as tmp:
        say(f"local S3 (SeaweedFS) at {server.endpoint_url}")
        os.environ.update(server.client_env())
        sample = os.path.join(tmp, "sample.bin")
        write_sample(sample, size)
        config = Config(endpoint_url=server.endpoint_url)

        async def main() -> Report:
            async with Engine(config) as engine:
                client = await engine._s3.client()
                await client.create_bucket(Bucket=DEMO_BUCKET)
                started = time.perf_counter()
                await upload_file(client, sample, DEMO_BUCKET, DEMO_KEY)
                say(
                    f"uploaded s3://{DEMO_BUCKET}/{DEMO_KEY} ({format_size(size)}) in "
                    f"{time.perf_counter() - started:.1f}s"
                )
                say(f"stages: {' -> '.join(specs)}")
                stages = [parse_spec(s) for s in specs]
                return await engine.process(f"s3://{DEMO_BUCKET}/{DEMO_KEY}", stages)

        try:
            report: Report = run_async(main)
        except FastpipeError as exc:
            report = getattr(exc, "report", None) or Report(
                source=f"s3://{DEMO_BUCKET}/{DEMO_KEY}",
                error=str(exc),
                error_type=type(exc).__name__,
            )
            print(f"fastpipe demo: error: {printable(exc)}", file=sys.stderr)
            if not as_json:
                return int(exc.exit_code)
        if as_json:
            data = report.to_dict()
            data["exit_code"] = report.exit_code
            print(json.dumps(data, default=str))
        else:
            print(_summary(report))
        return report.exit_code
