"""The scan kernel: native against its plain-Python twin, numpy and Python's UTF-8 decoder."""

from __future__ import annotations

import math
import mmap
import os
import random
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from fastpipe import StageFailed, UsageError
from fastpipe._native import _scan, _scan_py
from fastpipe.stages import scan as scan_stage  # noqa: F401 - registers "scan"
from fastpipe.stages._base import ObjectInfo
from fastpipe.stages._registry import parse_spec
from fastpipe.stages.scan import Scan

IMPLS = [_scan.Scanner, _scan_py.Scanner]


def scan(
    impl: Any, data: bytes, pieces: list[int] | None = None, block_size: int = 1 << 20
) -> dict[str, Any]:
    scanner = impl(block_size)
    pos = 0
    for cut in pieces or []:
        scanner.update(data[pos:cut])
        pos = cut
    scanner.update(data[pos:])
    result: dict[str, Any] = scanner.result()
    return result


def first_invalid(data: bytes) -> int | None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return None


def sample(kind: str, n: int, rng: random.Random) -> bytes:
    if kind == "random":
        return rng.randbytes(n)
    if kind == "zeros":
        return bytes(n)
    if kind == "runs":  # low entropy: runs of a few values, some long
        out = bytearray()
        while len(out) < n:
            out += bytes([rng.choice(b"\x00\xffa\n")]) * rng.choice((1, 2, 3, 9, 17, 300))
        return bytes(out[:n])
    if kind == "text":
        chars = "abc \n\té€𝄞ü\u07ff\uffff"
        return "".join(rng.choice(chars) for _ in range(n)).encode()[:n]
    raise AssertionError(kind)


KINDS = ["random", "zeros", "runs", "text"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 1000, 4099])
def test_native_matches_twin(kind: str, n: int) -> None:
    rng = random.Random(n * 31 + len(kind))
    data = sample(kind, n, rng)
    pieces = sorted(rng.randrange(n + 1) for _ in range(5))
    for block_size in (1, 64, 1000, 1 << 20):
        expected = scan(_scan_py.Scanner, data, pieces, block_size)
        assert scan(_scan.Scanner, data, pieces, block_size) == expected
        assert scan(_scan.Scanner, data, None, block_size) == expected


def test_every_split_point_joins_runs_and_sequences() -> None:
    data = "aa€€€𝄞\x00\x00\x00bb\n".encode() + b"\xf0\x9f\x98" + b"ccc"
    whole = scan(_scan_py.Scanner, data)
    assert whole["first_invalid_utf8"] == first_invalid(data)
    for impl in IMPLS:
        for i in range(len(data) + 1):
            for j in range(i, len(data) + 1, 3):
                assert scan(impl, data, [i, j], block_size=5) == scan(
                    _scan_py.Scanner, data, None, block_size=5
                )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"plain ascii\n",
        "é€𝄞\U0010ffff\ud7ff\ue000".encode(),
        b"\x80",  # lone continuation byte
        b"a\xc0\x80",  # overlong NUL
        b"\xc1\xbf",  # overlong 2-byte
        b"\xe0\x80\x80",  # overlong 3-byte
        b"\xe0\x9f\xbf",  # overlong 3-byte, top
        b"\xf0\x80\x80\x80",  # overlong 4-byte
        b"\xf0\x8f\xbf\xbf",  # overlong 4-byte, top
        b"ok\xed\xa0\x80",  # surrogate U+D800
        b"\xed\xbf\xbf",  # surrogate U+DFFF
        b"\xf4\x90\x80\x80",  # U+110000
        b"\xf5\x80\x80\x80",  # lead above F4
        b"\xff",
        b"abc\xe2\x82",  # truncated at the end
        b"abc\xf0\x9f\x98",  # truncated at the end
        b"\xe2\x82a",  # truncated in the middle
        b"\xc3",  # truncated, alone
        b"x\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xa9",  # stray continuation after valid
        b"12345678\xe2\x82\xac" * 3 + b"\xe2\x28\xa1",
    ],
)
def test_utf8_edges_match_python(data: bytes) -> None:
    expected = first_invalid(data)
    for impl in IMPLS:
        for pieces in ([], [1], [len(data) // 2], [1, 2, 3]):
            pieces = [min(p, len(data)) for p in pieces]
            result = scan(impl, data, pieces)
            assert result["first_invalid_utf8"] == expected, (impl, pieces)
            assert result["utf8_valid"] is (expected is None)


def test_utf8_fuzz_against_python_decoder() -> None:
    rng = random.Random(7)
    alphabet = ["a", "\n", "é", "€", "𝄞", "\U0010ffff"]
    bad = [b"\x80", b"\xc0", b"\xed\xa0", b"\xf4\x90", b"\xe2\x82", b"\xff", b"\xf0\x9f\x98"]
    for trial in range(300):
        parts = [rng.choice(alphabet).encode() for _ in range(rng.randrange(1, 40))]
        if trial % 3:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(bad))
        data = b"".join(parts)
        split = sorted(rng.randrange(len(data) + 1) for _ in range(2))
        assert scan(_scan.Scanner, data, split)["first_invalid_utf8"] == first_invalid(data)
        if trial % 10 == 0:
            assert scan(_scan_py.Scanner, data, split)["first_invalid_utf8"] == first_invalid(data)


def test_large_valid_text_with_late_error() -> None:
    text = ("line of text é€𝄞\n" * 200_000).encode()
    data = text + b"\xed\xa0\x80" + b"tail"
    result = scan(_scan.Scanner, data, [len(text) - 1, len(text) + 1])
    assert result["first_invalid_utf8"] == len(text)
    assert result["lines"] == 200_000


def test_runs_of_every_length_at_every_alignment() -> None:
    # the word loops see a run as a first, inner or last part of an 8-byte word
    for length in range(1, 20):
        for lead in range(17):
            data = bytes(range(1, lead + 1)) + b"z" * length + bytes(range(40, 60))
            expected = scan(_scan_py.Scanner, data)
            assert expected["longest_run"]["length"] == max(length, 1)
            assert scan(_scan.Scanner, data) == expected
            assert scan(_scan.Scanner, data, [lead + length // 2]) == expected
            # two runs of one length: the earlier one is reported
            twice = data + b"q" * length
            assert scan(_scan.Scanner, twice) == scan(_scan_py.Scanner, twice)


def test_utf8_sequences_at_every_alignment() -> None:
    chars = ["é", "€", "\ud7ff", "\ue000", "𝄞", "\U0010ffff", "\u07ff", "\uffff"]
    bad = [
        b"\x80",
        b"\xc0\x80",
        b"\xe0\x9f\xbf",
        b"\xed\xa0\x80",
        b"\xf0\x8f\xbf\xbf",
        b"\xf4\x90\x80\x80",
        b"\xf5",
        b"\xe2\x82a",
        b"\xf0\x9f\x98",
    ]
    for lead in range(17):
        for char in chars:
            good = b"a" * lead + (char * 5).encode() + b"x" * 9
            assert scan(_scan.Scanner, good)["utf8_valid"] is True
            for tail in bad:
                data = good[: lead + 4] + tail + good[lead + 4 :]
                expected = first_invalid(data)
                for pieces in ([], [lead + 1], [lead + 4, lead + 5]):
                    assert scan(_scan.Scanner, data, pieces)["first_invalid_utf8"] == expected


def test_fold_of_the_32_bit_counts() -> None:
    # a small fold limit makes the kernel fold its 32-bit counts every few bytes, as it does
    # every 4 GiB of a block
    rng = random.Random(11)
    old = _scan._set_fold_limit(7)
    try:
        for kind in KINDS:
            data = sample(kind, 3000, rng)
            pieces = sorted(rng.randrange(3001) for _ in range(4))
            for block_size in (5, 64, 1 << 20):
                expected = scan(_scan_py.Scanner, data, pieces, block_size)
                for limit in (1, 7, 8, 64):
                    _scan._set_fold_limit(limit)
                    assert scan(_scan.Scanner, data, pieces, block_size) == expected
    finally:
        _scan._set_fold_limit(old)
    assert old == 2**32 - 1
    with pytest.raises(ValueError):
        _scan._set_fold_limit(0)
    with pytest.raises(ValueError):
        _scan._set_fold_limit(2**32)


def test_large_text_against_python() -> None:
    # mostly ASCII with multi-byte characters across word boundaries; numpy and Python's
    # decoder as oracles, on sizes the twin is too slow for
    rng = random.Random(5)
    words = ["alpha", "beta", "gg", "é", "€uro", "𝄞", "\U0010ffff", "a\u07ff", "  "]
    text = "".join(rng.choice(words) + rng.choice(" \n") for _ in range(200_000)).encode()
    arr = np.frombuffer(text, dtype=np.uint8)
    for data, cut in ((text, len(text) // 3), (text + b"\xc3", 12345)):
        result = scan(_scan.Scanner, data, [cut, cut + 7])
        assert result["first_invalid_utf8"] == first_invalid(data)
        assert result["histogram"][:128] == np.bincount(arr, minlength=256)[:128].tolist()
        assert result["lines"] == text.count(b"\n")
    for at in (0, 1, 7, 8, 9, 4097, len(text) - 9):
        broken = text[:at] + b"\xff" + text[at + 1 :]
        assert scan(_scan.Scanner, broken)["first_invalid_utf8"] == first_invalid(broken)


def entropy_of(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("kind", ["random", "runs"])
def test_against_numpy(kind: str) -> None:
    rng = random.Random(3)
    n = (3 << 20) + 12345  # odd tail
    data = rng.randbytes(n) if kind == "random" else sample("runs", n, rng)
    block = 1 << 20
    result = scan(_scan.Scanner, data, [100, 1 << 20, (2 << 20) + 7])
    arr = np.frombuffer(data, dtype=np.uint8)
    counts = np.bincount(arr, minlength=256)
    assert result["histogram"] == counts.tolist()
    assert result["lines"] == int(counts[10])
    assert result["entropy"] == pytest.approx(entropy_of(counts), abs=1e-9)
    blocks = [
        entropy_of(np.bincount(arr[i : i + block], minlength=256)) for i in range(0, n, block)
    ]
    assert len(blocks) == 4  # the partial block counts
    assert result["block_entropy_min"] == pytest.approx(min(blocks), abs=1e-9)
    assert result["block_entropy_max"] == pytest.approx(max(blocks), abs=1e-9)
    # longest run, checked with numpy on the run boundaries
    change = np.flatnonzero(np.diff(arr) != 0) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.concatenate((starts, [n])))
    k = int(np.argmax(lengths))  # first of the longest
    run = result["longest_run"]
    assert (run["length"], run["offset"], run["byte"]) == (
        int(lengths[k]),
        int(starts[k]),
        int(arr[starts[k]]),
    )


def test_empty_and_runs() -> None:
    for impl in IMPLS:
        empty = scan(impl, b"")
        assert empty["entropy"] is None
        assert empty["block_entropy_min"] is None and empty["block_entropy_max"] is None
        assert empty["longest_run"] == {"byte": None, "length": 0, "offset": None}
        assert empty["utf8_valid"] is True and empty["lines"] == 0
        zeros = scan(impl, bytes(10_000), [3, 5000, 5001])
        assert zeros["longest_run"] == {"byte": 0, "length": 10_000, "offset": 0}
        assert zeros["entropy"] == 0.0
        hole = b"x" * 10 + bytes(100) + b"y" * 100 + bytes(99)
        assert scan(impl, hole, [50, 115])["longest_run"] == {
            "byte": 0,
            "length": 100,
            "offset": 10,
        }
        assert scan(impl, b"ab")["longest_run"] == {"byte": 97, "length": 1, "offset": 0}
        two_blocks = scan(impl, bytes(8) + bytes(range(8)), block_size=8)
        assert two_blocks["block_entropy_min"] == 0.0
        assert two_blocks["block_entropy_max"] == pytest.approx(3.0)
        assert two_blocks["entropy"] == pytest.approx(-(9 / 16) * math.log2(9 / 16) + (7 / 16) * 4)


def test_buffers_without_copies(tmp_path: Any) -> None:
    data = os.urandom(100_000) + b"\n" * 10
    expected = scan(_scan.Scanner, data)
    path = tmp_path / "f"
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        s = _scan.Scanner()
        s.update(m)
        assert s.result() == expected
        view = memoryview(m)
        s = _scan.Scanner()
        s.update(view[:500])
        s.update(view[500:])
        del view
        assert s.result() == expected
    s = _scan.Scanner()
    s.update(bytearray(data))
    assert s.result() == expected
    with pytest.raises(ValueError):
        _scan.Scanner(0)


def test_twin_selected_by_environment() -> None:
    code = (
        "import fastpipe._native as n, fastpipe._native._scan_py as p, "
        "fastpipe._native._cdc_py as c; assert n.scan is p and n.cdc is c and n.NO_EXTENSIONS"
    )
    env = dict(os.environ, FASTPIPE_NO_EXTENSIONS="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_scan_stage_spec_and_limits() -> None:
    stage = parse_spec("scan:block_size=64KiB,max_run=8,require_utf8=yes,min_entropy=1")
    assert isinstance(stage, Scan)
    assert (stage.block_size, stage.max_run, stage.require_utf8) == (65536, 8, True)
    assert stage.min_entropy == 1.0 and stage.max_entropy is None
    with pytest.raises(UsageError):
        parse_spec("scan:max_entropy=9")
    with pytest.raises(UsageError):
        parse_spec("scan:colour=red")

    info = ObjectInfo(source="mem", size=0)
    stage = Scan(max_run=8, require_utf8=True)
    stage.start(info)
    stage.update(memoryview("héllo\n".encode() * 10))
    result = stage.finish()
    assert set(result) == {
        "entropy",
        "block_entropy_min",
        "block_entropy_max",
        "longest_run",
        "lines",
        "utf8_valid",
        "first_invalid_utf8",
        "histogram",
    }
    assert result["lines"] == 10 and result["utf8_valid"]

    stage.start(info)
    stage.update(memoryview(b"ok" + bytes(20) + b"\xff"))
    with pytest.raises(StageFailed) as failed:
        stage.finish()
    assert "max_run" in str(failed.value) and "UTF-8 at offset 22" in str(failed.value)
    assert failed.value.result["longest_run"] == {"byte": 0, "length": 20, "offset": 2}

    stage = Scan(max_entropy=4.0)
    stage.start(info)
    stage.update(memoryview(bytes(range(256))))
    with pytest.raises(StageFailed, match="above max_entropy"):
        stage.finish()
