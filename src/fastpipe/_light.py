"""The light control plane: HEAD and presigned GETs without importing botocore.

Importing botocore and building its S3 client cost about a quarter of a second before a
run's first byte. For the setups :func:`~fastpipe._lightsetup.light_setup` accepts, this
plane signs with the standard library (``_sigv4``) and sends HEAD over the raw plane's HTTP
connection, with the same URLs, answers and errors as the botocore client: a HEAD answered
404 is looked up again as a bucket, 403 is :class:`AccessDenied`, 5xx and broken
connections are retried (four attempts in all, as botocore's client makes), and a
bucket in another region is named as such. Everything else (listing, tagging, the
fallback data plane) keeps botocore.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import anyio

from ._config import Config
from ._exceptions import EndpointUnreachable, FastpipeError, ObjectNotFound, SourceError
from ._http import ConnectFault, ConnectionPool, HTTPFault, RawConnection, Response
from ._lightsetup import LightSetup
from ._objectinfo import ObjectInfo, object_info_from_head
from ._s3meta import (
    CHECKSUM_ALGORITHMS,
    TransientError,
    map_s3_error,
    needs_part1,
    raise_if_no_bucket,
    request_id_from_headers,
)
from ._sigv4 import encode_key_path, presign_get, sign_headers, uri_encode
from ._source import S3Location

logger = logging.getLogger(__name__)

#: Attempts of one HEAD, as botocore's client makes them: its ``retries`` setting
#: ``max_attempts: 3`` counts the retries, not the first attempt.
HEAD_ATTEMPTS = 4
_HEAD_BUFFER = 128 << 10
_HEADER_KEYS = {
    "etag": "ETag",
    "x-amz-version-id": "VersionId",
    "content-type": "ContentType",
    "x-amz-checksum-type": "ChecksumType",
}


def head_dict(headers: Mapping[str, str]) -> dict[str, Any]:
    """A HEAD response's headers (lower-case names) in the shape of botocore's
    ``head_object`` answer, as far as :func:`object_info_from_head` reads it."""
    out: dict[str, Any] = {
        key: headers[name] for name, key in _HEADER_KEYS.items() if name in headers
    }
    for name, key in (("content-length", "ContentLength"), ("x-amz-mp-parts-count", "PartsCount")):
        if headers.get(name, "").isdigit():
            out[key] = int(headers[name])
    for algorithm in CHECKSUM_ALGORITHMS:
        value = headers.get(f"x-amz-checksum-{algorithm.lower()}")
        if value:
            out[f"Checksum{algorithm}"] = value
    if "last-modified" in headers:
        out["LastModified"] = http_date(headers["last-modified"])
    out["Metadata"] = {k[11:]: v for k, v in headers.items() if k.startswith("x-amz-meta-")}
    return out


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(text: str) -> datetime | None:
    """``Sun, 06 Nov 1994 08:49:37 GMT`` as an aware UTC datetime (None if unreadable).

    The fixed form S3 sends is read directly; any other goes to :mod:`email.utils`, whose
    import (about 2 ms) is left for that case.
    """
    parts = text.split()
    try:
        if len(parts) == 6 and parts[5] == "GMT" and parts[2] in _MONTHS:
            hour, minute, second = (int(x) for x in parts[4].split(":"))
            month = _MONTHS.index(parts[2]) + 1
            return datetime(
                int(parts[3]), month, int(parts[1]), hour, minute, second, tzinfo=timezone.utc
            )
        from email.utils import parsedate_to_datetime

        return parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None


class LightControl:
    """HEAD and presigning for one engine, on the setup decided at its start."""

    def __init__(
        self, setup: LightSetup, config: Config, tls: Callable[[], ssl.SSLContext]
    ) -> None:
        self.setup = setup
        self.config = config
        self._tls = tls
        #: Idle HEAD connections: one per object HEADing at once at the most, none kept
        #: past the pool's idle limit (a server closes idle keep-alive connections).
        self._idle = ConnectionPool(config.max_objects)

    def presign(self, location: S3Location, version_id: str | None) -> tuple[str, float]:
        """A presigned GET URL and when to renew it (see :meth:`S3Control.presign`)."""
        setup, expires = self.setup, self.config.presign_expires
        params = [("versionId", version_id)] if version_id else []
        url = presign_get(
            setup.credentials,
            setup.region,
            setup.base,
            setup.host,
            encode_key_path(location.bucket, location.key),
            params,
            expires,
        )
        return url, time.monotonic() + expires * 0.8

    async def head(self, location: S3Location) -> ObjectInfo:
        """HEAD the object (checksums enabled); for a multipart object also part 1."""
        path = encode_key_path(location.bucket, location.key)
        params = [("versionId", location.version_id)] if location.version_id else []
        try:
            head = await self._head(location, path, params)
        except ObjectNotFound:
            bucket_path = f"/{uri_encode(location.bucket)}"
            await raise_if_no_bucket(
                location, lambda: self._head(location, bucket_path, [], checksum=False)
            )
            raise
        part1 = None
        if needs_part1(head):
            version = head.get("VersionId") or location.version_id
            part_params = [("partNumber", "1")] + ([("versionId", version)] if version else [])
            with contextlib.suppress(SourceError):
                part1 = await self._head(location, path, part_params)
        return object_info_from_head(
            head, part1, str(location), bucket=location.bucket, key=location.key
        )

    async def _head(
        self,
        location: S3Location,
        path: str,
        params: list[tuple[str, str]],
        checksum: bool = True,
    ) -> dict[str, Any]:
        """One HEAD with botocore's retries; its headers as :func:`head_dict`."""
        for attempt in range(1, HEAD_ATTEMPTS + 1):
            try:
                response = await self._send_head(location, path, params, checksum)
            except HTTPFault as exc:
                error: FastpipeError = exc
            else:
                if 200 <= response.status < 300:
                    return head_dict(response.headers)
                error = self._error(location, response)
                if not isinstance(error, TransientError):
                    raise error
            if attempt == HEAD_ATTEMPTS:
                final = _final(location, error)
                if final is error:
                    raise error
                raise final from error
            cap = min(self.config.backoff_max, self.config.backoff_base * 2 ** (attempt - 1))
            backoff = random.uniform(0, cap)
            # A FastpipeError's message holds no signature.
            logger.debug(
                "%s: HEAD attempt %d failed: %s; retrying in %.3fs",
                location,
                attempt,
                error,
                backoff,
            )
            await anyio.sleep(backoff)
        raise AssertionError("unreachable")

    def _error(self, location: S3Location, response: Response) -> FastpipeError:
        headers, status = response.headers, response.status
        region = headers.get("x-amz-bucket-region")
        if status in (301, 400) and region and region != self.setup.region:
            return SourceError(
                f"{location}: the bucket is in region {region}, not {self.setup.region} "
                "(set Config.region or AWS_DEFAULT_REGION)"
            )
        # A HEAD answer has no body: botocore's error code is the status, its message
        # the reason phrase.
        return map_s3_error(
            str(status),
            status,
            response.reason,
            location,
            request_id=request_id_from_headers(headers),
        )

    async def _send_head(
        self, location: S3Location, path: str, params: list[tuple[str, str]], checksum: bool
    ) -> Response:
        setup = self.setup
        extra = {"x-amz-checksum-mode": "ENABLED"} if checksum else {}
        headers = sign_headers(
            setup.credentials, setup.region, "HEAD", setup.host, path, params, extra
        )
        query = "&".join(f"{uri_encode(k)}={uri_encode(v)}" for k, v in params)
        target = path + ("?" + query if query else "")
        conn = self._idle.take(setup.base) or self._connection()
        conn.name = str(location)
        try:
            response = await conn.head(target, headers)
        except BaseException:
            conn.close()
            raise
        self._idle.give(conn)
        return response

    def _connection(self) -> RawConnection:
        https = self.setup.base.startswith("https:")
        return RawConnection(
            self.setup.base + "/",
            buffer_size=_HEAD_BUFFER,
            connect_timeout=self.config.connect_timeout,
            read_timeout=self.config.read_timeout,
            ssl_context=self._tls() if https else None,
        )

    def close(self) -> None:
        """Close the idle HEAD connections."""
        self._idle.close()


def _final(location: S3Location, error: FastpipeError) -> FastpipeError:
    """The error once the attempts are spent, as the botocore plane raises it."""
    if isinstance(error, ConnectFault):
        return EndpointUnreachable(f"{location}: endpoint unreachable: {error}")
    if isinstance(error, HTTPFault):
        return SourceError(f"{location}: {error}")
    return error
