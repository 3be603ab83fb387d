"""Splitting a slow part: a connection with nothing left takes half of another's bytes.

The watermark's segments are checked against a plain model (a bytearray of written
flags) on random and edge-case sizes; the fetcher's split against a real SeaweedFS behind
the fault proxy, which holds one part's GET while the others finish.
"""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

import pytest
from faultproxy import Fault, FaultProxy

import fastpipe
from fastpipe import Config
from fastpipe._fetch import SPLIT_LEAST
from fastpipe._file import Watermark
from fastpipe.stages import Checksum


class Reference:
    """What a watermark must say, from the bytes written alone."""

    def __init__(self, size: int, part_size: int) -> None:
        self.written = bytearray(size)
        self.part_size = part_size

    def write(self, start: int, nbytes: int) -> None:
        for i in range(start, start + nbytes):
            assert not self.written[i], "a byte written twice"
            self.written[i] = 1

    def value(self) -> int:
        index = self.written.find(0)
        return len(self.written) if index < 0 else index

    def completed(self) -> frozenset[int]:
        size, part = len(self.written), self.part_size
        parts = -(-size // part) if size else 0
        return frozenset(
            i for i in range(parts) if all(self.written[i * part : min(size, (i + 1) * part)])
        )


def _check(wm: Watermark, ref: Reference) -> None:
    assert wm.value == ref.value()
    assert wm.completed_parts() == ref.completed()
    ranges = sorted(wm.segment_range(s) for s in range(wm.segments))
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False)), (
        "segments tile the object"
    )
    if ranges:
        assert ranges[0][0] == 0 and ranges[-1][1] == wm.size


def _drive(size: int, part_size: int, least: int, seed: int) -> None:
    """Random writes and splits until every byte is in, checked at every step."""
    rng = random.Random(seed)
    wm, ref = Watermark(size, part_size), Reference(size, part_size)
    _check(wm, ref)
    for _ in range(100_000):
        open_segments = [s for s in range(wm.segments) if wm.left(s) > 0]
        if not open_segments:
            break
        seg = rng.choice(open_segments)
        if rng.random() < 0.25:
            before = wm.segments
            half = wm.split(seg, least)
            if half is None:
                assert wm.segments == before and wm.left(seg) < 2 * max(1, least)
            else:
                assert wm.left(half) >= least and wm.left(seg) >= least
        else:
            start, _ = wm.segment_range(seg)
            nbytes = rng.randint(1, wm.left(seg))
            ref.write(start + wm.done[seg], nbytes)
            wm.advance(seg, nbytes)
        _check(wm, ref)
    assert wm.value == size
    assert wm.completed_parts() == frozenset(range(wm.parts))


SIZES = [0, 1, 2, 7, 8, 9, 15, 16, 17, 64, 100]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("least", [1, 2, 3])
def test_segments_match_the_reference_on_edge_sizes(size: int, least: int) -> None:
    for seed in range(20):
        _drive(size, 8, least, seed)


def test_segments_match_the_reference_on_random_sizes() -> None:
    rng = random.Random(7)
    for seed in range(40):
        part = rng.choice([1, 3, 4096, 65536, 65537, 200_000])
        size = rng.randint(0, 6 * part)
        _drive(size, part, rng.choice([1, 1000, 65536]), seed)


def test_split_halves_the_bytes_left_on_an_aligned_boundary() -> None:
    part = 8 << 20
    wm = Watermark(2 * part, part)
    wm.advance(0, 1000)
    half = wm.split(0, 1 << 20)
    assert half == 2
    start, end = wm.segment_range(half)
    assert (start % (64 << 10), end) == (0, part)
    assert wm.segment_range(0) == (0, start)
    assert abs(start - (1000 + (part - 1000) // 2)) < 64 << 10
    assert wm.completed_parts() == frozenset()
    # Bytes of the half do not move the watermark past the head's gap.
    wm.advance(half, end - start)
    assert wm.value == 1000 and wm.completed_parts() == frozenset()
    wm.advance(0, start - 1000)
    assert wm.value == part and wm.completed_parts() == frozenset({0})


def test_split_refuses_a_segment_too_short_to_halve() -> None:
    wm = Watermark(100, 100)
    assert wm.split(0, 51) is None
    assert wm.split(0, 50) is not None


def test_a_reader_waiting_past_a_split_is_woken_in_byte_order() -> None:
    wm = Watermark(200, 100)
    half = wm.split(0, 10)
    assert half is not None
    start, end = wm.segment_range(half)
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.append(wm.wait(0, 150, timeout=30)))
    reader.start()
    wm.advance(1, 100)  # part 1, then the half: nothing contiguous yet
    wm.advance(half, end - start)
    assert wm.value == 0
    wm.advance(0, start)
    reader.join(30)
    assert seen == [200]


# -- the fetcher, on a real server ------------------------------------------------------


PART = 8 << 20


def _hold_part_zero(n: int, request: Any) -> Fault | None:
    """Hold the first GET of part 0 (whose range starts at byte 0)."""
    if request.range is not None and request.range[0] == 0 and n < 4:
        return Fault("hold")
    return None


def _gets_inside_part_zero(proxy: FaultProxy) -> list[tuple[int, int]]:
    """Ranges of the GETs answered that start inside part 0 (split halves)."""
    return [
        r.range
        for r in proxy.gets()
        if r.range is not None and 0 < r.range[0] < PART and r.answered_at
    ]


@pytest.mark.parametrize("plane", ["raw", "botocore"])
def test_a_held_part_is_split_and_its_cut_get_loses_nothing(
    proxy: FaultProxy, put_object: Any, plane: str, tmp_path: Any
) -> None:
    data = os.urandom(4 * PART)
    uri = put_object(data)
    proxy.reset(_hold_part_zero)
    outcome: dict[str, Any] = {}
    dest = tmp_path / "out.bin"

    def work() -> None:
        config = Config(endpoint_url=proxy.url, part_size=PART, max_concurrency=4, data_plane=plane)
        outcome["report"] = fastpipe.run(uri, [Checksum()], dest=str(dest), config=config)

    thread = threading.Thread(target=work)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        # The other parts finish; on the raw plane their connections split part 0 (8 MiB
        # left: halves of 4, then of its first 4, 2 and 2; the last connection finds no
        # segment that halves into SPLIT_LEAST or more).
        want = 2 if plane == "raw" else 0
        while time.monotonic() < deadline:
            done = sum(1 for r in proxy.gets() if r.range and r.range[0] >= PART and r.answered_at)
            if done >= 3 and len(_gets_inside_part_zero(proxy)) >= want:
                break
            time.sleep(0.02)
        assert proxy.held() == 1
    finally:
        proxy.release()
        thread.join(60)
    report = outcome["report"]
    assert report.passed
    assert dest.read_bytes() == data
    halves = _gets_inside_part_zero(proxy)
    if plane == "raw":
        assert report.download.splits == len(halves) >= 2
        # Every half at least SPLIT_LEAST long, and the held GET asked for all of part 0
        # (it was cut at its segment's end once released).
        assert all(last + 1 - first >= SPLIT_LEAST for first, last in halves)
        held = [r for r in proxy.gets() if r.fault is not None and r.fault.kind == "hold"]
        assert [r.range for r in held] == [(0, PART - 1)]
    else:
        assert report.download.splits == 0 and halves == []
