"""Stage 8 — forward: stream the request upstream and the response back.

Request heads are built as bytes: the client's headers minus hop-by-hop
ones, the client's ``Authorization`` (unless the route passes it) and
anything ``X-Keygate-*``, then ``X-Forwarded-*``, ``Via``, ``X-Request-Id``
and the verified key's identity headers (encoded once when the key entered
the cache). Bodies stream both ways in the pieces they arrive in, never
buffered whole, with the framing they came with: a Content-Length body goes
on with that length, a chunked one chunked. A WebSocket handshake that the
upstream accepts turns the connection into a tunnel: bytes relayed both
ways untouched, until either side closes or both are idle for the
upstream's ``timeout``, or its key no longer admits it (:mod:`.tunnels`).
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from typing import Any, Final

from multidict import CIMultiDictProxy

from ..config.schema import UpstreamSettings
from ..pipeline.outcomes import Denied, Outcome
from ..pipeline.ratelimit import DEGRADED_HEADER
from ..pipeline.scope import Target
from .client_gone import ClientGone
from .http1 import MEMO_BLOCK, Body, BodyTimeout, MalformedBody, Request, reason_of
from .latency import Histogram
from .sweeper import Sweeper
from .tunnels import Admission, TunnelGuard
from .upstream_pool import BadResponse, ConnectTimeout, Disconnected, ReadTimeout, Response, Upstream, UpstreamConnection, \
    UpstreamError

# "close": a header of that name would be dropped as one named by "Connection: close" (RFC 9110 section
# 7.6.1), and the name is reserved for that reason (section 16.3.2.2): never forwarded, whatever Connection says.
HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "close",
})
# Headers we set ourselves (or that the server already acted on: Expect).
# SECURITY: Content-Length too: the framing that goes upstream is always ours, so no client header
# (not even one named in Connection, which drops it) can leave a body unframed.
_REPLACED: Final = frozenset({"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id",
                              "expect", "content-length"})
VIA: Final = "1.1 keygate"

# Connection values that name no header beyond the hop-by-hop ones: by far the most common.
_PLAIN_CONNECTION: Final = frozenset({"keep-alive", "close"})

# SECURITY: an upstream that honours these runs another method than the one the key was checked for.
METHOD_OVERRIDES: Final = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
# SECURITY: forwarding headers Keygate does not set itself (it sets X-Forwarded-For/-Proto/-Host):
# from a client that is not a trusted proxy they are forgeries an upstream might believe (for the
# client's address, the original path or method, the scheme).
_UNTRUSTED_FORWARDING: Final = frozenset({
    "forwarded", "x-real-ip", "x-client-ip", "true-client-ip", "x-cluster-client-ip",
    "x-original-uri", "x-original-method", "x-forwarded-uri", "x-forwarded-path", "x-forwarded-prefix",
    "x-forwarded-method", "x-forwarded-port", "x-forwarded-scheme", "x-forwarded-ssl", "x-forwarded-server",
})
# SECURITY: IIS and Symfony route by these instead of the request line: a key judged for one path
# would run another. Keygate judged the path, so they never go upstream.
_PATH_OVERRIDES: Final = frozenset({"x-original-url", "x-rewrite-url"})

# Every combination of what an upstream request drops, built once rather than per request.
# (A WebSocket handshake keeps its Sec-WebSocket-* headers: the tunnel relays the upstream's answer to them.)
_DROPPED: Final[dict[tuple[bool, bool, bool], frozenset[str]]] = {
    (pass_credentials, pass_method_override, peer_trusted):
        HOP_BY_HOP | _REPLACED | _PATH_OVERRIDES
        | (frozenset() if pass_credentials else frozenset({"authorization"}))
        | (frozenset() if pass_method_override else METHOD_OVERRIDES)
        | (frozenset() if peer_trusted else _UNTRUSTED_FORWARDING)
    for pass_credentials in (False, True) for pass_method_override in (False, True) for peer_trusted in (False, True)
}

# Methods sent without a Content-Length when they carry no body; others get "Content-Length: 0"
# (an upstream may otherwise wait for a body, or answer 411).
_NO_LENGTH_NEEDED: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE"})
# Retried once on a pooled connection that turned out closed (RFC 9112 section 9.3.1.1).
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

_HOP_BY_HOP_BYTES: Final = frozenset(name.encode() for name in HOP_BY_HOP) | {b"content-length"}
# Response headers Keygate sets itself on an allowed answer: the upstream's own are replaced.
_ANSWERED: Final = frozenset({b"x-request-id", b"ratelimit", b"ratelimit-policy", DEGRADED_HEADER.lower().encode()})
_VIA_LINE: Final = f"Via: {VIA}\r\n".encode()
_PLAIN_CONNECTION_BYTES: Final = frozenset(value.encode() for value in _PLAIN_CONNECTION)


def _connection_named(headers: CIMultiDictProxy[str], base: frozenset[str]) -> frozenset[str]:
    """``base`` plus the headers the ``Connection`` header names (hop-by-hop too, RFC 9110 section 7.6.1)."""
    connection = headers.getall("Connection", ())
    if not connection or (len(connection) == 1 and connection[0].lower() in _PLAIN_CONNECTION):
        return base
    return base | {t.strip().lower() for v in connection for t in v.split(",")}


# Header names as a client or an upstream spells them, each judged once per spelling rather than per
# request (most requests repeat the same few spellings). Only short names are kept, and a full table
# starts over, so names sent to fill it cost memory for a moment, never more than this bounds.
_MEMO_NAME: Final = 64  # characters of a name worth remembering
_MEMO_SIZE: Final = 4096  # spellings remembered per table
# A request header name as judged: lower case, "_" read as "-"; every X-Keygate-* name as _IDENTITY.
_IDENTITY: Final = "x-keygate-"
_REQUEST_NAMES: Final[dict[str, str]] = {}


def _remember(table: dict[Any, Any], name: str | bytes, judged: Any) -> None:
    if len(name) <= _MEMO_NAME:
        if len(table) >= _MEMO_SIZE:
            table.clear()
        table[name] = judged


def _request_name(name: str) -> str:
    lower = name.lower().replace("_", "-")
    if lower.startswith(_IDENTITY):
        lower = _IDENTITY
    _remember(_REQUEST_NAMES, name, lower)
    return lower


def upstream_request_headers(
    request: Request, *, pass_credentials: bool, identity: bytes, client_ip: str | None, peer: str,
    peer_trusted: bool, request_id: str, pass_method_override: bool = False,
) -> bytes:
    """The header lines that go upstream (without Host and framing), as bytes."""
    headers = request.headers
    dropped = _DROPPED[pass_credentials, pass_method_override, peer_trusted]
    pairs = request.pairs
    conn = request.conn
    if dropped is conn.sent_drop and pairs == conn.sent_pairs:
        # The same headers as this connection's last request (names and values equal, in order), judged
        # by the same rules: the same lines.
        client = conn.sent_lines
    else:
        lines = _client_lines(pairs, dropped, True)
        if lines is None:
            # A Connection header that names more headers (rare): those go too.
            lines = _client_lines(pairs, _connection_named(headers, dropped), False)
            assert lines is not None
        client = "".join(lines)
        if len(client) <= MEMO_BLOCK:
            conn.sent_pairs, conn.sent_drop, conn.sent_lines = pairs, dropped, client
    if peer_trusted:
        forwarded_for = headers.getall("X-Forwarded-For", ())
        chain = [*forwarded_for, peer] if forwarded_for else [client_ip or peer]
        hops = ", ".join(hop for hop in chain if hop)
        proto = headers.get("X-Forwarded-Proto") or "http"
        forwarded_host = headers.get("X-Forwarded-Host")
        host = forwarded_host if forwarded_host is not None else request.host
    else:
        # SECURITY: an untrusted client's X-Forwarded-For is replaced, not extended.
        hops, proto, host = client_ip or peer, "http", request.host
    # All but Via were dropped from the client's headers above, so adding never duplicates one.
    # Client values arrived as bytes and were read as latin-1: the same bytes go on.
    return (f"{client}X-Forwarded-For: {hops}\r\nX-Forwarded-Proto: {proto}\r\nX-Forwarded-Host: {host}\r\n"
            f"Via: {VIA}\r\nX-Request-Id: {request_id}\r\n").encode("latin-1") + identity


def _client_lines(pairs: list[tuple[str, str]], drop: frozenset[str], plain: bool) -> list[str] | None:
    """The client's header lines that go upstream: all but those in ``drop`` and identity headers.

    With ``plain``, None on a Connection header that may name more headers than ``drop`` holds (one
    that is not just "keep-alive" or "close"): ``drop`` must take them in first.
    """
    # SECURITY: clients must not be able to forge identity headers (X-Keygate-*),
    # and the key goes upstream only where a route says pass_credentials.
    # SECURITY: CGI and WSGI servers read "X_Keygate_Key_Id" as "X-Keygate-Key-Id" (both become
    # HTTP_X_KEYGATE_KEY_ID), so an underscore spelling is judged as its dash spelling.
    names = _REQUEST_NAMES
    lines: list[str] = []
    for name, value in pairs:
        lower = names.get(name)
        if lower is None:
            lower = _request_name(name)
        if lower in drop or lower is _IDENTITY:
            if plain and lower == "connection" and value.lower() not in _PLAIN_CONNECTION:
                return None
            continue
        lines.append(f"{name}: {value}\r\n")
    return lines


# What happens to a response header: kept, dropped (hop-by-hop, or one Keygate sets), or Connection
# (dropped, and whatever else it names dropped too).
_DROP: Final = 0
_KEEP: Final = 1
_CONNECTION: Final = 2
_RESPONSE_NAMES: Final[dict[bytes, int]] = {}


def _response_name(name: bytes) -> int:
    lower = name.lower()
    kind = _CONNECTION if lower == b"connection" else _DROP if lower in _HOP_BY_HOP_BYTES or lower in _ANSWERED \
        else _KEEP
    _remember(_RESPONSE_NAMES, name, kind)
    return kind


def response_header_block(headers: list[tuple[bytes, bytes]], answer: bytes) -> bytes:
    """The upstream's response headers minus hop-by-hop ones and those we set, plus Via and ``answer``."""
    kinds = _RESPONSE_NAMES
    lines: list[bytes] = []  # (joined once: adding each line to a block copied the block per header)
    for name, value in headers:
        kind = kinds.get(name)
        if kind is None:
            kind = _response_name(name)
        if kind == _KEEP:
            lines.append(b"%s: %s\r\n" % (name, value))
        elif kind == _CONNECTION and value.lower() not in _PLAIN_CONNECTION_BYTES:
            return _named_response_header_block(headers, answer)  # it names more headers to drop: rare
    lines.append(_VIA_LINE)
    lines.append(answer)
    return b"".join(lines)


def _named_response_header_block(headers: list[tuple[bytes, bytes]], answer: bytes) -> bytes:
    """response_header_block when a Connection header names headers beyond the hop-by-hop ones."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named |= {t.strip().lower() for t in value.split(b",")}  # (close and keep-alive: hop-by-hop)
    drop = _HOP_BY_HOP_BYTES | _ANSWERED | named
    return b"".join([name + b": " + value + b"\r\n" for name, value in headers if name.lower() not in drop]) \
        + _VIA_LINE + answer


class _Upstream:
    """What forwarding to one configured upstream needs, made on its first request."""

    __slots__ = ("pool", "latency", "errors")

    def __init__(self, pool: Upstream) -> None:
        self.pool = pool
        self.latency = Histogram()  # time until its response head arrived
        self.errors: dict[str, int] = {}  # failed exchanges by UpstreamError.kind (rare: not the hot path)

    def failed(self, exc: UpstreamError) -> None:
        self.errors[exc.kind] = self.errors.get(exc.kind, 0) + 1


class Forwarder:
    def __init__(self, sweeper: Sweeper, *, max_body_size: int, client_timeout: float,
                 tunnels: TunnelGuard | None = None) -> None:
        self.sweeper = sweeper
        self.max_body_size = max_body_size
        self.client_timeout = client_timeout
        # Open WebSocket tunnels by key: ended when the key no longer admits them (see .tunnels).
        self.tunnels = tunnels
        self._upstreams: dict[str, _Upstream] = {}

    @property
    def upstream_latency(self) -> dict[str, Histogram]:
        """Per upstream used so far: time until its response head arrived."""
        return {name: up.latency for name, up in self._upstreams.items()}

    @property
    def upstream_errors(self) -> dict[tuple[str, str], int]:
        """Failed exchanges by upstream name and kind (connect, connect_timeout, tls, timeout, disconnected,
        bad_response)."""
        return {(name, kind): n for name, up in self._upstreams.items() for kind, n in up.errors.items()}

    def _upstream(self, settings: UpstreamSettings) -> _Upstream:
        known = self._upstreams.get(settings.name)
        if known is None:
            known = self._upstreams[settings.name] = _Upstream(Upstream(
                settings.url, self.sweeper, connect_timeout=settings.connect_timeout,
                read_timeout=settings.timeout))
        return known

    def close(self) -> None:
        for up in self._upstreams.values():
            up.pool.close()

    async def forward(self, request: Request, target: Target, path: str, headers: bytes, answer: bytes) -> None:
        """Relay the exchange; Denied for 413/408/502/504 raised before the response starts."""
        up = self._upstream(target.upstream)  # type: ignore[arg-type]
        pool = up.pool
        body = request.body
        method = request.method
        if body is None:
            framing = b"Content-Length: 0\r\n" if request.content_length is not None or method not in _NO_LENGTH_NEEDED \
                else b""
        else:
            if self.max_body_size and body.expected is not None and body.expected > self.max_body_size:
                raise Denied(Outcome.BODY_TOO_LARGE, f"Content-Length {body.expected}")
            if body.broken:
                # Its framing broke off before forwarding began (it usually comes in one read with its
                # head): nothing goes upstream.
                raise Denied(Outcome.INVALID_BODY)
            # A chunked body is the one without a length (http1.Connection makes no other).
            framing = b"Transfer-Encoding: chunked\r\n" if body.expected is None \
                else b"Content-Length: %d\r\n" % body.expected
        head = b"%s %s%s HTTP/1.1\r\n%s%s%s\r\n" % (
            method.encode("ascii"), pool.prefix, path.encode("latin-1"), pool.host_line, headers, framing)
        started = time.perf_counter()
        conn, response = await self._exchange(up, request, head)
        up.latency.observe(time.perf_counter() - started)
        if response.status == 101:
            # Switching protocols on a request that asked for no upgrade (ours never carry Upgrade
            # here): relayed, the client would read what follows as another protocol.
            conn.abort()
            raise self._failure(up, BadResponse("101 to a request without an upgrade"))
        await self._relay(up, request, conn, response, answer)

    async def _exchange(self, up: _Upstream, request: Request, head: bytes) -> tuple[UpstreamConnection, Response]:
        pool = up.pool
        body = request.body
        retry = body is None and request.method in IDEMPOTENT_METHODS
        while True:
            # A pooled connection without a coroutine (every request but the first few); else a new one.
            conn = pool.idle_connection()
            reused = conn is not None
            if conn is None:
                try:
                    conn = await pool.connect()
                except UpstreamError as exc:
                    raise self._failure(up, exc) from None
            conn.begin(bodyless=request.method == "HEAD")
            try:
                if body is None:
                    conn.write_soon(head)  # (with the loop's other small writes: see Sweeper.hold)
                else:
                    conn.write(head)
                    await self._send_body(conn, body)
                return conn, await conn.response()
            except Disconnected as exc:
                if conn.answered:
                    # It answered before taking the whole body, then closed (413, say): that answer is the client's.
                    conn.partial = True
                    return conn, await conn.response()
                conn.abort()
                if retry and reused and not conn.received:
                    retry = False  # the pooled connection had been closed by the upstream: once more
                    continue
                raise self._failure(up, exc) from None
            except UpstreamError as exc:
                conn.abort()
                raise self._failure(up, exc) from None
            except BaseException:
                conn.abort()  # refused, cancelled or failed mid-exchange: its state is unknown
                raise

    async def _send_body(self, conn: UpstreamConnection, body: Body) -> None:
        limit = self.max_body_size
        sent = 0
        chunked = body.chunked
        while True:
            try:
                # Waiting on the client is not the upstream's time; the client has its own timeout (408).
                chunk = await body.read()
            except BodyTimeout:
                raise Denied(Outcome.CLIENT_TIMEOUT) from None
            except MalformedBody:
                raise Denied(Outcome.INVALID_BODY) from None
            if not chunk:
                break
            sent += len(chunk)
            if limit and sent > limit:
                raise Denied(Outcome.BODY_TOO_LARGE)
            if conn.answered:
                # The upstream answered early (413, or 200 without reading): the rest is not sent, and the
                # connection is not reused (the upstream would read the unsent rest as the next request).
                conn.partial = True
                return
            conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            await conn.drain()
        if chunked:
            conn.write(b"0\r\n\r\n")

    async def _relay(
        self, up: _Upstream, request: Request, conn: UpstreamConnection, response: Response, answer: bytes,
    ) -> None:
        status = response.status
        reason = response.reason.decode("latin-1") if response.reason else reason_of(status)
        # SECURITY: the framing the client gets is always Keygate's own (the upstream's Content-Length is
        # dropped with the hop-by-hop headers), so no upstream header can leave a body unframed.
        headers = response.headers
        if headers == conn.last_headers:
            # The same headers as this connection's last response (a Date changes once a second): the same block.
            block = conn.last_block + answer
        else:
            kept = response_header_block(headers, b"")
            if len(kept) <= MEMO_BLOCK:
                conn.last_headers, conn.last_block = headers, kept
            block = kept + answer
        bodyless = request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        if bodyless:
            # A HEAD's or 304's Content-Length describes the body a GET would get: passed on as declared.
            if response.declared is not None and status != 204 and not 100 <= status < 200:
                block += b"Content-Length: %d\r\n" % response.declared
        elif response.length is not None and not response.chunked and not conn.complete:
            block += b"Content-Length: %d\r\n" % response.length
        if conn.complete:
            # The whole body is here: head and body leave in one write.
            request.send(status, reason, block, conn.take_buffered(), add_length=not bodyless)
            conn.finish()
            return
        request.start(status, reason, block, length=response.length if not response.chunked else None,
                      bodyless=bodyless)
        try:
            request.write(conn.take_buffered())
            while True:
                await request.drain()  # the client takes what was written before more is read
                chunk = await conn.read()
                if not chunk:
                    break
                request.write(chunk)
        except ClientGone:
            conn.abort()
            raise
        except UpstreamError as exc:
            # The head is gone already: all we can do is cut the client off,
            # so it cannot mistake a truncated body for a whole one.
            up.failed(exc)
            conn.abort()
            request.abort()
            return
        except BaseException:
            conn.abort()
            raise
        request.end()
        conn.finish()

    @staticmethod
    def _failure(up: _Upstream, exc: UpstreamError) -> Denied:
        up.failed(exc)
        if isinstance(exc, ReadTimeout):
            return Denied(Outcome.UPSTREAM_TIMEOUT, "read timeout")
        if isinstance(exc, ConnectTimeout):
            return Denied(Outcome.UPSTREAM_UNAVAILABLE, "connect timeout")
        return Denied(Outcome.UPSTREAM_UNAVAILABLE, exc.kind)

    async def websocket(self, request: Request, target: Target, path: str, headers: bytes, answer: bytes,
                        admission: Admission | None = None, ends_at: float = math.inf) -> None:
        """Relay a WebSocket handshake; on the upstream's 101, tunnel bytes both ways until either side closes.

        Denied(INVALID_UPGRADE) for a handshake that could not complete with the client (not a GET,
        no ``Connection: Upgrade``, no valid key, another version), before anything is opened upstream.
        The tunnel also ends at ``ends_at`` (epoch seconds: its key's expiry or scheduled revocation)
        and, with an ``admission`` and a TunnelGuard, once its key no longer admits it.
        """
        # SECURITY: checked first, or the upstream would run its handler for a request that was
        # judged as another method or that fails with the client.
        if not valid_handshake(request):
            raise Denied(Outcome.INVALID_UPGRADE)
        up = self._upstream(target.upstream)  # type: ignore[arg-type]
        pool = up.pool
        head = b"GET %s%s HTTP/1.1\r\n%s%sConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n" % (
            pool.prefix, path.encode("latin-1"), pool.host_line, headers)
        started = time.perf_counter()
        conn, response = await self._exchange(up, request, head)
        up.latency.observe(time.perf_counter() - started)
        if response.status != 101:
            await self._relay(up, request, conn, response, answer)
            return
        block = b"".join([name + b": " + value + b"\r\n" for name, value in response.headers
                          if name.lower() not in _ANSWERED])
        request.switch(b"HTTP/1.1 101 Switching Protocols\r\n%s%s\r\n" % (block, answer))
        tunnel = Tunnel(request, conn, response.upgraded, idle=pool.read_timeout, ends_at=ends_at)
        guard = self.tunnels
        if guard is not None and admission is not None:
            guard.opened(tunnel, admission)
            try:
                await tunnel.closed
            finally:
                guard.closed(tunnel, admission.key_id)
        else:
            await tunnel.closed


def valid_handshake(request: Request) -> bool:
    """An RFC 6455 opening handshake a server could accept (section 4.2.1)."""
    headers = request.headers
    if request.method != "GET" or request.version != "1.1" or headers.get("Sec-WebSocket-Version") != "13":
        return False
    if not any(t.strip().lower() == "upgrade" for v in headers.getall("Connection", ()) for t in v.split(",")):
        return False
    key = headers.get("Sec-WebSocket-Key")
    if key is None:
        return False
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


class Tunnel:
    """Bytes both ways between a client and an upstream connection, with flow control and an idle timeout."""

    def __init__(self, request: Request, upstream: UpstreamConnection, early_upstream: bytes, *, idle: float,
                 ends_at: float = math.inf) -> None:
        self.client = request.conn
        self.upstream = upstream
        self.sweeper = upstream.sweeper
        self.loop = upstream.loop
        self.idle = idle
        self.active_until = self.sweeper.time() + idle  # the idle timeout, moved by every read
        self.ends = math.inf  # sweeper time at which it ends whatever flows (see end_at)
        self.deadline = self.active_until
        self.end_at(ends_at)
        self.closed = self.loop.create_future()
        self._eofs = 0
        early_client = self.client.take_tunnel(self)
        upstream._tunnel = self
        self.sweeper.watch(self)
        if early_upstream:
            self.client.write(early_upstream)
        if early_client:
            self.from_client(early_client)

    def from_client(self, data: bytes) -> None:
        self.active_until = until = self.sweeper.time() + self.idle
        self.deadline = min(until, self.ends)
        transport = self.upstream.transport
        if transport is None or self.upstream.closed:
            return
        transport.write(data)
        if self.upstream._write_paused:
            self.client.pause(4)

    def from_upstream(self, data: bytes) -> None:
        self.active_until = until = self.sweeper.time() + self.idle
        self.deadline = min(until, self.ends)
        self.client.write(data)
        if self.client._write_paused and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def client_drained(self) -> None:
        if self.upstream.transport is not None and not self.upstream.closed:
            self.upstream.transport.resume_reading()

    def upstream_drained(self) -> None:
        self.client.resume(4)

    def client_eof(self) -> bool:
        # Half-close passed on: the other side may still answer (a WebSocket close frame, say).
        self._eofs += 1
        transport = self.upstream.transport
        if self._eofs < 2 and transport is not None and not self.upstream.closed and transport.can_write_eof():
            transport.write_eof()
            return True
        self._end()
        return False

    def upstream_eof(self) -> bool:
        self._eofs += 1
        transport = self.client.transport
        if self._eofs < 2 and transport is not None and not self.client._closed and transport.can_write_eof():
            transport.write_eof()
            return True
        self._end()
        return False

    def client_lost(self) -> None:
        self._end()

    def upstream_lost(self) -> None:
        self._end()

    def expire(self, now: float) -> None:
        self._end()

    def end(self) -> None:
        """Cut both sides now (its key no longer admits it)."""
        self._end()

    def end_at(self, epoch: float) -> None:
        """End at ``epoch`` (wall-clock seconds: its key's expiry or scheduled revocation; inf for never)."""
        self.ends = self.sweeper.time() + (epoch - time.time()) if epoch != math.inf else math.inf
        self.deadline = min(self.active_until, self.ends)

    def _end(self) -> None:
        self.sweeper.forget(self)
        self.upstream.close()
        self.client.close()
        if not self.closed.done():
            self.closed.set_result(None)
