"""Sources of a many-object run: a listed prefix, a file of sources, glob filters.

Each is an async iterator, pulled by ``Engine.map`` only as object slots free up, so that
a listing of a million keys or a long file is never held whole.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TextIO

import anyio

from ._exceptions import UsageError
from ._source import S3Location, parse_source

if TYPE_CHECKING:
    from ._s3 import S3Control

#: Lines read from a sources file per trip to a worker thread.
_BATCH = 1000


def parse_prefix(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` (the prefix may be empty or end with ``/``) as (bucket,
    prefix); a :class:`UsageError` for anything else."""
    if not uri.lower().startswith("s3://"):
        raise UsageError(f"--recursive lists an S3 prefix (s3://bucket/prefix/), got {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    if not 3 <= len(bucket) <= 63:
        raise UsageError(f"malformed S3 prefix {uri!r}: bucket names have 3 to 63 characters")
    return bucket, prefix


async def list_uris(s3: S3Control, bucket: str, prefix: str) -> AsyncIterator[str]:
    """The ``s3://`` URI of every object under the prefix, as the listing pages arrive."""
    async for key in s3.list_keys(bucket, prefix):
        yield f"s3://{bucket}/{key}"


def key_filter(include: Sequence[str], exclude: Sequence[str]) -> Callable[[str], bool]:
    """Whether a key is processed: it matches one ``include`` glob (when any is given) and
    no ``exclude`` glob; an exclude wins. Globs are :mod:`fnmatch` patterns on the whole
    key (``*`` matches ``/`` too), case-sensitive."""

    def wanted(key: str) -> bool:
        if include and not any(fnmatch.fnmatchcase(key, p) for p in include):
            return False
        return not any(fnmatch.fnmatchcase(key, p) for p in exclude)

    return wanted


def key_of(source: str) -> str:
    """The key of an ``s3://`` URI (a local path is its own key)."""
    if source.lower().startswith("s3://"):
        return source[5:].partition("/")[2]
    return source


async def filtered(
    sources: AsyncIterator[str], wanted: Callable[[str], bool]
) -> AsyncIterator[str]:
    """The sources whose key ``wanted`` accepts."""
    async for source in sources:
        if wanted(key_of(source)):
            yield source


async def read_sources(
    path: str, bad_line: Callable[[str, UsageError], Awaitable[None]], *, s3_only: bool = False
) -> AsyncIterator[str]:
    """One source per line of ``path`` (``-``: stdin); blank lines and ``#`` comments are
    skipped. A malformed line (with ``s3_only``, also one that is not an ``s3://`` URI) goes
    to ``bad_line`` (its text, and a :class:`UsageError` naming the file, the line number
    and why) and the reading goes on. A file that cannot be read is a ``UsageError``
    naming it and the cause. Opening and reading happen in worker threads."""
    stream: TextIO
    if path == "-":
        stream = sys.stdin
    else:
        stream = await anyio.to_thread.run_sync(_open, path)
    where = "stdin" if path == "-" else path
    number = 0
    try:
        while True:
            try:
                lines = await anyio.to_thread.run_sync(_read_batch, stream)
            except OSError as exc:
                raise _unreadable(path, exc) from exc
            if not lines:
                return
            for line in lines:
                number += 1
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                try:
                    _check_source(text, s3_only)
                except UsageError as exc:
                    await bad_line(text, UsageError(f"{where} line {number}: {exc}"))
                    continue
                yield text
    finally:
        if stream is not sys.stdin:
            stream.close()


def _open(path: str) -> TextIO:
    try:
        return open(path, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def _unreadable(path: str, exc: OSError) -> UsageError:
    return UsageError(f"--from {path}: cannot read: {exc.strerror or exc}")


def _check_source(text: str, s3_only: bool) -> None:
    """A ``UsageError`` saying why ``text`` is not a source (with ``s3_only``: an S3 one)."""
    location = parse_source(text)
    if s3_only and not isinstance(location, S3Location):
        raise UsageError(f"not an s3:// URI: {text!r}")


def _read_batch(stream: TextIO) -> list[str]:
    lines = []
    for _ in range(_BATCH):
        line = stream.readline()
        if not line:
            break
        lines.append(line.rstrip("\r\n") if line.endswith("\n") else line)
    return lines


async def from_list(sources: Sequence[str]) -> AsyncIterator[str]:
    """Sources given on the command line, as an async iterator."""
    for source in sources:
        yield source
