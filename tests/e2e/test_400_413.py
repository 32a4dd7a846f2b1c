"""400, 408 and 413: smuggling attempts, requests for anything but a path, oversized and slow bodies, vanishing clients."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator

import aiohttp
import aiohttp.http_parser
import pytest
from yarl import URL

from .conftest import bearer
from .harness import Keygate, Upstream, stored_requests
from .rawhttp import exchange as raw_exchange


@pytest.fixture(scope="module")
def small(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """A gateway with a 1 MiB body limit and a 1 s client timeout."""
    keygate = Keygate(tmp_path_factory.mktemp("small"), upstream.url,
                      proxy='max_body_size = "1MiB"\nclient_timeout = 1\n').start()
    yield keygate
    assert keygate.stop() == 0


def responses_in(data: bytes) -> int:
    """How many HTTP responses start in ``data`` (status lines at line starts)."""
    return len(re.findall(rb"(?:^|\r\n)HTTP/1\.[01] \d{3} ", data))


def exchange(port: int, payload: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send raw bytes; return what came back and whether the server closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        received = b""
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                closed = True
                break
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            received += chunk
            if responses_in(received) >= 2:
                break
        return received, closed


SMUGGLING = {
    "te-and-cl": b"POST /echo HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "two-content-lengths": b"POST /echo HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 5\r\nContent-Length: 30\r\n\r\n"
                           b"hello GET /smuggled HTTP/1.1\r\n\r\n",
    "chunked-identity": b"POST /echo HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked, identity\r\n\r\n"
                        b"5\r\nhello\r\n0\r\n\r\n",
    "obs-fold": b"POST /echo HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 5\r\nX-Folded: a\r\n b\r\n\r\nhello",
    "bare-lf": b"POST /echo HTTP/1.1\nHost: x\n{auth_lf}Content-Length: 5\n\nhello",
    "lf-in-chunk-extension": b"POST /echo HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n"
                             b"5;ext=\"a\nb\"\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", list(SMUGGLING))
async def test_smuggling_never_makes_two_upstream_requests(gateway: Keygate, upstream: Upstream, name: str) -> None:
    """Ambiguous framing gets a 400 and a closed connection, or exactly one upstream request."""
    _, key = await gateway.key(name="ci", role="admin")
    payload = SMUGGLING[name].replace(b"{auth}", f"Authorization: Bearer {key}\r\n".encode()) \
        .replace(b"{auth_lf}", f"Authorization: Bearer {key}\n".encode())
    before = upstream.count()
    received, closed = await asyncio.to_thread(exchange, gateway.proxy_port, payload)
    await asyncio.sleep(0.2)
    forwarded = upstream.count() - before
    assert b"/smuggled" not in received
    # aiohttp answers parse errors itself, as HTTP/1.0 400.
    if received.split(b" ", 2)[1:2] == [b"400"]:
        assert closed, received
        assert forwarded == 0
    else:
        assert forwarded == 1, received
        assert responses_in(received) == 1


# Forward-proxy and tunnel requests: Keygate serves one API by path and never connects anywhere else.
NOT_A_PATH = {
    "absolute-form": b"GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\n{auth}\r\n",
    "asterisk-form": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n{auth}\r\n",
    "connect": b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n{auth}\r\n",
    "connect-then-tunnel-bytes": b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n{auth}\r\n"
                                 b"\x16\x03\x01\x00\x05hello",
    "authority-form": b"GET evil.example:443 HTTP/1.1\r\nHost: x\r\n{auth}\r\n",
    # Forwarded, this declared a body it never sent, and the upstream read the next request on the
    # pooled connection as that body (request smuggling past the scope check).
    "connect-origin-form": b"CONNECT /echo HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 69\r\n\r\n",
}


# A declined upgrade (no key: 401) hands its held-back bytes to the parser from its answer (Connection.response_done),
# not from data_received.
DECLINED_UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@pytest.mark.parametrize("behind", [b"", DECLINED_UPGRADE], ids=["alone", "behind-a-declined-upgrade"])
@pytest.mark.parametrize("name", list(NOT_A_PATH))
async def test_request_not_for_a_path_is_400_and_closed(
    gateway: Keygate, upstream: Upstream, name: str, behind: bytes,
) -> None:
    """A request whose target is not a path gets our 400, without echo, and a closed connection; nothing is forwarded."""
    _, key = await gateway.key(name="ci", role="admin")
    before, logged = upstream.count(), len(gateway.log())
    responses, closed = await raw_exchange(
        gateway.proxy_port, behind + NOT_A_PATH[name].replace(b"{auth}", f"Authorization: Bearer {key}\r\n".encode()))
    assert [r.status for r in responses] == ([401, 400] if behind else [400])
    response = responses[-1]
    assert response.json()["error"] == "invalid_request"
    assert b"evil.example" not in response.body and key.encode() not in response.body
    assert b"\r\nconnection: close\r\n" in response.head.lower()
    assert closed
    assert upstream.count() == before
    assert "Traceback" not in gateway.log()[logged:]


@pytest.mark.parametrize("credential", ["x:read", "x%3Aread", "*", "%2A"])
async def test_placeholder_value_that_could_widen_a_grant_is_400(
    http: aiohttp.ClientSession, gateway: Keygate, upstream: Upstream, credential: str,
) -> None:
    """A segment named in the operation may not hold ':' or '*': "x:read" would give a `*:read` key a registry login."""
    _, key = await gateway.key(name="reader", operations=["*:read"])
    before = upstream.count()
    url = URL(f"{gateway.proxy_url}/api/registry/{credential}/login", encoded=True)
    async with http.post(url, headers=bearer(key)) as response:
        assert response.status == 400 and (await response.json())["error"] == "invalid_request"
    assert upstream.count() == before


def test_c_parser_is_in_use() -> None:
    """aiohttp's llhttp-based C parser is the one serving requests, not the Python fallback."""
    assert aiohttp.http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"
    assert tuple(int(p) for p in aiohttp.__version__.split(".")[:3]) >= (3, 14, 3)


async def test_declared_body_over_limit_is_413(http: aiohttp.ClientSession, small: Keygate, upstream: Upstream) -> None:
    """A Content-Length over max_body_size is refused before anything is forwarded."""
    _, key = await small.key(name="ci", role="admin")
    before = upstream.count()
    async with http.post(small.proxy_url + "/echo", headers=bearer(key), data=b"x" * (2 << 20)) as r:
        assert r.status == 413
    assert upstream.count() == before


async def test_streamed_body_over_limit_is_413(http: aiohttp.ClientSession, small: Keygate, upstream: Upstream) -> None:
    """A chunked body is counted while streaming and cut off with 413 past the limit."""
    _, key = await small.key(name="ci", role="admin")
    before = upstream.count("completed")

    async def body():
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB in all

    try:
        async with http.post(small.proxy_url + "/echo", headers=bearer(key), data=body()) as r:
            assert r.status == 413
    except aiohttp.ClientOSError:
        pytest.fail("the gateway should answer 413, not drop the connection")
    assert upstream.count("completed") == before


async def test_slow_client_gets_408(small: Keygate, upstream: Upstream) -> None:
    """A client that stops sending its body times out with 408 and nothing completes upstream."""
    _, key = await small.key(name="ci", role="admin")
    before = upstream.count("completed")
    payload = (f"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
               "Content-Length: 100\r\n\r\nonly-some").encode()
    received, _ = await asyncio.to_thread(exchange, small.proxy_port, payload, 5.0)
    assert received.startswith(b"HTTP/1.1 408"), received
    assert upstream.count("completed") == before


async def test_client_vanishing_mid_upload_aborts_upstream(small: Keygate, upstream: Upstream) -> None:
    """When the client disconnects mid-upload, the upstream request is aborted, not completed, and recorded as 499."""
    record, key = await small.key(name="ci", role="admin")
    before = upstream.count("completed")
    seen = upstream.count()
    with socket.create_connection(("127.0.0.1", small.proxy_port)) as s:
        s.sendall((f"POST /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                   "Content-Length: 1000\r\n\r\n").encode() + b"x" * 100)
        for _ in range(50):
            if upstream.count() > seen:
                break
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert upstream.count() == seen + 1  # it did start upstream...
    assert upstream.count("completed") == before  # ...and was aborted there
    # Not an upstream failure (502) or a fault: the client went away.
    [request] = await stored_requests(small, record.id)
    assert (request.decision, request.status, request.reason) == ("allowed", 499, None)
