"""Python code run in a fresh interpreter against this checkout's source: what a user's
first import loads, without the test process's modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_fresh(code: str, timeout: float = 120) -> str:
    """Run ``code`` with ``python -c`` (``PYTHONPATH``: this checkout's ``src``), check
    that it exited 0 (its stderr as the message), and return its stdout."""
    env = dict(os.environ, PYTHONPATH=REPO_SRC)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
