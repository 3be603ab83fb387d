"""The local side: temp file (0600, preallocated), pwrite, watermark, atomic rename.

Nothing is ever left under the destination name unless it is complete and every stage
passed: bytes go to a hidden temp file in the destination's folder, which is renamed at
the end or removed on any failure.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import re
import tempfile
import threading
import unicodedata

from ._exceptions import DestinationError, LocalIOError

TEMP_SUFFIX = ".fastpipe-tmp"
_MAX_NAME_BYTES = 255
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


def local_name_for_key(key: str) -> str:
    """A safe file name for an S3 key: its last path segment, cleaned.

    The result never contains a separator, NUL or control character, is never ``.``,
    ``..`` or empty, and fits in 255 bytes (long names keep a hash of the key), so that
    joining it to a folder can never leave that folder.
    """
    segment = key.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    segment = unicodedata.normalize("NFC", segment)
    segment = _UNSAFE.sub("_", segment).strip()
    if segment in ("", ".", ".."):
        segment = "object"
    if segment.startswith("."):
        segment = "_" + segment[1:]  # no hidden files, no clash with our temp names
    encoded = segment.encode("utf-8", "surrogatepass")
    if len(encoded) > _MAX_NAME_BYTES - len(TEMP_SUFFIX) - 16:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        keep = _MAX_NAME_BYTES - len(TEMP_SUFFIX) - 16 - len(digest) - 1
        head = encoded[:keep].decode("utf-8", "ignore")
        segment = f"{head}-{digest}"
    return segment


def resolve_dest(dest: str | os.PathLike[str], key: str | None, force: bool) -> str:
    """Return the absolute destination file path, or raise :class:`DestinationError`.

    A ``dest`` that is an existing folder receives the object under a name made from its
    key (:func:`local_name_for_key`). The destination's folder must exist and be writable,
    and an existing file is refused unless ``force``.
    """
    path = os.path.abspath(os.fspath(dest))
    if os.path.isdir(path):
        if key is None:
            raise DestinationError(f"destination {path} is a folder")
        path = os.path.join(path, local_name_for_key(key))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise DestinationError(f"destination folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DestinationError(f"destination folder {folder} is not writable")
    if os.path.lexists(path) and not force:
        raise DestinationError(f"destination {path} already exists (use --force to replace it)")
    if os.path.isdir(path):
        raise DestinationError(f"destination {path} is a folder")
    return path


class TempFile:
    """A hidden 0600 temp file, preallocated to the object's size, written with pwrite."""

    def __init__(self, folder: str, stem: str, size: int, path: str | None = None) -> None:
        """Create a fresh temp file in ``folder``, or open ``path`` (a resumed one)."""
        self.size = size
        if path is None:
            fd, path = tempfile.mkstemp(prefix=f".{stem[:64]}.", suffix=TEMP_SUFFIX, dir=folder)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.path = path
        self.fd = fd
        try:
            os.fchmod(fd, 0o600)
            if size:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
                    os.ftruncate(fd, size)
        except OSError as exc:
            self.remove()
            raise LocalIOError(f"cannot allocate {size} bytes for {path}: {exc.strerror}") from exc

    def pwrite(self, data: memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (loops over short writes)."""
        written = os.pwrite(self.fd, data, offset)
        while written < len(data):  # short writes are rare: no slice on the usual path
            written += os.pwrite(self.fd, data[written:], offset + written)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """Close and delete the temp file (idempotent; never raises for a missing file)."""
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def commit(self, dest: str, force: bool) -> None:
        """Move the complete file to ``dest`` atomically.

        Without ``force`` a file that appeared at ``dest`` meanwhile is not replaced: a
        hard link fails if the name exists, and only then the temp name is dropped.
        """
        self.close()
        if force:
            os.replace(self.path, dest)
            return
        try:
            os.link(self.path, dest)
        except FileExistsError:
            raise DestinationError(f"destination {dest} already exists") from None
        except OSError:
            # Filesystems without hard links: a checked rename is the best left.
            if os.path.lexists(dest):
                raise DestinationError(f"destination {dest} already exists") from None
            os.rename(self.path, dest)
            return
        os.unlink(self.path)


class Watermark:
    """Tracks per-part progress and the contiguous prefix ``[0, value)`` written so far.

    Written by the event loop (``advance``), read by the stream-stage thread (``wait``).
    """

    def __init__(self, size: int, part_size: int) -> None:
        self.size = size
        self.part_size = part_size
        self.parts = -(-size // part_size) if size else 0
        self.done = [0] * self.parts  # contiguous bytes written from each part's start
        self._first_open = 0
        self.value = 0
        self.closed = False
        self._cond = threading.Condition()
        self._waiting: list[int] = []  # targets of the readers blocked in wait()
        self._wake_at = 0  # the smallest of them (0: nobody waits)

    def completed_parts(self) -> frozenset[int]:
        """Indices of the parts written in full."""
        return frozenset(
            i
            for i in range(self.parts)
            if self.done[i] >= self.part_range(i)[1] - self.part_range(i)[0]
        )

    def preset(self, parts: set[int]) -> int:
        """Mark whole ``parts`` as already present (a resumed file); return their bytes."""
        total = 0
        for index in parts:
            start, end = self.part_range(index)
            self.done[index] = end - start
            total += end - start
        with self._cond:
            self._first_open = 0
            self._move_up()
            self._cond.notify_all()
        return total

    def _move_up(self) -> None:
        """Advance ``value`` over the parts complete from ``_first_open`` on (lock held)."""
        while self._first_open < self.parts:
            start, end = self.part_range(self._first_open)
            self.value = start + self.done[self._first_open]
            if self.value < end:
                break
            self._first_open += 1

    def part_range(self, index: int) -> tuple[int, int]:
        """``(start, end)`` byte offsets of part ``index`` (end exclusive)."""
        start = index * self.part_size
        return start, min(start + self.part_size, self.size)

    def advance(self, index: int, nbytes: int) -> None:
        """Record ``nbytes`` more written contiguously in part ``index``."""
        self.done[index] += nbytes
        if index != self._first_open:
            return
        with self._cond:
            self._move_up()
            # Wake readers only when one of them has what it waits for: a wake-up per
            # receive-buffer flush made waiting threads fight the event loop for the GIL.
            if self.value >= self._wake_at:
                self._cond.notify_all()

    def complete_all(self) -> None:
        """Mark the whole object as present (a local source, or a resumed complete file)."""
        with self._cond:
            self.value = self.size
            self._first_open = self.parts
            self._cond.notify_all()

    def close(self) -> None:
        """Wake the reader for good (download ended or was cancelled)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait(self, position: int, min_bytes: int, timeout: float = 0.5) -> int:
        """Block until at least ``min_bytes`` past ``position`` (or the end) are present,
        or the watermark is closed; return the watermark."""
        target = min(self.size, position + min_bytes)
        with self._cond:
            if self.value < target and not self.closed:
                self._waiting.append(target)
                self._wake_at = min(self._waiting)
                try:
                    self._cond.wait_for(lambda: self.value >= target or self.closed, timeout)
                finally:
                    self._waiting.remove(target)
                    self._wake_at = min(self._waiting, default=0)
            return self.value


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned anonymous buffer (reading into it costs less kernel time)."""
    return mmap.mmap(-1, size)


JOURNAL_SUFFIX = ".fastpipe-journal"


def resume_paths(dest: str) -> tuple[str, str]:
    """The fixed temp-file and journal paths that ``--resume`` uses for ``dest``."""
    folder, name = os.path.split(dest)
    return (
        os.path.join(folder, f".{name}{TEMP_SUFFIX}"),
        os.path.join(folder, f".{name}{JOURNAL_SUFFIX}"),
    )


class Journal:
    """A small JSON record beside a resumable temp file: which whole parts are written.

    Only parts complete in the file are listed, and the journal is replaced atomically,
    so after a crash (even SIGKILL) it never claims bytes that are not there. It pins the
    object (ETag, VersionId, size) and the part size: a resume against anything else is
    refused.
    """

    VERSION = 1

    def __init__(
        self,
        path: str,
        source: str,
        etag: str | None,
        version_id: str | None,
        size: int,
        part_size: int,
    ) -> None:
        self.path = path
        self.fields = {
            "version": self.VERSION,
            "source": source,
            "etag": etag,
            "version_id": version_id,
            "size": size,
            "part_size": part_size,
        }
        self._written: frozenset[int] = frozenset()

    @staticmethod
    def load(path: str) -> dict[str, object] | None:
        """The journal's content, or None when there is none (or it is unreadable)."""
        import json

        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write(self, done_parts: frozenset[int]) -> None:
        """Record ``done_parts`` (atomically; skipped when nothing changed)."""
        import json

        if done_parts == self._written and os.path.exists(self.path):
            return
        tmp = self.path + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(self.fields, done=sorted(done_parts)), f)
        os.replace(tmp, self.path)
        self._written = done_parts

    def remove(self) -> None:
        """Delete the journal (idempotent)."""
        for path in (self.path, self.path + ".new"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
