"""The ``chunk`` file stage: a FastCDC 2020 manifest of the local file, de-duplicated.

The file is chunked one mapped window at a time (16 MiB, or four times ``max_size`` when
larger), so that memory stays flat in the file size; the chunk left open at the end of a
window restarts the next one, which gives exactly the cut points of the whole file at
once. Cut points match fastcdc-rs v2020 / pyfastcdc, found by ``threads`` threads; each
chunk is fingerprinted with xxh3-64.

Manifest format (all integers little-endian)::

    header, 32 bytes:
        magic     8 bytes   b"FPCDC1\\0\\0"
        min_size  u32
        avg_size  u32
        max_size  u32
        reserved  u32       0
        count     u64       number of records
    count records, 20 bytes each, in file order:
        offset    u64
        length    u32
        xxh3_64   u64       fingerprint of the chunk's bytes

It is written to a temporary file (mode 0600) beside its destination and renamed over it
once complete, so a reader never sees half a manifest.

De-duplication counts: ``unique_chunks`` distinct fingerprints; ``duplicate_bytes`` bytes
of chunks whose fingerprint appeared earlier in this object; with ``previous`` (an
earlier manifest), ``new_chunks`` and ``new_bytes`` count the distinct chunks of this
object absent from it (what a store holding the previous version would have to add).
Fingerprints seen are kept in memory: about 70 bytes per distinct chunk.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, NamedTuple

from .._exceptions import StageFailed, UsageError
from ..cdc import Params, _cut_array, fingerprints, params
from ._base import FileStage, LocalFile
from ._registry import Option, register, to_size

MAGIC = b"FPCDC1\0\0"
_HEADER = struct.Struct("<8sIIIIQ")
_RECORD = struct.Struct("<QIQ")
#: Default bytes mapped at a time.
WINDOW_SIZE = 16 << 20


class ManifestChunk(NamedTuple):
    offset: int
    length: int
    fingerprint: int


class Manifest(NamedTuple):
    """A manifest as :func:`read_manifest` returns it."""

    min_size: int
    avg_size: int
    max_size: int
    chunks: list[ManifestChunk]


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read a manifest written by the ``chunk`` stage; ValueError when it is not one."""
    with open(path, "rb") as f:
        header = f.read(_HEADER.size)
        if len(header) != _HEADER.size:
            raise ValueError(f"{os.fspath(path)!r} is not a fastpipe chunk manifest (too short)")
        magic, min_size, avg_size, max_size, _reserved, count = _HEADER.unpack(header)
        if magic != MAGIC:
            raise ValueError(f"{os.fspath(path)!r} is not a fastpipe chunk manifest (bad magic)")
        body = f.read()
    if len(body) != count * _RECORD.size:
        raise ValueError(
            f"{os.fspath(path)!r} is truncated: {count} records announced, "
            f"{len(body)} bytes of records"
        )
    chunks = [ManifestChunk(*rec) for rec in _RECORD.iter_unpack(body)]
    return Manifest(min_size, avg_size, max_size, chunks)


class _ManifestWriter:
    """Records to a 0600 temporary file, renamed over ``path`` on :meth:`commit`."""

    def __init__(self, path: str, p: Params) -> None:
        self.path = os.path.abspath(path)
        folder, base = os.path.split(self.path)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self.params = p
        self.count = 0
        self.file.write(bytes(_HEADER.size))

    def add(self, records: list[tuple[int, int, int]]) -> None:
        pack = _RECORD.pack
        self.file.write(b"".join([pack(*rec) for rec in records]))
        self.count += len(records)

    def commit(self) -> None:
        p = self.params
        self.file.seek(0)
        self.file.write(_HEADER.pack(MAGIC, p.min_size, p.avg_size, p.max_size, 0, self.count))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


@register(
    "chunk",
    {
        "avg_size": Option(to_size, "average chunk size (default 64KiB)"),
        "min_size": Option(to_size, "minimum chunk size (default avg_size/4)"),
        "max_size": Option(to_size, "maximum chunk size (default avg_size*4)"),
        "threads": Option(int, "threads hashing segments (default: CPU count)"),
        "manifest": Option(str, "path of the chunk manifest to write"),
        "previous": Option(str, "path of an earlier manifest to de-duplicate against"),
    },
    "FastCDC 2020 chunks with xxh3-64 fingerprints; de-duplication counts, manifest",
)
class Chunk(FileStage):
    """Content-defined chunks of the local file (see the module docstring).

    Result: ``chunks``, ``avg_chunk``, ``unique_chunks``, ``duplicate_bytes``; with
    ``previous`` also ``new_chunks`` and ``new_bytes``; with ``manifest`` its path.
    """

    #: Reads windows in order and writes its manifest only after the last one: the
    #: engine may start it while the download runs.
    reads_in_order = True

    name = "chunk"

    def __init__(
        self,
        avg_size: int = 64 << 10,
        min_size: int | None = None,
        max_size: int | None = None,
        threads: int | None = None,
        manifest: str | None = None,
        previous: str | None = None,
        window_size: int = WINDOW_SIZE,
    ) -> None:
        try:
            self.params = params(avg_size, min_size, max_size)
        except ValueError as exc:
            raise UsageError(f"chunk sizes: {exc}") from None
        if threads is not None and threads < 1:
            raise UsageError(f"chunk threads must be at least 1, got {threads}")
        self.threads = threads or os.cpu_count() or 1
        self.manifest = manifest
        self.previous = previous
        # A window must hold more than one max-size chunk past any restart point.
        self.window_size = max(window_size, 4 * self.params.max_size)

    def _load_previous(self) -> set[int] | None:
        if self.previous is None:
            return None
        try:
            return {c.fingerprint for c in read_manifest(self.previous).chunks}
        except FileNotFoundError:
            raise StageFailed(f"previous manifest not found: {self.previous}") from None
        except ValueError as exc:
            raise StageFailed(f"previous manifest unusable: {exc}") from None

    def run(self, local: LocalFile) -> dict[str, Any]:
        p = self.params
        previous = self._load_previous()
        writer = _ManifestWriter(self.manifest, p) if self.manifest else None
        seen: set[int] = set()
        chunks = duplicate_bytes = new_chunks = new_bytes = 0
        pos = 0
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="fastpipe-chunk") as ex:
                while pos < local.size:
                    length = min(self.window_size, local.size - pos)
                    final = pos + length == local.size
                    with local.window(pos, length) as view:
                        ends = _cut_array(view, p, self.threads, ex).tolist()
                        if not final:
                            # Keep the chunks decided by bytes inside the window: a chunk
                            # starting more than max_size before its end.
                            keep = 0
                            while keep < len(ends) and (
                                keep == 0 or ends[keep - 1] + p.max_size < length
                            ):
                                keep += 1
                            del ends[keep:]
                        # xxh3 runs near memory speed on one thread (about 30 GB/s)
                        fps = fingerprints(view, ends)
                        view.release()  # the mapping closes on exit only without exports
                    records = []
                    start = 0
                    for end, fp in zip(ends, fps, strict=True):
                        size = end - start
                        records.append((pos + start, size, fp))
                        if fp in seen:
                            duplicate_bytes += size
                        else:
                            seen.add(fp)
                            if previous is not None and fp not in previous:
                                new_chunks += 1
                                new_bytes += size
                        start = end
                    chunks += len(records)
                    if writer is not None:
                        writer.add(records)
                    pos += ends[-1]
            if writer is not None:
                writer.commit()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        result: dict[str, Any] = {
            "chunks": chunks,
            "avg_chunk": local.size / chunks if chunks else 0,
            "unique_chunks": len(seen),
            "duplicate_bytes": duplicate_bytes,
        }
        if previous is not None:
            result["new_chunks"] = new_chunks
            result["new_bytes"] = new_bytes
        if writer is not None:
            result["manifest"] = writer.path
        return result
