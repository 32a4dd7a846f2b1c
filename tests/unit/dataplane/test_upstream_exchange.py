"""The bodyless exchange: the same bytes as ClientSession.request, the same pool, the same failures."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.dataplane import forward
from gateway.config.schema import UpstreamSettings
from gateway.dataplane.deadlines import Deadlines
from gateway.dataplane.forward import Forwarder
from gateway.pipeline.scope import Target
from gateway.dataplane.upstream_client import send, upstream_session
from gateway.dataplane.upstream_exchange import InvalidUpstreamResponse, Origin, exchange

# pytest-asyncio 1.x calls overriding event_loop_policy deprecated; the session fixture checks it still works.
pytestmark = pytest.mark.filterwarnings("ignore:Overriding the \"event_loop_policy\" fixture:DeprecationWarning")

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def ok(head: bytes) -> bytes:
    """200 with a two-byte body (its head only, for HEAD)."""
    return OK[:-2] if head.startswith(b"HEAD ") else OK
CONNECT = aiohttp.ClientTimeout(total=None, sock_connect=2)


class RawUpstream:
    """A TCP upstream that records each request head as bytes and answers with ``reply(head)``.

    ``reply`` returns the bytes to send, or ``None`` to close the connection without answering.
    """

    def __init__(self, reply: Callable[[bytes], bytes | None] = ok) -> None:
        self.reply = reply
        self.heads: list[bytes] = []
        self.connections = 0
        self.closed_by_client = 0
        self._server: asyncio.Server | None = None

    async def start(self, tls: ssl.SSLContext | None = None) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, path: str = "") -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                self.heads.append(head)
                answer = self.reply(head)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        except ConnectionError:
            self.closed_by_client += 1
        finally:
            writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture(params=["asyncio", "uvloop"], scope="module")
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test on both loops: Keygate serves on uvloop, whose transports behave differently at the edges."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


@pytest.fixture
async def session(event_loop_policy: asyncio.AbstractEventLoopPolicy) -> AsyncIterator[aiohttp.ClientSession]:
    # The policy really made this test's loop (pytest-asyncio calls its override deprecated: fail, not drift).
    assert type(asyncio.get_running_loop()).__module__.split(".")[0] == type(event_loop_policy).__module__.split(".")[0]
    made = upstream_session()
    yield made
    await made.close()


async def _upstream(reply: Callable[[bytes], bytes | None] = ok) -> RawUpstream:
    return await RawUpstream(reply).start()


async def _until(condition: Callable[[], bool], seconds: float = 1.0) -> None:
    """Wait (at most ``seconds``) for what the upstream sees to catch up; the assertion after it decides."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)


async def _read_all(answer: object) -> bytes:
    content = answer.content  # type: ignore[attr-defined]
    body = await content.read()
    answer.release()  # type: ignore[attr-defined]
    return bytes(body)


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "OPTIONS", "POST", "PUT", "PATCH"])
async def test_the_same_bytes_as_clientsession_request(session: aiohttp.ClientSession, method: str) -> None:
    """What goes upstream is byte for byte what ClientSession.request sends for the same bodyless request."""
    upstream = await _upstream()
    headers = CIMultiDict([("X-One", "1"), ("x-two", "2"), ("X-One", "again"), ("Via", "1.1 keygate")])
    try:
        via_session = await send(session, method, URL(str(upstream.url()) + "/a/b%2Fc?d=e&f", encoded=True),
                                 headers, allow_redirects=False, timeout=CONNECT, compress=None)
        await _read_all(via_session)
        answer = await exchange(Origin(session, upstream.url()), method, "/a/b%2Fc?d=e&f", headers, CONNECT)
        assert answer.status == 200
        assert await _read_all(answer) == (b"" if method == "HEAD" else b"ok")
        assert upstream.heads[0] == upstream.heads[1]
        assert upstream.heads[1].startswith(f"{method} /a/b%2Fc?d=e&f HTTP/1.1\r\nHost: 127.0.0.1:".encode())
        # Content-Length: 0 exactly where aiohttp adds it: for methods that expect a body.
        assert (b"Content-Length: 0" in upstream.heads[1]) == (method in ("DELETE", "POST", "PUT", "PATCH"))
    finally:
        await upstream.close()


@pytest.mark.parametrize("configured", [
    "http://127.0.0.1:{port}", "http://127.0.0.1:{port}/", "http://127.0.0.1:{port}/v2/", "http://LOCALHOST:{port}/v%7E1",
    "http://127.0.0.1:{port}/a/./b/../c", "http://127.0.0.1:{port}/x%2Fy", "http://127.0.0.1:{port}/\u00e4pi",
])
async def test_the_forwarder_sends_both_ways_to_the_same_place(session: aiohttp.ClientSession, configured: str) -> None:
    """However the upstream URL is written, a request with a body and one without reach the same host and path."""
    upstream = await _upstream()
    forwarder = Forwarder(session, max_body_size=0, client_timeout=5)
    target = Target(upstream=UpstreamSettings(name="app", url=configured.format(port=upstream.port)), server="app",
                    operation="read", pass_credentials=False)
    try:
        up = forwarder._upstream(target)
        via_session = await send(session, "POST", URL(up.base + "/things?x=1", encoded=True), CIMultiDict(),
                                 allow_redirects=False, timeout=CONNECT, compress=None)
        await _read_all(via_session)
        await _read_all(await exchange(up.origin, "POST", "/things?x=1", CIMultiDict(), CONNECT))
        assert upstream.heads[0] == upstream.heads[1]
        assert upstream.heads[0].split(b" ")[1].endswith(b"/things?x=1")
        assert upstream.heads[0].isascii()  # a non-ASCII path prefix goes out percent-encoded
    finally:
        await upstream.close()


async def test_the_forwarder_takes_the_exchange_only_for_bodyless_requests(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GET without a body goes through exchange(); a body goes through ClientSession.request."""
    upstream = await _upstream()
    taken: list[str] = []

    async def counted_exchange(*args: object, **kwargs: object) -> object:
        taken.append("exchange")
        return await exchange(*args, **kwargs)  # type: ignore[arg-type]

    async def counted_send(*args: object, **kwargs: object) -> object:
        taken.append("session")
        return await send(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(forward, "exchange", counted_exchange)
    monkeypatch.setattr(forward, "send", counted_send)
    forwarder = Forwarder(session, max_body_size=0, client_timeout=5)
    target = Target(upstream=UpstreamSettings(name="app", url=str(upstream.url())), server="app",
                    operation="read", pass_credentials=False)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return await forwarder.forward(request, target, request.raw_path, CIMultiDict(), {})

    runner = web.ServerRunner(web.Server(handler))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as client:
            for method, data in (("GET", None), ("POST", b"body"), ("DELETE", None)):
                async with client.request(method, f"http://127.0.0.1:{port}/p", data=data) as r:
                    assert r.status == 200 and await r.read() == b"ok"
        assert taken == ["exchange", "session", "exchange"]
    finally:
        await runner.cleanup()
        await upstream.close()


async def test_a_client_content_length_is_not_doubled(session: aiohttp.ClientSession) -> None:
    upstream = await _upstream()
    try:
        answer = await exchange(Origin(session, upstream.url()), "POST", "/", CIMultiDict([("Content-Length", "0")]),
                                CONNECT)
        await _read_all(answer)
        assert upstream.heads[0].count(b"Content-Length") == 1
    finally:
        await upstream.close()


@pytest.mark.parametrize("method", ["GET", "POST", "CONNECT"])
async def test_a_declared_length_never_goes_upstream_without_its_body(session: aiohttp.ClientSession,
                                                                      method: str) -> None:
    """Bodyless means Content-Length: 0 upstream, whatever the client declared: no desync of a pooled connection."""
    upstream = await _upstream()
    try:
        answer = await exchange(Origin(session, upstream.url()), method, "/",
                                CIMultiDict([("Content-Length", "69")]), CONNECT)
        await _read_all(answer)
        assert b"Content-Length: 0\r\n" in upstream.heads[0] and b"Content-Length: 69" not in upstream.heads[0]
    finally:
        await upstream.close()


async def test_an_upstream_path_prefix_comes_first(session: aiohttp.ClientSession) -> None:
    upstream = await _upstream()
    try:
        answer = await exchange(Origin(session, upstream.url("/v2/")), "GET", "/items?x=1", CIMultiDict(), CONNECT)
        await _read_all(answer)
        assert upstream.heads[0].startswith(b"GET /v2/items?x=1 HTTP/1.1\r\n")
    finally:
        await upstream.close()


async def test_connections_are_pooled_and_shared_with_the_session(session: aiohttp.ClientSession) -> None:
    upstream = await _upstream()
    origin = Origin(session, upstream.url())
    try:
        for _ in range(3):
            assert await _read_all(await exchange(origin, "GET", "/", CIMultiDict(), CONNECT)) == b"ok"
        # ClientSession.request takes the same pooled connection.
        async with session.get(upstream.url("/")) as r:
            assert await r.read() == b"ok"
        assert await _read_all(await exchange(origin, "GET", "/", CIMultiDict(), CONNECT)) == b"ok"
        assert len(upstream.heads) == 5
        assert upstream.connections == 1
    finally:
        await upstream.close()


async def test_a_body_left_unread_closes_its_connection(session: aiohttp.ClientSession) -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000
    upstream = await _upstream(lambda _head: big)
    origin = Origin(session, upstream.url())
    try:
        answer = await exchange(origin, "GET", "/", CIMultiDict(), CONNECT)
        answer.release()  # only part of the body arrived: the connection cannot carry another request
        await _until(lambda: bool(upstream.closed_by_client))
        assert upstream.closed_by_client == 1
        answer = await exchange(origin, "GET", "/", CIMultiDict(), CONNECT)
        answer.release()
        assert upstream.connections == 2
    finally:
        await upstream.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
], ids=["204", "304", "empty 200"])
async def test_bodyless_answers_leave_the_connection_reusable(session: aiohttp.ClientSession, answer: bytes) -> None:
    upstream = await _upstream(lambda head: answer if b"/empty" in head else ok(head))
    origin = Origin(session, upstream.url())
    try:
        for _ in range(2):
            assert await _read_all(await exchange(origin, "GET", "/empty", CIMultiDict(), CONNECT)) == b""
        assert await _read_all(await exchange(origin, "GET", "/", CIMultiDict(), CONNECT)) == b"ok"
        assert upstream.connections == 1
    finally:
        await upstream.close()


async def test_head_answers_leave_the_connection_reusable(session: aiohttp.ClientSession) -> None:
    """A HEAD answer announces a length but carries no body: the next request must not wait for one."""
    upstream = await _upstream()
    origin = Origin(session, upstream.url())
    try:
        for method, body in (("HEAD", b""), ("HEAD", b""), ("GET", b"ok")):
            answer = await exchange(origin, method, "/", CIMultiDict(), CONNECT)
            assert answer.headers["Content-Length"] == "2"
            assert await asyncio.wait_for(_read_all(answer), 5) == body
        assert upstream.connections == 1
    finally:
        await upstream.close()


async def test_connection_close_is_honoured(session: aiohttp.ClientSession) -> None:
    upstream = await _upstream(lambda _head: b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    origin = Origin(session, upstream.url())
    try:
        for _ in range(2):
            assert await _read_all(await exchange(origin, "GET", "/", CIMultiDict(), CONNECT)) == b"ok"
        assert upstream.connections == 2
    finally:
        await upstream.close()


async def test_a_body_without_length_is_read_to_the_close(session: aiohttp.ClientSession) -> None:
    hang_up = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await hang_up.wait()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        answer = await exchange(Origin(session, URL(f"http://127.0.0.1:{port}")), "GET", "/", CIMultiDict(),
                                CONNECT)
        read = asyncio.ensure_future(_read_all(answer))
        await asyncio.sleep(0.05)
        assert not read.done()  # the upstream has not closed: the body may go on
        hang_up.set()
        assert await read == b"until the end"
    finally:
        hang_up.set()
        server.close()
        await server.wait_closed()


async def test_interim_answers_are_skipped(session: aiohttp.ClientSession) -> None:
    upstream = await _upstream(lambda _head: b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + OK)
    try:
        answer = await exchange(Origin(session, upstream.url()), "GET", "/", CIMultiDict(), CONNECT)
        assert answer.status == 200 and answer.reason == "OK"
        assert await _read_all(answer) == b"ok"
    finally:
        await upstream.close()


async def test_an_idempotent_request_is_retried_once_on_a_closed_pooled_connection(
    session: aiohttp.ClientSession,
) -> None:
    seen: list[int] = []

    def reply(_head: bytes) -> bytes | None:
        seen.append(1)
        # The second request meets a connection the upstream closes without answering.
        return None if len(seen) == 2 else ok(_head)

    upstream = await _upstream(reply)
    origin = Origin(session, upstream.url())
    try:
        assert await _read_all(await exchange(origin, "GET", "/", CIMultiDict(), CONNECT)) == b"ok"
        assert await _read_all(await exchange(origin, "GET", "/", CIMultiDict(), CONNECT)) == b"ok"
        assert len(upstream.heads) == 3 and upstream.connections == 2
    finally:
        await upstream.close()


async def test_a_non_idempotent_request_is_never_sent_twice(session: aiohttp.ClientSession) -> None:
    upstream = await _upstream(lambda _head: None)
    try:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await exchange(Origin(session, upstream.url()), "POST", "/", CIMultiDict(), CONNECT)
        assert len(upstream.heads) == 1
    finally:
        await upstream.close()


async def test_an_upstream_that_never_answers_fails_after_one_retry(session: aiohttp.ClientSession) -> None:
    upstream = await _upstream(lambda _head: None)
    try:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await exchange(Origin(session, upstream.url()), "GET", "/", CIMultiDict(), CONNECT)
        assert len(upstream.heads) == 2
    finally:
        await upstream.close()


async def test_an_invalid_answer_is_a_client_response_error(session: aiohttp.ClientSession) -> None:
    upstream = await _upstream(lambda _head: b"NOT HTTP AT ALL\r\n\r\n")
    try:
        with pytest.raises(InvalidUpstreamResponse) as caught:
            await exchange(Origin(session, upstream.url()), "GET", "/", CIMultiDict(), CONNECT)
        assert isinstance(caught.value, aiohttp.ClientResponseError)
        assert len(upstream.heads) == 1  # not retried: the upstream answered
    finally:
        await upstream.close()


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(
    session: aiohttp.ClientSession,
) -> None:
    upstream = await _upstream()
    try:
        with pytest.raises(ValueError):
            await exchange(Origin(session, upstream.url()), "GET", "/", CIMultiDict([("X-A", "1\r\nX-B: 2")]),
                           CONNECT)
        assert upstream.connections == 0
    finally:
        await upstream.close()


async def test_a_cancelled_exchange_closes_its_connection(session: aiohttp.ClientSession) -> None:
    upstream = await _upstream(lambda _head: b"")  # never answers, keeps the connection open
    origin = Origin(session, upstream.url())
    loop = asyncio.get_running_loop()
    reports: list[str] = []
    loop.set_exception_handler(lambda _loop, context: reports.append(context["message"]))
    try:
        waiting = asyncio.ensure_future(exchange(origin, "GET", "/", CIMultiDict(), CONNECT))
        await _until(lambda: bool(upstream.heads))
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await _until(lambda: bool(upstream.closed_by_client))
        assert upstream.closed_by_client == 1  # not put back in the pool half-way through an answer
        del waiting
        gc.collect()
        # Closed by the exchange itself, not left for the garbage collector to find.
        assert "Unclosed connection" not in reports
    finally:
        loop.set_exception_handler(None)
        await upstream.close()


async def test_an_upstream_timeout_mid_answer_closes_the_connection(session: aiohttp.ClientSession) -> None:
    """The forwarder's clock (gateway.dataplane.deadlines) expiring while the answer is awaited: TimeoutError, closed."""
    upstream = await _upstream(lambda _head: b"")  # never answers
    deadlines = Deadlines(resolution=0.01)
    try:
        with pytest.raises(TimeoutError), deadlines.clock(0.05):
            await exchange(Origin(session, upstream.url()), "GET", "/", CIMultiDict(), CONNECT)
        await _until(lambda: bool(upstream.closed_by_client))
        assert upstream.closed_by_client == 1 and len(upstream.heads) == 1
    finally:
        deadlines.close()
        await upstream.close()


@pytest.mark.parametrize("closing", ["session", "connector"])
async def test_a_closed_session_opens_no_connection(session: aiohttp.ClientSession, closing: str) -> None:
    """Once shutdown closed the session (or, first, its connector), an exchange fails at once, connecting nowhere."""
    upstream = await _upstream()
    origin = Origin(session, upstream.url())
    if closing == "session":
        await session.close()
    else:
        assert session.connector is not None
        await session.connector.close()
    try:
        with pytest.raises(aiohttp.ClientConnectionError):
            await exchange(origin, "GET", "/", CIMultiDict(), CONNECT)
        await asyncio.sleep(0.05)
        assert upstream.connections == 0
    finally:
        await upstream.close()


async def test_a_refused_connection_is_a_connector_error(session: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(aiohttp.ClientConnectorError):
        await exchange(Origin(session, URL(f"http://127.0.0.1:{port}")), "GET", "/", CIMultiDict(), CONNECT)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key (openssl, as on every Debian machine with CAs)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


async def test_a_tls_upstream_is_verified_and_pooled(tls_files: tuple[str, str]) -> None:
    """https:// upstreams: the connector's TLS (with verification) carries the exchange, connections pooled."""
    cert, key = tls_files
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    upstream = await RawUpstream().start(tls=served)
    base = URL(f"https://127.0.0.1:{upstream.port}")
    trusting = ssl.create_default_context(cafile=cert)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusting)) as session:
            for _ in range(2):
                assert await _read_all(await exchange(Origin(session, base), "GET", "/t", CIMultiDict(), CONNECT)) \
                    == b"ok"
            assert upstream.connections == 1
            assert upstream.heads[0] == f"GET /t HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n\r\n".encode()
        # Without trusting the certificate, the session's default verification refuses it.
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await exchange(Origin(session, base), "GET", "/t", CIMultiDict(), CONNECT)
    finally:
        await upstream.close()
