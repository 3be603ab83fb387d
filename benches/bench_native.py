"""Native kernels against their peers, in the same run.

    PYTHONPATH=src python -m pytest benches/bench_native.py -p no:cacheprovider \\
        --benchmark-columns=min,mean,max --benchmark-group-by=group

On a 256 MiB random buffer (``FASTPIPE_BENCH_SMALL=1``: 16 MiB, as CI runs it with
``--benchmark-disable``): FastCDC cut points on one thread against pyfastcdc's
``cut_buf``, two threads against one, on the random buffer and on a sparse one (a long
run of zeros between random stretches, out of phase with the threads' segments: the
worst case of the speculative parallel chunking); the scan against hashlib.md5, on the random buffer
and on text of the same size (ASCII lines, now and then a multi-byte character: the UTF-8
check stays on to the end); two threads each scanning a buffer against one thread
scanning both.
"""

from __future__ import annotations

import hashlib
import os
import random
import string
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from pyfastcdc import FastCDC

from fastpipe import cdc
from fastpipe._native import scan as native_scan

SIZE = (16 << 20) if os.environ.get("FASTPIPE_BENCH_SMALL") == "1" else (256 << 20)
AVG = 64 << 10
ROUNDS = 3


@pytest.fixture(scope="module")
def data() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture(scope="module")
def text() -> bytes:
    rng = random.Random(1)
    words = [
        "".join(rng.choices(string.ascii_lowercase, k=rng.randrange(1, 10))) for _ in range(2000)
    ]
    words += ["café", "€", "naïve", "𝄞"]
    chunk = bytearray()
    while len(chunk) < 1 << 20:
        chunk += (" ".join(rng.choices(words, k=rng.randrange(3, 15))) + "\n").encode()
    whole = bytes(chunk) * (SIZE // len(chunk) + 1)
    return whole[: whole.rfind(b"\n", 0, SIZE) + 1]


@pytest.fixture(scope="module")
def sparse() -> bytes:
    rng = random.Random(2)
    head = rng.randbytes(100_003)
    tail = rng.randbytes(SIZE // 8)
    return head + bytes(SIZE - len(head) - len(tail)) + tail


def run(benchmark: Any, fn: Any, *args: Any) -> Any:
    return benchmark.pedantic(fn, args=args, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def _pyfastcdc_ends(buf: bytes) -> list[int]:
    return [c.offset + c.length for c in FastCDC(AVG).cut_buf(buf)]


@pytest.mark.benchmark(group="cdc")
def test_cdc_fastpipe_threads1(benchmark: Any, data: bytes) -> None:
    ends = run(benchmark, lambda b: cdc.cut_points(b, avg_size=AVG, threads=1), data)
    assert ends[-1] == len(data)


@pytest.mark.benchmark(group="cdc")
def test_cdc_pyfastcdc_cut_buf(benchmark: Any, data: bytes) -> None:
    ends = run(benchmark, _pyfastcdc_ends, data)
    assert ends[-1] == len(data)


@pytest.mark.benchmark(group="cdc")
def test_cdc_fastpipe_threads2(benchmark: Any, data: bytes) -> None:
    ends = run(benchmark, lambda b: cdc.cut_points(b, avg_size=AVG, threads=2), data)
    assert ends[-1] == len(data)


@pytest.mark.benchmark(group="cdc-sparse")
def test_cdc_sparse_fastpipe_threads1(benchmark: Any, sparse: bytes) -> None:
    ends = run(benchmark, lambda b: cdc.cut_points(b, avg_size=AVG, threads=1), sparse)
    assert ends[-1] == len(sparse)


@pytest.mark.benchmark(group="cdc-sparse")
def test_cdc_sparse_pyfastcdc_cut_buf(benchmark: Any, sparse: bytes) -> None:
    ends = run(benchmark, _pyfastcdc_ends, sparse)
    assert ends[-1] == len(sparse)


@pytest.mark.benchmark(group="cdc-sparse")
def test_cdc_sparse_fastpipe_threads2(benchmark: Any, sparse: bytes) -> None:
    ends = run(benchmark, lambda b: cdc.cut_points(b, avg_size=AVG, threads=2), sparse)
    assert ends[-1] == len(sparse)


def _scan(buf: Any) -> dict[str, Any]:
    scanner = native_scan.Scanner()
    scanner.update(buf)
    return scanner.result()  # type: ignore[no-any-return]


@pytest.mark.benchmark(group="scan")
def test_scan_native(benchmark: Any, data: bytes) -> None:
    result = run(benchmark, _scan, data)
    assert sum(result["histogram"]) == len(data)


@pytest.mark.benchmark(group="scan")
def test_scan_peer_md5(benchmark: Any, data: bytes) -> None:
    run(benchmark, lambda b: hashlib.md5(b).digest(), data)


@pytest.mark.benchmark(group="scan-text")
def test_scan_native_text(benchmark: Any, text: bytes) -> None:
    result = run(benchmark, _scan, text)
    assert result["utf8_valid"] and result["lines"] == text.count(b"\n")


@pytest.mark.benchmark(group="scan-text")
def test_scan_peer_md5_text(benchmark: Any, text: bytes) -> None:
    run(benchmark, lambda b: hashlib.md5(b).digest(), text)


def _scan_halves_one_thread(buf: bytes) -> list[dict[str, Any]]:
    view = memoryview(buf)
    half = len(buf) // 2
    return [_scan(view[:half]), _scan(view[half:])]


def _scan_halves_two_threads(buf: bytes) -> list[dict[str, Any]]:
    view = memoryview(buf)
    half = len(buf) // 2
    with ThreadPoolExecutor(2) as ex:
        return list(ex.map(_scan, [view[:half], view[half:]]))


@pytest.mark.benchmark(group="scan-threads")
def test_scan_two_buffers_one_thread(benchmark: Any, data: bytes) -> None:
    results = run(benchmark, _scan_halves_one_thread, data)
    assert len(results) == 2


@pytest.mark.benchmark(group="scan-threads")
def test_scan_two_buffers_two_threads(benchmark: Any, data: bytes) -> None:
    results = run(benchmark, _scan_halves_two_threads, data)
    assert results == _scan_halves_one_thread(data)
