"""Placement: where one object's bytes land, and how they get to the destination.

- :class:`Placement` is the caller's choice for one call (``dest``, ``force``,
  ``resume``, ``temp_dir``), validated here for the library and the CLI alike.
- :class:`ObjectPlacement` carries it out for one S3 object: it resolves the destination
  path, takes the resume lock, creates (or, resuming, reopens) the temp file and its
  journal, commits the complete file with an atomic rename, and cleans up on every
  other way out.

Nothing is ever left under the destination name unless it is complete and every stage
passed: bytes go to a hidden temp file in the destination's folder, which is renamed at
the end or removed on any failure. Temp names never hold the key (a shell command or a
listing must not see a name an uploader chose): a fresh temp file is
``.fastpipe-f<random>.fastpipe-tmp``; ``resume`` uses ``.fastpipe-<hash of the
destination name>`` with the suffixes ``.fastpipe-tmp``, ``.fastpipe-journal`` and
``.fastpipe-lock``. Files that may already exist under those fixed names are opened with
``O_NOFOLLOW`` and must be regular files of this user with no other hard link, so that
nothing planted there makes a run write elsewhere; new ones are created with ``O_EXCL``.

A fresh temp file is held (``flock``) by its run until it is renamed or removed, so the
one a killed run left is told apart from a live run's: the first fresh temp file a
process makes in a folder removes those nobody holds there (:func:`sweep_once`; a worker
also sweeps its ``dest`` when it starts). Resume files are not swept: they are kept on
purpose for the next ``resume`` run, under its own lock.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ._exceptions import (
    DestinationError,
    FastpipeError,
    IntegrityError,
    LocalIOError,
    UsageError,
)
from ._file import TempFile

if TYPE_CHECKING:
    from .stages._base import ObjectInfo

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".fastpipe-"
TEMP_SUFFIX = ".fastpipe-tmp"
#: A fresh (not resumable) temp file: ``f`` and tempfile's 8 random characters. The
#: other names under TEMP_PREFIX (resume's hash; older versions' fresh files, which no
#: lock tells live from dead) never match it.
FRESH_PREFIX = TEMP_PREFIX + "f"
_FRESH_NAME = re.compile(r"\.fastpipe-f[a-z0-9_]{8}\.fastpipe-tmp\Z")
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


def local_path_for_key(key: str) -> str:
    """A safe relative path for an S3 key, keeping its ``/`` folders.

    Each segment is cleaned as :func:`local_name_for_key` cleans a name (NUL, control
    characters and backslashes become ``_``, a leading ``.`` becomes ``_``, ``..`` becomes
    ``__``; an overlong segment keeps a hash); empty and ``.`` segments are dropped, so an
    absolute key or ``a//b`` stays relative. The result never holds a ``..`` segment and
    never starts with ``/``: joined to a folder it stays inside it.
    """
    raw = [seg for seg in key.split("/") if seg not in ("", ".")]
    if not raw:
        return local_name_for_key(key)
    # A backslash is a character here, not a separator: it must not split a segment.
    return "/".join(
        "__" if seg == ".." else local_name_for_key(seg.replace("\\", "_")) for seg in raw
    )


def make_key_folders(root: str, relative: str) -> str:
    """Create the folders of ``relative`` under ``root`` (one level at a time, each a
    real folder, not a symlink, so that nothing planted leads outside ``root``); return
    the file's absolute path."""
    folder = os.path.abspath(root)
    parts = relative.split("/")
    for part in parts[:-1]:
        folder = os.path.join(folder, part)
        try:
            os.mkdir(folder, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            raise local_io_error(f"destination folder {folder} cannot be created", exc) from exc
        try:
            st = os.lstat(folder)
        except OSError as exc:
            raise local_io_error(f"destination folder {folder} cannot be used", exc) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise DestinationError(f"destination {folder} is not a folder (a file or a symlink)")
    return os.path.join(folder, parts[-1])


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
    path = _dest_file(os.fspath(dest), key)
    _check_folder(*os.path.split(path))
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


def _dest_file(text: str, key: str | None) -> str:
    """The file path ``dest`` names: itself, or a name made from ``key`` in a folder."""
    if not text:
        raise UsageError("dest must not be empty (give a file path or a folder)")
    path = os.path.abspath(text)
    if os.path.isdir(path):
        if key is None:
            raise DestinationError(f"destination {path} is a folder")
        return os.path.join(path, local_name_for_key(key))
    if text.endswith(("/", os.sep)):  # a trailing separator means a folder
        raise DestinationError(f"destination folder {path} does not exist")
    return path


def _check_folder(folder: str, name: str) -> None:
    """The destination's folder exists, is writable and takes a name that long."""
    if not os.path.isdir(folder):
        raise DestinationError(f"destination folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DestinationError(f"destination folder {folder} is not writable")
    size, limit = len(os.fsencode(name)), _name_max(folder)
    if size > limit:
        raise DestinationError(
            f"destination name is too long for the file system ({size} bytes, at most "
            f"{limit}): {os.path.join(folder, name)}"
        )


def open_private(path: str, flags: int) -> int:
    """Open ``path`` never through a symlink, and only if it is a regular file of ours.

    ``O_NONBLOCK`` keeps a FIFO planted there from blocking the open (it has no effect on
    a regular file). Raises :class:`DestinationError` for a symlink, another kind of file,
    another owner or a file with other hard links; ``FileNotFoundError`` (and
    ``FileExistsError`` with ``O_EXCL``) pass through for the caller to decide.
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


@dataclass(frozen=True)
class Placement:
    """Where one call puts the objects it processes; validated on construction.

    ``dest`` keeps the object: a file path, or a folder that receives it under a name
    made from its key (a path ending in a separator must be a folder); None keeps
    nothing. ``force`` replaces an existing destination file. ``resume`` (needs ``dest``)
    keeps a fixed temp file and a journal beside the destination, so that an interrupted
    run continues from the whole parts already written. ``temp_dir`` is the temp file's
    folder when there is no ``dest`` (default ``TMPDIR``, else ``/tmp``; a tmpfs there
    holds the whole object in RAM).
    """

    dest: str | os.PathLike[str] | None = None
    force: bool = False
    resume: bool = False
    temp_dir: str | os.PathLike[str] | None = None
    #: ``dest`` is a folder that receives each object under its key's path
    #: (:func:`local_path_for_key`), as many objects are kept.
    key_paths: bool = False

    def __post_init__(self) -> None:
        if self.dest is not None:
            dest = os.fspath(self.dest)
            if not dest:
                raise UsageError("dest must not be empty (give a file path or a folder)")
            object.__setattr__(self, "dest", dest)
        if self.resume and self.dest is None:
            raise UsageError("resume needs a destination (--dest)")
        if self.temp_dir is not None:
            temp_dir = os.fspath(self.temp_dir)
            if not os.path.isdir(temp_dir):
                raise UsageError(f"temp_dir {temp_dir!r} is not a folder")
            object.__setattr__(self, "temp_dir", temp_dir)

    @property
    def temp_folder(self) -> str | os.PathLike[str] | None:
        """Where this placement's temp files go: beside ``dest`` (``dest`` itself, whose
        nearest existing folder :func:`~fastpipe._budgets.default_disk_budget` measures),
        else ``temp_dir``; None for the system temp folder."""
        return self.dest if self.dest is not None else self.temp_dir

    def check_local_source(self) -> None:
        """A local file is processed in place: there is nothing to place."""
        if self.dest is not None:
            raise UsageError("dest applies to S3 sources; a local file is processed in place")

    def with_key_paths(self) -> Placement:
        """This placement, keeping each object under its key's path in the ``dest``
        folder (checked here)."""
        self.check_many()
        return replace(self, key_paths=True)

    def check_many(self) -> None:
        """Many objects need a folder to receive them (each named after its key)."""
        if self.dest is not None and not os.path.isdir(self.dest):
            raise UsageError(f"process_many needs a destination folder, got {self.dest}")


class ObjectPlacement:
    """Where one S3 object's bytes land, from its temp file to its destination.

    Made before HEAD (the destination is resolved and, with ``resume``, its lock taken,
    so that a bad or busy destination fails before any request); :meth:`open_temp` after
    HEAD; :meth:`commit` once every stage passed; :meth:`close` on every way out.
    """

    def __init__(self, placement: Placement, key: str) -> None:
        self.placement = placement
        dest = placement.dest
        name_from: str | None = key
        if dest is not None and placement.key_paths:
            dest = make_key_folders(os.fspath(dest), local_path_for_key(key))
            name_from = None  # dest is now the file itself
        self.dest_path = None if dest is None else resolve_dest(dest, name_from, placement.force)
        self.temp: TempFile | None = None
        self.journal: Journal | None = None
        #: Leave the temp file and journal for the next ``resume`` run.
        self.keep_for_resume = False
        #: :meth:`close` went through (a second call has nothing left to do).
        self.closed = False
        self._committed = False
        self._resume: ResumeState | None = None
        if placement.resume:
            assert self.dest_path is not None  # Placement requires dest with resume
            resume = ResumeState(self.dest_path)
            resume.lock()
            self._resume = resume

    def open_temp(self, source: str, info: ObjectInfo, part_size: int) -> tuple[int, set[int]]:
        """Create (resuming: reopen) the temp file, sized to the object.

        Returns the part size to use (a resumed run keeps the earlier plan) and the whole
        parts already in the file.
        """
        if self._resume is None:
            folder = (
                os.path.dirname(self.dest_path)
                if self.dest_path
                else os.fspath(self.placement.temp_dir or tempfile.gettempdir())
            )
            sweep_once(folder)
            self.temp = new_temp_file(folder, info.size)
            return part_size, set()
        plan = self._resume.plan(source, info.etag, info.version_id, info.size, part_size)
        self.temp, self.journal = plan.temp, plan.journal
        return plan.part_size, plan.reuse

    def record(self, done_parts: frozenset[int]) -> None:
        """Write the resume journal (no-op without ``resume``)."""
        if self.journal is not None:
            self.journal.write(done_parts)

    def interrupted(self, exc: BaseException) -> None:
        """The download ended with ``exc``: with ``resume`` a broken or interrupted one
        keeps what it has; a changed object, or a local or usage error, starts over."""
        self.keep_for_resume = self.journal is not None and not isinstance(
            exc, (IntegrityError, LocalIOError, UsageError)
        )

    def commit(self) -> str | None:
        """Move the complete temp file to the destination; return its path, or None when
        there is no destination."""
        if self.dest_path is None or self.temp is None:
            return None
        commit(self.temp, self.dest_path, self.placement.force)
        self._committed = True
        return self.dest_path

    def close(self) -> None:
        """Remove the temp file unless it was committed or is left for a resume, drop
        the journal unless it is left, and let go of the resume lock (idempotent)."""
        try:
            if self.temp is not None:
                if self._committed or self.keep_for_resume:
                    self.temp.close()
                else:
                    self.temp.remove()
            if self.journal is not None and not self.keep_for_resume:
                self.journal.remove()
        finally:
            if isinstance(self.temp, FreshTempFile):
                self.temp.release()  # renamed or removed by now: a sweep may look at it
            if self._resume is not None:
                self._resume.unlock()
        self.closed = True


class FreshTempFile(TempFile):
    """A fresh temp file and its hold: a second descriptor with an exclusive ``flock``,
    kept until :meth:`release` (the write descriptor is closed before the file stages
    run; the hold outlives it, up to the rename or the removal)."""

    def __init__(self, fd: int, path: str, size: int, hold: int) -> None:
        self.hold = hold  # before TempFile's __init__, whose failure calls remove()
        super().__init__(fd, path, size)

    def remove(self) -> None:
        """Close and delete the file, then let go of it (idempotent)."""
        super().remove()
        self.release()

    def release(self) -> None:
        """Let go of the hold (idempotent)."""
        if self.hold >= 0:
            os.close(self.hold)
            self.hold = -1


def new_temp_file(folder: str, size: int) -> FreshTempFile:
    """A fresh temp file with a random name in ``folder`` (``O_EXCL``: never a symlink),
    held until it is released (see :func:`sweep_once`)."""
    while True:
        try:
            fd, path = tempfile.mkstemp(prefix=FRESH_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
        except OSError as exc:
            raise local_io_error(f"cannot create a temp file in {folder}", exc) from exc
        hold = _hold(fd, path)
        if hold >= 0:
            return FreshTempFile(fd, path, size, hold)
        os.close(fd)  # a sweep took it for a dead run's before it was held: another name


def _hold(fd: int, path: str) -> int:
    """A descriptor of ``path`` holding an exclusive ``flock``, or -1 when the file under
    ``path`` is no longer ``fd``'s (a sweep removed it before the lock was taken)."""
    try:
        hold = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1
    except OSError as exc:
        _unlink(path)
        os.close(fd)
        raise local_io_error(f"cannot open {path}", exc) from exc
    try:
        fcntl.flock(hold, fcntl.LOCK_EX)  # waits only while a sweep looks at this file
    except OSError:
        pass  # no flock on this file system: a sweep cannot take the lock either
    if _still_at(hold, path) and os.path.samestat(os.fstat(hold), os.fstat(fd)):
        return hold
    os.close(hold)
    return -1


def _still_at(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open on ``fd``."""
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except FileNotFoundError:
        return False


#: Folders this process swept already (bounded: a long run over many key folders).
_swept: OrderedDict[str, None] = OrderedDict()
_swept_lock = threading.Lock()
_SWEPT_MAX = 4096


def sweep_once(folder: str) -> list[str]:
    """Remove the fresh temp files in ``folder`` that no process holds (a run killed by
    SIGKILL or a crash left them), the first time this process asks for ``folder``;
    return their paths. A live run holds its file, so it is never removed; resume files
    have other names and are left to the next ``resume`` run."""
    key = os.path.abspath(folder)
    with _swept_lock:
        if key in _swept:
            _swept.move_to_end(key)
            return []
        _swept[key] = None
        if len(_swept) > _SWEPT_MAX:
            _swept.popitem(last=False)
    try:
        names = os.listdir(key)
    except OSError:
        return []  # creating the temp file there says why, if it matters
    candidates = [os.path.join(key, name) for name in names if _FRESH_NAME.match(name)]
    removed = [path for path in candidates if _remove_if_dead(path)]
    if removed:
        logger.warning("removed %d temp file(s) that dead runs left in %s", len(removed), key)
    return removed


def _remove_if_dead(path: str) -> bool:
    """Delete ``path`` if nobody holds it, with its lock taken (a run creating it at this
    moment then finds it gone and makes another)."""
    try:
        fd = open_private(path, os.O_RDONLY)
    except (FastpipeError, OSError):
        return False  # gone, or not a plain file of this user: not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _still_at(fd, path):
            return False  # renamed to its destination meanwhile
        os.unlink(path)
        return True
    except OSError:
        return False  # held: its run is alive (or this file system has no flock)
    finally:
        os.close(fd)


def commit(temp: TempFile, dest: str, force: bool) -> None:
    """Move the complete ``temp`` file to ``dest`` atomically.

    Without ``force`` a file that appeared at ``dest`` meanwhile is not replaced: a hard
    link fails if the name exists, and only then the temp name is dropped. A symlink at
    ``dest`` is replaced itself, never followed.
    """
    temp.close()
    try:
        _move(temp.path, dest, force)
    except FastpipeError:
        raise
    except OSError as exc:
        raise local_io_error(f"cannot move {temp.path} to {dest}", exc) from exc


def _move(path: str, dest: str, force: bool) -> None:
    if force:
        os.replace(path, dest)
        return
    try:
        os.link(path, dest)
    except FileExistsError:
        raise DestinationError(f"destination {dest} already exists") from None
    except OSError:
        # Filesystems without hard links: a checked rename is the best left.
        if os.path.lexists(dest):
            raise DestinationError(f"destination {dest} already exists") from None
        os.rename(path, dest)
        return
    os.unlink(path)


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
            except OSError as exc:  # a file system without flock (ENOLCK)
                os.close(fd)
                raise local_io_error(f"cannot lock {self.lock_path}", exc) from exc
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
                fd = self._start_over(fd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        temp = TempFile(fd, self.temp_path, size)  # owns fd; cuts a longer file to the size
        part, reuse = found
        journal = Journal(self.journal_path, source, etag, version_id, size, part)
        return ResumePlan(temp, journal, part, reuse)

    def _start_over(self, fd: int) -> int:
        """Drop the old state (closing ``fd`` if open); return a new, empty temp file."""
        if fd >= 0:
            os.close(fd)
        try:
            # The journal goes first: it must never describe a file it did not see.
            for path in (self.journal_path, self.journal_path + ".new", self.temp_path):
                _unlink(path)
            return open_private(self.temp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            raise DestinationError(f"{self.temp_path} appeared while it was replaced") from None
        except FastpipeError:
            raise
        except OSError as exc:
            raise local_io_error(f"cannot replace {self.temp_path}", exc) from exc

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
