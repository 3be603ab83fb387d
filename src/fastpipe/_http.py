"""The raw data plane: HTTP/1.1 ranged GETs read by an asyncio BufferedProtocol.

Each connection owns one page-aligned receive buffer. The event loop reads socket data
straight into it (no intermediate bytes objects), and full stretches are handed to a sink
that pwrites them at their offset. Measured on the development machines this costs about
half the CPU per byte of streaming aiobotocore's bodies, which matters because the S3
server shares the same cores. Only what ranged GETs of S3 need is implemented: keep-alive,
Content-Length bodies, and small error bodies (possibly chunked) to map S3 error codes.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

from ._exceptions import FastpipeError, SourceError

_FLUSH_SLACK = 64 * 1024
_MAX_HEAD = 64 * 1024
_MAX_ERROR_BODY = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
#: Seconds an idle connection stays in a :class:`ConnectionPool` (aiohttp's keep-alive
#: default): servers close idle keep-alive connections, and a request sent as the server
#: closes one fails and is retried.
POOL_IDLE_SECONDS = 15.0


class HTTPFault(FastpipeError):
    """The connection broke, timed out or spoke broken HTTP: worth a retry. Internal."""


class ConnectFault(HTTPFault):
    """The connection could not be opened (refused, unreachable, timed out). Internal."""


@dataclass
class Response:
    """Status and headers of one response; ``error_body`` holds a non-2xx body."""

    status: int
    reason: str
    headers: dict[str, str]
    error_body: bytes = b""
    body_bytes: int = 0
    keep_alive: bool = True


def parse_content_range(value: str) -> tuple[int, int, int | None] | None:
    """``bytes a-b/total`` -> (a, b, total or None)."""
    m = _CONTENT_RANGE.match(value.strip())
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


@dataclass
class _Request:
    sink: Callable[[memoryview], None]
    check_head: Callable[[Response], None]
    future: asyncio.Future[Response]
    response: Response | None = None
    body_length: int = -1
    received: int = 0
    chunked: bool = False
    error_body: bytearray = field(default_factory=bytearray)
    #: A HEAD: its Content-Length describes the object, no body follows.
    head_only: bool = False


class _ResponseProtocol(asyncio.BufferedProtocol):
    """Reads responses into one reusable aligned buffer; one request at a time."""

    def __init__(self, buffer_size: int) -> None:
        self._buf = mmap.mmap(-1, buffer_size)
        self._view = memoryview(self._buf)
        self._fill = 0
        self._scan_from = 0
        self._request: _Request | None = None
        self.transport: asyncio.Transport | None = None
        self.activity = 0
        self.lost = False

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        req = self._request
        if req is not None and not req.future.done():
            if req.response is not None and req.body_length < 0 and not req.chunked:
                # A body delimited by the connection's end (errors only): it is complete.
                req.response.error_body = bytes(req.error_body)
                req.future.set_result(req.response)
            else:
                why = f": {exc}" if exc else ""
                fault: BaseException = HTTPFault(f"connection closed mid-response{why}")
                try:
                    self.salvage()
                except Exception as sink_error:  # the sink's LocalIOError
                    fault = sink_error
                req.future.set_exception(fault)
        self._request = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._fill :]

    def buffer_updated(self, nbytes: int) -> None:
        self.activity += 1
        self._fill += nbytes
        req = self._request
        if req is None or req.future.done():
            self._fail(HTTPFault("unexpected bytes from the server"))
            return
        try:
            if req.response is None:
                self._parse_head(req)
            else:
                self._consume_body(req)
        except Exception as exc:  # the sink's LocalIOError, or broken HTTP
            self._fail(exc)

    def eof_received(self) -> bool:
        return False

    @property
    def idle(self) -> bool:
        """Open, with no request in progress."""
        transport = self.transport
        return (
            self._request is None
            and not self.lost
            and transport is not None
            and not transport.is_closing()
        )

    # -- requests -----------------------------------------------------------------------

    def start(
        self,
        sink: Callable[[memoryview], None],
        check_head: Callable[[Response], None],
        head_only: bool = False,
    ) -> asyncio.Future[Response]:
        loop = asyncio.get_running_loop()
        self._fill = 0
        self._scan_from = 0
        req = _Request(
            sink=sink, check_head=check_head, future=loop.create_future(), head_only=head_only
        )
        self._request = req
        return req.future

    def salvage(self) -> None:
        """Hand the body bytes received so far to the sink (before giving up on a response).

        They are a correct prefix of the range, so a retry resumes after them instead of
        fetching them again.
        """
        req = self._request
        if req is None or req.response is None or not 200 <= req.response.status < 300:
            return
        if self._fill:
            fill, self._fill = self._fill, 0
            self._deliver(req, self._view[:fill])

    def _fail(self, exc: BaseException) -> None:
        req = self._request
        if req is not None and not req.future.done():
            req.future.set_exception(exc)
        self._request = None
        if self.transport is not None:
            self.transport.abort()

    def _parse_head(self, req: _Request) -> None:
        end = self._buf.find(b"\r\n\r\n", max(0, self._scan_from - 3), self._fill)
        if end < 0:
            self._scan_from = self._fill
            if self._fill > _MAX_HEAD:
                raise HTTPFault("response head too large")
            return
        head = bytes(self._view[:end]).decode("latin-1")
        status, reason, keep_alive, headers = _split_head(head)
        req.response = Response(status, reason, headers, b"", 0, keep_alive)
        _frame_body(req, status, headers)
        if 200 <= status < 300:
            # Before any body byte reaches the sink: a wrong range or another object
            # must never be written to the file.
            req.check_head(req.response)
        body_start = end + 4
        rest = self._fill - body_start
        if rest:
            self._deliver(req, self._view[body_start : self._fill])
        self._fill = 0
        self._consume_body(req)

    def _deliver(self, req: _Request, data: memoryview) -> None:
        assert req.response is not None
        if 200 <= req.response.status < 300:
            if req.body_length >= 0 and req.received + len(data) > req.body_length:
                raise HTTPFault("server sent more bytes than Content-Length")
            req.sink(data)
        else:
            if len(req.error_body) + len(data) > _MAX_ERROR_BODY:
                raise HTTPFault("error body too large")
            req.error_body += data
        req.received += len(data)

    def _consume_body(self, req: _Request) -> None:
        assert req.response is not None
        remaining = req.body_length - req.received if req.body_length >= 0 else None
        if self._fill and (
            self._fill >= len(self._buf) - _FLUSH_SLACK
            or (remaining is not None and self._fill >= remaining)
            or not 200 <= req.response.status < 300
        ):
            self._deliver(req, self._view[: self._fill])
            self._fill = 0
        done = req.body_length >= 0 and req.received >= req.body_length
        if req.chunked and req.error_body.endswith(b"0\r\n\r\n"):
            req.error_body = bytearray(_dechunk(bytes(req.error_body)))
            done = True
        if done:
            req.response.body_bytes = req.received
            req.response.error_body = bytes(req.error_body)
            self._request = None
            req.future.set_result(req.response)

    def close(self) -> None:
        # The buffer is not closed here: the loop may still hold a slice of it until the
        # aborted transport lets go; it is freed with the protocol.
        if self.transport is not None:
            self.transport.abort()
        self._request = None


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while pos < len(data):
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(data[pos:eol].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2
    return bytes(out)


class RawConnection:
    """One keep-alive HTTP/1.1 (or TLS) connection to the endpoint of a URL."""

    def __init__(
        self,
        url: str,
        *,
        buffer_size: int,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None,
        name: str = "",
    ) -> None:
        parts = urlsplit(url)
        self.name = name  # what the messages name (the object), never the URL
        self.scheme, self.host, self.port = _endpoint(parts)
        explicit = parts.port != default_port(parts.scheme)
        self.host_header = parts.netloc.rpartition("@")[2] if explicit else self.host
        self.buffer_size = buffer_size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl_context = ssl_context
        self._protocol: _ResponseProtocol | None = None

    async def _connect(self) -> _ResponseProtocol:
        loop = asyncio.get_running_loop()
        ssl_arg = self.ssl_context if self.scheme == "https" else None
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _ResponseProtocol(self.buffer_size),
                    self.host,
                    self.port,
                    ssl=ssl_arg,
                    server_hostname=self.host if ssl_arg else None,
                ),
                self.connect_timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            # Not a transient fault: the same certificate would be refused again.
            raise SourceError(
                f"{self.name}: TLS certificate verification failed for {self.host}:{self.port}"
                f" ({exc.verify_message or exc.reason})"
            ) from exc
        except (OSError, asyncio.TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            raise ConnectFault(f"cannot connect to {self.host}:{self.port}: {why}") from exc
        return protocol

    async def get(
        self,
        target: str,
        headers: dict[str, str],
        sink: Callable[[memoryview], None],
        check_head: Callable[[Response], None],
    ) -> Response:
        """Send ``GET target`` and feed a 2xx body to ``sink``; return the response.

        ``check_head`` sees a 2xx response's status and headers before its body and may
        raise to refuse it (the connection is then dropped). Raises :class:`HTTPFault` on
        a broken connection or an idle read timeout; bytes fed to ``sink`` before the
        fault stay fed (the caller resumes after them).
        """
        return await self.request("GET", target, headers, sink, check_head)

    async def head(self, target: str, headers: dict[str, str]) -> Response:
        """Send ``HEAD target``; the response's headers, and no body whatever its length."""
        return await self.request("HEAD", target, headers, _no_body, _no_check)

    async def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        sink: Callable[[memoryview], None],
        check_head: Callable[[Response], None],
    ) -> Response:
        """Send one bodiless request (see :meth:`get`)."""
        if self._protocol is None or self._protocol.lost:
            self.close()
            self._protocol = await self._connect()
        protocol = self._protocol
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append("User-Agent: fastpipe")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        future = protocol.start(sink, check_head, head_only=method == "HEAD")
        if protocol.transport is None or protocol.lost:
            raise HTTPFault("connection closed before the request")
        protocol.transport.write(request)
        response: Response | None = None
        try:
            while True:
                seen = protocol.activity
                done, _ = await asyncio.wait({future}, timeout=self.read_timeout)
                if done:
                    break
                if protocol.activity == seen:
                    protocol.salvage()
                    raise HTTPFault(
                        f"no data from {self.host}:{self.port} for {self.read_timeout}s"
                    )
            response = future.result()
            return response
        finally:
            if response is None or not response.keep_alive:
                # Mid-response, failed or closing: this connection cannot be reused.
                self.close()

    def close(self) -> None:
        """Drop the connection (the next request opens a new one)."""
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    @property
    def endpoint(self) -> tuple[str, str, int]:
        """``(scheme, host, port)``: the connections that can serve a URL."""
        return self.scheme, self.host, self.port

    @property
    def reusable(self) -> bool:
        """Open, and its last response read whole with keep-alive: it can take another
        request now (a failed or cut request closes the connection)."""
        return self._protocol is not None and self._protocol.idle


def default_port(scheme: str) -> int:
    """The port a URL of ``scheme`` means when it names none."""
    return 443 if scheme == "https" else 80


def _endpoint(parts: SplitResult) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a split URL, the port defaulting by the scheme."""
    return parts.scheme, parts.hostname or "", parts.port or default_port(parts.scheme)


class ConnectionPool:
    """Idle keep-alive connections, for the next request to their endpoint.

    The raw data plane's: a fetcher that runs out of parts gives its connection back,
    and the next fetcher, of this object or the next one, takes it instead of
    connecting (``Config.reuse_connections``; ``limit`` is one object's connections, so
    that their receive buffers stay within the memory bound; 0: none, every connection
    closes with its fetcher). The light control plane's: its HEAD connections. At most
    ``limit`` wait, none longer than ``idle_seconds``; one that cannot take a request
    (cut, or closed by the server) is closed, not kept.
    """

    def __init__(self, limit: int, idle_seconds: float = POOL_IDLE_SECONDS) -> None:
        self.limit = limit
        self.idle_seconds = idle_seconds
        self._idle: list[tuple[float, RawConnection]] = []  # (given back at, connection)

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, url: str) -> RawConnection | None:
        """An idle connection to ``url``'s endpoint (the most recently used: the warmest),
        or None."""
        self._expire()
        if not self._idle:
            return None
        endpoint = _endpoint(urlsplit(url))
        for i in range(len(self._idle) - 1, -1, -1):
            conn = self._idle[i][1]
            if conn.endpoint == endpoint:
                del self._idle[i]
                return conn
        return None

    def give(self, conn: RawConnection) -> None:
        """Keep ``conn`` for the next fetcher if it is reusable and there is room; else
        close it."""
        self._expire()
        if conn.reusable and len(self._idle) < self.limit:
            self._idle.append((time.monotonic(), conn))
        else:
            conn.close()

    def close(self) -> None:
        """Close every idle connection (the engine's end)."""
        while self._idle:
            self._idle.pop()[1].close()

    def _expire(self) -> None:
        """Close the connections idle too long, or closed by the server meanwhile."""
        oldest = time.monotonic() - self.idle_seconds
        keep = []
        for given, conn in self._idle:
            if given >= oldest and conn.reusable:
                keep.append((given, conn))
            else:
                conn.close()
        self._idle = keep


def _no_body(data: memoryview) -> None:
    raise HTTPFault("a body after a HEAD response")


def _no_check(response: Response) -> None:
    return None


def _split_head(head: str) -> tuple[int, str, bool, dict[str, str]]:
    """A response head's status, reason, keep-alive and headers (names lowercased)."""
    status_line, *lines = head.split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HTTPFault(f"bad status line {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    keep_alive = headers.get("connection", "").lower() != "close" and parts[0] != "HTTP/1.0"
    return int(parts[1]), parts[2] if len(parts) > 2 else "", keep_alive, headers


def _frame_body(req: _Request, status: int, headers: dict[str, str]) -> None:
    """How the body ends: its length, -1 until the connection closes (or chunked)."""
    assert req.response is not None
    req.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    if req.head_only:
        req.chunked, req.body_length = False, 0  # the headers describe a body never sent
    elif "content-length" in headers:
        req.body_length = int(headers["content-length"])
    elif req.chunked:
        if 200 <= status < 300:
            raise HTTPFault("chunked body on a ranged GET is not supported")
        req.body_length = -1
    elif status in (204, 304) or 100 <= status < 200:
        req.body_length = 0
    else:
        req.body_length = -1  # until the connection closes
        req.response.keep_alive = False


def proxy_configured(endpoint: str) -> bool:
    """True when an HTTP(S) proxy applies to ``endpoint`` (the raw path cannot serve)."""
    parts = urlsplit(endpoint)
    wanted = f"{parts.scheme}_proxy"
    if not any(value and name.lower() == wanted for name, value in os.environ.items()):
        # No such variable: urllib would find no proxy either. Importing it (and
        # http.client, email) costs about 5 ms of every run's start-up.
        return False
    import urllib.request

    proxies = urllib.request.getproxies_environment()
    if parts.scheme not in proxies:
        return False
    return not urllib.request.proxy_bypass_environment(parts.hostname or "")  # type: ignore[attr-defined]
