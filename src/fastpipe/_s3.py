"""The control plane: credentials, HEAD, presigning and error mapping.

For a simple setup HEAD and presigning take the light plane (``_light``: no botocore);
otherwise, and for everything else, botocore. Its few calls (a HEAD, a presigned URL, the
odd tag) run on a plain botocore client in worker threads: importing aiobotocore pulls in
aiohttp, which loads the CA store into two SSL contexts at import, and its client takes
longer to create and to make its first request; measured here the plain client costs
about 0.15 s less of every run's fixed cost. The fallback data plane (streaming
aiobotocore's response bodies, for where the raw HTTP path cannot serve) keeps
aiobotocore, imported only when it runs. botocore is imported lazily.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio

from ._config import Config
from ._exceptions import (
    AccessDenied,
    EndpointUnreachable,
    FastpipeError,
    ObjectNotFound,
    SourceError,
    UsageError,
)
from ._http import ConnectionPool
from ._objectinfo import PinnedObject, object_info_from_head
from ._s3meta import (
    TransientError,
    check_range_response,
    map_s3_error,
    needs_part1,
    quoted_etag,
    raise_if_no_bucket,
)
from ._source import S3Location

if TYPE_CHECKING:
    from ._light import LightControl
    from ._objectinfo import ObjectInfo

__all__ = ["S3Control", "check_range_response"]

logger = logging.getLogger(__name__)


def _quiet_unverified_warning(endpoint_url: str | None) -> None:
    """Silence urllib3's warning about unverified HTTPS for the endpoint the caller chose
    not to verify (``verify_tls=False``), and for no other host.

    botocore's client warns at every request; the asynchronous one never did, and the
    caller asked for it.
    """
    from urllib3.exceptions import InsecureRequestWarning

    host = urlsplit(endpoint_url).hostname if endpoint_url else None
    pattern = re.escape(host) if host else ".*"
    warnings.filterwarnings(
        "ignore",
        message=f"Unverified HTTPS request is being made to host '{pattern}'",
        category=InsecureRequestWarning,
    )


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic collector, then leave it as it was found.

    Importing botocore and building a client allocate some 10^5 long-lived objects, and
    the collector's passes over them cost about 60 ms of CPU here.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _warm_loader(loader: Any) -> None:
    """Load into ``loader``'s cache the JSON models an S3 client's creation reads (those
    this botocore version has: the cache only saves a read)."""
    from botocore.exceptions import DataNotFoundError

    for name in ("endpoints", "partitions", "sdk-default-configuration"):
        with contextlib.suppress(DataNotFoundError):
            loader.load_data(name)
    for type_name in ("service-2", "endpoint-rule-set-1"):
        with contextlib.suppress(DataNotFoundError):
            # As botocore's client asks (the cache is keyed on the arguments' spelling).
            loader.load_service_model("s3", type_name, api_version=None)


def _object_params(location: S3Location, version_id: str | None, **extra: Any) -> dict[str, Any]:
    """botocore's parameters naming the object (and its version, if any), and ``extra``."""
    params: dict[str, Any] = {"Bucket": location.bucket, "Key": location.key, **extra}
    if version_id:
        params["VersionId"] = version_id
    return params


class S3Control:
    """The S3 clients of one engine, each created on first use and reused.

    :meth:`client` is a plain botocore client (its calls run in worker threads);
    :meth:`data_client`, for the fallback data plane only, an aiobotocore one.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._session: Any = None
        self._aio_session: Any = None
        self._client: Any = None
        self._data_client: Any = None
        self._client_lock = anyio.Lock()
        self._tls: ssl.SSLContext | None = None
        #: The raw data plane's idle connections, reused across parts and objects.
        self.pool = ConnectionPool(config.max_concurrency if config.reuse_connections else 0)
        self._light: LightControl | None = None
        self._light_decided = False

    def light(self, location: S3Location) -> LightControl | None:
        """The light control plane (no botocore) when it serves ``location``, else None.

        Whether the setup allows it is decided on first call, once per engine.
        """
        from ._lightsetup import light_setup, plain_bucket

        if not self._light_decided:
            self._light_decided = True
            setup, why = light_setup(self.config)
            if setup is not None:
                from ._light import LightControl

                self._light = LightControl(setup, self.config, self.data_plane_tls)
            logger.debug("control plane: %s (%s)", "light" if setup else "botocore", why)
        return self._light if self._light and plain_bucket(location.bucket) else None

    def control_plane(self, location: S3Location) -> str:
        """``light`` or ``botocore``: the control plane that serves ``location``."""
        return "light" if self.light(location) is not None else "botocore"

    async def client(self) -> Any:
        """The botocore S3 client (created on first call); botocore retries its calls.

        Its methods block: call them through :meth:`_call`, which runs them in a thread.
        """
        async with self._client_lock:  # objects started together share one client
            if self._client is None:
                self._client = await self._create_client(
                    partial(self._new_client, {"max_attempts": 3, "mode": "standard"})
                )
        return self._client

    def ca_bundle(self) -> str | None:
        """The CA bundle botocore trusts (``AWS_CA_BUNDLE`` or the profile's), if any."""
        if self._session is None:
            return os.environ.get("AWS_CA_BUNDLE") or None
        bundle = self._session.get_config_variable("ca_bundle")
        return str(bundle) if bundle else None

    def data_plane_tls(self) -> ssl.SSLContext:
        """The raw data plane's TLS context, built on first use and shared by every object.

        The same trust as the control plane (``AWS_CA_BUNDLE`` or the profile's bundle).
        Loading the CA store takes about 16 ms of CPU: once per engine, not once per object.
        """
        if self._tls is None:
            context = ssl.create_default_context(cafile=self.ca_bundle())
            if not self.config.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls = context
        return self._tls

    async def data_client(self) -> Any:
        """The aiobotocore client of the fallback data plane: botocore does not retry its
        GETs.

        The fetchers retry (and resume) each part themselves, bounded by
        ``Config.max_attempts`` and counted in the report; retries inside botocore would
        multiply that bound and hide the faults.
        """
        async with self._client_lock:
            if self._data_client is None:
                self._data_client = await self._create_client(
                    partial(self._new_data_client, {"total_max_attempts": 1, "mode": "standard"})
                )
        return self._data_client

    async def _create_client(self, create: Callable[[], Awaitable[Any]]) -> Any:
        """Create a client; a bad setup (profile, config file, credentials, region,
        endpoint) becomes a one-line :class:`FastpipeError` instead of botocore's own."""
        from botocore.exceptions import (
            BotoCoreError,
            ConfigParseError,
            InvalidRegionError,
            NoCredentialsError,
            PartialCredentialsError,
            ProfileNotFound,
        )

        try:
            return await create()
        except FastpipeError:
            raise
        except (InvalidRegionError, ValueError) as exc:
            # botocore says "Invalid endpoint: URL" with a ValueError.
            raise UsageError(f"S3 client setup: {exc}") from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise AccessDenied(f"AWS credentials: {exc}") from None
        except (ProfileNotFound, ConfigParseError) as exc:
            raise SourceError(f"AWS configuration: {exc}") from None
        except BotoCoreError as exc:
            raise SourceError(f"S3 client setup: {exc}") from None

    def _client_options(self, session: Any, retries: dict[str, Any]) -> dict[str, Any]:
        """What both clients are created with (the config's class differs)."""
        cfg = self.config
        return {
            "endpoint_url": cfg.resolved_endpoint(),
            "region_name": cfg.region or session.get_config_variable("region") or "us-east-1",
            # None lets botocore use AWS_CA_BUNDLE or the profile's ca_bundle.
            "verify": None if cfg.verify_tls else False,
            "config": {
                "signature_version": "s3v4",
                "connect_timeout": cfg.connect_timeout,
                "read_timeout": cfg.read_timeout,
                "retries": retries,
                "max_pool_connections": max(10, cfg.max_concurrency),
            },
        }

    async def _new_client(self, retries: dict[str, Any]) -> Any:
        def create() -> Any:
            with _gc_paused():
                import botocore.session
                from botocore.config import Config as BotoConfig

                if self._session is None:
                    self._session = botocore.session.get_session()
                options = self._client_options(self._session, retries)
                options["config"] = BotoConfig(**options["config"])
                if not self.config.verify_tls:
                    _quiet_unverified_warning(options["endpoint_url"])
                return self._session.create_client("s3", **options)

        # Importing botocore and building the client is CPU work of a few tenths of a
        # second: not on the event loop, where other objects' transfers may be running.
        return await anyio.to_thread.run_sync(create)

    async def _new_data_client(self, retries: dict[str, Any]) -> Any:
        # The client itself is made on the loop (its HTTP session belongs to it, and
        # aiobotocore resolves credentials there); what blocks is done first in a thread.
        options = await anyio.to_thread.run_sync(self._data_client_setup, retries)
        if self._exit_stack is None:
            self._exit_stack = contextlib.AsyncExitStack()
        return await self._exit_stack.enter_async_context(
            self._aio_session.create_client("s3", **options)
        )

    def _data_client_setup(self, retries: dict[str, Any]) -> dict[str, Any]:
        """The blocking part of the data client (a worker thread): import aiobotocore,
        make the session, read the AWS config and load the JSON models ``create_client``
        reads into the session loader's cache (about 0.3 s that ran on the loop)."""
        with _gc_paused():
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session

            if self._aio_session is None:
                self._aio_session = get_session()
            options = self._client_options(self._aio_session, retries)
            options["config"] = AioConfig(**options["config"])
            _warm_loader(self._aio_session.get_component("data_loader"))
            return options

    async def close(self) -> None:
        """Close the clients and their connection pools."""
        self.pool.close()
        if self._light is not None:
            self._light.close()
        if self._exit_stack is not None:
            await self._exit_stack.aclose()
        if self._client is not None:
            self._client.close()
        self._exit_stack = None
        self._client = self._data_client = None

    async def _call(
        self,
        location: S3Location,
        fn: Callable[..., Any],
        *,
        network_transient: bool = False,
        pinned_etag: str | None = None,
        blocking: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Call ``fn`` and map botocore's errors; with ``network_transient`` a broken or
        timed-out connection is a :class:`TransientError` (the caller retries).

        A ``blocking`` (botocore) method runs in a worker thread, which a cancel leaves to
        finish on its own, bounded by the client's timeouts; an aiobotocore one is awaited.
        """
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        try:
            if not blocking:
                return await fn(**kwargs)
            return await anyio.to_thread.run_sync(partial(fn, **kwargs), abandon_on_cancel=True)
        except (
            ConnectionClosedError,
            ReadTimeoutError,
            EndpointConnectionError,
            ConnectTimeoutError,
        ) as exc:
            # These name the endpoint URL, whose query holds no signature (botocore signs
            # its own requests in headers): the cause is safe to keep.
            if network_transient:
                raise TransientError(f"{location}: {exc}") from exc
            if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
                raise EndpointUnreachable(f"{location}: endpoint unreachable: {exc}") from exc
            raise SourceError(f"{location}: {exc}") from exc
        except ClientError as exc:
            err = exc.response.get("Error", {})
            meta = exc.response.get("ResponseMetadata", {})
            # from None: a ClientError's text is the server's message unredacted (a server
            # may quote the signed request in it); the mapped error keeps the code, the
            # redacted message and the request id.
            raise map_s3_error(
                str(err.get("Code", "")),
                int(meta.get("HTTPStatusCode", 0) or 0),
                str(err.get("Message", "")),
                location,
                pinned_etag,
                request_id=meta.get("RequestId") or None,
            ) from None
        except NoCredentialsError as exc:
            raise AccessDenied(f"{location}: no AWS credentials found") from exc
        except BotoCoreError as exc:
            raise SourceError(f"{location}: {exc}") from exc

    async def head(self, location: S3Location) -> ObjectInfo:
        """HEAD the object (checksums enabled); for multipart objects also part 1's size."""
        light = self.light(location)
        if light is not None:
            return await light.head(location)
        client = await self.client()
        params = _object_params(location, location.version_id, ChecksumMode="ENABLED")
        try:
            head = await self._call(location, client.head_object, **params)
        except ObjectNotFound:
            await raise_if_no_bucket(
                location, partial(self._call, location, client.head_bucket, Bucket=location.bucket)
            )
            raise
        part1 = None
        if needs_part1(head):
            part_params = dict(params, PartNumber=1)
            if head.get("VersionId"):
                part_params["VersionId"] = head["VersionId"]
            with contextlib.suppress(SourceError):
                part1 = await self._call(location, client.head_object, **part_params)
        return object_info_from_head(
            head, part1, str(location), bucket=location.bucket, key=location.key
        )

    async def presign(self, location: S3Location, version_id: str | None) -> tuple[str, float]:
        """A presigned GET URL for the object and the monotonic time it should be renewed.

        Range and If-Match travel as plain headers beside it. The URL holds a signature:
        never print it.
        """
        light = self.light(location)
        if light is not None:
            return light.presign(location, version_id)
        client = await self.client()
        params = _object_params(location, version_id)
        expires = self.config.presign_expires
        url = await self._call(
            location,
            client.generate_presigned_url,
            ClientMethod="get_object",
            Params=params,
            ExpiresIn=expires,
        )
        logger.debug("%s: presigned a GET URL valid for %ss", location, expires)  # not the URL
        # Renew well before expiry so a slow part does not start with a stale signature.
        return str(url), time.monotonic() + expires * 0.8

    async def list_keys(self, bucket: str, prefix: str) -> AsyncIterator[str]:
        """Every key under ``prefix`` (ListObjectsV2, page by page, as pages arrive)."""
        async for item in self.list_objects(bucket, prefix):
            yield item["Key"]

    async def list_objects(self, bucket: str, prefix: str) -> AsyncIterator[dict[str, Any]]:
        """Every object under ``prefix`` as ListObjectsV2 describes it (``Key``, ``Size``,
        ``ETag``...), page by page, as pages arrive."""
        client = await self.client()
        where = S3Location(bucket, prefix or "/")
        params: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = await self._call(where, client.list_objects_v2, **params)
            for item in page.get("Contents", []):
                yield item
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            params["ContinuationToken"] = token

    async def get_tags(self, location: S3Location, version_id: str | None) -> dict[str, str]:
        """The object's tags (GetObjectTagging)."""
        client = await self.client()
        params = _object_params(location, version_id)
        answer = await self._call(location, client.get_object_tagging, **params)
        return {t["Key"]: t["Value"] for t in answer.get("TagSet", [])}

    async def put_tags(
        self, location: S3Location, version_id: str | None, tags: dict[str, str]
    ) -> None:
        """Replace the object's tags (PutObjectTagging)."""
        client = await self.client()
        params = _object_params(location, version_id)
        tag_set = [{"Key": k, "Value": v} for k, v in tags.items()]
        await self._call(location, client.put_object_tagging, Tagging={"TagSet": tag_set}, **params)

    async def stream_range(
        self,
        obj: PinnedObject,
        start: int,
        end: int,
        sink: Callable[[memoryview], None],
        chunk_size: int,
    ) -> None:
        """Fallback data plane: GET ``[start, end)`` through aiobotocore, feeding ``sink``."""
        client = await self.data_client()  # first: it imports aiohttp in a worker thread
        from aiohttp import ClientError as AioHttpClientError
        from botocore.exceptions import ReadTimeoutError, ResponseStreamingError

        location, etag, version_id = obj.location, obj.info.etag, obj.info.version_id
        params = _object_params(location, version_id, Range=f"bytes={start}-{end - 1}")
        if etag:
            params["IfMatch"] = quoted_etag(etag)
        response = await self._call(
            location,
            client.get_object,
            network_transient=True,
            pinned_etag=etag,
            blocking=False,
            **params,
        )
        expected = end - start
        body = response["Body"]
        received = 0
        try:
            async with body:
                check_range_response(
                    obj,
                    start,
                    end,
                    status=int(response["ResponseMetadata"].get("HTTPStatusCode", 206)),
                    content_length=response.get("ContentLength"),
                    content_range=response.get("ContentRange"),
                    response_etag=response.get("ETag"),
                )
                while received < expected:
                    chunk = await body.read(min(chunk_size, expected - received))
                    if not chunk:
                        break
                    sink(memoryview(chunk))
                    received += len(chunk)
        except (AioHttpClientError, ReadTimeoutError, ResponseStreamingError, OSError) as exc:
            if isinstance(exc, FastpipeError):
                raise
            raise TransientError(f"{location}: body read failed: {exc}") from exc
        if received != expected:
            raise TransientError(f"{location}: body cut short ({received} of {expected} bytes)")
