"""Content-defined chunking: FastCDC 2020 cut points and chunk fingerprints.

The cut points are those of fastcdc-rs ``v2020`` and pyfastcdc (normalization level 1,
their gear table and masks, ``min_size = avg_size // 4`` and ``max_size = avg_size * 4``
by default), so that manifests agree with chunks stored by those tools.

With ``threads > 1`` the buffer is cut into segments chunked in parallel, GIL released,
each as if a chunk started at its start (speculatively; 8 bytes per chunk). Where a chunk
ends depends only on where it starts, so once the true chain of cuts, known up to the end
of one segment, meets a cut of the next segment's chain, usually within a chunk or two,
the rest of that chain is true as well (see :mod:`fastpipe._native._cdc_py`). The result is
identical to the sequential algorithm, which ``threads=1`` runs directly, and the parallel
form hashes as little as it does (the first ``min_size`` bytes of each chunk are
skipped), plus the chunk or two of each resynchronisation. Long runs where the cuts fall
with a fixed period (one byte repeated over several ``max_size``) may keep the chains apart
up to the end of a segment: that segment is then walked again sequentially, no slower in
all than ``threads=1``.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import xxhash

from ._native import cdc as _impl
from ._native._cdc_py import Params, params

__all__ = ["Params", "cut_points", "fingerprints", "params"]

#: Below this many bytes a segment is not worth a thread.
MIN_SEGMENT = 4 << 20


def _byte_view(data: Any) -> memoryview:
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _cut_array(
    view: memoryview,
    p: Params,
    threads: int,
    executor: Executor | None = None,
    segments: int | None = None,
) -> array[int]:
    """Chunk end offsets of ``view`` as ``array('q')``; the engine behind cut_points.

    ``segments`` forces the number of segments whatever their size (for the tests).
    """
    n = len(view)
    if segments is None:
        segments = min(threads, n // MIN_SEGMENT) if threads > 1 else 1
    if segments <= 1:
        return _impl.cut_sequential(view, p)  # type: ignore[no-any-return]
    bounds = [n * k // segments for k in range(segments + 1)]

    def speculate(k: int) -> array[int]:
        return _impl.cut_range(view, bounds[k], bounds[k + 1], p)  # type: ignore[no-any-return]

    if executor is None:
        workers = min(threads, segments)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastpipe-cdc") as ex:
            return _stitch(view, p, ex.map(speculate, range(segments)))
    return _stitch(view, p, executor.map(speculate, range(segments)))


def _stitch(view: memoryview, p: Params, chains: Iterator[array[int]]) -> array[int]:
    """The true cuts from the speculative chains of consecutive segments, in order."""
    ends = next(chains)  # the first segment starts at 0: its chain is true
    for chain in chains:
        last = ends[-1] if ends else 0
        if not chain or chain[-1] <= last:
            continue  # an empty segment, or one the true chain has already passed
        walked, met = _impl.resync(view, last, chain, p)
        ends += walked
        if met >= 0:
            del chain[: met + 1]
            ends += chain
    return ends


def cut_points(
    data: Any,
    *,
    avg_size: int,
    min_size: int | None = None,
    max_size: int | None = None,
    threads: int = 1,
) -> list[int]:
    """Chunk end offsets of ``data`` in order (the last is ``len(data)``; ``[]`` if empty).

    ``data`` is any buffer (bytes, bytearray, mmap, memoryview); it is not copied.
    Sizes out of the reference's ranges raise ValueError. ``threads > 1`` chunks segments
    of at least 4 MiB in parallel with the same result.
    """
    p = params(avg_size, min_size, max_size)
    with _byte_view(data) as view:
        return _cut_array(view, p, max(1, threads)).tolist()


def _hash_range(
    view: memoryview, ends: Sequence[int], first: int, last: int, start: int
) -> list[int]:
    out = []
    digest = xxhash.xxh3_64_intdigest
    for k in range(first, last):
        end = ends[k]
        out.append(digest(view[start:end]))
        start = end
    return out


def fingerprints(
    data: Any,
    ends: Sequence[int],
    *,
    threads: int = 1,
    start: int = 0,
    executor: Executor | None = None,
) -> list[int]:
    """xxh3-64 of each chunk ``[ends[k-1], ends[k])`` of ``data`` (the first from ``start``).

    xxhash releases the GIL while it hashes, so ``threads > 1`` hashes groups of chunks in
    parallel (an ``executor`` may be given to reuse its threads). It rarely pays: xxh3 runs
    at about 30 GB/s on one core, near memory speed, and measured slower with two threads
    on 64 KiB chunks; it may help on buffers that are not yet in memory.
    """
    with _byte_view(data) as view:
        count = len(ends)
        groups = max(1, min(threads, count // 16))
        if groups == 1:
            return _hash_range(view, ends, 0, count, start)
        bounds = [count * g // groups for g in range(groups + 1)]

        def work(g: int) -> list[int]:
            first = bounds[g]
            return _hash_range(
                view, ends, first, bounds[g + 1], ends[first - 1] if first else start
            )

        if executor is None:
            with ThreadPoolExecutor(max_workers=groups, thread_name_prefix="fastpipe-xxh") as ex:
                results = list(ex.map(work, range(groups)))
        else:
            results = list(executor.map(work, range(groups)))
        return [fp for group in results for fp in group]
