"""Upstream connections: reuse, the one retry, response framing and the read deadline.

The upstream is a raw asyncio server of the test's own that answers each
request with the bytes the test gives (so framing can be anything), and
records how many connections it accepted and what it received.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from gateway.dataplane.forward import Forwarder, _Upstream
from gateway.dataplane.sweeper import Sweeper
from gateway.dataplane.upstream_pool import BadResponse, Disconnected, ReadTimeout, TlsFailed, Upstream, UpstreamConnection
from tests.clocks import FakeClock

from .detached import detached_request

READ_TIMEOUT = 60.0


@dataclass
class Raw:
    """Answers request number N (over all connections) with answers[N]; b"" means: close without answering."""

    answers: list[bytes]
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                answer = self.answers[len(self.requests) - 1]
                if not answer:
                    break
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[list[bytes]], asyncio.Future[tuple[Raw, Upstream, FakeClock[float]]]]]:
    servers: list[asyncio.base_events.Server] = []
    pools: list[Upstream] = []

    async def start(answers: list[bytes]) -> tuple[Raw, Upstream, FakeClock[float]]:
        raw = Raw(answers)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        raw.port = server.sockets[0].getsockname()[1]
        clock = FakeClock()
        sweeper = Sweeper(asyncio.get_running_loop(), resolution=3600, clock=clock)
        pool = Upstream(f"http://127.0.0.1:{raw.port}/prefix/", sweeper, connect_timeout=5, read_timeout=READ_TIMEOUT)
        pools.append(pool)
        return raw, pool, clock

    yield start  # type: ignore[misc]
    for pool in pools:
        pool.close()
        pool.sweeper.close()
    for server in servers:
        server.close()


async def exchange(pool: Upstream, method: str = "GET") -> tuple[UpstreamConnection, int, bytes]:
    conn = pool.idle_connection() or await pool.connect()
    conn.begin(bodyless=method == "HEAD")
    conn.write(b"%s %s/x HTTP/1.1\r\n%s\r\n" % (method.encode(), pool.prefix, pool.host_line))
    response = await conn.response()
    body = b""
    while chunk := await conn.read():
        body += chunk
    conn.finish()
    return conn, response.status, body


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_connection_is_reused_and_request_carries_prefix_and_host(upstream) -> None:  # type: ignore[no-untyped-def]
    raw, pool, _ = await upstream([OK, OK])
    first, *_ = await exchange(pool)
    second, status, body = await exchange(pool)
    assert (status, body, raw.connections, first is second) == (200, b"ok", 1, True)
    assert raw.requests[0].startswith(b"GET /prefix/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % raw.port)
    # Answered: no deadline is left running on the pooled connection (nor does the sweeper hold it).
    assert first.deadline == float("inf") and first not in pool.sweeper.watched


@pytest.mark.parametrize(("answer", "body"), [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3;x=1\r\n!!!\r\n0\r\nT: 1\r\n\r\n", b"ok!!!"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK, b"ok"),
    (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    (b"HTTP/1.1 304 Not Modified\r\nETag: \"a\"\r\n\r\n", b""),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding:  Chunked \r\n\r\n2\r\nok\r\n0\r\n\r\n", b"ok"),
], ids=["chunked-with-trailer", "interim-answers-skipped", "204", "304", "chunked-spelled-loosely"])
async def test_response_framing_ends_where_it_says_and_the_connection_is_reused(upstream, answer, body) -> None:  # type: ignore[no-untyped-def]
    raw, pool, _ = await upstream([answer, OK])
    first, _, got = await exchange(pool)
    assert got == body
    again, status, _ = await exchange(pool)
    assert (status, raw.connections, first is again) == (200, 1, True)


@pytest.mark.parametrize(("method", "answer", "reused"), [
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", False),
    ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", False),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", False),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
    # Neither: llhttp, which does not know the request was a HEAD, reads a body delimited by the close.
    ("HEAD", b"HTTP/1.1 200 OK\r\nETag: \"a\"\r\n\r\n", False),
], ids=["head-length", "head-chunked", "304-length", "head-length-0", "head-no-length"])
async def test_a_bodyless_answer_ends_with_its_head_and_one_announcing_a_body_ends_the_connection(
    upstream, method, answer, reused,  # type: ignore[no-untyped-def]
) -> None:
    """Should the upstream send the announced body anyway, in a read of its own after the connection went back
    to the pool, it would be read as the next exchange's answer (another client's): not reused."""
    raw, pool, _ = await upstream([answer, OK])
    first, status, body = await exchange(pool, method)
    assert body == b""
    again, status, body = await exchange(pool)
    assert (status, body, raw.connections, first is again) == (200, b"ok", 1 if reused else 2, reused)


async def test_body_delimited_by_close_is_read_to_the_end_and_not_reused(upstream) -> None:  # type: ignore[no-untyped-def]
    raw, pool, _ = await upstream([b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it", b"", OK])
    conn, status, body = await exchange(pool)
    assert (status, body, conn.closed) == (200, b"all of it", True)


async def test_idempotent_request_is_retried_once_on_a_pooled_connection_found_closed(upstream) -> None:  # type: ignore[no-untyped-def]
    """The upstream closes the idle connection (its keep-alive timeout); the next GET goes on a new one."""
    raw, pool, _ = await upstream([OK, b"", OK])
    await exchange(pool)
    await asyncio.sleep(0.05)
    conn = pool.idle_connection()
    assert conn is not None  # pooled, though the upstream has closed it
    pool.release(conn)
    # The forwarder's exchange: a failure before any answer byte on a reused connection is retried.
    forwarder = Forwarder(pool.sweeper, max_body_size=0, client_timeout=60)
    head = b"GET /prefix/x HTTP/1.1\r\n%s\r\n" % pool.host_line
    conn, response = await forwarder._exchange(_Upstream(pool), detached_request("GET"), head)
    assert (response.status, raw.connections) == (200, 2)


async def test_upstream_that_does_not_answer_times_out(upstream) -> None:  # type: ignore[no-untyped-def]
    raw, pool, clock = await upstream([b"HTTP/1.1 200 OK\r\n"])  # a head that never ends
    conn = await pool.connect()
    conn.begin(bodyless=False)
    conn.write(b"GET /prefix/x HTTP/1.1\r\n%s\r\n" % pool.host_line)
    waiting = asyncio.ensure_future(conn.response())
    await asyncio.sleep(0.05)
    clock.advance(READ_TIMEOUT - 1)
    pool.sweeper.sweep()
    assert not waiting.done()
    clock.advance(2)
    pool.sweeper.sweep()
    with pytest.raises(ReadTimeout):
        await waiting


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    b"NOT HTTP\r\n\r\n",
    # A transfer coding other than chunked: relayed, the client would get the body still coded, unlabelled.
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
], ids=["two-lengths", "bare-lf", "garbage", "gzip-chunked", "gzip-to-close", "chunked-twice"])
async def test_malformed_response_is_a_bad_response(upstream, answer) -> None:  # type: ignore[no-untyped-def]
    _, pool, _ = await upstream([answer])
    with pytest.raises((BadResponse, Disconnected)):
        await exchange(pool)


async def test_a_failed_tls_handshake_is_its_own_kind() -> None:
    """An https upstream that does not speak TLS fails as kind "tls" (counted apart from refused connections)."""

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    sweeper = Sweeper(asyncio.get_running_loop(), resolution=3600, clock=FakeClock())
    pool = Upstream(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}", sweeper, connect_timeout=5,
                    read_timeout=READ_TIMEOUT)
    try:
        with pytest.raises(TlsFailed) as failed:
            await pool.connect()
        assert failed.value.kind == "tls"
    finally:
        pool.close()
        sweeper.close()
        server.close()
