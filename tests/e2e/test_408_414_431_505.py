"""408, 414, 431 and 505: request heads too slow, too long or too large, and HTTP versions other than 1.0/1.1.

All of these are answered before any handler runs, with the connection
closed and nothing forwarded.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Iterator

import aiohttp
import pytest

from .conftest import bearer
from .harness import Keygate, Upstream
from .rawhttp import Response, closed_by_server, exchange, pieces, read_response

HEADER_TIMEOUT = 1.0
MARGIN = 3.0  # seconds past the header timeout within which the server must have closed
SLOWLORIS = 500  # connections held open at once


def _raise_fd_limit(needed: int) -> None:
    """Let this process (and the gateway it starts, which inherits the limit) hold ``needed`` sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.fixture(scope="module")
def slow(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """A gateway whose clients get 1 s for a request head."""
    # Both ends of every slowloris connection live on this machine, plus the gateway's own files.
    _raise_fd_limit(2 * SLOWLORIS + 512)
    keygate = Keygate(tmp_path_factory.mktemp("slow"), upstream.url, proxy=f"header_timeout = {HEADER_TIMEOUT}\n").start()
    yield keygate
    assert keygate.stop() == 0


def _get(key: str, path: str = "/echo") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n".encode()


async def _refused(gateway: Keygate, upstream: Upstream, payload: bytes | list[bytes], status: int) -> Response:
    """Send ``payload``; its last answer must be ``status``, then the connection closed, and nothing forwarded."""
    before = upstream.count()
    responses, closed = await exchange(gateway.proxy_port, payload)
    assert responses, "no answer before the connection closed"
    assert responses[-1].status == status, responses[-1].head
    assert b"\r\nconnection: close\r\n" in responses[-1].head.lower()
    assert closed
    assert upstream.count() == before
    return responses[-1]


# --- 408 ------------------------------------------------------------------------------------------------------


async def _hold(port: int, first: bytes, drip: bool) -> tuple[float, bytes]:
    """Open a connection, send ``first``, then a byte every 0.3 s if ``drip``; return when and what the server closed with.

    Gives up (and says it was never closed) a second past the time the server has to close it.
    """
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened = loop.time()
    writer.write(first)
    received = bytearray()
    try:
        while loop.time() - opened < HEADER_TIMEOUT + MARGIN + 1:
            try:
                chunk = await asyncio.wait_for(reader.read(4096), 0.3)
            except TimeoutError:
                if drip:
                    writer.write(b"x")
                continue
            if not chunk:
                writer.close()
                return loop.time() - opened, bytes(received)
            received += chunk
    except ConnectionResetError:
        writer.close()
        return loop.time() - opened, bytes(received)
    writer.close()
    return float("inf"), bytes(received)


SLOW_HEADS = {
    "nothing-sent": (b"", False),
    "partial-head-dripping": (b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: ", True),
    "partial-request-line-dripping": (b"GET /ec", True),
}


@pytest.mark.parametrize("name", list(SLOW_HEADS))
async def test_slowloris_connections_get_408_within_header_timeout(
    http: aiohttp.ClientSession, slow: Keygate, upstream: Upstream, name: str,
) -> None:
    """500 connections whose head never completes are each answered 408 and closed within the timeout, while others are served."""
    _, key = await slow.key(name="ci", role="admin")
    first, drip = SLOW_HEADS[name]
    before = upstream.count()
    holding = [asyncio.create_task(_hold(slow.proxy_port, first, drip)) for _ in range(SLOWLORIS)]
    await asyncio.sleep(0.5)
    async with http.get(slow.proxy_url + "/echo", headers=bearer(key)) as r:
        assert r.status == 200  # served while the slow ones are held
    results = await asyncio.gather(*holding)
    assert max(seconds for seconds, _ in results) < HEADER_TIMEOUT + MARGIN
    assert {received.split(b" ", 2)[1] for _, received in results} == {b"408"}
    async with http.get(slow.proxy_url + "/echo", headers=bearer(key)) as r:
        assert r.status == 200
    assert upstream.count() == before + 2


async def test_head_trickling_in_within_header_timeout_is_served(slow: Keygate) -> None:
    """A head sent in pieces over less than the header timeout is served normally."""
    _, key = await slow.key(name="ci", role="admin")
    head = _get(key)
    reader, writer = await asyncio.open_connection("127.0.0.1", slow.proxy_port)
    for i in range(0, len(head), len(head) // 5 + 1):
        writer.write(head[i:i + len(head) // 5 + 1])
        await asyncio.sleep(0.1)
    response = await read_response(reader)
    writer.close()
    assert response is not None and response.status == 200


async def test_idle_keep_alive_connection_outlives_header_timeout(slow: Keygate) -> None:
    """A keep-alive connection idle after a response is not a slow head: it may send its next request later."""
    _, key = await slow.key(name="ci", role="admin")
    reader, writer = await asyncio.open_connection("127.0.0.1", slow.proxy_port)
    writer.write(_get(key))
    first = await read_response(reader)
    await asyncio.sleep(HEADER_TIMEOUT + 0.5)
    writer.write(_get(key))
    second = await read_response(reader)
    writer.close()
    assert first is not None and first.status == 200
    assert second is not None and second.status == 200


@pytest.mark.parametrize("pipelined", [False, True], ids=["after-idling", "in-the-first-request's-read"])
async def test_stalled_second_head_on_keep_alive_connection_is_408(slow: Keygate, pipelined: bool) -> None:
    """The header timeout runs from the next request's first byte; a second head that stalls gets 408 and is closed."""
    _, key = await slow.key(name="ci", role="admin")
    reader, writer = await asyncio.open_connection("127.0.0.1", slow.proxy_port)
    stalled = b"GET /echo HTTP/1.1\r\nHost: x\r\n"
    writer.write(_get(key) + (stalled if pipelined else b""))
    first = await read_response(reader)
    if not pipelined:
        await asyncio.sleep(HEADER_TIMEOUT + 0.5)  # idle first: the deadline must not run from the last response
        writer.write(stalled)
    second = await read_response(reader, timeout=HEADER_TIMEOUT + MARGIN)
    closed = await closed_by_server(reader, MARGIN)
    writer.close()
    assert first is not None and first.status == 200
    assert second is not None and second.status == 408
    assert second.json()["error"] == "request_timeout"
    assert closed


async def test_websocket_outlives_header_timeout(http: aiohttp.ClientSession, slow: Keygate) -> None:
    """A WebSocket quiet for longer than the header timeout stays open: the deadline is for HTTP heads only."""
    _, key = await slow.key(name="ci", role="admin")
    async with http.ws_connect(slow.proxy_url + "/ws", headers=bearer(key), protocols=("echo.v1",)) as ws:
        await asyncio.sleep(HEADER_TIMEOUT + 0.5)
        await ws.send_str("still here")
        message = await asyncio.wait_for(ws.receive(), 5)
    assert message.type is aiohttp.WSMsgType.TEXT


# --- 414 ------------------------------------------------------------------------------------------------------


async def test_long_target_is_414(gateway: Keygate, upstream: Upstream) -> None:
    """A request target over 8192 bytes gets 414, the connection closed and nothing forwarded."""
    _, key = await gateway.key(name="ci", role="admin")
    response = await _refused(gateway, upstream, _get(key, "/" + "a" * 9000), 414)
    assert response.json()["error"] == "uri_too_long"
    assert b"aaaa" not in response.body


# --- 431 ------------------------------------------------------------------------------------------------------


def _headers(count: int, size: int) -> bytes:
    return b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * size) for i in range(count))


HEAD = b"GET /echo HTTP/1.1\r\nHost: x\r\n"
TOO_LARGE_HEADS: dict[str, bytes | list[bytes]] = {
    "one-9000-byte-line": HEAD + _headers(1, 9000) + b"\r\n",
    "512KB-in-64-lines": HEAD + _headers(64, 8000) + b"\r\n",
    "200-small-headers": HEAD + _headers(200, 1) + b"\r\n",
    "70KB-in-one-read": HEAD + _headers(70, 1000) + b"\r\n",
    "70KB-in-4KB-pieces": pieces(HEAD + _headers(70, 1000) + b"\r\n", 4096),
    # Refused as it passes the cap, not when it ends (it never does) or at the header timeout (10 s).
    "100KB-never-finished": pieces(HEAD + _headers(100, 1000), 4096),
    # The next head starts in the read that ended the previous request, so its first bytes are
    # not counted as they arrive: the request is measured whole instead.
    "70KB-begun-behind-a-bodiless-request": [
        b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n" + HEAD + _headers(60, 1000), _headers(10, 1000) + b"\r\n"],
    "70KB-begun-behind-a-body": [
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" + HEAD + _headers(60, 1000),
        _headers(10, 1000) + b"\r\n"],
    "70KB-begun-in-the-read-ending-a-body": [
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n", b"hello" + HEAD + _headers(60, 1000),
        _headers(10, 1000) + b"\r\n"],
}


@pytest.mark.parametrize("name", list(TOO_LARGE_HEADS))
async def test_too_large_head_is_431(gateway: Keygate, upstream: Upstream, name: str) -> None:
    """A header line over 8190 bytes, over 128 headers, or over 64 KiB of head in all gets 431, closed, nothing forwarded."""
    response = await _refused(gateway, upstream, TOO_LARGE_HEADS[name], 431)
    assert response.json()["error"] == "request_header_fields_too_large"


@pytest.mark.parametrize("piece_size", [None, 4096], ids=["in-one-read", "in-4KB-pieces"])
async def test_60KB_of_headers_is_under_the_cap(gateway: Keygate, upstream: Upstream, piece_size: int | None) -> None:
    """60 KB of headers in many lines is under the 64 KiB cap, so the request is served (200)."""
    _, key = await gateway.key(name="ci", role="admin")
    head = HEAD + _headers(60, 1000) + f"Authorization: Bearer {key}\r\n\r\n".encode()
    before = upstream.count()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
    for piece in pieces(head, piece_size or len(head)):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.01)
    response = await read_response(reader)
    writer.close()
    assert response is not None and response.status == 200
    assert upstream.count() == before + 1


# --- 505 ------------------------------------------------------------------------------------------------------


OTHER_VERSIONS = {
    "HTTP/2.0": b"GET /echo HTTP/2.0\r\nHost: x\r\n{auth}\r\n",
    "HTTP/3.0": b"GET /echo HTTP/3.0\r\nHost: x\r\n{auth}\r\n",
    "HTTP/0.9": b"GET /echo HTTP/0.9\r\nHost: x\r\n{auth}\r\n",
    "no-version": b"GET /echo\r\n\r\n",
}


@pytest.mark.parametrize("name", list(OTHER_VERSIONS))
async def test_http_version_other_than_1_0_and_1_1_is_505(gateway: Keygate, upstream: Upstream, name: str) -> None:
    """A request in an HTTP version other than 1.0 or 1.1 gets 505 and a closed connection; nothing is forwarded."""
    _, key = await gateway.key(name="ci", role="admin")
    payload = OTHER_VERSIONS[name].replace(b"{auth}", f"Authorization: Bearer {key}\r\n".encode())
    before = upstream.count()
    responses, closed = await exchange(gateway.proxy_port, payload)
    assert [r.status for r in responses] == [505]
    assert responses[0].json()["error"] == "http_version_not_supported"
    assert closed
    assert upstream.count() == before
