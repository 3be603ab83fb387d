"""AWS Signature Version 4 for S3 with the standard library (hmac, hashlib).

Two forms, both as botocore builds them for S3 (tests compare them byte for byte at a
frozen clock): a presigned URL (query authentication, ``UNSIGNED-PAYLOAD``, only ``host``
signed) and a request signed in its ``Authorization`` header. S3 paths are signed as sent,
never normalised. Nothing here logs: keys, tokens and signatures stay in the values
returned, which callers must not print.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote

#: The SHA-256 of an empty body: what a HEAD signs as its payload.
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_ALGORITHM = "AWS4-HMAC-SHA256"


@dataclass(frozen=True)
class Credentials:
    """A static key pair, and the session token of temporary credentials."""

    access_key: str
    secret_key: str
    token: str | None = None

    def __repr__(self) -> str:  # never show the secret or the token
        return f"Credentials(access_key={self.access_key!r}, secret_key=..., token=...)"


def uri_encode(text: str, safe: str = "") -> str:
    """Percent-encode all but RFC 3986's unreserved characters (and ``safe``)."""
    return quote(text, safe="-_.~" + safe)


def encode_key_path(bucket: str, key: str) -> str:
    """The path of a path-style object URL: ``/bucket/key``, the key's ``/`` kept."""
    return f"/{uri_encode(bucket)}/{uri_encode(key, '/')}"


def _timestamp(now: datetime | None) -> str:
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is not None:
        now = now.astimezone(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ")


def _signing_key(secret: str, day: str, region: str) -> bytes:
    key = hmac.new(f"AWS4{secret}".encode(), day.encode(), hashlib.sha256).digest()
    for part in (region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _signature(creds: Credentials, region: str, stamp: str, canonical: str) -> str:
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    to_sign = f"{_ALGORITHM}\n{stamp}\n{scope}\n{digest}"
    key = _signing_key(creds.secret_key, stamp[:8], region)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def _canonical_query(pairs: list[tuple[str, str]]) -> str:
    """Encoded pairs sorted by encoded name, then value (``pairs`` are already encoded)."""
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def presign_get(
    creds: Credentials,
    region: str,
    base: str,
    host: str,
    path: str,
    params: list[tuple[str, str]],
    expires: int,
    now: datetime | None = None,
) -> str:
    """A presigned GET URL: ``base`` is ``scheme://netloc``, ``host`` the signed Host
    value, ``path`` already encoded, ``params`` the operation's (e.g. ``versionId``)."""
    stamp = _timestamp(now)
    credential = f"{creds.access_key}/{stamp[:8]}/{region}/s3/aws4_request"
    query = [(uri_encode(k), uri_encode(v)) for k, v in params]
    query += [
        ("X-Amz-Algorithm", _ALGORITHM),
        ("X-Amz-Credential", uri_encode(credential)),
        ("X-Amz-Date", stamp),
        ("X-Amz-SignedHeaders", "host"),
        ("X-Amz-Expires", str(expires)),
    ]
    if creds.token:
        query.append(("X-Amz-Security-Token", uri_encode(creds.token)))
    canonical = "\n".join(
        ["GET", path, _canonical_query(query), f"host:{host}\n", "host", UNSIGNED_PAYLOAD]
    )
    signature = _signature(creds, region, stamp, canonical)
    query_string = "&".join(f"{k}={v}" for k, v in query)
    return f"{base}{path}?{query_string}&X-Amz-Signature={signature}"


def sign_headers(
    creds: Credentials,
    region: str,
    method: str,
    host: str,
    path: str,
    params: list[tuple[str, str]],
    headers: dict[str, str],
    now: datetime | None = None,
) -> dict[str, str]:
    """The headers that sign a bodiless request (HEAD) in ``Authorization``.

    ``headers`` are the request's other headers to sign (names in lower case, e.g.
    ``x-amz-checksum-mode``); the result holds them, ``host`` excepted, plus
    ``x-amz-date``, ``x-amz-content-sha256``, the session token and ``Authorization``.
    """
    stamp = _timestamp(now)
    signed = dict(headers, host=host)
    signed["x-amz-date"] = stamp
    signed["x-amz-content-sha256"] = EMPTY_SHA256
    if creds.token:
        signed["x-amz-security-token"] = creds.token
    names = sorted(signed)
    canonical_headers = "".join(f"{n}:{' '.join(signed[n].split())}\n" for n in names)
    signed_names = ";".join(names)
    query = [(uri_encode(k), uri_encode(v)) for k, v in params]
    canonical = "\n".join(
        [method, path, _canonical_query(query), canonical_headers, signed_names, EMPTY_SHA256]
    )
    signature = _signature(creds, region, stamp, canonical)
    scope = f"{creds.access_key}/{stamp[:8]}/{region}/s3/aws4_request"
    del signed["host"]
    signed["authorization"] = (
        f"{_ALGORITHM} Credential={scope}, SignedHeaders={signed_names}, Signature={signature}"
    )
    return signed
