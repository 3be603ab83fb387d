"""The control plane's start-up: a plain botocore client, built without a collector pass.

Each check runs a real ``fastpipe.run`` against the SeaweedFS fixture in a fresh process,
since what it guards (which modules load, the collector's state) is per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run_in_fresh_process(uri: str, before: str, after: str) -> list[str]:
    """Run ``fastpipe.run(uri)`` (checksum stage, botocore's control plane) between two
    snippets; return stdout lines."""
    code = (
        "import sys, gc, fastpipe\n"
        "from fastpipe.stages import Checksum\n"
        f"{before}\n"
        "config = fastpipe.Config(control_plane='botocore')\n"
        f"report = fastpipe.run({uri!r}, [Checksum()], config=config)\n"
        "assert report.passed, report.error\n"
        f"{after}\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_SRC)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_s3_run_loads_no_aiohttp(put_object: Any) -> None:
    """HEAD and presigning go through botocore's own client: aiobotocore and aiohttp
    (about 0.1 s of imports and client set-up) load only for the fallback data plane."""
    uri = put_object(os.urandom(64 << 10))
    lines = _run_in_fresh_process(
        uri,
        "",
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'aiobotocore')))\n"
        "print('botocore' in sys.modules)",
    )
    assert lines[-2:] == ["[]", "True"]


def test_client_creation_leaves_the_collector_as_found(put_object: Any) -> None:
    """The collector is paused while the client is built, and left as it was: enabled when
    it was enabled, disabled when the caller had disabled it."""
    uri = put_object(os.urandom(4096))
    assert _run_in_fresh_process(uri, "", "print(gc.isenabled())")[-1] == "True"
    assert _run_in_fresh_process(uri, "gc.disable()", "print(gc.isenabled())")[-1] == "False"
