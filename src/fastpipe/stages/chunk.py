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

It is written to a temporary file beside its destination (``.NAME.<random>.tmp``, mode
0600, created with ``O_EXCL|O_NOFOLLOW``) and renamed over it once complete, so a reader
never sees half a manifest; the temporary file is removed on every failure path (an
error, the engine's timeout, a cancel). A ``manifest`` or ``previous`` in a missing
folder, a missing or unreadable ``previous``, and a ``previous`` cut with other chunk
sizes (whose chunks could never match) are refused when the stage is built, before the
first byte.

De-duplication counts: ``unique_chunks`` distinct fingerprints; ``duplicate_bytes`` bytes
of chunks whose fingerprint appeared earlier in this object; with ``previous`` (an
earlier manifest), ``new_chunks`` and ``new_bytes`` count the distinct chunks of this
object absent from it (what a store holding the previous version would have to add).
Fingerprints seen are kept in memory: about 70 bytes per distinct chunk.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, NamedTuple

from .._exceptions import StageFailed, UsageError
from ..cdc import Params, _cut_array, fingerprints, params
from ._base import FileStage, LocalFile, ObjectInfo
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


def _unpack_header(header: bytes, path: str | os.PathLike[str]) -> tuple[int, int, int, int]:
    """A manifest header's min, avg and max sizes and record count; ValueError if not one."""
    if len(header) != _HEADER.size:
        raise ValueError(f"{os.fspath(path)!r} is not a fastpipe chunk manifest (too short)")
    magic, min_size, avg_size, max_size, _reserved, count = _HEADER.unpack(header)
    if magic != MAGIC:
        raise ValueError(f"{os.fspath(path)!r} is not a fastpipe chunk manifest (bad magic)")
    return min_size, avg_size, max_size, count


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read a manifest written by the ``chunk`` stage; ValueError when it is not one."""
    with open(path, "rb") as f:
        min_size, avg_size, max_size, count = _unpack_header(f.read(_HEADER.size), path)
        body = f.read()
    if len(body) != count * _RECORD.size:
        raise ValueError(
            f"{os.fspath(path)!r} is truncated: {count} records announced, "
            f"{len(body)} bytes of records"
        )
    chunks = [ManifestChunk(*rec) for rec in _RECORD.iter_unpack(body)]
    return Manifest(min_size, avg_size, max_size, chunks)


def _open_new(folder: str, base: str) -> tuple[int, str]:
    """Create ``folder/.base.<random>.tmp`` (0600), never through a symlink or over a file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        path = os.path.join(folder, f".{base}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(path, flags, 0o600), path
        except FileExistsError:
            continue


class _ManifestWriter:
    """Records to a 0600 temporary file, renamed over ``path`` on :meth:`commit`."""

    def __init__(self, path: str, p: Params) -> None:
        self.path = os.path.abspath(path)
        folder, base = os.path.split(self.path)
        fd, self.tmp = _open_new(folder, base)
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
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def _check_folder(option: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"chunk {option}={path}: folder {folder} does not exist")


def _sizes(p: Params | Manifest) -> str:
    return f"min/avg/max {p.min_size}/{p.avg_size}/{p.max_size}"


def _read_header(path: str) -> Manifest:
    """The sizes of a manifest (no records); ValueError when it is not one."""
    with open(path, "rb") as f:
        min_size, avg_size, max_size, _count = _unpack_header(f.read(_HEADER.size), path)
    return Manifest(min_size, avg_size, max_size, [])


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
        # Refused here, before the first byte, rather than after a whole download.
        if manifest is not None:
            _check_folder("manifest", manifest)
        if previous is not None:
            _check_folder("previous", previous)
            try:
                self._check_previous(_read_header(previous))
            except FileNotFoundError:
                raise UsageError(f"chunk previous={previous}: no such manifest") from None
            except (OSError, ValueError) as exc:
                raise UsageError(f"chunk previous={previous}: unusable: {exc}") from None
        # A window must hold more than one max-size chunk past any restart point.
        self.window_size = max(window_size, 4 * self.params.max_size)
        self._cancelled = threading.Event()

    def _check_previous(self, previous: Manifest) -> None:
        """Refuse a previous manifest cut with other sizes: no chunk would match."""
        p = self.params
        if (previous.min_size, previous.avg_size, previous.max_size) != (
            p.min_size,
            p.avg_size,
            p.max_size,
        ):
            raise UsageError(
                f"chunk previous={self.previous}: made with chunk sizes {_sizes(previous)}, "
                f"this stage cuts {_sizes(self.params)}; chunks of other sizes never match, "
                "so de-duplication against it would count every chunk as new"
            )

    def check_info(self, info: ObjectInfo) -> None:
        """Refuse before the first byte when the manifest's folder has gone."""
        for option, path in (("manifest", self.manifest), ("previous", self.previous)):
            if path is not None:
                try:
                    _check_folder(option, path)
                except UsageError as exc:
                    raise StageFailed(f"{info.source}: {exc}") from None

    def cost_key(self, info: ObjectInfo | None = None) -> str:
        """``chunk:t<threads>``: the threads set the rate."""
        return f"chunk:t{self.threads}"

    def cancel(self) -> None:
        """Stop a running :meth:`run` at its next window; it removes its temp manifest."""
        self._cancelled.set()

    def _load_previous(self, source: str) -> set[int] | None:
        if self.previous is None:
            return None
        try:
            previous = read_manifest(self.previous)
            self._check_previous(previous)
        except FileNotFoundError:
            raise StageFailed(f"{source}: previous manifest not found: {self.previous}") from None
        except (OSError, ValueError) as exc:  # UsageError is a ValueError
            raise StageFailed(f"{source}: previous manifest unusable: {exc}") from None
        return {c.fingerprint for c in previous.chunks}

    def run(self, local: LocalFile) -> dict[str, Any]:
        try:
            return self._run(local)
        finally:
            self._cancelled.clear()

    def _run(self, local: LocalFile) -> dict[str, Any]:
        source = local.info.source
        tally = _Tally(self._load_previous(source))
        writer = self._open_writer(source)
        try:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="fastpipe-chunk") as ex:
                pos = 0
                while pos < local.size:
                    self._check_cancelled(source)
                    records = self._window_chunks(local, pos, ex)
                    tally.add(records)
                    if writer is not None:
                        writer.add(records)
                    pos = records[-1][0] + records[-1][1]
            self._check_cancelled(source)
            if writer is not None:
                writer.commit()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        result = tally.result(local.size)
        if writer is not None:
            result["manifest"] = writer.path
        return result

    def _check_cancelled(self, source: str) -> None:
        if self._cancelled.is_set():
            raise StageFailed(f"{source}: chunk was cancelled")

    def _open_writer(self, source: str) -> _ManifestWriter | None:
        if not self.manifest:
            return None
        try:
            return _ManifestWriter(self.manifest, self.params)
        except OSError as exc:
            raise StageFailed(
                f"{source}: cannot write the manifest beside {self.manifest}: {exc.strerror or exc}"
            ) from None

    def _window_chunks(
        self, local: LocalFile, pos: int, ex: ThreadPoolExecutor
    ) -> list[tuple[int, int, int]]:
        """The chunks decided by the window at ``pos``: (offset, size, fingerprint)."""
        p = self.params
        length = min(self.window_size, local.size - pos)
        final = pos + length == local.size
        with local.window(pos, length) as view:
            ends = _cut_array(view, p, self.threads, ex).tolist()
            if not final:
                # Keep the chunks decided by bytes inside the window: a chunk
                # starting more than max_size before its end.
                keep = 0
                while keep < len(ends) and (keep == 0 or ends[keep - 1] + p.max_size < length):
                    keep += 1
                del ends[keep:]
            # xxh3 runs near memory speed on one thread (about 30 GB/s)
            fps = fingerprints(view, ends)
            view.release()  # the mapping closes on exit only without exports
        records = []
        start = 0
        for end, fp in zip(ends, fps, strict=True):
            records.append((pos + start, end - start, fp))
            start = end
        return records


class _Tally:
    """Counts chunks as they are cut: unique, duplicate bytes, new against a manifest."""

    def __init__(self, previous: set[int] | None) -> None:
        self.previous = previous
        self.seen: set[int] = set()
        self.chunks = self.duplicate_bytes = self.new_chunks = self.new_bytes = 0

    def add(self, records: list[tuple[int, int, int]]) -> None:
        for _, size, fp in records:
            if fp in self.seen:
                self.duplicate_bytes += size
            else:
                self.seen.add(fp)
                if self.previous is not None and fp not in self.previous:
                    self.new_chunks += 1
                    self.new_bytes += size
        self.chunks += len(records)

    def result(self, size: int) -> dict[str, Any]:
        result: dict[str, Any] = {
            "chunks": self.chunks,
            "avg_chunk": size / self.chunks if self.chunks else 0,
            "unique_chunks": len(self.seen),
            "duplicate_bytes": self.duplicate_bytes,
        }
        if self.previous is not None:
            result["new_chunks"] = self.new_chunks
            result["new_bytes"] = self.new_bytes
        return result
