"""The local side: temp file (0600, preallocated), pwrite, watermark, atomic rename.

Nothing is ever left under the destination name unless it is complete and every stage
passed: bytes go to a hidden temp file in the destination's folder, which is renamed at
the end or removed on any failure. Temp names never hold the key (a shell command or a
listing must not see a name an uploader chose): a fresh temp file is
``.fastpipe-<random>.fastpipe-tmp``; ``--resume`` uses ``.fastpipe-<hash of the
destination name>`` with the suffixes ``.fastpipe-tmp``, ``.fastpipe-journal`` and
``.fastpipe-lock``.

Files that may already exist under those fixed names are opened with ``O_NOFOLLOW`` and
checked to be regular files of this user, so that a symlink planted there never makes a
run write through it; new ones are created with ``O_EXCL``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import stat
import tempfile
import threading
import unicodedata
from dataclasses import dataclass

from ._exceptions import DestinationError, FastpipeError, LocalIOError, UsageError

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".fastpipe-"
TEMP_SUFFIX = ".fastpipe-tmp"
JOURNAL_SUFFIX = ".fastpipe-journal"
LOCK_SUFFIX = ".fastpipe-lock"
_MAX_NAME_BYTES = 255
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")
#: errno values that mean the disk (not the place) is the problem: exit 5, not 2.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def local_io_error(message: str, exc: OSError) -> FastpipeError:
    """``exc`` (raised while creating or moving a local file) as the error that fits.

    A full disk, a quota or an I/O error is a :class:`LocalIOError` (exit 5); a place that
    cannot hold the file (missing, read-only, denied, a name too long) a
    :class:`DestinationError` (exit 2).
    """
    text = f"{message}: {exc.strerror or exc}"
    if exc.errno in _DISK_ERRNOS:
        return LocalIOError(text)
    return DestinationError(text)


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


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return _MAX_NAME_BYTES


def resolve_dest(dest: str | os.PathLike[str], key: str | None, force: bool) -> str:
    """Return the absolute destination file path, or raise :class:`DestinationError`.

    A ``dest`` that is an existing folder receives the object under a name made from its
    key (:func:`local_name_for_key`); one that ends with a separator must be an existing
    folder. The destination's folder must exist and be writable, the name must fit the
    file system, and an existing file is refused unless ``force``. An empty ``dest`` is a
    :class:`UsageError` (it would silently mean the current folder).
    """
    text = os.fspath(dest)
    if not text:
        raise UsageError("dest must not be empty (give a file path or a folder)")
    path = os.path.abspath(text)
    if os.path.isdir(path):
        if key is None:
            raise DestinationError(f"destination {path} is a folder")
        path = os.path.join(path, local_name_for_key(key))
    elif text.endswith(("/", os.sep)):
        raise DestinationError(f"destination folder {path} does not exist")
    folder, name = os.path.split(path)
    if not os.path.isdir(folder):
        raise DestinationError(f"destination folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DestinationError(f"destination folder {folder} is not writable")
    limit = _name_max(folder)
    if len(os.fsencode(name)) > limit:
        raise DestinationError(
            f"destination name is too long for the file system ({len(os.fsencode(name))} "
            f"bytes, at most {limit}): {path}"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise local_io_error(f"destination {path} cannot be used", exc) from exc
    if stat.S_ISDIR(st.st_mode):
        raise DestinationError(f"destination {path} is a folder")
    if not force:
        raise DestinationError(f"destination {path} already exists (use --force to replace it)")
    return path


def open_private(path: str, flags: int) -> int:
    """Open ``path`` never through a symlink, and only if it is a regular file of ours.

    ``O_NONBLOCK`` keeps a FIFO planted there from blocking the open (it has no effect on
    a regular file). Raises :class:`DestinationError` for a symlink, another kind of file,
    another owner or a file with other hard links; ``FileNotFoundError`` (and ``FileExistsError`` with ``O_EXCL``)
    pass through for the caller to decide.
    """
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except (FileNotFoundError, FileExistsError):
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DestinationError(
                f"{path} is a symbolic link: refusing to follow it (remove it)"
            ) from None
        raise local_io_error(f"cannot open {path}", exc) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise DestinationError(
                f"{path} is not a regular file of this user: refusing to use it (remove it)"
            )
        if st.st_nlink != 1:  # a hard link planted there would make us write elsewhere
            raise DestinationError(f"{path} has other hard links: refusing to use it (remove it)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class TempFile:
    """A hidden 0600 temp file, sized to the object, written with pwrite.

    Allocation cuts the file to the object's size (a reused file that was longer keeps no
    tail) and preallocates it, so that a full disk shows before the first byte.
    """

    def __init__(self, fd: int, path: str, size: int) -> None:
        """Take over ``fd`` (open on ``path``), size it to ``size`` bytes; closes it on error."""
        self.size = size
        self.path = path
        self.fd = fd
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            if size:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
        except OSError as exc:
            self.remove()
            raise LocalIOError(f"cannot allocate {size} bytes for {path}: {exc.strerror}") from exc

    @classmethod
    def create(cls, folder: str, size: int) -> TempFile:
        """A fresh temp file with a random name in ``folder``."""
        try:
            fd, path = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
        except OSError as exc:
            raise local_io_error(f"cannot create a temp file in {folder}", exc) from exc
        return cls(fd, path, size)

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
        hard link fails if the name exists, and only then the temp name is dropped. A
        symlink at ``dest`` is replaced itself, never followed.
        """
        self.close()
        try:
            self._move(dest, force)
        except FastpipeError:
            raise
        except OSError as exc:
            raise local_io_error(f"cannot move {self.path} to {dest}", exc) from exc

    def _move(self, dest: str, force: bool) -> None:
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


class Journal:
    """A small JSON record beside a resumable temp file: which whole parts are written.

    Only parts complete in the file are listed, and the journal is replaced atomically,
    so after a crash (even SIGKILL) it never claims bytes that are not there. It pins the
    object (source, ETag, VersionId, size) and the part size: a resume against anything
    else starts over.
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
        self._written: frozenset[int] | None = None

    def write(self, done_parts: frozenset[int]) -> None:
        """Record ``done_parts`` (atomically; skipped when nothing changed)."""
        if done_parts == self._written:
            return
        data = json.dumps(dict(self.fields, done=sorted(done_parts))).encode()
        new = self.path + ".new"
        try:
            fd = _create_new(new)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(new, self.path)  # replaces a symlink at the name, never follows it
        except OSError as exc:
            raise local_io_error(f"cannot write the resume journal {self.path}", exc) from exc
        self._written = done_parts

    def remove(self) -> None:
        """Delete the journal (idempotent)."""
        for path in (self.path, self.path + ".new"):
            _unlink(path)


def _create_new(path: str) -> int:
    """Create ``path`` with ``O_EXCL``; a leftover of a run that died is removed first."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        os.unlink(path)  # unlink removes a symlink itself, never what it points to
        return os.open(path, flags, 0o600)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass
class ResumePlan:
    """Where a resumable download starts: its temp file and journal, the part size (an
    earlier run's plan is kept) and the whole parts already in the file."""

    temp: TempFile
    journal: Journal
    part_size: int
    reuse: set[int]


class ResumeState:
    """The fixed temp file, journal and lock that ``--resume`` keeps for one destination.

    Their names come from a hash of the destination's name (never from the key).
    :meth:`lock` takes an exclusive ``flock`` on the lock file, so that a second run to
    the same destination is refused instead of writing into the same temp file; the
    other methods run with it held.
    """

    def __init__(self, dest: str) -> None:
        folder, name = os.path.split(dest)
        tag = hashlib.sha256(os.fsencode(name)).hexdigest()[:24]
        base = os.path.join(folder, TEMP_PREFIX + tag)
        self.dest = dest
        self.temp_path = base + TEMP_SUFFIX
        self.journal_path = base + JOURNAL_SUFFIX
        self.lock_path = base + LOCK_SUFFIX
        self._lock_fd = -1

    def lock(self) -> None:
        """Take the destination's resume lock, or raise :class:`DestinationError`."""
        while True:
            try:
                fd = open_private(self.lock_path, os.O_RDWR | os.O_CREAT)
            except FileNotFoundError as exc:  # a folder that cannot hold files (/proc)
                raise local_io_error(f"cannot create {self.lock_path}", exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DestinationError(
                    f"destination {self.dest} is in use by another --resume run "
                    f"(it holds {self.lock_path})"
                ) from None
            # The run that held the lock removed the file before letting go: only a
            # lock on the file still under the name counts.
            held = os.fstat(fd)
            try:
                now = os.lstat(self.lock_path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                self._lock_fd = fd
                return
            os.close(fd)

    def unlock(self) -> None:
        """Remove the lock file and let go of the lock (idempotent)."""
        if self._lock_fd < 0:
            return
        try:
            _unlink(self.lock_path)  # while still held: see lock()
        finally:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def plan(
        self, source: str, etag: str | None, version_id: str | None, size: int, part_size: int
    ) -> ResumePlan:
        """Open the temp file, keeping the whole parts an earlier run of this very object
        wrote; anything else there is discarded (with a warning) and the run starts over."""
        previous = self._load_journal()
        try:
            fd = open_private(self.temp_path, os.O_RDWR)
        except FileNotFoundError:
            fd = -1
        try:
            found: tuple[int, set[int]] | str = "its temp file is gone"
            if fd >= 0:
                found = _reusable(previous, source, etag, version_id, size, os.fstat(fd).st_size)
            if isinstance(found, str):
                if fd >= 0 or previous is not None:
                    logger.warning(
                        "%s: discarding the resume state an earlier run left for %s (%s); "
                        "starting over",
                        source,
                        self.dest,
                        found,
                    )
                found = (part_size, set())
                if fd >= 0:
                    os.close(fd)
                    fd = -1
                # The journal goes first: it must never describe a file it did not see.
                for path in (self.journal_path, self.journal_path + ".new", self.temp_path):
                    _unlink(path)
                fd = open_private(self.temp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except BaseException as exc:
            if fd >= 0:
                os.close(fd)
            if isinstance(exc, FileExistsError):
                raise DestinationError(f"{self.temp_path} appeared while it was replaced") from None
            if isinstance(exc, OSError) and not isinstance(exc, FastpipeError):
                raise local_io_error(f"cannot open {self.temp_path}", exc) from exc
            raise
        temp = TempFile(fd, self.temp_path, size)  # owns fd; cuts a longer file to the size
        part, reuse = found
        journal = Journal(self.journal_path, source, etag, version_id, size, part)
        return ResumePlan(temp, journal, part, reuse)

    def _load_journal(self) -> dict[str, object] | str | None:
        """The journal's content, None when there is none, or why it cannot be read."""
        try:
            fd = open_private(self.journal_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            raw = f.read(1 << 20)
        try:
            data = json.loads(raw)
        except ValueError:
            return "its journal is unreadable"
        return data if isinstance(data, dict) else "its journal is unreadable"


def _reusable(
    previous: dict[str, object] | str | None,
    source: str,
    etag: str | None,
    version_id: str | None,
    size: int,
    file_size: int,
) -> tuple[int, set[int]] | str:
    """The part size and whole parts to keep, or why nothing can be kept."""
    if previous is None:
        return "no journal says what its temp file holds"
    if isinstance(previous, str):
        return previous
    if previous.get("version") != Journal.VERSION:
        return "its journal has another format"
    if previous.get("source") != source:
        return "it was for another object"
    if (previous.get("etag"), previous.get("version_id"), previous.get("size")) != (
        etag,
        version_id,
        size,
    ):
        return f"the object changed since (ETag {previous.get('etag')} is now {etag})"
    old_part, done = previous.get("part_size"), previous.get("done")
    if not isinstance(old_part, int) or old_part < 1 or not isinstance(done, list):
        return "its journal is unreadable"
    if file_size != size:
        return f"its temp file holds {file_size} bytes, not {size}"
    parts = -(-size // old_part)
    return old_part, {i for i in done if isinstance(i, int) and 0 <= i < parts}
