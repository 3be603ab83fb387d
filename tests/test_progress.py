"""Progress events at milestones of the bytes, besides the timer (real SeaweedFS)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import fastpipe
from fastpipe import Config, Progress
from fastpipe._progress import PROGRESS_EVERY, STEPS, Milestones
from fastpipe.stages import Checksum

KiB = 1024
MiB = 1024 * KiB


def _milestones(total: int, base: int = 0) -> list[int]:
    """Every count at which the milestones of ``total`` bytes (``base`` in) fall due."""
    m, seen = Milestones(total, base), []
    while m.next != Milestones.never().next:
        seen.append(m.next)
        m.next = m._after(m.next)  # as crossed() does, without a reporter to wake
    return seen


def test_milestone_arithmetic() -> None:
    """Each twentieth of the object, at or just past it; none at the end (the phase's
    own last event is there); a resumed download's bytes already in count."""
    assert _milestones(1000) == list(range(50, 1000, 50))
    assert _milestones(1001) == [-(-k * 1001 // STEPS) for k in range(1, STEPS)]
    assert _milestones(1000, base=420) == [c - 420 for c in range(450, 1000, 50)]
    assert _milestones(10) == list(range(1, 10))  # fewer bytes than steps: each byte
    assert _milestones(1) == [] and _milestones(0) == []
    assert _milestones(1000, base=1000) == []
    m = Milestones(1000)
    m.crossed(730)  # one buffer crossed several milestones: one event, the next above
    assert m.next == 750


def _download_events(events: list[Progress]) -> list[Progress]:
    download = [e for e in events if e.phase == "download"]
    done = [e.bytes_done for e in download]
    assert done == sorted(done), "bytes_done must not go back"
    assert events[: len(download)] == download, "download events come first"
    return download


def _bound(download: list[Progress]) -> int:
    """The most download events an object may get: the first and the last, one per
    milestone, and the timer's (one per PROGRESS_EVERY at most)."""
    return 2 + (STEPS - 1) + int(download[-1].seconds / PROGRESS_EVERY) + 1


def _at_each_milestone(events: list[Progress], size: int, buffer: int) -> list[Progress]:
    """The first event at or past each milestone, checked to hold less than one buffer
    past it (the event is sent at the crossing)."""
    firsts = []
    for k in range(1, STEPS):
        point = -(-k * size // STEPS)
        first = next(e for e in events if e.bytes_done >= point)
        assert first.bytes_done < point + buffer, (k, first.bytes_done)
        firsts.append(first)
    return firsts


def test_download_events_at_each_milestone(put_object: Any) -> None:
    """A small object (eight parts, 64 KiB receive buffers) gets an event at or just past
    each 5% of its bytes: sent from the sink at the crossing, less than a buffer past it."""
    size = 4 * MiB + 123
    uri = put_object(os.urandom(size))
    buffer, connections = 64 * KiB, 2
    config = Config(part_size=512 * KiB, receive_buffer=buffer, max_concurrency=connections)
    events: list[Progress] = []
    report = fastpipe.run(uri, stages=[Checksum()], config=config, progress=events.append)
    assert report.passed and report.download.parts == 9
    download = _download_events(events)
    assert download[-1].bytes_done == size
    assert len(download) <= _bound(download)
    for first in _at_each_milestone(download, size, buffer):
        assert first.eta_seconds is not None


@pytest.mark.parametrize("size", [0, 1])
def test_tiny_objects_get_few_events(put_object: Any, size: int) -> None:
    uri = put_object(b"x" * size)
    events: list[Progress] = []
    report = fastpipe.run(uri, stages=[Checksum()], progress=events.append)
    assert report.passed
    download = _download_events(events)
    assert download and download[-1].bytes_done == size == download[-1].total
    # the first, at most one milestone (the byte is all of them), the last; the timer's
    assert len(download) <= 3 + int(download[-1].seconds / PROGRESS_EVERY)


def test_local_file_events_at_each_milestone(tmp_path: Path) -> None:
    """A local file: the stream reader sends the event at its crossing (it waits for it),
    so the event holds the bytes read there, within one stream buffer."""
    size = 4 * MiB + 5
    path = tmp_path / "local.bin"
    path.write_bytes(os.urandom(size))
    buffer = 64 * KiB
    events: list[Progress] = []
    config = Config(stream_buffer=buffer)
    report = fastpipe.run(str(path), stages=[Checksum()], config=config, progress=events.append)
    assert report.passed
    stream = [e for e in events if e.phase == "stream"]
    assert [e.bytes_done for e in stream] == sorted(e.bytes_done for e in stream)
    assert stream[-1].bytes_done == size
    assert len(stream) <= _bound(stream)
    _at_each_milestone(stream, size, buffer)


def test_a_callback_that_raises_at_a_milestone_fails_the_call(put_object: Any) -> None:
    """The event at a crossing is sent from the fetchers' sink, but the callback's error
    is the call's, as at the timer's events (not a broken connection to retry)."""
    uri = put_object(os.urandom(2 * MiB))

    def callback(event: Progress) -> None:
        if event.bytes_done > 0:
            raise ValueError(f"no thanks at {event.bytes_done}")

    config = Config(part_size=256 * KiB, receive_buffer=64 * KiB)
    with pytest.raises(ValueError, match="no thanks"):
        fastpipe.run(uri, stages=[Checksum()], config=config, progress=callback)
