"""Parse a source: ``s3://bucket/key`` or a local path."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ._exceptions import UsageError


@dataclass(frozen=True)
class S3Location:
    """A bucket and key (and optionally a version)."""

    bucket: str
    key: str
    version_id: str | None = None

    def __str__(self) -> str:
        """The URI, with ``?versionId=`` when a version was given (the report's source)."""
        uri = f"s3://{self.bucket}/{self.key}"
        return f"{uri}?versionId={self.version_id}" if self.version_id else uri


@dataclass(frozen=True)
class LocalLocation:
    """A file on local disk, processed in place."""

    path: str

    def __str__(self) -> str:
        """The absolute path (the report's source); ``path`` keeps it as given."""
        return os.path.abspath(self.path)


Location = S3Location | LocalLocation


def parse_source(source: str | os.PathLike[str]) -> Location:
    """Return the location ``source`` names.

    ``s3://bucket/key`` (optionally ``?versionId=...``) is an S3 object; anything without
    a scheme is a local path. Malformed S3 URIs raise :class:`UsageError`.
    """
    if isinstance(source, os.PathLike):
        return LocalLocation(os.fspath(source))
    text = str(source)
    if "\x00" in text:
        raise UsageError("source contains a NUL character")
    lowered = text.lower()
    if lowered.startswith("s3:"):
        return _parse_s3_uri(text)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise UsageError(f"unsupported source scheme {scheme!r} in {text!r}; use s3:// or a path")
    if not text:
        raise UsageError("empty source")
    return LocalLocation(text)


def _parse_s3_uri(text: str) -> S3Location:
    """``s3://bucket/key[?versionId=...]``, or a UsageError that says what is wrong."""
    if not text.lower().startswith("s3://"):
        raise UsageError(f"malformed S3 URI {text!r}: expected s3://bucket/key")
    rest = text[5:]
    version_id = None
    if "?versionId=" in rest:
        rest, _, version_id = rest.partition("?versionId=")
    bucket, slash, key = rest.partition("/")
    if not bucket:
        raise UsageError(f"malformed S3 URI {text!r}: no bucket (expected s3://bucket/key)")
    if not slash or not key:
        raise UsageError(f"malformed S3 URI {text!r}: no key (expected s3://bucket/key)")
    if len(bucket) < 3 or len(bucket) > 63:
        raise UsageError(f"malformed S3 URI {text!r}: bucket names have 3 to 63 characters")
    return S3Location(bucket, key, version_id or None)
