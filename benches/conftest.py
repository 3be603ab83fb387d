"""Fixtures of the benches: one embedded S3 server (SeaweedFS) and one object per session.

Object size: ``FASTPIPE_BENCH_SIZE`` (default 1GiB); ``FASTPIPE_BENCH_SMALL=1`` makes it
8 MiB and one round, which is how CI runs the suites (``--benchmark-disable``) so that they
cannot rot. ``FASTPIPE_BENCH_ROUNDS`` sets the rounds of a timed run (default 3).

The files are named ``bench_*.py``; :func:`pytest_collect_file` collects them when
``pytest benches`` is given the folder, whatever ``python_files`` says. At the end of a
timed session the median of each benchmark is printed as a ratio to fastpipe's in the
same group (never asserted: wall-clock thresholds do not belong in a test).
"""

from __future__ import annotations

import fnmatch
import os
import resource
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastpipe import Config, parse_size
from fastpipe._console import format_size
from fastpipe.tools.bench import remove_and_sync, upload_targets, write_random
from fastpipe.tools.locals3 import LocalS3

SMALL = os.environ.get("FASTPIPE_BENCH_SMALL") == "1"
SIZE = (8 << 20) if SMALL else parse_size(os.environ.get("FASTPIPE_BENCH_SIZE", "1GiB"))
ROUNDS = 1 if SMALL else int(os.environ.get("FASTPIPE_BENCH_ROUNDS", "3"))
BUCKET = "fastpipe-benches"


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Collect ``bench_*.py`` under this folder (unless pytest does already)."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None  # a file named on the command line is collected by pytest itself
    patterns = parent.config.getini("python_files")
    if any(fnmatch.fnmatch(file_path.name, pattern) for pattern in patterns):
        return None  # the ini's python_files covers it: do not collect it twice
    return pytest.Module.from_parent(parent, path=file_path)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class BenchObject:
    """A random object on the session's server, and a local file with the same bytes."""

    bucket: str
    key: str
    size: int
    local: str
    endpoint_url: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def config(self) -> Config:
        return Config(endpoint_url=self.endpoint_url)


@pytest.fixture(scope="session")
def local_s3() -> Iterator[LocalS3]:
    """A SeaweedFS server on free loopback ports; its env is exported for the session."""
    with LocalS3() as server, server.exported_env():
        yield server


@pytest.fixture(scope="session")
def bench_bucket(local_s3: LocalS3) -> str:
    upload_targets(local_s3.endpoint_url, BUCKET, [])
    return BUCKET


@pytest.fixture(scope="session")
def bench_object(
    local_s3: LocalS3, bench_bucket: str, tmp_path_factory: pytest.TempPathFactory
) -> BenchObject:
    """``SIZE`` random bytes (no duplicates for the chunker), uploaded multipart."""
    local = str(tmp_path_factory.mktemp("bench-object") / f"random-{SIZE}.bin")
    write_random(local, SIZE)
    key = f"benches/random-{SIZE}.bin"
    upload_targets(local_s3.endpoint_url, bench_bucket, [(local, key)], False)
    return BenchObject(bench_bucket, key, SIZE, local, local_s3.endpoint_url)


@pytest.fixture
def dest_file(tmp_path: Path) -> Iterator[str]:
    """A download destination, removed (and its writeback flushed) around every round."""
    path = str(tmp_path / "download.bin")
    yield path
    remove_and_sync(path)


# -- medians, printed as ratios at the end ------------------------------------------------

#: group -> {benchmark name: median seconds}; the baseline of each group is in _BASELINE.
_MEDIANS: dict[str, dict[str, float]] = {}
#: group -> {benchmark name: median CPU seconds (this process and its children)}.
_CPU: dict[str, dict[str, float]] = {}
_BASELINE: dict[str, str] = {}


def _cpu_seconds() -> float:
    """User + system CPU of this process and of its waited-for children so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.fixture
def bench(benchmark: Any, request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``bench(fn, setup=..., baseline=False)``: ``benchmark.pedantic`` over ``ROUNDS``
    rounds of one call each, keeping the median for the closing ratio table."""

    def run(
        fn: Callable[[], Any], setup: Callable[[], None] | None = None, baseline: bool = False
    ) -> Any:
        cpu: list[float] = []

        def timed() -> Any:
            # CPU is sampled around the call only: setup (delete + sync) is not counted.
            before = _cpu_seconds()
            try:
                return fn()
            finally:
                cpu.append(_cpu_seconds() - before)

        result = benchmark.pedantic(
            timed, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=0
        )
        group = benchmark.group or "default"
        name = request.node.name
        if baseline:
            _BASELINE[group] = name
        if not benchmark.disabled and benchmark.stats is not None:
            _MEDIANS.setdefault(group, {})[name] = benchmark.stats.stats.median
            _CPU.setdefault(group, {})[name] = statistics.median(cpu)
        return result

    return run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _MEDIANS:
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"median ratios to fastpipe ({format_size(SIZE)} object)")
    for group, medians in sorted(_MEDIANS.items()):
        base_name = _BASELINE.get(group)
        base = medians.get(base_name) if base_name else None
        cpu = _CPU.get(group, {})
        base_cpu = cpu.get(base_name) if base_name else None
        write(f"{group}:  (wall, ratio; CPU of client process + children, ratio)")
        for name, median in sorted(medians.items(), key=lambda item: item[1]):
            ratio = f"{median / base:6.2f}x" if base else "     -"
            used = cpu.get(name)
            cpu_ratio = f"{used / base_cpu:6.2f}x" if used is not None and base_cpu else "     -"
            cpu_text = f"{used:8.3f} s" if used is not None else "       -"
            write(f"  {name:40} {median:8.3f} s  {ratio}   {cpu_text}  {cpu_ratio}")
