"""400 and 403 from the request target: what the route table judges is exactly what the upstream gets.

Every case runs against two upstreams behind ``keygate serve``: the echo server,
which shows the bytes it received, and a real nginx, which decodes ``%2F`` and
resolves ``..`` before it routes (its deploy location counts what reaches it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .harness import Keygate, Upstream
from .nginx import Nginx

ROUTES = (
    '[[routes]]\nmethods = ["POST"]\npath = "/api/servers/{server}/deploy"\noperation = "deploy"\n'
    '[[routes]]\npath = "/api/servers/{server}/*"\noperation = "servers:read"\n'
    '[[routes]]\npath = "/override/*"\noperation = "override"\npass_method_override = true\n'
)
DEPLOY = "/api/servers/prod-2/deploy"


@dataclass
class Behind:
    """A gateway in front of one kind of upstream, and a count of what reached that upstream."""

    kind: str
    gateway: Keygate
    upstream: Upstream | Nginx

    def reached(self) -> int:
        if isinstance(self.upstream, Nginx):
            return len(self.upstream.requests())
        return self.upstream.count()


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    server = Nginx(tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


def _gateway(folder: Path, url: str, proxy: str = "") -> Keygate:
    return Keygate(folder, url, config=ROUTES, proxy=proxy).start()


@pytest.fixture(scope="module", params=["echo", "nginx"])
def behind(request: pytest.FixtureRequest, upstream: Upstream, nginx: Nginx,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Behind]:
    server: Upstream | Nginx = upstream if request.param == "echo" else nginx
    gateway = _gateway(tmp_path_factory.mktemp(f"target-{request.param}"), server.url)
    yield Behind(request.param, gateway, server)
    assert gateway.stop() == 0


async def send(port: int, method: str, target: str, key: str = "", headers: str = "",
               connection: str = "close") -> tuple[int, bytes]:
    """One request with its target written exactly as given; the status and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: gw\r\n{auth}{headers}Content-Length: 0\r\n"
                 f"Connection: {connection}\r\n\r\n".encode("utf-8", "surrogateescape"))
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def keys(gateway: Keygate) -> dict[str, str]:
    """A servers:read key on prod-2, a catch-all write key and a deploy key."""
    _, reader = await gateway.key(name="reader", operations=["servers:read"], servers=["prod-2"])
    _, writer = await gateway.key(name="writer", operations=["write", "read"])
    _, deployer = await gateway.key(name="deployer", operations=["deploy", "servers:read"], servers=["prod-2"])
    return {"reader": reader, "writer": writer, "deployer": deployer}


# Spellings an upstream may read as the deploy path (or as another segment than Keygate would see).
AMBIGUOUS = [
    ("fragment", "reader", DEPLOY + "#x"),
    ("fragment-after-query", "reader", DEPLOY + "?a=b#x"),
    ("encoded-slashes", "writer", "/api%2fservers%2fprod-2%2fdeploy"),
    ("encoded-slashes-upper", "writer", "/api%2Fservers%2Fprod-2%2Fdeploy"),
    ("dot-dot-encoded-slash", "reader", "/api/servers/prod-2/x/..%2fdeploy"),
    ("dot-dot-encoded-backslash", "reader", "/api/servers/prod-2/x/..%5cdeploy"),
    ("backslash", "reader", "/api/servers/prod-2/x/..\\deploy"),
    ("encoded-nul", "reader", DEPLOY + "%00.json"),
    ("path-parameter", "reader", DEPLOY + ";x=1"),
    ("escaped-path-parameter", "reader", DEPLOY + "%3Bx=1"),
    ("servlet-dot-dot", "reader", "/api/servers/prod-2/deploy/x/..;/"),
    ("malformed-escape", "reader", "/api/servers/prod-2/%zzdeploy"),
    ("encoded-newline", "reader", DEPLOY + "%0A"),  # PCRE: "^.../deploy$" matches "deploy\n"
    ("encoded-tab", "reader", DEPLOY + "%09"),
    ("upper-case", "reader", "/api/servers/prod-2/DEPLOY"),  # case-insensitive upstreams run deploy
    ("mixed-case-escape", "reader", "/api/servers/prod-2/%44eploy"),
    # Keygate's own endpoints spelled another way: served by neither Keygate nor (with the key's write) the upstream.
    ("keygate-own-double-slash", "writer", "//.well-known/keygate/revoke"),
    ("keygate-own-encoded-dot", "writer", "/%2Ewell-known/keygate/revoke"),
    ("keygate-own-dot-segment", "writer", "/x/../.well-known/keygate/revoke"),
    ("keygate-own-upper-case", "writer", "/.WELL-KNOWN/Keygate/revoke"),  # case-insensitive upstreams
]


@pytest.mark.parametrize(("case", "who", "target"), AMBIGUOUS, ids=[c[0] for c in AMBIGUOUS])
async def test_ambiguous_targets_are_400_and_reach_nothing(behind: Behind, case: str, who: str, target: str) -> None:
    """Fragments, encoded slashes, backslashes, NULs, path parameters and bad escapes: 400, nothing forwarded."""
    key = (await keys(behind.gateway))[who]
    before = behind.reached()
    status, body = await send(behind.gateway.proxy_port, "POST", target, key)
    assert status == 400, body
    assert json.loads(body)["error"] == "invalid_request"
    assert behind.reached() == before


# Spellings every reading resolves to the deploy path: judged as deploy, so a servers:read key is refused.
DEPLOY_SPELLINGS = [
    ("dot-dot", "/api/servers/prod-2/x/../deploy"),
    ("encoded-dot-dot", "/api/servers/prod-2/x/%2e%2e/deploy"),
    ("dot", "/api/servers/prod-2/./deploy"),
    ("double-slashes", "//api//servers/prod-2//deploy"),
    ("encoded-letter", "/api/servers/prod-2/%64eploy"),
    ("trailing-slash", "/api/servers/prod-2/deploy/"),
]


@pytest.mark.parametrize(("case", "target"), DEPLOY_SPELLINGS, ids=[c[0] for c in DEPLOY_SPELLINGS])
async def test_other_spellings_of_deploy_need_deploy(behind: Behind, case: str, target: str) -> None:
    """A servers:read key gets 403 for any spelling of the deploy path, and nothing reaches the upstream."""
    key = (await keys(behind.gateway))["reader"]
    before = behind.reached()
    status, body = await send(behind.gateway.proxy_port, "POST", target, key)
    assert status == 403, body
    assert json.loads(body)["error"] == "insufficient_scope"
    assert behind.reached() == before


@pytest.mark.parametrize(("case", "target"), DEPLOY_SPELLINGS, ids=[c[0] for c in DEPLOY_SPELLINGS])
async def test_the_upstream_gets_the_path_that_was_judged(behind: Behind, case: str, target: str) -> None:
    """A deploy key's request goes upstream in the canonical form the route table matched."""
    key = (await keys(behind.gateway))["deployer"]
    status, body = await send(behind.gateway.proxy_port, "POST", target + "?a=%2F", key)
    assert status == 200, body
    canonical = DEPLOY + ("/" if target.endswith("/") else "")
    if isinstance(behind.upstream, Nginx):
        assert behind.upstream.requests()[-1] == f"POST {canonical}"
        assert body == (b"deployed\n" if canonical == DEPLOY else b"ok\n")
    else:
        assert json.loads(body)["path"] == canonical + "?a=%2F"  # the query as sent


async def test_method_override_headers_are_dropped_unless_the_route_names_them(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """X-HTTP-Method-Override and its kin reach the upstream only on a route with pass_method_override."""
    gateway = _gateway(tmp_path_factory.mktemp("override"), upstream.url)
    try:
        key = (await keys(gateway))["writer"]
        _, granted = await gateway.key(name="override", operations=["override"])
        overrides = "X-HTTP-Method-Override: DELETE\r\nX-HTTP-Method: DELETE\r\nX-Method-Override: DELETE\r\n"
        status, body = await send(gateway.proxy_port, "POST", "/items/1", key, overrides)
        assert status == 200
        sent = {name.lower() for name, _ in json.loads(body)["headers"]}
        assert not sent & {"x-http-method-override", "x-http-method", "x-method-override"}
        status, body = await send(gateway.proxy_port, "POST", "/override/1", granted, overrides)
        assert status == 200
        sent = {name.lower() for name, _ in json.loads(body)["headers"]}
        assert {"x-http-method-override", "x-http-method", "x-method-override"} <= sent
    finally:
        assert gateway.stop() == 0


async def test_path_parameters_stripped_are_judged_and_forwarded_without_them(
    nginx: Nginx, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With path_parameters = "strip", ";..." is removed before routing and the upstream never sees it."""
    strip = 'path_parameters = "strip"\n'
    behind_nginx = _gateway(tmp_path_factory.mktemp("strip-nginx"), nginx.url, strip)
    behind_echo = _gateway(tmp_path_factory.mktemp("strip-echo"), upstream.url, strip)
    try:
        for gateway in (behind_nginx, behind_echo):
            reader = (await keys(gateway))["reader"]
            before = len(nginx.requests())
            for target in (DEPLOY + ";jsessionid=1", "/api/servers/prod-2/deploy/x/..;/"):
                assert (await send(gateway.proxy_port, "POST", target, reader))[0] == 403
            assert len(nginx.requests()) == before
        status, body = await send(behind_echo.proxy_port, "GET", "/api/servers/prod-2/status;v=1?a=b", reader)
        assert status == 200 and json.loads(body)["path"] == "/api/servers/prod-2/status?a=b"
    finally:
        assert behind_nginx.stop() == 0
        assert behind_echo.stop() == 0


async def test_encoded_slashes_pass_inside_their_segment_when_configured(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """With encoded_slashes = "pass", %2F and %5C stay encoded in their segment, judged and sent as such."""
    gateway = _gateway(tmp_path_factory.mktemp("pass"), upstream.url, 'encoded_slashes = "pass"\n')
    try:
        reader = (await keys(gateway))["reader"]
        status, body = await send(gateway.proxy_port, "GET", "/api/servers/prod-2/a%2fb%5cc\\d", reader)
        assert status == 200 and json.loads(body)["path"] == "/api/servers/prod-2/a%2Fb%5Cc%5Cd"
        # The encoded slash is not a segment boundary: "prod-2%2Fx" is a server named "prod-2/x".
        assert (await send(gateway.proxy_port, "GET", "/api/servers/prod-2%2fx/status", reader))[0] == 403
        assert (await send(gateway.proxy_port, "GET", "/a%00", reader))[0] == 400  # NUL never passes
        # Decoded, these climb out of the segment (and the server): refused even here.
        for target in ("/api/servers/prod-2/x%2F..%2Fdeploy", "/api/servers/prod-2/%2Fdeploy",
                       "/api/servers/prod-2/..%2Fprod-1%2Fdeploy", "/api/servers/prod-2/a%5C.%2E%5Cdeploy"):
            assert (await send(gateway.proxy_port, "POST", target, reader))[0] == 400, target
    finally:
        assert gateway.stop() == 0


WS_KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
BAD_UPGRADES = [
    ("no-connection-upgrade", "GET", "close", f"Upgrade: websocket\r\n{WS_KEY}Sec-WebSocket-Version: 13\r\n"),
    ("no-key", "GET", "Upgrade, close", "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"),
    ("version-8", "GET", "Upgrade, close", f"Upgrade: websocket\r\n{WS_KEY}Sec-WebSocket-Version: 8\r\n"),
    ("post", "POST", "Upgrade, close", f"Upgrade: websocket\r\n{WS_KEY}Sec-WebSocket-Version: 13\r\n"),
    ("delete", "DELETE", "Upgrade, close", f"Upgrade: websocket\r\n{WS_KEY}Sec-WebSocket-Version: 13\r\n"),
]


@pytest.mark.parametrize(("case", "method", "connection", "headers"), BAD_UPGRADES, ids=[c[0] for c in BAD_UPGRADES])
async def test_websocket_upgrades_that_cannot_complete_are_400_and_open_nothing(
    gateway: Keygate, upstream: Upstream, case: str, method: str, connection: str, headers: str,
) -> None:
    """A WebSocket handshake we cannot complete (or one judged as another method than GET) is a 400, before
    any upstream WebSocket is opened, and without a traceback."""
    key = (await keys(gateway))["writer"]
    before = upstream.count()
    status, body = await send(gateway.proxy_port, method, "/ws", key, headers, connection)
    assert status == 400, body
    assert json.loads(body)["error"] == "invalid_request"
    assert upstream.count() == before
    assert "Traceback" not in gateway.log()
