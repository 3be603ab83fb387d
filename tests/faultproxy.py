"""A fault-injecting HTTP/1.1 proxy on loopback, placed between fastpipe and SeaweedFS.

It works at the TCP level: requests are parsed only far enough to decide on a fault
(method, target, headers, Content-Length body) and are otherwise piped unchanged, Host
header included, so that presigned URLs signed for the proxy's ``host:port`` verify
upstream. Responses are framed (Content-Length, chunked, or until close) so that one
client connection may carry many keep-alive requests.

A test gives a ``plan``: ``plan(n, request) -> Fault | None`` is asked once per GET
(``n`` counts GETs from 0), and ``head_plan`` the same for HEAD requests. Every request is
logged with its headers, Range and the monotonic times it arrived and was answered; every
fault injected is counted. With ``tls`` the proxy speaks HTTPS to the client, choosing the
certificate per connection. The proxy runs its own event loop in a background thread;
``stop()`` ends it.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import random
import socket
import ssl
import struct
import termios
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_S3_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message>"
    "<Resource>{resource}</Resource><RequestId>faultproxy</RequestId></Error>"
)
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    412: "Precondition Failed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Fault:
    """What to do to one GET.

    ``kind``:
      - ``"reset"``: forward the head and ``after_bytes`` body bytes, then reset the
        connection (RST) once those bytes have left;
      - ``"close"``: the same with an orderly close (FIN) instead of a reset;
      - ``"stall"``: forward the head and ``after_bytes`` body bytes, then send nothing
        more (the connection stays open until the client gives up or the proxy stops);
      - ``"error"``: answer ``status`` with an S3 XML error ``code`` without asking upstream
        (with ``echo`` its ``<Message>`` quotes the request line and the Authorization
        header, as some servers and proxies do);
      - ``"hold"``: forward nothing until :meth:`FaultProxy.release` is called.
    """

    kind: str
    after_bytes: int = 0
    status: int = 503
    code: str = "SlowDown"
    echo: bool = False
    message: str = "injected by faultproxy"
    #: Extra response headers of an ``"error"`` (e.g. ``x-amz-bucket-region``).
    headers: tuple[tuple[str, str], ...] = ()


def slow_down() -> Fault:
    return Fault("error", status=503, code="SlowDown")


def internal_error() -> Fault:
    return Fault("error", status=500, code="InternalError")


@dataclass
class Request:
    """One request seen by the proxy (GETs carry their parsed Range)."""

    method: str
    target: str
    headers: dict[str, str]
    range: tuple[int, int] | None = None  # (first, last) byte, inclusive
    fault: Fault | None = None  # what the plan asked for
    applied: bool = False  # the fault really happened (a cut needs a longer body)
    received_at: float = 0.0  # time.monotonic() when the request head arrived
    #: An injected error: just before it was written (the client cannot have it sooner);
    #: a relayed response: once relayed (or cut). 0.0 if never answered.
    answered_at: float = 0.0


Plan = Callable[[int, Request], "Fault | None"]


def every(k: int, fault: Callable[[], Fault] | Fault, offset: int = 0) -> Plan:
    """Fault every ``k``-th GET (GET numbers ``offset``, ``offset + k``, ...)."""

    def plan(n: int, request: Request) -> Fault | None:
        if n >= offset and (n - offset) % k == 0:
            return fault() if callable(fault) else fault
        return None

    return plan


def share(fraction: float, faults: list[Fault], seed: int = 0) -> Plan:
    """Fault a seeded-random ``fraction`` of GETs, cycling through ``faults``."""
    rng = random.Random(seed)
    used = [0]

    def plan(n: int, request: Request) -> Fault | None:
        if rng.random() < fraction:
            used[0] += 1
            return faults[(used[0] - 1) % len(faults)]
        return None

    return plan


def capped(plan: Plan, per_range_end: int) -> Plan:
    """``plan``, but at most ``per_range_end`` faults for GETs ending at the same byte
    (one part: a resumed part keeps its end), so that a bounded retry always wins."""
    seen: Counter[int] = Counter()

    def capped_plan(n: int, request: Request) -> Fault | None:
        end = request.range[1] if request.range else -1
        if seen[end] >= per_range_end:
            return None
        fault = plan(n, request)
        if fault is not None:
            seen[end] += 1
        return fault

    return capped_plan


def always(fault: Fault) -> Plan:
    return lambda n, request: fault


def _parse_range(value: str | None) -> tuple[int, int] | None:
    if not value or not value.startswith("bytes="):
        return None
    first, _, last = value[6:].partition("-")
    try:
        return int(first), int(last)
    except ValueError:
        return None


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    first, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return first, headers


@dataclass
class FaultProxy:
    """The proxy; ``url`` is what fastpipe's ``Config(endpoint_url=...)`` takes."""

    upstream_host: str
    upstream_port: int
    plan: Plan | None = None
    head_plan: Plan | None = None
    #: With ``tls``, ``tls(k)`` is the server context for the k-th client connection (from 0).
    tls: Callable[[int], ssl.SSLContext] | None = None
    requests: list[Request] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    port: int = 0
    connections: int = 0  # client connections accepted since the last reset()
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.base_events.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _clients: set[asyncio.StreamWriter] = field(default_factory=set)
    _gate: asyncio.Event | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _gets: int = 0
    _heads: int = 0
    _accepted: int = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    # -- control (from the test's thread) ---------------------------------------------------

    def start(self) -> FaultProxy:
        ready = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=main, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    def reset(self, plan: Plan | None = None, head_plan: Plan | None = None) -> None:
        """Forget the log and counters (and the client connections still open: a test
        counts its own), release held requests, install the plans."""
        self.release()
        with self._lock:
            self.plan = plan
            self.head_plan = head_plan
            self.requests.clear()
            self.faults.clear()
            self.connections = 0
            self._gets = 0
            self._heads = 0
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._renew(), self._loop).result(10)

    def release(self) -> None:
        """Let every held request go on (and the ones held later)."""
        if self._loop is not None and self._gate is not None:
            self._loop.call_soon_threadsafe(self._gate.set)

    def refuse_new_connections(self) -> None:
        """Stop listening: connections open stay, new ones are refused. From any thread
        (a plan may call it); the proxy cannot listen again afterwards."""
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return
        if threading.current_thread() is self._thread:
            server.close()
        else:
            loop.call_soon_threadsafe(server.close)

    def drop_connections(self) -> None:
        """Close every client connection open now (accepted since the last reset), as a
        server closes idle keep-alive connections (from the test's thread; returns once
        they are closed)."""
        loop = self._loop
        if loop is None:
            return

        async def drop() -> None:
            for writer in list(self._clients):
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(drop(), loop).result(10)

    def open_connections(self) -> int:
        """Client connections open now, of those accepted since the last reset."""
        return len(self._clients)

    def gets(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET"]

    def heads(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "HEAD"]

    def held(self) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.fault is not None and r.fault.kind == "hold")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop -------------------------------------------------------------------------

    async def _renew(self) -> None:
        self._gate = asyncio.Event()
        # An earlier test's engine may still be closing its connections (or a client it
        # left for the garbage collector): they are not this test's to count or drop.
        self._clients.clear()

    async def _open(self) -> None:
        self._gate = asyncio.Event()
        self._server = await asyncio.start_server(self._track, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self._server.wait_closed()

    async def _track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections += 1
            number, self._accepted = self._accepted, self._accepted + 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._clients.add(writer)
        try:
            if self.tls is not None:
                await writer.start_tls(self.tls(number))
            await self._serve(reader, writer)
        except (
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ssl.SSLError,
        ):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            self._clients.discard(writer)
            writer.transport.abort()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                try:
                    head = await client_r.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed between requests
                request_line, headers = _parse_head(head)
                method, target = (request_line.split(" ") + ["", ""])[:2]
                body = b""
                if int(headers.get("content-length", "0") or 0):
                    body = await client_r.readexactly(int(headers["content-length"]))
                request = Request(method, target, headers, _parse_range(headers.get("range")))
                request.received_at = time.monotonic()
                with self._lock:
                    self.requests.append(request)
                    if method == "GET":
                        n, self._gets = self._gets, self._gets + 1
                        plan = self.plan
                        request.fault = plan(n, request) if plan is not None else None
                    elif method == "HEAD":
                        n, self._heads = self._heads, self._heads + 1
                        plan = self.head_plan
                        request.fault = plan(n, request) if plan is not None else None
                fault = request.fault
                if fault is not None and fault.kind in ("error", "hold"):
                    self._applied(request)
                if fault is not None and fault.kind == "error":
                    answer = self._error_response(fault, request, request_line)
                    request.answered_at = time.monotonic()
                    client_w.write(answer)
                    await client_w.drain()
                    continue
                if fault is not None and fault.kind == "hold":
                    assert self._gate is not None
                    await self._gate.wait()
                if upstream is None:
                    upstream = await asyncio.open_connection(self.upstream_host, self.upstream_port)
                up_r, up_w = upstream
                up_w.write(head + body)
                await up_w.drain()
                keep = await self._relay_response(request, up_r, client_w, client_r)
                request.answered_at = time.monotonic()
                if not keep:
                    return
        finally:
            if upstream is not None:
                upstream[1].transport.abort()

    def _applied(self, request: Request) -> None:
        assert request.fault is not None
        with self._lock:
            request.applied = True
            self.faults[request.fault.kind] += 1

    def _error_response(self, fault: Fault, request: Request, request_line: str) -> bytes:
        message = fault.message
        if fault.echo:
            from xml.sax.saxutils import escape

            authorization = request.headers.get("authorization", "")
            message = escape(
                f"{message}: cannot serve {request_line} (Authorization: {authorization})"
            )
        body = _S3_ERROR.format(
            code=fault.code, message=message, resource=request.target.split("?")[0]
        ).encode()
        head = (
            f"HTTP/1.1 {fault.status} {_REASONS.get(fault.status, 'Error')}\r\n"
            "Content-Type: application/xml\r\n"
            "x-amz-request-id: faultproxy\r\n"  # as S3 sends it (botocore reads only this)
            + "".join(f"{name}: {value}\r\n" for name, value in fault.headers)
            + f"Content-Length: {len(body)}\r\n\r\n"
        )
        # A HEAD response carries the head only (its Content-Length is the body it would be).
        return head.encode("latin-1") + (b"" if request.method == "HEAD" else body)

    async def _relay_response(
        self,
        request: Request,
        up_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        client_r: asyncio.StreamReader,
    ) -> bool:
        """Pipe one response; True if the connection may carry another request.

        A cut (reset, close, stall) happens only if the body is longer than the fault's
        ``after_bytes``; a shorter body passes whole and the fault is not counted.
        """
        method, fault = request.method, request.fault
        head = await up_r.readuntil(b"\r\n\r\n")
        status_line, headers = _parse_head(head)
        status = int(status_line.split(" ")[1])
        keep = headers.get("connection", "").lower() != "close"
        cut = fault is not None and fault.kind in ("reset", "close", "stall")
        limit = fault.after_bytes if cut and fault is not None else -1
        client_w.write(head)
        sent = 0

        async def forward(data: bytes) -> bool:
            """Send ``data`` unless the fault's byte limit is reached; False: cut now."""
            nonlocal sent
            if limit >= 0 and sent + len(data) > limit:
                self._applied(request)
                client_w.write(data[: limit - sent])
                sent = limit
                await client_w.drain()
                return False
            client_w.write(data)
            sent += len(data)
            await client_w.drain()
            return True

        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            pass
        elif "content-length" in headers:
            remaining = int(headers["content-length"])
            while remaining:
                data = await up_r.read(min(remaining, 256 * 1024))
                if not data:
                    raise ConnectionError("upstream closed mid-body")
                remaining -= len(data)
                if not await forward(data):
                    return await self._cut(fault, client_w, client_r)
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                line = await up_r.readuntil(b"\r\n")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                chunk = line + await up_r.readexactly(size + 2)  # no trailers expected
                if not await forward(chunk):
                    return await self._cut(fault, client_w, client_r)
                if size == 0:
                    break
        else:
            while data := await up_r.read(256 * 1024):
                if not await forward(data):
                    return await self._cut(fault, client_w, client_r)
            keep = False
        return keep

    async def _cut(
        self, fault: Fault | None, client_w: asyncio.StreamWriter, client_r: asyncio.StreamReader
    ) -> bool:
        assert fault is not None
        await client_w.drain()
        if fault.kind == "stall":
            await client_r.read()  # until the client gives up (or the proxy stops)
            return False
        # Let the bytes already sent reach the client before the connection ends, so that
        # "reset after N bytes" means the client really received N bytes: wait until the
        # client's kernel acknowledged every byte (nothing left in our send queue).
        await _acknowledged(client_w)
        if fault.kind == "reset":
            sock = client_w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client_w.transport.abort()
        else:
            client_w.close()
        return False


async def _acknowledged(writer: asyncio.StreamWriter) -> None:
    """Return once the peer acknowledged every byte written (or the socket is gone)."""
    sock = writer.get_extra_info("socket")
    if sock is None or writer.get_extra_info("sslcontext") is not None:
        return  # TLS: the record layer may hold bytes back; only plain TCP is measured
    pending = array.array("i", [0])
    while not writer.transport.is_closing():
        try:
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, pending, True)
        except OSError:
            return
        if pending[0] == 0 and writer.transport.get_write_buffer_size() == 0:
            return
        await asyncio.sleep(0.001)  # a poll for a kernel counter, not a guess of a delay


def fast_retry_config(endpoint: str, part_size: int, plane: str, **kwargs: Any) -> Any:
    """A fastpipe Config for fault tests: small parts, 4 fetchers, millisecond backoff,
    ``plane`` as the data plane; ``kwargs`` override any of it."""
    from fastpipe import Config

    options: dict[str, Any] = dict(
        endpoint_url=endpoint,
        part_size=part_size,
        max_concurrency=4,
        data_plane=plane,
        backoff_base=0.01,
        backoff_max=0.05,
    )
    options.update(kwargs)
    return Config(**options)
