"""What fastpipe knows about S3's wire forms, in one place.

ETag shapes (single-part MD5, multipart ``<md5>-N``, quoted or weak), checksum algorithm
names and the order checks prefer them, S3 error codes and how they map to fastpipe's
errors on both data planes (aiobotocore's parsed ``ClientError`` and the raw plane's XML
bodies), and request ids. Transport modules and stages import these names from here.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._exceptions import (
    AccessDenied,
    FastpipeError,
    IntegrityError,
    ObjectChanged,
    ObjectNotFound,
    SourceError,
)
from ._http import parse_content_range
from ._source import S3Location

if TYPE_CHECKING:
    from ._objectinfo import PinnedObject

# -- ETags --------------------------------------------------------------------------------

#: A single-part upload's ETag: the MD5 of the bytes, in hex.
MD5_ETAG = re.compile(r"^[0-9a-fA-F]{32}$")
#: A multipart upload's ETag: the MD5 of the parts' MD5s, ``-`` and the part count.
MULTIPART_ETAG = re.compile(r"^([0-9a-fA-F]{32})-(\d+)$")


def strip_etag(etag: str | None) -> str | None:
    """Return an ETag without its quotes (and without a weak ``W/`` prefix)."""
    if etag is None:
        return None
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    return etag.strip('"')


def parts_from_etag(etag: str | None) -> int | None:
    """The part count of a multipart ETag (``<md5>-N``), or None for any other shape."""
    m = MULTIPART_ETAG.match(strip_etag(etag) or "")
    return int(m.group(2)) if m else None


def needs_part1(head: Mapping[str, Any]) -> bool:
    """True when a HEAD answer (botocore's shape) is of a multipart object: a second HEAD
    of part 1 gives its part size (both control planes ask it)."""
    etag = strip_etag(head.get("ETag"))
    return bool(parts_from_etag(etag)) or head.get("ChecksumType") == "COMPOSITE"


def quoted_etag(etag: str) -> str:
    """The ETag as ``If-Match`` sends it (quoted)."""
    return f'"{etag}"'


# -- checksums ----------------------------------------------------------------------------

#: S3 checksum algorithms as HEAD names them (``Checksum<NAME>`` response keys), in the
#: order a check prefers them: the cheapest to compute first.
CHECKSUM_ALGORITHMS = ("CRC64NVME", "CRC32C", "CRC32", "SHA1", "SHA256")

#: A composite (per-part) checksum: ``<base64>-N``.
COMPOSITE_CHECKSUM = re.compile(r"^(.+)-(\d+)$")


# -- errors -------------------------------------------------------------------------------

#: S3 error codes (and HTTP statuses) that are worth another attempt.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "500",
        "502",
        "503",
        "504",
    }
)

#: Codes that say the credentials may not read the object.
_DENIED_CODES = frozenset(
    {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
)


class TransientError(FastpipeError):
    """A fault worth retrying (5xx, 429, SlowDown, reset, timeout, short body). Internal."""


class ExpiredURL(FastpipeError):
    """The presigned URL expired: sign again and retry. Internal."""


@dataclass(frozen=True)
class S3ErrorBody:
    """The fields of an S3 XML error body (empty strings when absent)."""

    code: str = ""
    message: str = ""
    request_id: str = ""


def parse_error_body(body: bytes) -> S3ErrorBody:
    """Read ``<Error><Code/><Message/><RequestId/></Error>`` (anything else: empty)."""
    if not body:
        return S3ErrorBody()
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return S3ErrorBody()
    return S3ErrorBody(
        root.findtext("Code") or "",
        root.findtext("Message") or "",
        root.findtext("RequestId") or "",
    )


def request_id_from_headers(headers: Mapping[str, str]) -> str | None:
    """S3's request id from response headers (keys in lower case), if any."""
    return headers.get("x-amz-request-id") or None


def map_s3_error(
    code: str,
    status: int,
    message: str,
    location: S3Location,
    etag: str | None = None,
    request_id: str | None = None,
) -> FastpipeError:
    """Map an S3 error (from aiobotocore or a raw response) to fastpipe's hierarchy.

    ``message`` is the server's text: it may quote the request (a presigned URL
    included); :class:`FastpipeError` redacts it. ``request_id`` is kept on the error.
    """
    error = _mapped(code, status, message, location, etag)
    error.request_id = request_id or None
    return error


def _mapped(
    code: str, status: int, message: str, location: S3Location, etag: str | None
) -> FastpipeError:
    where = str(location)
    if code in ("NoSuchKey", "NoSuchVersion") or (status == 404 and code in ("404", "NotFound")):
        return ObjectNotFound(f"{where}: no such key")
    if code == "NoSuchBucket":
        return ObjectNotFound(f"{where}: no such bucket {location.bucket!r}")
    if code in ("PreconditionFailed", "412") or status == 412:
        return object_changed(location, f"ETag {etag} no longer matches")
    if code in ("InvalidRange", "416") or status == 416:
        return ObjectChanged(f"{where}: the object is shorter than when the download started")
    if status == 403 and "expired" in message.lower():
        return ExpiredURL(f"{where}: presigned URL expired")
    if code in _DENIED_CODES:
        detail = "" if code in ("403", "Forbidden") else f" ({code})"
        return AccessDenied(f"{where}: access denied{detail}")
    if code in TRANSIENT_CODES or status >= 500 or status == 429:
        return TransientError(f"{where}: {code or status} {message}".strip())
    return SourceError(f"{where}: S3 error {code or status}: {message}".strip())


async def raise_if_no_bucket(
    location: S3Location, head_bucket: Callable[[], Awaitable[Any]]
) -> None:
    """After a HEAD of ``location`` found no object: is it the bucket that is missing?

    ``head_bucket`` is one plane's HEAD of the bucket (with its retries and error mapping).
    Only a bucket that is not found is "no such bucket". A bucket that answers, or that
    refuses (403: S3 answers 404 for a bucket that does not exist whoever asks, so a
    refusal means it exists and HeadBucket is not allowed), leaves "no such key" (this
    returns); so do the other source errors (another region, unreachable), which the
    object's own HEAD would have met first. A :class:`TransientError` once the retries
    are spent propagates. Both control planes ask this, so they give the same answer for
    the same server answers.
    """
    try:
        await head_bucket()
    except ObjectNotFound:
        raise ObjectNotFound(f"{location}: no such bucket {location.bucket!r}") from None
    except SourceError:
        return


def object_changed(location: S3Location, detail: str) -> ObjectChanged:
    """The error for an object replaced while it was read (``detail`` says how)."""
    return ObjectChanged(f"{location}: the object changed during the download ({detail})")


def check_range_response(
    obj: PinnedObject,
    start: int,
    end: int,
    *,
    status: int,
    content_length: int | None,
    content_range: str | None,
    response_etag: str | None,
) -> None:
    """Refuse a 2xx answer to ``GET bytes=start..end-1`` that is not that range of the
    object seen by HEAD (both data planes call this before writing a byte)."""
    location, size, etag = obj.location, obj.info.size, obj.info.etag
    if status == 200 and not (start == 0 and end == size):
        raise IntegrityError(f"{location}: server ignored the byte range")
    if content_length is not None and content_length != end - start:
        raise IntegrityError(f"{location}: server sent a different range length than asked")
    if status == 206:
        parsed = parse_content_range(content_range or "")
        if parsed is None or parsed[0] != start or parsed[1] != end - 1:
            raise IntegrityError(f"{location}: server sent another range than asked")
        if parsed[2] is not None and parsed[2] != size:
            raise object_changed(location, f"size {size} became {parsed[2]}")
    got = strip_etag(response_etag)
    if etag and got and got != etag:
        raise object_changed(location, f"ETag {etag} became {got}")
