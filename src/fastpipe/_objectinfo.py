"""What is known of an object before its first byte (:class:`ObjectInfo`), built from HEAD.

The engine sends ``HeadObject(ChecksumMode="ENABLED")`` for the object and, for a
multipart object, ``HeadObject(PartNumber=1)`` for the size of its first part: the stages
that check what S3 stored (``verify``) need both before the first byte arrives.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import ObjectNotFound, SourceError
from ._s3meta import CHECKSUM_ALGORITHMS, parts_from_etag, strip_etag
from ._source import LocalLocation, S3Location


@dataclass(frozen=True)
class ObjectInfo:
    """What is known about the object before its first byte is read (from HEAD or stat).

    ``checksums`` maps an algorithm name as S3 spells it (``CRC32``, ``CRC32C``,
    ``CRC64NVME``, ``SHA1``, ``SHA256``) to the base64 value S3 stored; ``checksum_type`` is
    ``FULL_OBJECT`` or ``COMPOSITE`` when S3 said so. ``parts_count`` and
    ``multipart_part_size`` describe a multipart upload (from HEAD ``PartNumber=1``).
    """

    source: str
    size: int
    etag: str | None = None
    version_id: str | None = None
    content_type: str | None = None
    bucket: str | None = None
    key: str | None = None
    local_path: str | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    checksum_type: str | None = None
    parts_count: int | None = None
    multipart_part_size: int | None = None


# Re-exported for the modules and tests that read ETags through this module.
__all__ = ["object_info_from_head", "parts_from_etag", "strip_etag"]


def _split_s3_url(source: str) -> tuple[str | None, str | None]:
    if not source.startswith("s3://"):
        return None, None
    bucket, _, key = source[5:].partition("/")
    return bucket or None, key or None


def object_info_from_head(
    head: Mapping[str, Any],
    part1_head: Mapping[str, Any] | None,
    source: str,
    *,
    bucket: str | None = None,
    key: str | None = None,
) -> ObjectInfo:
    """Map a HEAD response (and the HEAD of part 1, when sent) to an :class:`ObjectInfo`.

    ``head`` is the dict botocore returns for ``HeadObject`` (with ``ChecksumMode``
    enabled, so that ``Checksum*`` keys are present), ``part1_head`` the one for
    ``HeadObject(PartNumber=1)`` or None. ``bucket`` and ``key`` default to the parts of
    an ``s3://bucket/key`` source.

    ``parts_count`` comes from ``PartsCount`` (part HEAD first), else from a multipart
    ETag's ``-N`` suffix; it stays None for a single-part upload. ``multipart_part_size``
    is the part HEAD's ``ContentLength``, set only for a multipart object (a part HEAD of
    a single-part object answers with the whole object).
    """
    if bucket is None and key is None:
        bucket, key = _split_s3_url(source)
    etag = strip_etag(head.get("ETag"))
    checksums = {
        name: str(head[f"Checksum{name}"])
        for name in CHECKSUM_ALGORITHMS
        if head.get(f"Checksum{name}")
    }
    # A part HEAD of a single-part object answers with the whole object (SeaweedFS adds
    # PartsCount 1): only an ETag "-N" or a count above 1 says the object is multipart.
    parts_count = parts_from_etag(etag)
    for response in (part1_head, head):
        count = int(response.get("PartsCount") or 0) if response is not None else 0
        if count > 1 or (count == 1 and parts_count is not None):
            parts_count = count
            break
    part_size: int | None = None
    if part1_head is not None and parts_count is not None:
        length = part1_head.get("ContentLength")
        if isinstance(length, int) and length > 0:
            part_size = length
    return ObjectInfo(
        source=source,
        size=int(head.get("ContentLength", 0)),
        etag=etag,
        version_id=head.get("VersionId"),
        content_type=head.get("ContentType"),
        bucket=bucket,
        key=key,
        checksums=checksums,
        checksum_type=head.get("ChecksumType"),
        parts_count=parts_count,
        multipart_part_size=part_size,
    )


@dataclass(frozen=True)
class PinnedObject:
    """One S3 object version as HEAD saw it: where it lives and what every GET must match.

    The part of a job the data planes need (size, ETag and version pin each ranged GET).
    """

    location: S3Location
    info: ObjectInfo

    def __str__(self) -> str:
        return str(self.location)


def local_object_info(location: LocalLocation) -> ObjectInfo:
    """What a local source is (its ``stat``), or the error that says why it cannot be read."""
    path = os.path.abspath(location.path)
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise ObjectNotFound(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise SourceError(f"{path}: permission denied") from exc
    if not os.path.isfile(path):
        raise SourceError(f"{path}: not a regular file")
    return ObjectInfo(source=path, size=st.st_size, local_path=path)
