"""FastCDC 2020: native against its twin and pyfastcdc; the chunk stage and its manifest."""

from __future__ import annotations

import mmap
import os
import random
import stat
from array import array
from pathlib import Path
from typing import Any

import pytest
import xxhash
from pyfastcdc import FastCDC

from fastpipe import StageFailed, UsageError, cdc
from fastpipe._native import _cdc, _cdc_py
from fastpipe.stages import chunk as chunk_stage  # noqa: F401 - registers "chunk"
from fastpipe.stages._base import LocalFile, ObjectInfo
from fastpipe.stages._registry import parse_spec
from fastpipe.stages.chunk import Chunk, read_manifest


def reference(
    data: Any, avg: int, min_size: int | None = None, max_size: int | None = None
) -> list[int]:
    chunker = FastCDC(avg, min_size=min_size, max_size=max_size)
    return [c.offset + c.length for c in chunker.cut_buf(data)]


def low_entropy(n: int, rng: random.Random) -> bytes:
    """Runs and repeated phrases: long stretches where the gear hash cycles."""
    out = bytearray()
    while len(out) < n:
        if rng.random() < 0.3:
            out += bytes([rng.randrange(3)]) * rng.randrange(1, 5000)
        else:
            out += b"the same phrase again, " * rng.randrange(1, 50)
    return bytes(out[:n])


def runs(n: int, rng: random.Random, byte: int) -> bytes:
    """Random stretches between runs of ``byte`` of up to several ``max_size`` at odd
    offsets: cuts at ``max_size`` in the runs, out of phase with any segment start."""
    out = bytearray()
    while len(out) < n:
        out += rng.randbytes(rng.randrange(0, 3000))
        out += bytes([byte]) * rng.randrange(1, 40_000)
    return bytes(out[:n])


def chained(impl: Any, data: bytes, p: _cdc_py.Params, segments: int) -> list[int]:
    """Cut points through speculative chains of ``segments`` segments, with ``impl``."""
    n = len(data)
    bounds = [n * k // segments for k in range(segments + 1)]
    ends = list(impl.cut_range(data, 0, bounds[1], p))
    for k in range(1, segments):
        chain = impl.cut_range(data, bounds[k], bounds[k + 1], p)
        assert all(bounds[k] < e <= n for e in chain) and list(chain) == sorted(chain)
        if chain and bounds[k] < bounds[k + 1]:
            assert chain[-1] >= bounds[k + 1] and (len(chain) == 1 or chain[-2] < bounds[k + 1])
        last = ends[-1] if ends else 0
        if not chain or chain[-1] <= last:
            continue
        walked, met = impl.resync(data, last, chain, p)
        ends += walked
        if met >= 0:
            assert ends[-1] == chain[met]
            ends += list(chain[met + 1 :])
        else:
            assert ends[-1] > chain[-1]
    return ends


def both_ways(
    impl: Any, data: bytes, p: _cdc_py.Params, segments: int
) -> tuple[list[int], list[int]]:
    return list(impl.cut_sequential(data, p)), chained(impl, data, p, segments)


def test_gear_table_is_the_reference() -> None:
    from pyfastcdc.py.constants import GEAR, MASKS

    assert list(_cdc_py.GEAR) == list(GEAR)
    assert all(MASKS[bits] == mask for bits, mask in _cdc_py.MASKS.items())


@pytest.mark.parametrize("avg", [256, 1024])
@pytest.mark.parametrize("kind", ["random", "low"])
def test_twin_and_native_match_reference_small(avg: int, kind: str) -> None:
    rng = random.Random(avg + len(kind))
    p = _cdc_py.params(avg)
    sizes = [
        0,
        1,
        63,
        64,
        65,
        p.min_size - 1,
        p.min_size,
        p.min_size + 1,
        avg - 1,
        avg,
        avg + 1,
        p.max_size - 1,
        p.max_size,
        p.max_size + 1,
        2 * p.max_size + 3,
        20_011,
    ]
    for n in sizes:
        data = rng.randbytes(n) if kind == "random" else low_entropy(n, rng)
        expected = reference(data, avg)
        for segments in (1, 2, 5, 13):
            assert both_ways(_cdc_py, data, p, segments) == (expected, expected), (n, segments)
            assert both_ways(_cdc, data, p, segments) == (expected, expected), (n, segments)
        for start, stop in ((0, n), (n // 3, n // 2), (n // 2, n // 2), (n, n), (1, n)):
            if start <= stop:
                chain = _cdc.cut_range(data, start, stop, p)
                assert chain == _cdc_py.cut_range(data, start, stop, p), (n, start, stop)
                for cut in {0, n // 2, n, *expected[:3]}:
                    assert _cdc.resync(data, cut, chain, p) == _cdc_py.resync(data, cut, chain, p)


def test_custom_min_max_and_odd_sizes() -> None:
    rng = random.Random(5)
    data = rng.randbytes(300_001)
    for avg, lo, hi in [
        (1000, 65, 1025),
        (4096, 4096, 4096),
        (8192, 1001, 20_001),
        (300, 299, 9999),
    ]:
        expected = reference(data, avg, lo, hi)
        assert cdc.cut_points(data, avg_size=avg, min_size=lo, max_size=hi) == expected
        p = _cdc_py.params(avg, lo, hi)
        assert both_ways(_cdc, data, p, 7) == (expected, expected)
    small = data[:40_000]
    p = _cdc_py.params(1000, 65, 1025)
    assert both_ways(_cdc_py, small, p, 3) == both_ways(_cdc, small, p, 3)


@pytest.mark.parametrize("impl", [_cdc, _cdc_py], ids=["native", "twin"])
def test_cut_range_and_resync_contract(impl: Any) -> None:
    rng = random.Random(8)
    data = rng.randbytes(20_000)
    p = _cdc_py.params(256)
    whole = list(impl.cut_sequential(data, p))
    assert list(impl.cut_range(data, 0, len(data), p)) == whole
    chain = impl.cut_range(data, 5000, 9000, p)
    assert chain[0] > 5000 and chain[-2] < 9000 <= chain[-1]
    assert list(impl.cut_range(data, 5000, 5000, p)) == []
    # from a true cut, walk until the chains meet (nothing to walk from one they share)
    shared = [c for c in whole if c in chain]
    assert shared  # random data: they meet within the segment
    first = shared[0]
    assert impl.resync(data, first, chain, p) == (array("q"), list(chain).index(first))
    before = max(c for c in whole if c < 5000)
    walked, met = impl.resync(data, before, chain, p)
    assert list(walked) == [c for c in whole if before < c <= first] and chain[met] == first
    # a list never met (cuts are min_size apart): -1, the walk ends past its last entry
    stranger = array("q", [c + 1 for c in whole[:5]])
    assert impl.resync(data, 0, stranger, p) == (array("q", whole[:6]), -1)
    assert impl.resync(data, 0, array("q"), p) == (array("q"), -1)
    assert impl.resync(b"", 0, array("q", [0]), p) == (array("q"), 0)
    for bad in ((-1, 10), (10, 5), (0, len(data) + 1)):
        with pytest.raises(ValueError):
            impl.cut_range(data, *bad, p)
    for bad_cut in (-1, len(data) + 1):
        with pytest.raises(ValueError):
            impl.resync(data, bad_cut, chain, p)


def test_resync_late_and_never_in_runs() -> None:
    """A segment starting in a run of zeros cuts at max_size out of phase with the true
    chain: the chains meet only after the run, or not at all inside the segment."""
    rng = random.Random(4)
    data = rng.randbytes(5001) + bytes(200_000) + rng.randbytes(100_000)
    p = _cdc_py.params(1024)  # max_size 4096
    whole = list(_cdc.cut_sequential(data, p))
    assert whole == reference(data, 1024)
    for impl in (_cdc, _cdc_py):
        inside = impl.cut_range(data, 100_000, 150_000, p)
        true = min(c for c in whole if c >= 100_000)
        walked, met = impl.resync(data, true, inside, p)
        assert met == -1 and list(walked) == [c for c in whole if true < c <= walked[-1]]
        assert walked[-1] > inside[-1] >= 150_000
        across = impl.cut_range(data, 100_000, 300_000, p)
        walked, met = impl.resync(data, true, across, p)
        assert met >= 0 and len(walked) > 20 and walked[-1] > 205_001
        assert list(walked) + list(across[met + 1 :]) == [
            c for c in whole if true < c <= across[-1]
        ]
    assert cdc._cut_array(memoryview(data), p, 2, segments=3).tolist() == whole


STITCH_SEGMENTS = [2, 3, 4, 7, 16, 31, 64, 200, 1000]


@pytest.mark.parametrize("avg", [256, 1024])
@pytest.mark.parametrize("kind", ["random", "low", "zeros", "runs"])
def test_stitching_at_many_segment_counts(
    avg: int, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(avg * 7 + len(kind))
    n = 150_001
    if kind == "random":
        data = rng.randbytes(n)
    elif kind == "low":
        data = low_entropy(n, rng)
    elif kind == "zeros":
        data = rng.randbytes(777) + bytes(n - 777 - 999) + rng.randbytes(999)
    else:
        data = runs(n, rng, 0)
    p = _cdc_py.params(avg)
    expected = reference(data, avg)
    assert cdc._cut_array(memoryview(data), p, 1).tolist() == expected
    for segments in STITCH_SEGMENTS:
        for threads in (2, 3):
            got = cdc._cut_array(memoryview(data), p, threads, segments=segments)
            assert got.tolist() == expected, (segments, threads)
    # the same stitching over the twin's kernels, on a smaller buffer
    small = data[:30_011]
    expected = reference(small, avg)
    monkeypatch.setattr(cdc, "_impl", _cdc_py)
    for segments in (2, 5, 16, 200):
        assert cdc._cut_array(memoryview(small), p, 2, segments=segments).tolist() == expected


@pytest.mark.parametrize(
    ("avg", "lo", "hi"),
    [(256, None, None), (1024, None, None), (4096, 4096, 4096), (1000, 65, 1025), (300, 299, 9999)],
)
def test_runs_of_every_byte(avg: int, lo: int | None, hi: int | None) -> None:
    """The kernel's shortcut for runs of one byte (whose hash is constant from 64 bytes
    on) cuts as the reference does, whether or not that hash matches a mask."""
    rng = random.Random(avg)
    p = _cdc_py.params(avg, lo, hi)
    for byte in range(256):
        data = runs(60_000, rng, byte)
        expected = reference(data, avg, lo, hi)
        assert list(_cdc.cut_sequential(data, p)) == expected, byte
        assert chained(_cdc, data, p, 9) == expected, byte
        if byte in (0, 9, 57, 91, 255):  # 57, 9 and 91 hash to a match at avg 256 or 1024
            assert list(_cdc_py.cut_sequential(data[:20_000], p)) == reference(
                data[:20_000], avg, lo, hi
            )


@pytest.fixture(scope="module")
def big() -> dict[str, bytes]:
    rng = random.Random(11)
    n = (6 << 20) + 4321
    return {
        "random": rng.randbytes(n),
        "low": low_entropy(n, rng),
        "zeros": bytes(n),
        "runs": runs(n, rng, 0),
    }


@pytest.mark.parametrize("avg", [16 << 10, 64 << 10, 256 << 10])
@pytest.mark.parametrize("kind", ["random", "low", "zeros", "runs"])
def test_cut_points_match_pyfastcdc(
    avg: int, kind: str, big: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = big[kind]
    expected = reference(data, avg)
    assert cdc.cut_points(data, avg_size=avg) == expected
    monkeypatch.setattr(cdc, "MIN_SEGMENT", 1 << 20)  # several segments on a few MiB
    for threads in (2, 3):
        assert cdc.cut_points(data, avg_size=avg, threads=threads) == expected


def test_cut_points_buffers(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    expected = reference(data, 16384)
    assert cdc.cut_points(b"", avg_size=16384) == []
    assert cdc.cut_points(b"x", avg_size=16384) == [1]
    assert cdc.cut_points(bytearray(data), avg_size=16384) == expected
    assert cdc.cut_points(memoryview(data), avg_size=16384) == expected
    assert cdc.cut_points(memoryview(b"--" + data)[2:], avg_size=16384) == expected
    assert cdc.cut_points(memoryview(data).cast("c"), avg_size=16384) == expected
    path = tmp_path / "f"
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert cdc.cut_points(m, avg_size=16384, threads=2) == expected
    for bad in ({"avg_size": 100}, {"avg_size": 4096, "min_size": 8192}, {"avg_size": 1 << 23}):
        with pytest.raises(ValueError):
            cdc.cut_points(data, **bad)


def test_fingerprints_parallel() -> None:
    data = os.urandom(3 << 20)
    ends = cdc.cut_points(data, avg_size=4096)
    starts = [0, *ends[:-1]]
    expected = [xxhash.xxh3_64_intdigest(data[s:e]) for s, e in zip(starts, ends, strict=True)]
    assert cdc.fingerprints(data, ends) == expected
    assert cdc.fingerprints(data, ends, threads=3) == expected
    assert cdc.fingerprints(data, []) == []


def local_file(path: Path) -> LocalFile:
    size = path.stat().st_size
    return LocalFile(str(path), size, ObjectInfo(source=str(path), size=size))


def test_chunk_stage_windows_equal_whole(tmp_path: Path) -> None:
    rng = random.Random(2)
    block = rng.randbytes(200_000)
    data = rng.randbytes(1 << 20) + block + low_entropy(500_000, rng) + block + rng.randbytes(777)
    path = tmp_path / "obj"
    path.write_bytes(data)
    expected = reference(data, 16384)
    manifest = tmp_path / "out" / "m.fpcdc"
    manifest.parent.mkdir()
    # window_size=1 is raised to 4 * max_size = 256 KiB: about ten restarts
    stage = parse_spec(f"chunk:avg_size=16KiB,threads=2,manifest={manifest}")
    assert isinstance(stage, Chunk) and stage.manifest == str(manifest)
    stage = Chunk(avg_size=16384, threads=2, manifest=str(manifest), window_size=1)
    result = stage.run(local_file(path))
    m = read_manifest(manifest)
    assert (m.min_size, m.avg_size, m.max_size) == (4096, 16384, 65536)
    assert [c.offset + c.length for c in m.chunks] == expected
    assert [c.offset for c in m.chunks] == [0, *expected[:-1]]
    assert all(
        c.fingerprint == xxhash.xxh3_64_intdigest(data[c.offset : c.offset + c.length])
        for c in m.chunks
    )
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600
    assert os.listdir(manifest.parent) == ["m.fpcdc"]
    assert result["chunks"] == len(expected)
    assert result["manifest"] == str(manifest)
    assert result["avg_chunk"] == pytest.approx(len(data) / len(expected))
    fps = [c.fingerprint for c in m.chunks]
    assert result["unique_chunks"] == len(set(fps)) < len(fps)
    seen: set[int] = set()
    dup = 0
    for c in m.chunks:
        if c.fingerprint in seen:
            dup += c.length
        seen.add(c.fingerprint)
    assert result["duplicate_bytes"] == dup > 100_000
    assert "new_chunks" not in result

    # an edited copy against the first manifest: only the chunks around the edit are new
    edited = data[:700_000] + b"EDIT" + data[700_000:]
    path2 = tmp_path / "obj2"
    path2.write_bytes(edited)
    again = Chunk(avg_size=16384, threads=1, previous=str(manifest), window_size=1)
    result2 = again.run(local_file(path2))
    assert 1 <= result2["new_chunks"] <= 3
    assert 0 < result2["new_bytes"] < 3 * 65536
    assert result2["chunks"] == len(reference(edited, 16384))


def test_chunk_stage_small_and_empty(tmp_path: Path) -> None:
    for size in (0, 1, 5000):
        path = tmp_path / f"f{size}"
        data = os.urandom(size)
        path.write_bytes(data)
        manifest = tmp_path / f"m{size}"
        result = Chunk(avg_size=4096, threads=2, manifest=str(manifest)).run(local_file(path))
        assert result["chunks"] == len(reference(data, 4096))
        assert result["avg_chunk"] == (size / result["chunks"] if size else 0)
        assert len(read_manifest(manifest).chunks) == result["chunks"]


def test_chunk_stage_errors(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"data")
    # A bad previous is refused when the stage is built; one that goes away later, at run.
    with pytest.raises(UsageError, match="no such manifest"):
        Chunk(previous=str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.write_bytes(b"NOTAMANIFEST" * 4)
    with pytest.raises(UsageError, match="unusable"):
        Chunk(previous=str(bad))
    good = tmp_path / "good"
    Chunk(manifest=str(good)).run(local_file(path))
    stage = Chunk(previous=str(good))
    good.unlink()
    with pytest.raises(StageFailed, match="not found"):
        stage.run(local_file(path))
    with pytest.raises(ValueError, match="not a fastpipe chunk manifest"):
        read_manifest(bad)
    with pytest.raises(UsageError):
        parse_spec("chunk:avg_size=64,threads=2")
    with pytest.raises(UsageError):
        parse_spec("chunk:threads=0")
    with pytest.raises(UsageError):
        parse_spec("chunk:speed=fast")
    stage = parse_spec("chunk:avg_size=64KiB,min_size=8KiB,max_size=1MiB,threads=2")
    assert isinstance(stage, Chunk)
    assert stage.params[:3] == (8192, 65536, 1 << 20) and stage.threads == 2
    # a manifest that cannot be written is refused before any byte
    with pytest.raises(UsageError, match="does not exist"):
        Chunk(manifest=str(tmp_path / "no" / "such" / "dir" / "m"))
