"""The Python floor for ``bench.py``: a minimal raw-protocol proxy with a dict key check.

Usage: ``PY_FLOOR_KEYS=KEY[,KEY...] python python_floor.py PORT UPSTREAM_URL``

What Python itself allows a key-checking proxy to cost, with none of a
framework's generality: uvloop when importable, httptools (llhttp) parsers on
raw ``asyncio.Protocol``s on both sides, and per request:

* the request is parsed by ``httptools.HttpRequestParser``; its
  ``Authorization`` header is looked up in a dict (401 JSON when absent);
* one coroutine (a task) runs it; pipelined requests wait their turn;
* the request head is built as bytes: method, target and headers minus the
  hop-by-hop ones, ``Authorization`` and ``Host``, plus ``Host``,
  ``X-Forwarded-For`` and an identity header (``X-Keygate-Key-Id``, encoded
  once per key), as Keygate does;
* it goes upstream on a pooled keep-alive connection (raw protocol +
  ``httptools.HttpResponseParser``), opened when none is idle;
* the response head is rebuilt (hop-by-hop headers dropped) and its body
  streamed back as it arrives: by Content-Length as given, chunked re-chunked,
  close-delimited with the client connection closed after it; when the client
  is slower than the upstream, reading from the upstream pauses.

Deliberately left out (it is a floor, not a proxy to run): request bodies are
buffered whole and sent with a Content-Length, not streamed; no HEAD (the
response parser is not told that a HEAD response has no body: 501), no
upgrades or CONNECT (501), no timeouts, no limits, no retries, no TLS.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
from urllib.parse import urlsplit

import httptools

# Request headers not forwarded: hop-by-hop, and those the proxy sets itself.
DROP_REQUEST = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host", b"authorization", b"content-length",
    b"x-forwarded-for", b"x-keygate-key-id", b"expect",
})
# Response headers not forwarded (Content-Length is kept: the body is passed through as framed).
DROP_RESPONSE = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})


def _answer(status: bytes, body: bytes, close: bool = False) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + (b"\r\nConnection: close" if close else b"") + b"\r\n\r\n" + body)


UNAUTHORIZED = _answer(b"401 Unauthorized", b'{"error":"invalid_token"}')
UNAUTHORIZED_CLOSE = _answer(b"401 Unauthorized", b'{"error":"invalid_token"}', close=True)
BAD_REQUEST = _answer(b"400 Bad Request", b'{"error":"invalid_request"}', close=True)
NOT_IMPLEMENTED = _answer(b"501 Not Implemented", b'{"error":"not_implemented"}', close=True)
BAD_GATEWAY = _answer(b"502 Bad Gateway", b'{"error":"bad_gateway"}', close=True)


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


class Request:
    __slots__ = ("method", "target", "headers", "body", "keep_alive", "http10")

    def __init__(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None,
                 keep_alive: bool, http10: bool) -> None:
        self.method, self.target, self.headers, self.body = method, target, headers, body
        self.keep_alive, self.http10 = keep_alive, http10


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive connection to the upstream; one exchange at a time, its response streamed to a client."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.client: ClientProtocol | None = None
        self.done: asyncio.Future[bool] | None = None
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.until_close = False
        self.informational = False
        self.wrote_head = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(ConnectionError("malformed upstream response"))
            self.transport.close()  # type: ignore[union-attr]

    def eof_received(self) -> bool | None:
        if self.until_close and self.client is not None:
            self._finish(False)  # a close-delimited body ends here
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        self._fail(ConnectionError("upstream connection lost"))

    # the exchange

    def exchange(self, head: bytes, client: ClientProtocol) -> asyncio.Future[bool]:
        """Send ``head``; the future says whether the connection may be reused, once the response is relayed."""
        self.client = client
        self.done = asyncio.get_running_loop().create_future()
        self.wrote_head = False
        client.upstream = self
        if client.paused:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.transport.write(head)  # type: ignore[union-attr]
        return self.done

    def _fail(self, exc: Exception) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.reason = b""
        self.headers = []
        self.chunked = False
        self.until_close = False
        self.informational = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.informational = True  # 1xx: skipped; the final response follows
            return
        client = self.client
        assert client is not None
        out = [b"HTTP/1.1 ", str(status).encode(), b" ", self.reason, b"\r\n"]
        has_length = False
        for name, value in self.headers:
            lower = name.lower()
            if lower in DROP_RESPONSE:
                if lower == b"transfer-encoding" and value.lower().endswith(b"chunked"):
                    self.chunked = True
                continue
            if lower == b"content-length":
                has_length = True
            out += (name, b": ", value, b"\r\n")
        if self.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif not has_length and status not in (204, 304):
            self.until_close = True  # close-delimited: the client learns the end by the close
            client.request_close = True
        if client.request_close:
            out.append(b"Connection: close\r\n")
        elif client.http10:
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        client.write(b"".join(out))
        self.wrote_head = True

    def on_body(self, body: bytes) -> None:
        if self.informational:
            return
        if self.chunked:
            self.client.write(b"%x\r\n%b\r\n" % (len(body), body))  # type: ignore[union-attr]
        else:
            self.client.write(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self.informational:
            return
        if self.chunked:
            self.client.write(b"0\r\n\r\n")  # type: ignore[union-attr]
        self._finish(self.parser.should_keep_alive())

    def _finish(self, reusable: bool) -> None:
        client, self.client = self.client, None
        if client is not None and client.upstream is self:
            client.upstream = None
        if self.done is not None and not self.done.done():
            self.done.set_result(reusable)


class Pool:
    """Idle keep-alive connections to one upstream (LIFO), opened on demand."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[UpstreamProtocol] = []

    async def acquire(self) -> UpstreamProtocol:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _transport, conn = await loop.create_connection(lambda: UpstreamProtocol(self), self.host, self.port)
        return conn

    def release(self, conn: UpstreamProtocol, reusable: bool) -> None:
        if reusable and not conn.closed:
            self.idle.append(conn)
        elif not conn.closed:
            conn.transport.close()  # type: ignore[union-attr]

    def forget(self, conn: UpstreamProtocol) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass


class Proxy:
    def __init__(self, upstream: str, keys: list[str]) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise SystemExit(f"UPSTREAM_URL must be http://HOST[:PORT][/prefix], not {upstream!r}")
        port = parts.port or 80
        self.prefix = parts.path.rstrip("/").encode()
        self.host_header = b"Host: " + parts.netloc.encode() + b"\r\n"
        self.pool = Pool(parts.hostname, port)
        # The key check is one dict look-up; the identity header is encoded once per key.
        self.keys = {f"Bearer {k}".encode(): b"X-Keygate-Key-Id: key%d\r\n" % n for n, k in enumerate(keys)}

    async def serve(self, client: ClientProtocol, request: Request) -> None:
        """Answer one request on ``client``; sets ``client.request_close`` when the connection must close."""
        if request.method == b"HEAD":
            client.request_close = True
            client.write(NOT_IMPLEMENTED)
            return
        authorization = None
        out = [request.method, b" ", self.prefix, request.target, b" HTTP/1.1\r\n", self.host_header]
        for name, value in request.headers:
            lower = name.lower()
            if lower in DROP_REQUEST:
                if lower == b"authorization":
                    authorization = value
                continue
            out += (name, b": ", value, b"\r\n")
        identity = self.keys.get(authorization)  # type: ignore[arg-type]
        if identity is None:
            client.write(UNAUTHORIZED if not client.request_close else UNAUTHORIZED_CLOSE)
            return
        out += (identity, b"X-Forwarded-For: ", client.peer, b"\r\n")
        if request.body is not None:
            out += (b"Content-Length: ", str(len(request.body)).encode(), b"\r\n\r\n", request.body)
        else:
            out.append(b"\r\n")
        try:
            conn = await self.pool.acquire()
        except OSError:
            client.request_close = True
            client.write(BAD_GATEWAY)
            return
        try:
            reusable = await conn.exchange(b"".join(out), client)
        except ConnectionError:
            client.request_close = True
            if not conn.wrote_head:
                client.write(BAD_GATEWAY)
            self.pool.release(conn, False)
            return
        self.pool.release(conn, reusable)


class ClientProtocol(asyncio.Protocol):
    """One client connection: parses requests, runs them one at a time (in order), writes the answers."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = b""
        self.closed = False
        self.paused = False  # the client's send buffer is full
        self.upstream: UpstreamProtocol | None = None  # the exchange relaying to this client now
        self.pending: collections.deque[Request] = collections.deque()
        self.running = False
        self.request_close = False
        self.refusal: bytes | None = None  # the answer to a request that could not be parsed
        self.http10 = False
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0] if peer else "").encode()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(NOT_IMPLEMENTED)
        except httptools.HttpParserError:
            self._refuse(BAD_REQUEST)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def pause_writing(self) -> None:
        self.paused = True
        if self.upstream is not None and not self.upstream.closed:
            self.upstream.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.paused = False
        if self.upstream is not None and not self.upstream.closed:
            self.upstream.transport.resume_reading()  # type: ignore[union-attr]

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.target = b""
        self.headers = []
        self.body = None

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        if self.body is None:
            self.body = [body]
        else:
            self.body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        if parser.should_upgrade():
            return  # not served: data_received refuses it (501) once the parser stops at the upgrade
        request = Request(parser.get_method(), self.target, self.headers,
                          b"".join(self.body) if self.body is not None else None,
                          parser.should_keep_alive(), parser.get_http_version() == "1.0")
        if self.running:
            self.pending.append(request)
            if len(self.pending) > 16:
                self.transport.pause_reading()  # type: ignore[union-attr]
            return
        self.running = True
        asyncio.get_running_loop().create_task(self._run(request))

    # requests

    async def _run(self, request: Request | None) -> None:
        try:
            while request is not None and not self.closed:
                self.http10 = request.http10
                self.request_close = not request.keep_alive
                await self.proxy.serve(self, request)
                if self.request_close:
                    self.transport.close()  # type: ignore[union-attr]
                    return
                request = self.pending.popleft() if self.pending else None
                if request is not None and len(self.pending) == 16 and self.refusal is None:
                    self.transport.resume_reading()  # type: ignore[union-attr]
            if self.refusal is not None:
                self.write(self.refusal)
                self.transport.close()  # type: ignore[union-attr]
        finally:
            self.running = False

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def _refuse(self, answer: bytes) -> None:
        """A request that cannot be parsed or served: answered after those in hand, then the connection closes."""
        self.transport.pause_reading()  # type: ignore[union-attr]
        self.refusal = answer
        if not self.running:  # else answered after the requests in hand, in order
            self.write(answer)
            self.transport.close()  # type: ignore[union-attr]


async def main(port: int, upstream: str, keys: list[str]) -> None:
    proxy = Proxy(upstream, keys)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: ClientProtocol(proxy), "127.0.0.1", port, backlog=1024)
    print(f"python floor listening on 127.0.0.1:{port} ({loop_name()})", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()


def run() -> None:
    keys = [k for k in os.environ.get("PY_FLOOR_KEYS", "").split(",") if k]
    if len(sys.argv) != 3 or not keys:
        sys.exit(__doc__.split("\n\n")[1])
    coro = main(int(sys.argv[1]), sys.argv[2], keys)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    run()
