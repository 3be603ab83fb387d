"""`fastpipe demo` (what `make demo` runs) works end to end on its own local S3."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_runs_every_builtin_and_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "demo", "--size", "48MiB", "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert report["size"] == 48 << 20
    names = [s["name"] for s in report["stages"]]
    assert names == ["limits", "checksum", "verify", "scan", "chunk"]
    verify = report["stages"][2]["result"]
    assert verify["method"] == "etag-multipart-md5"  # the demo uploads in 16 MiB parts
    assert report["stages"][4]["result"]["duplicate_bytes"] > 0  # the sample repeats blocks
