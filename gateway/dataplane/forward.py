"""Stage 8 — forward: stream the request upstream and the response back.

One shared ``aiohttp.ClientSession`` per process; bodies are streamed both
ways in chunks, never buffered whole; hop-by-hop headers are dropped, the
client's ``Authorization`` and ``X-Keygate-*`` are removed, and the identity
headers of the verified key are added.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import NamedTuple

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .deadlines import Clock, Deadlines
from .latency import Histogram
from ..pipeline.outcomes import Denied, Outcome
from ..pipeline.scope import Target
from .upstream_client import send
from .upstream_exchange import Answer, Origin, exchange

CHUNK = 64 * 1024
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# Headers we set ourselves (or that aiohttp's server already acted on).
_REPLACED = frozenset({"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "expect"})
_WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                           "sec-websocket-accept", "sec-websocket-protocol"})
VIA = "1.1 keygate"


# Connection values that name no header beyond the hop-by-hop ones: by far the most common.
_PLAIN_CONNECTION = frozenset({"keep-alive", "close"})


def _connection_named(headers: CIMultiDictProxy[str], base: frozenset[str]) -> frozenset[str]:
    """``base`` plus the headers the ``Connection`` header names (hop-by-hop too, RFC 9110 section 7.6.1)."""
    connection = headers.getall("Connection", ())
    if not connection or (len(connection) == 1 and connection[0].lower() in _PLAIN_CONNECTION):
        return base
    return base | {t.strip().lower() for v in connection for t in v.split(",")}


# SECURITY: an upstream that honours these runs another method than the one the key was checked for.
METHOD_OVERRIDES = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
# SECURITY: forwarding headers Keygate does not set itself (it sets X-Forwarded-For/-Proto/-Host):
# from a client that is not a trusted proxy they are forgeries an upstream might believe (for the
# client's address, the original path or method, the scheme).
_UNTRUSTED_FORWARDING = frozenset({
    "forwarded", "x-real-ip", "x-client-ip", "true-client-ip", "x-cluster-client-ip",
    "x-original-uri", "x-original-method", "x-forwarded-uri", "x-forwarded-path", "x-forwarded-prefix",
    "x-forwarded-method", "x-forwarded-port", "x-forwarded-scheme", "x-forwarded-ssl", "x-forwarded-server",
})
# SECURITY: IIS and Symfony route by these instead of the request line: a key judged for one path
# would run another. Keygate judged the path, so they never go upstream.
_PATH_OVERRIDES = frozenset({"x-original-url", "x-rewrite-url"})

# Every combination of what an upstream request drops, built once rather than per request.
_DROPPED: dict[tuple[bool, bool, bool, bool], frozenset[str]] = {
    (websocket, pass_credentials, pass_method_override, peer_trusted):
        HOP_BY_HOP | _REPLACED | _PATH_OVERRIDES | (_WS_HANDSHAKE if websocket else frozenset())
        | (frozenset() if pass_credentials else frozenset({"authorization"}))
        | (frozenset() if pass_method_override else METHOD_OVERRIDES)
        | (frozenset() if peer_trusted else _UNTRUSTED_FORWARDING)
    for websocket in (False, True) for pass_credentials in (False, True)
    for pass_method_override in (False, True) for peer_trusted in (False, True)
}


def upstream_request_headers(
    request: web.BaseRequest, *, pass_credentials: bool, identity: Sequence[tuple[str, str]],
    client_ip: str | None, peer: str, peer_trusted: bool, request_id: str, websocket: bool = False,
    pass_method_override: bool = False,
) -> CIMultiDict[str]:
    headers = request.headers
    drop = _connection_named(headers, _DROPPED[websocket, pass_credentials, pass_method_override, peer_trusted])
    # SECURITY: clients must not be able to forge identity headers (X-Keygate-*),
    # and the key goes upstream only where a route says pass_credentials.
    # SECURITY: CGI and WSGI servers read "X_Keygate_Key_Id" as "X-Keygate-Key-Id" (both become
    # HTTP_X_KEYGATE_KEY_ID), so an underscore spelling is judged as its dash spelling.
    out = [(name, value) for name, value in headers.items()
           if (lower := name.lower().replace("_", "-")) not in drop and not lower.startswith("x-keygate-")]
    if peer_trusted:
        forwarded_for = headers.getall("X-Forwarded-For", ())
        chain = [*forwarded_for, peer] if forwarded_for else [client_ip or peer]
        hops = ", ".join(hop for hop in chain if hop)
        proto = headers.get("X-Forwarded-Proto") or request.scheme
        forwarded_host = headers.get("X-Forwarded-Host")
        host = forwarded_host if forwarded_host is not None else request.host
    else:
        # SECURITY: an untrusted client's X-Forwarded-For is replaced, not extended.
        hops, proto, host = client_ip or peer, request.scheme, request.host
    # All but Via were dropped from the client's headers above, so adding never duplicates one.
    out += (
        ("X-Forwarded-For", hops),
        ("X-Forwarded-Proto", proto),
        ("X-Forwarded-Host", host),
        ("Via", VIA),
        ("X-Request-Id", request_id),
        *identity,
    )
    return CIMultiDict(out)


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out = upstream.copy()
    for name in _connection_named(upstream, HOP_BY_HOP):
        out.popall(name, None)
    out.add("Via", VIA)
    return out


class ClientClosed(Exception):
    """The client's connection closed while its response was being written: not a fault, nobody to answer."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the client closed the connection")
        self.response = response


class _Body:
    """The client's body as an async iterator, counted against the size limit as it streams."""

    def __init__(self, request: web.BaseRequest, *, max_size: int, read_timeout: float,
                 clock: Clock) -> None:
        self._content = request.content
        self._max = max_size
        self._timeout = read_timeout
        self._clock = clock
        self.received = 0
        self.refusal: Outcome | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            # Waiting on the client is not the upstream's time; the client has its own timeout (408).
            self._clock.stop()
            try:
                async with asyncio.timeout(self._timeout):
                    chunk = await self._content.readany()
            except TimeoutError:
                self.refusal = Outcome.CLIENT_TIMEOUT
                raise
            # From here until the upstream asks for more (or answers), it is the upstream we wait on.
            self._clock.restart()
            if not chunk:
                return
            self.received += len(chunk)
            if self._max and self.received > self._max:
                self.refusal = Outcome.BODY_TOO_LARGE
                raise Denied(Outcome.BODY_TOO_LARGE)
            yield chunk


class _Upstream(NamedTuple):
    """What forwarding to one upstream needs, made on its first request."""

    base: str  # its URL without a trailing slash; the client's raw path is appended
    origin: Origin  # its place in the session's connection pool, for bodyless requests
    timeout: aiohttp.ClientTimeout
    seconds: float  # the upstream's read timeout (gateway.dataplane.deadlines)
    latency: Histogram  # time until its response headers arrived


class Forwarder:
    def __init__(self, session: aiohttp.ClientSession, *, max_body_size: int, client_timeout: float) -> None:
        self.session = session
        self.max_body_size = max_body_size
        self.client_timeout = client_timeout
        self.upstream_errors = 0
        self.deadlines = Deadlines()
        self._upstreams: dict[str, _Upstream] = {}

    @property
    def upstream_latency(self) -> dict[str, Histogram]:
        """Per upstream used so far: time until its response headers arrived."""
        return {name: up.latency for name, up in self._upstreams.items()}

    def _upstream(self, target: Target) -> _Upstream:
        up = target.upstream
        known = self._upstreams.get(up.name)
        if known is None:
            # No sock_read: the upstream's read timeout is ours (gateway.dataplane.deadlines).
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=up.connect_timeout, sock_read=None)
            # One reading of the configured URL for both ways of sending (yarl's: percent-encoding,
            # dot segments, host case and default port normalised), so they reach the same place.
            base = str(URL(up.url)).rstrip("/")
            known = self._upstreams[up.name] = _Upstream(
                base, Origin(self.session, URL(base, encoded=True)), timeout, up.timeout, Histogram())
        return known

    def url(self, target: Target, request_target: str) -> URL:
        # The canonical request target (gateway.pipeline.target): exactly what the route table judged.
        return URL(self._upstream(target).base + request_target, encoded=True)

    async def forward(
        self, request: web.BaseRequest, target: Target, request_target: str, headers: CIMultiDict[str],
        extra_response_headers: dict[str, str],
    ) -> web.StreamResponse:
        """Relay the exchange; Denied for 413/408/502/504 raised before the response starts."""
        up = self._upstream(target)
        clock = self.deadlines.clock(up.seconds)
        body: _Body | None = None
        if request.body_exists:
            length = request.content_length
            if self.max_body_size and length is not None and length > self.max_body_size:
                raise Denied(Outcome.BODY_TOO_LARGE, f"Content-Length {length}")
            body = _Body(request, max_size=self.max_body_size, read_timeout=self.client_timeout, clock=clock)
        started = time.perf_counter()
        upstream: Answer | aiohttp.ClientResponse
        try:
            with clock:
                if body is None:
                    upstream = await exchange(up.origin, request.method, request_target, headers, up.timeout)
                else:
                    upstream = await send(
                        self.session, request.method, self.url(target, request_target), headers,
                        data=body.__aiter__() if body is not None else None,
                        allow_redirects=False, timeout=up.timeout, compress=None,
                    )
        except Denied:
            raise
        except Exception as exc:
            raise self._failure(exc, body) from None
        up.latency.observe(time.perf_counter() - started)
        try:
            headers = response_headers(upstream.headers)
            headers.update(extra_response_headers)
            try:
                # What has arrived already, without waiting: for most answers, the whole body.
                first = upstream.content.read_nowait(CHUNK)
            except (aiohttp.ClientError, TimeoutError):
                first = b""  # the stream below meets the same error, after the headers as before
            if upstream.content.at_eof():
                # The whole body is here: headers and body leave in one write (one
                # syscall less per request than prepare() + write() + write_eof()).
                whole = web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=first)
                try:
                    await whole.prepare(request)
                    await whole.write_eof()
                except ConnectionError:
                    raise ClientClosed(whole) from None
                return whole
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
            try:
                await response.prepare(request)
                if first:
                    await response.write(first)
                # Only the wait for the upstream's next piece is timed, not a slow client's.
                with self.deadlines.clock(up.seconds) as reading:
                    while chunk := await upstream.content.read(CHUNK):
                        reading.stop()
                        await response.write(chunk)
                        reading.restart()
                await response.write_eof()
            except ConnectionError:
                # Writing to the client failed: it went away (aiohttp's ClientConnectionResetError
                # is a ConnectionError too). The upstream's read errors below are not ConnectionErrors.
                raise ClientClosed(response) from None
            except (aiohttp.ClientError, TimeoutError):
                # Headers are gone already: all we can do is cut the client off,
                # so it cannot mistake a truncated body for a whole one.
                self.upstream_errors += 1
                if request.transport is not None:
                    request.transport.abort()
                return response
            return response
        finally:
            upstream.release()

    def _failure(self, exc: BaseException, body: _Body | None) -> Denied:
        if body is not None and body.refusal is not None:
            return Denied(body.refusal)
        self.upstream_errors += 1
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return Denied(Outcome.UPSTREAM_UNAVAILABLE, "connect timeout")
        if isinstance(exc, (aiohttp.SocketTimeoutError, aiohttp.ServerTimeoutError, TimeoutError)):
            return Denied(Outcome.UPSTREAM_TIMEOUT, "read timeout")
        if isinstance(exc, (aiohttp.ClientError, OSError)):
            return Denied(Outcome.UPSTREAM_UNAVAILABLE, type(exc).__name__)
        raise exc

    async def websocket(
        self, request: web.BaseRequest, target: Target, request_target: str, headers: CIMultiDict[str],
        extra_response_headers: dict[str, str],
    ) -> web.StreamResponse:
        """Open the upstream WebSocket first, then accept the client's and relay both ways.

        Denied(INVALID_UPGRADE) for a handshake we could not complete with the client (not a GET,
        no ``Connection: Upgrade``, no key, another version), before anything is opened upstream.
        """
        # SECURITY: checked first, or the upstream would run its handler for a request that was
        # judged as another method (ws_connect always sends GET) or that fails with the client.
        if request.method != "GET" or request.headers.get("Sec-WebSocket-Version") != "13" \
                or not web.WebSocketResponse().can_prepare(request).ok:
            raise Denied(Outcome.INVALID_UPGRADE)
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        try:
            upstream = await self.session.ws_connect(
                self.url(target, request_target), headers=headers, protocols=protocols, autoclose=False,
                autoping=False, timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10),
                max_msg_size=0,
            )
        except Exception as exc:
            raise self._failure(exc, None) from None
        client = web.WebSocketResponse(
            protocols=[upstream.protocol] if upstream.protocol else (), autoclose=False, autoping=False,
            max_msg_size=0,
        )
        client.headers.update(extra_response_headers)
        try:
            await client.prepare(request)
            await asyncio.gather(_relay(client, upstream), _relay(upstream, client))
        finally:
            await upstream.close()
            if client.prepared:
                await client.close()
        return client


async def _relay(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                 sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
    async for message in source:
        if message.type is WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type is WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type is WSMsgType.PING:
            await sink.ping(message.data)
        elif message.type is WSMsgType.PONG:
            await sink.pong(message.data)
        elif message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            break
    if not sink.closed:
        await sink.close(code=source.close_code or 1000)
