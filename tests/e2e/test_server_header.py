"""No listener says what it runs on: no ``Server`` header in Keygate's own answers (README, "Server header"),
and a fixed ``Server: keygate`` on the admin listener's answer to a request it cannot parse, an answer
that, like the proxy's, quotes nothing of that request.

A proxied answer keeps the upstream's own ``Server`` header, unchanged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import aiohttp
import pytest

from .conftest import bearer
from .harness import Keygate, Upstream
from .rawhttp import read_response


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """A gateway with all three listeners: proxy, authz and admin."""
    keygate = Keygate(tmp_path_factory.mktemp("server-header"), upstream.url, authz="").start()
    yield keygate
    keygate.stop()


def own_answers(gateway: Keygate) -> list[tuple[str, str, dict[str, str]]]:
    """(listener URL, path, headers) of requests each listener answers itself, good and refused."""
    return [
        (gateway.admin_url, "/healthz", {}),
        (gateway.admin_url, "/readyz", {}),
        (gateway.admin_url, "/nowhere", {}),
        (gateway.admin_url, "/admin/v1/keys", {}),
        (gateway.admin_url, "/admin/v1/keys", bearer("kg_AAAAAAAAAAAA_notakey")),
        (gateway.admin_url, "/", {}),
        (gateway.proxy_url, "/anything", {}),
        (gateway.proxy_url, "/anything", bearer("kg_AAAAAAAAAAAA_notakey")),
        (gateway.authz_url, "/auth", {}),
        (gateway.authz_url, "/auth", bearer("kg_AAAAAAAAAAAA_notakey")),
    ]


async def test_own_answers_have_no_server_header(gateway: Keygate) -> None:
    async with aiohttp.ClientSession() as http:
        for url, path, headers in own_answers(gateway):
            async with http.get(url + path, headers=headers, allow_redirects=False) as reply:
                assert "Server" not in reply.headers, (url, path, reply.status, reply.headers["Server"])


@pytest.mark.parametrize("listener", ["proxy", "authz", "admin"])
async def test_malformed_request_answer_has_no_server_header(gateway: Keygate, listener: str) -> None:
    """Even the answer to bytes that are not HTTP, which no handler sees."""
    port = {"proxy": gateway.proxy_port, "authz": gateway.authz_port, "admin": gateway.admin_port}[listener]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        await writer.drain()
        response = await read_response(reader)
    finally:
        writer.close()
    assert response is not None and response.status == 400
    server = [line for line in response.head.lower().split(b"\r\n") if line.startswith(b"server:")]
    # The admin listener's HTTP library answers these itself, naming no software nor version.
    assert server == ([b"server: keygate"] if listener == "admin" else []), response.head


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 32 + b"\r\n\r\n",  # TLS to a plain port
], ids=["bad-content-length", "header-too-long", "not-http"])
async def test_a_request_the_admin_listener_cannot_parse_is_an_info_line(gateway: Keygate, request_bytes: bytes) -> None:
    """Logged as on the proxy: one info line (bad_http), no error and no traceback anyone could fill the log with."""
    before = len(gateway.log().splitlines())
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.admin_port)
    try:
        writer.write(request_bytes)
        await writer.drain()
        await reader.read()
    finally:
        writer.close()
    await asyncio.sleep(0.2)
    lines = [json.loads(line) for line in gateway.log().splitlines()[before:]]
    assert [(line["level"], line["logger"], line.get("event"), line.get("listener")) for line in lines] == [
        ("info", "keygate.http", "bad_http", "admin")], lines
    assert "exception" not in lines[0]


async def test_proxied_answer_keeps_the_upstream_server_header(gateway: Keygate, upstream: Upstream) -> None:
    _, key = await gateway.key(name="server-header", role="admin")
    async with aiohttp.ClientSession() as http:
        async with http.get(upstream.url + "/echo") as direct:
            upstream_server = direct.headers.getall("Server")
        async with http.get(gateway.proxy_url + "/echo", headers=bearer(key)) as proxied:
            assert proxied.status == 200
            assert proxied.headers.getall("Server") == upstream_server


@pytest.mark.parametrize("shape", [
    b"GET /admin/v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\x01\r\n\r\n",  # a bad byte in a value
    b"GET /admin/v1/keys?%s\x01 HTTP/1.1\r\nHost: x\r\n\r\n",  # in the target
    b"GET /admin/v1/keys HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n",  # a header line without a colon
    b"G\x01T /%s HTTP/1.1\r\nHost: x\r\n\r\n",  # a bad method first on the connection (logged at debug by aiohttp)
], ids=["header-value", "target", "no-colon", "method"])
@pytest.mark.parametrize("listener", ["admin", "proxy"])
async def test_a_request_no_listener_can_parse_is_never_echoed(gateway: Keygate, listener: str, shape: bytes) -> None:
    """SECURITY: the answer to an unparseable request quotes none of it (a key in it, say); the log shows its id."""
    record, key = await gateway.key(name=f"echo-{listener}-{len(shape)}", role="admin")
    port = {"proxy": gateway.proxy_port, "admin": gateway.admin_port}[listener]
    before = len(gateway.log().splitlines())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(shape % key.encode())
        await writer.drain()
        response = await read_response(reader)
    finally:
        writer.close()
    assert response is not None and response.status == 400
    assert key.encode() not in response.head + response.body and b"\\x01" not in response.body
    body = json.loads(response.body)
    assert body == ({"type": "urn:keygate:problem:invalid_request", "title": "Bad Request", "status": 400,
                     "detail": "The request is not well-formed HTTP."} if listener == "admin"
                    else {"error": "invalid_request", "error_description": "The request is not well-formed HTTP."})
    await asyncio.sleep(0.2)
    assert key not in "\n".join(gateway.log().splitlines()[before:])
