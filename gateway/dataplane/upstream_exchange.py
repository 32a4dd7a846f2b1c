"""A bodyless request's exchange with its upstream, on the shared session's pooled connections.

``ClientSession.request`` serves every kind of request: redirects, cookies,
auth, proxies, tracing, middlewares, request bodies of every type, response
timers. It costs about as much per request as the whole rest of a plain
aiohttp proxy (measured: 166 µs of CPU against 83 µs for what follows). A
request without a body (most GETs, HEADs, DELETEs) needs none of that, so
:func:`exchange` does only what such an exchange is:

1. a connection from the forwarder's one session, through its connector
   (``BaseConnector.connect``: the same pool, limits, DNS cache and TLS as
   every other request of the session);
2. the request line and headers serialised by aiohttp's own (C) serialiser,
   which refuses CR/LF in any header, and written in one call;
3. the response read by the connection's own protocol and C parser, set up
   as ``ClientSession`` sets it up; 1xx interim answers skipped;
4. the connection handed back to the pool when released, or closed when the
   body was not read to its end or the upstream asked to close.

The bytes that go upstream are the ones ``ClientSession.request`` sends for
the same request through :class:`~gateway.dataplane.upstream_client.UpstreamRequest`
(Host first, then the given headers in order; ``Content-Length: 0`` for a
method that expects a body), and failures surface as the same
``aiohttp.ClientError`` types, including one retry of an idempotent request
whose pooled connection turned out closed (RFC 9112 section 9.3.1.1).
Requests with a body and WebSocket upgrades go through ``ClientSession.request``
as before; the target is always the canonical one (:mod:`gateway.pipeline.target`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import hdrs
from aiohttp.client import IDEMPOTENT_METHODS  # retried once on a connection that turned out closed
from aiohttp.client_exceptions import ClientOSError, ServerDisconnectedError
from aiohttp.connector import Connection
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import _serialize_headers  # the C serialiser ClientRequest uses
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# The methods for which aiohttp adds no Content-Length: 0 when there is no body.
_NO_LENGTH_NEEDED = aiohttp.ClientRequest.GET_METHODS


class InvalidUpstreamResponse(aiohttp.ClientResponseError):
    """The upstream's answer was not valid HTTP (what ``ClientSession`` raises as ``ClientResponseError``)."""


class Origin:
    """One upstream's key into the shared session's connection pool, and its Host header.

    ``base`` is the upstream's URL as ``send()`` gets it before the client's
    path is appended: ``ClientSession.request(URL(base + path, encoded=True))``
    and ``exchange(Origin(session, URL(base, encoded=True)), path)`` send to
    the same host and path.
    """

    __slots__ = ("host", "path", "request", "session")

    def __init__(self, session: aiohttp.ClientSession, base: URL) -> None:
        self.session = session
        # What the connector reads to pick or open a connection (host, port, TLS, pool key): one per upstream.
        self.request = aiohttp.ClientRequest("GET", base, loop=asyncio.get_running_loop(), session=session)
        host = base.host_port_subcomponent
        assert host is not None  # upstream URLs are absolute (config)
        self.host = host
        self.path = base.raw_path.rstrip("/")  # an upstream's path prefix, prepended to the client's path

    @property
    def url(self) -> URL:
        return self.request.url


class Answer:
    """The upstream's response head and its body stream; ``release()`` once done with it."""

    __slots__ = ("_connection", "content", "headers", "reason", "status")

    def __init__(self, status: int, reason: str | None, headers: CIMultiDictProxy[str],
                 content: aiohttp.StreamReader, connection: Connection) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        self._connection = connection

    def release(self) -> None:
        # Back to the pool, unless the body was not read to its end or the upstream said close
        # (the connector asks the protocol's should_close).
        self._connection.release()


async def exchange(origin: Origin, method: str, raw_path: str, headers: CIMultiDict[str],
                   timeout: aiohttp.ClientTimeout) -> Answer:
    """Send a bodyless ``method raw_path`` with exactly ``headers`` (plus Host); the response head.

    ``timeout`` bounds only the connect (``sock_connect``); the wait for the
    answer is the caller's to bound (:mod:`gateway.dataplane.deadlines`). Raises what
    ``ClientSession.request`` raises: ``ConnectionTimeoutError``,
    ``ClientConnectorError``, ``ClientOSError``, ``ServerDisconnectedError``,
    ``ClientResponseError`` (:class:`InvalidUpstreamResponse`), and
    ``ValueError`` for a header with a control character.
    """
    head = CIMultiDict(((hdrs.HOST, origin.host),))
    head.extend(headers)
    if hdrs.CONTENT_LENGTH in head:
        # SECURITY: no body follows, whatever the client declared; a length above 0 would make the
        # upstream read the start of the next request on this pooled connection as this one's body.
        head[hdrs.CONTENT_LENGTH] = "0"
    elif method not in _NO_LENGTH_NEEDED:
        head[hdrs.CONTENT_LENGTH] = "0"
    message = _serialize_headers(f"{method} {origin.path}{raw_path} HTTP/1.1", head)
    retry = method in IDEMPOTENT_METHODS
    while True:
        connector = origin.session.connector
        if connector is None or connector.closed:
            # Shutting down: no new connection (the connector would open one before noticing).
            raise aiohttp.ClientConnectionError("Connector is closed.")
        try:
            connection = await connector.connect(origin.request, traces=[], timeout=timeout)
        except TimeoutError as exc:
            raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {origin.url}") from exc
        try:
            return await _send(connection, method, message)
        except (ClientOSError, ServerDisconnectedError):
            connection.close()
            if not retry:
                raise
            retry = False  # the connection from the pool had been closed by the upstream: once more
        except HttpProcessingError as exc:
            connection.close()
            raise InvalidUpstreamResponse(
                aiohttp.RequestInfo(origin.url, method, CIMultiDictProxy(head), origin.url), (),
                status=exc.code, message=exc.message,
            ) from exc
        except BaseException:
            connection.close()  # cancelled or timed out mid-answer: the connection is in an unknown state
            raise


async def _send(connection: Connection, method: str, message: bytes) -> Answer:
    protocol: Any = connection.protocol
    if protocol is None or protocol.transport is None:
        raise ServerDisconnectedError()  # closed while the connector handed it over
    # As ClientSession sets up each exchange, with its default limits (line, field and header
    # count); no sock_read: the wait for the answer is timed by the caller (gateway.dataplane.deadlines).
    protocol.set_response_params(skip_payload=method == "HEAD", read_until_eof=True, auto_decompress=False)
    protocol.transport.write(message)
    while True:
        answer, payload = await protocol.read()
        # Interim answers (100 Continue, 103 Early Hints) are not the response; 101 is.
        if not 100 <= answer.code <= 199 or answer.code == 101:
            return Answer(answer.code, answer.reason, answer.headers, payload, connection)
