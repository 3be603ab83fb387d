"""`fastpipe demo service` works end to end on its own local S3 and SQS."""

from __future__ import annotations

import subprocess
import sys


def test_demo_service_gives_every_object_its_verdict() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastpipe.cli", "demo", "service", "--size", "1MiB"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "every object got its verdict" in out
    assert out.count(" passed ") == 12
    assert "failed (scan)  incoming/zeros.bin" in out
    assert "dead-letter queue: 1 message(s): 'a message that is not an S3 event'" in out
    assert 'fastpipe_objects_total{outcome="passed"} 12' in out
