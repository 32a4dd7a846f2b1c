"""408, 414, 431 and 505: request heads too slow, too long or too large, and HTTP versions other than 1.0/1.1.

All of these are answered before any handler runs, with the connection
closed and nothing forwarded.
"""

from __future__ import annotations

import asyncio
import base64
import os
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
        await asyncio.sleep(0.05)
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


def _ws_frame(text: str) -> bytes:
    """One masked (client-to-server) WebSocket text frame, payload under 126 bytes."""
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    return bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _read_ws_text(reader: asyncio.StreamReader, timeout: float = 5.0) -> str:
    """The next (unmasked, server-to-client) text frame's payload, payload under 126 bytes."""
    first, length = await asyncio.wait_for(reader.readexactly(2), timeout)
    assert first == 0x81 and length < 126, (first, length)
    return (await asyncio.wait_for(reader.readexactly(length), timeout)).decode()


async def test_websocket_whose_first_frame_shares_the_handshake_read_outlives_header_timeout(slow: Keygate) -> None:
    """A WebSocket handshake and its first frame in one write: the frame is no head, so the deadline does not apply."""
    record, key = await slow.key(name="ci", role="admin")
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", slow.proxy_port)
    handshake = (
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: echo.v1\r\nAuthorization: Bearer {key}\r\n\r\n"
    ).encode()
    writer.write(handshake + _ws_frame("one"))
    sent = loop.time()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert (await _read_ws_text(reader)).startswith("hello ")
        assert await _read_ws_text(reader) == "echo:one"
        await asyncio.sleep(sent + 2.0 - loop.time())  # past the header timeout
        writer.write(_ws_frame("two"))
        assert await _read_ws_text(reader) == "echo:two"
        # Still open at 2.5 s: nothing more arrives, and no end of stream.
        assert not await closed_by_server(reader, sent + 2.5 - loop.time())
    finally:
        writer.close()


async def _rest(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, bool]:
    """What the server still sends, and whether it closed the connection within ``timeout`` seconds."""
    received = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        return bytes(received), False
    except ConnectionResetError:
        pass
    return bytes(received), True


async def test_request_in_hand_when_the_next_head_times_out_is_answered_then_closed(
    slow: Keygate, upstream: Upstream,
) -> None:
    """A complete request followed by a stalled partial head: the request's whole answer comes, then the close (no 408)."""
    _, key = await slow.key(name="ci", role="admin")
    before = upstream.count()
    reader, writer = await asyncio.open_connection("127.0.0.1", slow.proxy_port)
    try:
        writer.write(_get(key, "/slow/2") + b"GET / HT")  # answered after 2 s, the next head's deadline at 1 s
        first = await read_response(reader, timeout=5)
        rest, closed = await _rest(reader, MARGIN)
    finally:
        writer.close()
    assert first is not None and first.status == 200, first
    assert first.json() == {"slept": 2.0}
    assert rest == b""  # no 408 after (or in) it
    assert closed
    assert upstream.count() == before + 1


async def test_requests_in_hand_when_a_head_grows_too_large_are_answered_then_closed(
    gateway: Keygate, upstream: Upstream,
) -> None:
    """A next head passing the size cap while a request is handled: that request is answered, then the close (no 431)."""
    _, key = await gateway.key(name="ci", role="admin")
    before = upstream.count()
    # The next head's 70 KB arrive over 0.8 s, the first request is answered at 2 s (the upstream timeout is 3 s).
    responses, closed = await exchange(
        gateway.proxy_port, [_get(key, "/slow/2") + HEAD] + pieces(_headers(70, 1000), 8192), timeout=6)
    assert [r.status for r in responses] == [200]
    assert responses[0].json() == {"slept": 2.0}
    assert closed
    assert upstream.count() == before + 1


NEXT_HEAD = b"GET /echo HTTP/1.1\r\nHost: x\r\n"
BODY_THEN_STALLED_HEAD = {
    # The body ends in a read of its own that the next head's first bytes share.
    "content-length": [b"Content-Length: 5\r\n\r\nhel", b"lo" + NEXT_HEAD],
    "chunked": [b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel", b"lo\r\n0\r\n\r\n" + NEXT_HEAD],
    # The whole request and the next head's first bytes in one read.
    "content-length-with-its-head": [b"Content-Length: 5\r\n\r\nhello" + NEXT_HEAD],
    "chunked-with-its-head": [b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + NEXT_HEAD],
}


@pytest.mark.parametrize("name", list(BODY_THEN_STALLED_HEAD))
async def test_head_stalled_in_the_read_ending_a_body_is_408(slow: Keygate, name: str) -> None:
    """A next head beginning in the read that ends a body is held to the header timeout from there."""
    _, key = await slow.key(name="ci", role="admin")
    post = f"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n".encode()
    *earlier, last = BODY_THEN_STALLED_HEAD[name]
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", slow.proxy_port)
    try:
        for i, piece in enumerate(earlier):
            writer.write((post if i == 0 else b"") + piece)
            await asyncio.sleep(0.2)  # a read of its own
        writer.write((b"" if earlier else post) + last)
        sent = loop.time()
        first = await read_response(reader)
        rest, closed = await _rest(reader, HEADER_TIMEOUT + MARGIN)
        waited = loop.time() - sent
    finally:
        writer.close()
    assert first is not None and first.status == 200, first
    assert closed and waited < HEADER_TIMEOUT + MARGIN
    # The echo is answered long before the deadline, so the connection is idle then: 408.
    assert rest.split(b" ", 2)[1] == b"408", rest


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_keep_alive_connection_idle_after_a_body_outlives_header_timeout(slow: Keygate, framing: str) -> None:
    """A body's last bytes in a read of their own start no header clock: the connection may idle, then be used."""
    _, key = await slow.key(name="ci", role="admin")
    post = f"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n".encode()
    if framing == "chunked":
        parts = [post + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"0\r\n\r", b"\n"]
    else:
        parts = [post + b"Content-Length: 5\r\n\r\nhel", b"lo"]
    reader, writer = await asyncio.open_connection("127.0.0.1", slow.proxy_port)
    try:
        for part in parts:
            writer.write(part)
            await asyncio.sleep(0.2)
        first = await read_response(reader)
        await asyncio.sleep(HEADER_TIMEOUT + 0.5)
        writer.write(_get(key))
        second = await read_response(reader)
    finally:
        writer.close()
    assert first is not None and first.status == 200
    assert second is not None and second.status == 200


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
