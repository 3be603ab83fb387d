"""``fastpipe bench`` against a given endpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fastpipe.tools.locals3 import LocalS3


def test_bench_endpoint_url_uses_the_default_bucket(s3_server: LocalS3, tmp_path: Path) -> None:
    # --bucket has a default: --endpoint-url alone must not demand it.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastpipe.cli",
            "bench",
            "--endpoint-url",
            s3_server.endpoint_url,
            "--sizes",
            "64KiB",
            "--repeat",
            "1",
            "--warmup",
            "0",
            "--variants",
            "fastpipe",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert "needs --bucket" not in out.stderr
    assert out.returncode == 0, out.stderr
    assert "fastpipe" in out.stdout
