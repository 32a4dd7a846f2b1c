"""Keep-alive connections to each upstream, and one request/response exchange on them.

Each configured upstream gets an :class:`Upstream`: its address (DNS
answers cached for ``DNS_TTL`` seconds), TLS context (verified, with the
URL's host as server name), path prefix and ``Host`` header, encoded once,
and a stack of idle connections (the most recently used first: it is the
least likely to have been closed by the upstream's idle timeout).

An :class:`UpstreamConnection` is an ``asyncio.Protocol`` with llhttp's
response parser (httptools, no leniencies). Its response head is reported
once complete; its body is kept in a small queue that the forwarder takes
from, and reading from the upstream pauses while that queue is full (a slow
client slows the upstream down instead of filling memory). Interim 1xx
answers are skipped, 101 is the response. A connection goes back to the
pool only when its response ended as framed and the upstream did not ask to
close. Waiting on the upstream (to connect, to take the request body, for
the answer and each part of its body) is timed by the loop's
:class:`~gateway.dataplane.sweeper.Sweeper`.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections import deque
from typing import Any, ClassVar, Final
from urllib.parse import urlsplit

import httptools

from .sweeper import Sweeper

DNS_TTL: Final = 10.0  # seconds an upstream host's addresses are reused
MAX_IDLE: Final = 512  # idle connections kept per upstream; more are closed
BODY_HIGH: Final = 256 * 1024  # response bytes buffered before reading from the upstream pauses
BODY_LOW: Final = 64 * 1024
MAX_FIELD: Final = 64 * 1024  # one response header line, or the status line; more is a bad response
MAX_HEAD: Final = 256 * 1024  # a whole response head (interim ones before it included)
MAX_HEADERS: Final = 128  # header lines of a response head; more is a bad response
MAX_REASON: Final = 512  # a longer reason phrase is replaced by the status code's own
# Bytes a reason phrase may not hold (RFC 9112 section 4: HTAB, SP, VCHAR and obs-text only; llhttp lets any
# byte but CR and LF through): such a reason is replaced by the status code's own, never relayed.
_BAD_REASON: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

_INF: Final = float("inf")


class UpstreamError(Exception):
    """An exchange with the upstream failed; ``kind`` says how (for the answer and the metrics)."""

    kind: ClassVar[str] = "error"


class ConnectFailed(UpstreamError):
    kind: ClassVar[str] = "connect"


class TlsFailed(ConnectFailed):
    """The TLS handshake failed (certificate not trusted, wrong host name, no common protocol)."""

    kind: ClassVar[str] = "tls"


class ConnectTimeout(UpstreamError):
    kind: ClassVar[str] = "connect_timeout"


class ReadTimeout(UpstreamError):
    kind: ClassVar[str] = "timeout"


class Disconnected(UpstreamError):
    kind: ClassVar[str] = "disconnected"


class BadResponse(UpstreamError):
    kind: ClassVar[str] = "bad_response"


class Response:
    """An upstream's response head, and how its body is framed."""

    __slots__ = ("status", "reason", "headers", "length", "declared", "chunked", "keep_alive", "upgraded")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.length: int | None = None  # body bytes to read (0 for HEAD, 204, 304)
        self.declared: int | None = None  # its Content-Length header (a HEAD's or 304's describes another body)
        self.chunked = False
        self.keep_alive = True
        self.upgraded = b""  # after a 101: the bytes that followed its head


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream; one exchange at a time."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.sweeper = upstream.sweeper
        self.loop = upstream.sweeper._loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.deadline = _INF
        self.timeout = upstream.read_timeout
        self.used = 0  # exchanges begun on it
        self._error: BaseException | None = None
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._head_lines = 0
        self._head_read = 0  # bytes read of the exchange before its final head completed
        self._reason_ok = b""  # the last reason phrase judged fit to relay
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._bodyless = False  # a HEAD: the response ends with its head
        self.complete = False  # the response was read to its end
        self._ended = False  # the upstream ended its side cleanly (eof_received: a FIN, or TLS's close_notify)
        self.received = False  # a byte of the response arrived
        self.answered = False
        self.partial = False
        self._tunnel: Any = None
        # The last response's headers and the block made of them (see forward.Forwarder._relay): an upstream
        # repeats its headers, a Date changing once a second.
        self.last_headers: list[tuple[bytes, bytes]] | None = None
        self.last_block = b""

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.sweeper.forget(self)
        self.upstream.forget(self)
        if self._tunnel is not None:
            self._tunnel.upstream_lost()
            return
        response = self._response
        if exc is None and self._ended and response is not None and not self.complete and response.length is None \
                and not response.chunked and self._head is not None and self._head.done():
            # A body delimited by the close: a clean close (FIN) is its end. A reset is not: the body was
            # cut short, and the client must not be told it is whole (see Forwarder._relay). Nor is a TLS
            # connection's FIN without TLS's close_notify before it, which anyone on the path can send to
            # cut a body short (RFC 9112 section 9.8): uvloop reports that end as a close without an EOF.
            # (asyncio's own loop reports both alike: only where uvloop is not installed is it taken as whole.)
            self.complete = True
            self._wake()
            return
        self._fail(Disconnected("the upstream closed the connection" if exc is None
                                else f"the upstream connection was lost: {type(exc).__name__}"))

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.from_upstream(data)
            return
        if self._head is None:
            # SECURITY: bytes from an idle connection (a HEAD's late body, a second answer) would be read
            # as the start of the next client's response: the connection is dropped (as nginx does).
            self.abort()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
            if not self.answered:
                # A head still arriving: bounded by what was read of it, not only by what llhttp has
                # reported (it holds a header line, or the status line, until the line ends).
                self._head_read += len(data)
                if self._head_read > MAX_HEAD + MAX_FIELD:
                    raise BadResponse("response head too large")
        except httptools.HttpParserUpgrade as upgrade:
            if self._response is not None:
                self._response.upgraded = data[upgrade.args[0]:]
                self.complete = True
                self._wake()
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(str(exc.__context__ or exc) if exc.args else type(exc).__name__))
            if self.transport is not None:
                self.transport.abort()
        except BadResponse as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None
        if self._tunnel is not None:
            self._tunnel.upstream_drained()

    def eof_received(self) -> bool | None:
        self._ended = True
        if self._tunnel is not None:
            return self._tunnel.upstream_eof()
        return None

    # -- llhttp callbacks

    def on_message_begin(self) -> None:
        if self.complete and self._response is not None:
            # A second answer to one request: this connection can no longer be trusted to be in step.
            raise BadResponse("an answer after the response")
        self._headers = []
        self._head_size = 0
        self._head_lines = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        if len(self._reason) > MAX_FIELD:
            raise BadResponse("status line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        self._head_lines += 1
        if self._head_size > MAX_HEAD or len(name) + len(value) > MAX_FIELD or self._head_lines > MAX_HEADERS:
            raise BadResponse("response head too large")
        if self._response is None:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 100 or status > 599:
            # RFC 9110 section 15: llhttp reads any three digits; "099" would reach the client as "99".
            raise BadResponse(f"status code {status:03d}")
        if 100 <= status < 200 and status != 101:
            self._reason = b""
            return  # interim (100 Continue, 103 Early Hints): the response is still to come
        if status == 101 and not parser.should_upgrade():
            # Switching to nothing (no Upgrade, or no Connection: upgrade): llhttp fails on what follows it.
            raise BadResponse("101 without an upgrade")
        reason = self._reason
        if reason != self._reason_ok:  # (an upstream repeats its reasons: judged once while it does)
            if len(reason) > MAX_REASON or _BAD_REASON.search(reason) is not None:
                reason = b""  # (the client gets the status code's own reason phrase)
            else:
                self._reason_ok = reason
        headers = self._headers
        response = self._response = Response(status, reason, headers)
        coded = False  # a Transfer-Encoding other than one plain "chunked"
        for name, value in headers:
            # By length first: a name of another length is neither, and most are (no lower() for those).
            size = len(name)
            if size == 14 and name.lower() == b"content-length":
                response.length = int(value)
            elif size == 17 and name.lower() == b"transfer-encoding":
                coded = coded or response.chunked or value.strip().lower() != b"chunked"
                response.chunked = True
        response.declared = response.length
        response.keep_alive = self.parser.should_keep_alive()
        bodyless = self._bodyless or status in (204, 304)
        if coded and not bodyless and status != 101:
            # RFC 9112 section 6.1: a proxy removes a transfer coding only by decoding it. "gzip, chunked" (or
            # "gzip" to the close) would reach the client still coded and unlabelled: refused, as nginx does.
            raise BadResponse("a transfer coding other than chunked")
        self.answered = True
        # Trailers (after a chunked body) are bounded as a head of their own, not added to this one's.
        self._head_size = self._head_lines = 0
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)  # an early answer: the body being sent can stop (Forwarder._send_body)
        if bodyless:
            if response.length or response.chunked:
                # SECURITY: a head that announces a body it must not carry (a HEAD's Content-Length, as
                # most servers send; a 304's). Should the upstream write that body anyway, later and in a
                # read of its own, it would be read as the answer to the next request on this
                # connection, another client's: the connection is not used again.
                response.keep_alive = False
            response.length = 0
            response.chunked = False
            self.complete = True
        head = self._head
        if head is not None and not head.done():
            head.set_result(response)
        self.deadline = _INF

    def on_body(self, data: bytes) -> None:
        if self._response is None or self.complete:
            if self._bodyless:
                raise BadResponse("a body after a HEAD response")
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > BODY_HIGH and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._response is None:
            return  # the end of an interim answer
        if not self.complete:
            self.complete = True
            self._wake()

    # -- the exchange

    def begin(self, *, bodyless: bool) -> None:
        """Start a new exchange on this connection."""
        self.used += 1
        self._head = self.loop.create_future()
        self._response = None
        self._status = 0
        self._reason = b""
        self._head_read = 0
        self._error = None
        self._chunks.clear()
        self._buffered = 0
        self._bodyless = bodyless
        self.complete = False
        self.received = False
        self.answered = False  # the final response's head arrived
        self.partial = False  # the request's body was not sent whole (the upstream answered first)
        self.timeout = self.upstream.read_timeout

    def write(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            raise Disconnected("the upstream closed the connection")
        self.sweeper.release()
        self.transport.write(data)

    def write_soon(self, data: bytes) -> None:
        """A whole request (a head without a body), written once the loop's callbacks of the moment have run
        (see Sweeper.hold)."""
        if self.transport is None or self.closed:
            raise Disconnected("the upstream closed the connection")
        self.sweeper.hold(self, data)

    def send_held(self, data: bytes) -> None:
        """What write_soon held (Sweeper.release). Not written to a connection closing meanwhile: its
        connection_lost fails the exchange (Disconnected), which a pooled one's retry then takes up."""
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        """Wait until the upstream takes what was written (timed as a wait on the upstream)."""
        if self.closed:
            raise self._error or Disconnected("the upstream closed the connection")
        if self._write_paused:
            self._drain = self.loop.create_future()
            await self._timed(self._drain)

    async def response(self) -> Response:
        head = self._head
        assert head is not None
        if not head.done():
            # _timed's wait, inline: this one runs on every request, and a coroutine less is cheaper.
            self.deadline = self.sweeper.time() + self.timeout
            self.sweeper.watch(self)
            try:
                await head
            finally:
                self.deadline = _INF
                self.sweeper.forget(self)
        return head.result()

    async def read(self) -> bytes:
        """The next piece of the response body; ``b""`` at its end."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            waiter = self._waiter = self.loop.create_future()
            try:
                await self._timed(waiter)
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._paused and self._buffered < BODY_LOW and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def take_buffered(self) -> bytes:
        """All of the body that has arrived, without waiting."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def _timed(self, waiter: asyncio.Future[Any]) -> None:
        self.deadline = self.sweeper.time() + self.timeout
        self.sweeper.watch(self)
        try:
            await waiter
        finally:
            self.deadline = _INF
            self.sweeper.forget(self)

    def expire(self, now: float) -> None:
        self.sweeper.forget(self)
        self._fail(ReadTimeout("the upstream did not answer in time"))

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)
            head.exception()  # retrieved: a failure nobody awaits is not "never retrieved"
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(exc)
            drain.exception()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def reusable(self) -> bool:
        response = self._response
        return (not self.closed and self.complete and self._error is None and response is not None
                and response.keep_alive and response.status != 101 and not self._chunks and not self.partial)

    def finish(self) -> None:
        """The exchange is over: back to the pool, or closed."""
        if self.reusable():
            if self._bodyless:
                # llhttp expects the body the head announced; the next exchange starts afresh.
                self.parser = httptools.HttpResponseParser(self)
            self._response = None
            self._head = None
            self.upstream.release(self)
        else:
            self.close()

    def close(self) -> None:
        self.sweeper.release()  # (what was held for it goes first, as if written when asked)
        self.closed = True
        self.sweeper.forget(self)
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.sweeper.release()  # (what was held for it goes first, as if written when asked)
        self.closed = True
        self.sweeper.forget(self)
        if self.transport is not None:
            self.transport.abort()


class Upstream:
    """One configured upstream: where it is, how to reach it, and its idle connections."""

    def __init__(self, url: str, sweeper: Sweeper, *, connect_timeout: float, read_timeout: float) -> None:
        parts = urlsplit(url)
        self.sweeper = sweeper
        self.loop = sweeper._loop
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if self.tls else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if self.tls else 80
        authority = host if self.port == default_port else f"{host}:{self.port}"
        self.host_line = b"Host: " + authority.encode("idna" if not host.isascii() else "ascii") + b"\r\n"
        self.prefix = parts.path.rstrip("/").encode("ascii")
        self._idle: list[UpstreamConnection] = []
        self._all: set[UpstreamConnection] = set()
        self._addresses: list[tuple[Any, ...]] = []
        self._resolved_at = -_INF
        self.closed = False

    def idle_connection(self) -> UpstreamConnection | None:
        """A pooled connection, most recently used first, or None (then :meth:`connect` opens one)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self._idle) >= MAX_IDLE:
            conn.close()
        else:
            self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    async def connect(self) -> UpstreamConnection:
        """A new connection (connect timeout, DNS cached, TLS verified)."""
        if self.closed:
            raise ConnectFailed("shutting down")
        try:
            async with asyncio.timeout(self.connect_timeout):
                last: BaseException | None = None
                for family, address in await self._resolve():
                    try:
                        _, conn = await self.loop.create_connection(
                            lambda: UpstreamConnection(self), address[0], address[1], family=family,
                            ssl=self.ssl, server_hostname=self.host if self.ssl else None)
                    except (OSError, ssl.SSLError) as exc:
                        last = exc
                        continue
                    self._all.add(conn)
                    return conn
                if isinstance(last, ssl.SSLError):  # ssl.SSLCertVerificationError among them
                    raise TlsFailed(type(last).__name__)
                raise ConnectFailed(type(last).__name__ if last else "no address")
        except TimeoutError:
            raise ConnectTimeout("connect timeout") from None

    async def _resolve(self) -> list[tuple[int, tuple[Any, ...]]]:
        now = self.sweeper.time()
        if now - self._resolved_at < DNS_TTL and self._addresses:
            return self._addresses
        try:
            infos = await self.loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            if self._addresses:
                return self._addresses  # a resolver hiccup: the last answer still serves
            raise ConnectFailed(f"cannot resolve: {exc.strerror or exc}") from None
        self._addresses = [(info[0], info[4]) for info in infos]
        self._resolved_at = now
        return self._addresses

    def close(self) -> None:
        self.closed = True
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
