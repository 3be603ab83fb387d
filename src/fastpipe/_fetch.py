"""The fetchers: concurrent ranged GETs, pinned to one object version, with retries.

Each fetcher owns one keep-alive connection and takes parts in order, so that the
contiguous watermark advances steadily. A broken body resumes from the last byte written,
not from the start of its part.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio

from ._budgets import Turn
from ._config import Config
from ._exceptions import AccessDenied, LocalIOError, RetriesExhausted
from ._groups import unwrap_groups
from ._http import HTTPFault, RawConnection, Response
from ._job import Job
from ._progress import Milestones
from ._report import DownloadReport, Plane
from ._s3 import S3Control, check_range_response
from ._s3meta import (
    ExpiredURL,
    TransientError,
    map_s3_error,
    parse_error_body,
    quoted_etag,
    request_id_from_headers,
)
from ._source import S3Location

logger = logging.getLogger(__name__)


@dataclass
class FetchStats:
    """Counters the report shows."""

    bytes: int = 0
    retries: int = 0
    started: float = 0.0
    finished: float = 0.0

    def fill(self, download: DownloadReport) -> None:
        """Copy the counters into the report's download section."""
        download.bytes, download.retries = self.bytes, self.retries
        if self.finished:
            download.seconds = self.finished - self.started


def choose_plane(config: Config, location: S3Location) -> Plane:
    """The configured data plane; ``auto`` is ``raw`` unless a proxy applies."""
    plane = config.resolved_data_plane()
    logger.debug("%s: data plane %s (configured: %s)", location, plane, config.data_plane)
    return Plane(plane)


class Fetcher:
    """Downloads one object's parts into a temp file."""

    def __init__(
        self,
        s3: S3Control,
        config: Config,
        job: Job,
        connection_slot: Callable[[], AbstractAsyncContextManager[None]] | None = None,
        turn: Turn | None = None,
    ) -> None:
        self.s3 = s3
        #: One slot of the engine's ``max_connections`` per part being fetched.
        self._slot = connection_slot or contextlib.nullcontext
        #: Its place in the download order: the next object starts at its tail.
        self.turn = turn
        self.config = config
        self.pinned = job.pinned
        self.location = job.pinned.location
        self.info = job.info
        self.tmp = job.temp
        self.watermark = job.watermark
        self.plane = job.plane  # raw or botocore
        self.stats = FetchStats()
        #: When a progress event is due (the one pass sets them when someone listens).
        self.milestones = Milestones.never()
        self._next_part = 0
        self._url: str | None = None
        self._renew_at = 0.0
        self._url_lock = anyio.Lock()
        self._ssl: ssl.SSLContext | None = None

    async def run(self, concurrency: int) -> None:
        """Fetch every part not yet complete, with ``concurrency`` fetchers."""
        self.stats.started = time.perf_counter()
        if self.plane is Plane.RAW:
            await self._signed_url()  # fail fast (credentials) before starting fetchers
        workers = max(1, min(concurrency, self.watermark.parts))
        if self.turn is not None:
            self.turn.watch(lambda: self.stats.bytes)
        try:
            with unwrap_groups():
                async with anyio.create_task_group() as tg:
                    for _ in range(workers):
                        tg.start_soon(self._worker)
        finally:
            if self.turn is not None:
                self.turn.download_over()
        self.stats.finished = time.perf_counter()

    def _take_part(self) -> int | None:
        while self._next_part < self.watermark.parts:
            index = self._next_part
            self._next_part += 1
            start, end = self.watermark.part_range(index)
            if self.watermark.done[index] < end - start:
                return index
        return None

    async def _worker(self) -> None:
        # One worker is one connection for its whole life (raw plane: one keep-alive
        # socket): a limit on connections across objects is taken and given back here.
        conn: RawConnection | None = None
        try:
            while (index := self._take_part()) is not None:
                if self.plane is Plane.RAW and conn is None:
                    conn = await self._connection()
                async with self._slot():  # one part's GET (and its retries) at a time
                    await self._fetch_part(index, conn)
        finally:
            if conn is not None:  # kept for the next fetcher if it can take a request
                self.s3.pool.give(conn)
        if self.turn is not None:  # the first with no part left: the download's tail
            self.turn.parts_out()

    async def _connection(self) -> RawConnection:
        url = await self._signed_url()
        idle = self.s3.pool.take(url)
        if idle is not None:
            idle.name = str(self.location)  # what its messages name
            return idle
        if self._ssl is None and url.startswith("https:"):
            self._ssl = self.s3.data_plane_tls()  # one per engine: the CA store loads once
        return RawConnection(
            url,
            buffer_size=self.config.receive_buffer,
            connect_timeout=self.config.connect_timeout,
            read_timeout=self.config.read_timeout,
            ssl_context=self._ssl,
            name=str(self.location),
        )

    async def _signed_url(self, renew: bool = False) -> str:
        async with self._url_lock:
            if renew or self._url is None or time.monotonic() >= self._renew_at:
                if self._url is not None:
                    why = "it expired" if renew else "it is near its expiry"
                    logger.debug("%s: signing the GET URL again (%s)", self.location, why)
                self._url, self._renew_at = await self.s3.presign(
                    self.location, self.info.version_id
                )
            return self._url

    async def _fetch_part(self, index: int, conn: RawConnection | None) -> None:
        start, end = self.watermark.part_range(index)
        attempts = 0
        expired_retries = 0
        while True:
            position = start + self.watermark.done[index]
            if position >= end:
                return
            attempts += 1
            try:
                if conn is not None:
                    await self._get_raw(conn, index, position, end)
                else:
                    await self.s3.stream_range(
                        self.pinned,
                        position,
                        end,
                        self._sink(index),
                        self.config.receive_buffer,
                    )
            except ExpiredURL:
                # A signature that expired is not the server's fault: sign again.
                expired_retries += 1
                attempts -= 1
                if expired_retries > 3:
                    # Fresh signatures keep being refused as expired: a clock far off.
                    # from None: the cause is one more "expired" answer, pure noise.
                    raise AccessDenied(
                        f"{self.location}: presigned requests keep expiring "
                        "(is the system clock right?)"
                    ) from None
                await self._signed_url(renew=True)
                continue
            except (TransientError, HTTPFault) as exc:
                if start + self.watermark.done[index] >= end:
                    return  # every byte arrived before the fault
                if attempts >= self.config.max_attempts:
                    raise RetriesExhausted(
                        f"{self.location}: bytes {start}-{end - 1} failed after "
                        f"{attempts} attempts: {exc}",
                        exc,
                    ) from exc
                self.stats.retries += 1
                backoff = self._backoff(attempts)
                logger.debug(
                    "%s: part %d (bytes %d-%d) attempt %d failed: %s; retrying in %.3fs",
                    self.location,
                    index,
                    start,
                    end - 1,
                    attempts,
                    exc,  # a FastpipeError: its message holds no signature
                    backoff,
                )
                await anyio.sleep(backoff)

    def _backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff."""
        cap = min(self.config.backoff_max, self.config.backoff_base * (2 ** (attempt - 1)))
        return random.uniform(0, cap)

    def _sink(self, index: int) -> Callable[[memoryview], None]:
        """Writes part ``index``'s next bytes where its written prefix ends."""
        part_start = self.watermark.part_range(index)[0]
        tmp, watermark, stats, milestones = self.tmp, self.watermark, self.stats, self.milestones

        def write(data: memoryview) -> None:
            try:
                tmp.pwrite(data, part_start + watermark.done[index])
            except OSError as exc:
                raise LocalIOError(
                    f"{self.location}: writing {tmp.path} failed: {exc.strerror or exc}"
                ) from exc
            stats.bytes += len(data)
            watermark.advance(index, len(data))
            if stats.bytes >= milestones.next:  # the hot path's only progress cost
                milestones.crossed(stats.bytes)

        return write

    async def _get_raw(self, conn: RawConnection, index: int, start: int, end: int) -> None:
        url = await self._signed_url()
        parts = urlsplit(url)
        target = parts.path + ("?" + parts.query if parts.query else "")
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        if self.info.etag:
            headers["If-Match"] = quoted_etag(self.info.etag)

        def check_head(response: Response) -> None:
            check_range_response(
                self.pinned,
                start,
                end,
                status=response.status,
                content_length=_int_or_none(response.headers.get("content-length")),
                content_range=response.headers.get("content-range"),
                response_etag=response.headers.get("etag"),
            )

        response = await conn.get(target, headers, self._sink(index), check_head)
        if 200 <= response.status < 300:
            if response.body_bytes != end - start:
                raise TransientError(
                    f"{self.location}: body cut short ({response.body_bytes} of {end - start})"
                )
            return
        body = parse_error_body(response.error_body)
        raise map_s3_error(
            body.code or str(response.status),
            response.status,
            body.message or response.reason,
            self.location,
            self.info.etag,
            request_id=request_id_from_headers(response.headers) or body.request_id,
        )


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
