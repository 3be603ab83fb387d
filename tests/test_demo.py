"""`fastpipe demo` (what `make demo` runs) works end to end on its own local S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


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


def test_demo_leaves_the_environment_as_it_was(capsys: Any) -> None:
    """The demo exports its server's settings while it runs, and restores them."""
    from fastpipe.tools.demo import run_demo

    before = dict(os.environ)
    assert run_demo(8 << 20, as_json=True) == 0
    assert dict(os.environ) == before
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is True and report["exit_code"] == 0
