"""403: the client IP is not allowed, or the key may not do this on this server."""

from __future__ import annotations

import json
import aiohttp
import pytest

from .conftest import bearer
from .harness import Keygate, Upstream

SCOPE_CHALLENGE = 'Bearer realm="keygate", error="insufficient_scope"'


async def call(http: aiohttp.ClientSession, gateway: Keygate, key: str, path: str = "/echo",
               method: str = "GET", **headers: str) -> tuple[int, dict[str, str], dict]:
    async with http.request(method, gateway.proxy_url + path, headers={**bearer(key), **headers}) as r:
        body = await r.read()
        return r.status, dict(r.headers), json.loads(body) if body else {}


async def test_ip_not_in_allowlist(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """A key allowlisted for 10.0.0.0/8 is refused from 127.0.0.1 with ip_not_allowed."""
    _, key = await gateway.key(name="ci", role="admin", ip_allowlist=["10.0.0.0/8"])
    status, headers, body = await call(http, gateway, key)
    assert status == 403 and body["error"] == "ip_not_allowed"
    assert "WWW-Authenticate" not in headers


@pytest.mark.parametrize(
    ("allowlist", "status", "error"),
    [(["10.0.0.0/8"], 403, "ip_not_allowed"), (["2001:db8::/32", "127.0.0.0/8"], 200, None)],
    ids=["outside", "inside"],
)
async def test_the_admin_api_judges_an_allowlist_as_the_proxy_does(
    http: aiohttp.ClientSession, gateway: Keygate, allowlist: list[str], status: int, error: str | None,
) -> None:
    """The same key from the same address: both listeners allow it, or both refuse it with ip_not_allowed."""
    _, key = await gateway.key(name="ops", role="admin", servers=["*", "admin"], ip_allowlist=allowlist)
    answers = []
    for url in (gateway.proxy_url + "/echo", gateway.admin_url + "/admin/v1/keys"):
        async with http.get(url, headers=bearer(key)) as r:
            body = await r.json(content_type=None)
            answers.append((r.status, "WWW-Authenticate" in r.headers, body.get("error") or body.get("type")))
    assert answers[0][:2] == answers[1][:2] == (status, False)
    if error is not None:
        assert answers == [(403, False, error), (403, False, f"urn:keygate:problem:{error}")]


async def test_loopback_allowlist_allows(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """A key allowlisted for 127.0.0.0/8 (and an IPv6 net) works from 127.0.0.1."""
    _, key = await gateway.key(name="ci", role="admin", ip_allowlist=["2001:db8::/32", "127.0.0.0/8"])
    assert (await call(http, gateway, key))[0] == 200


@pytest.mark.parametrize(
    "spoof",
    [{"X-Forwarded-For": "10.1.2.3"}, {"Forwarded": "for=10.1.2.3"}, {"X-Real-IP": "10.1.2.3"}],
)
async def test_spoofed_forwarding_headers_change_nothing(
    http: aiohttp.ClientSession, gateway: Keygate, spoof: dict[str, str]
) -> None:
    """From an untrusted peer, forwarding headers cannot put the client in the allowlist."""
    _, key = await gateway.key(name="ci", role="admin", ip_allowlist=["10.0.0.0/8"])
    assert (await call(http, gateway, key, **spoof))[0] == 403


async def test_trusted_proxy_rightmost_untrusted_counts(
    http: aiohttp.ClientSession, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Behind a trusted proxy the rightmost untrusted X-Forwarded-For hop is the client."""
    folder = tmp_path_factory.mktemp("trusted")
    keygate = Keygate(folder, upstream.url, proxy='trusted_proxies = ["127.0.0.1/32"]\n').start()
    try:
        _, key = await keygate.key(name="ci", role="admin", ip_allowlist=["10.0.0.0/8"])
        assert (await call(http, keygate, key, **{"X-Forwarded-For": "10.1.2.3"}))[0] == 200
        # The client wrote "10.1.2.3"; the proxy appended the real client 192.0.2.7.
        assert (await call(http, keygate, key, **{"X-Forwarded-For": "10.1.2.3, 192.0.2.7"}))[0] == 403
        # A trusted hop on the right is skipped.
        assert (await call(http, keygate, key, **{"X-Forwarded-For": "10.1.2.3, 127.0.0.1"}))[0] == 200
        # IPv4-mapped IPv6 matches IPv4 rules.
        assert (await call(http, keygate, key, **{"X-Forwarded-For": "::ffff:10.9.9.9"}))[0] == 200
        status, _, echoed = await call(http, keygate, key, **{"X-Forwarded-For": "10.1.2.3"})
        forwarded = [v for k, v in echoed["headers"] if k.lower() == "x-forwarded-for"]
        assert forwarded == ["10.1.2.3, 127.0.0.1"]
    finally:
        assert keygate.stop() == 0


async def test_server_not_granted(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """A key for prod-1 may not deploy to prod-2."""
    _, key = await gateway.key(name="deployer", operations=["deploy"], servers=["prod-1"])
    status, headers, body = await call(http, gateway, key, "/api/servers/prod-2/deploy", "POST")
    assert status == 403 and headers["WWW-Authenticate"] == SCOPE_CHALLENGE
    assert body["error"] == "insufficient_scope"


async def test_operation_not_granted(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """A read-only key may read but not write (the catch-all maps POST to write)."""
    _, key = await gateway.key(name="reader", operations=["read"])
    assert (await call(http, gateway, key))[0] == 200
    status, headers, _ = await call(http, gateway, key, method="POST")
    assert status == 403 and headers["WWW-Authenticate"] == SCOPE_CHALLENGE


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_key_granted_one_registry_credential_may_not_use_another(
    http: aiohttp.ClientSession, gateway: Keygate, method: str
) -> None:
    """registry_login:ghcr-prod does not reach /api/registry/dockerhub/login: insufficient_scope."""
    _, key = await gateway.key(name="registry", operations=["registry_login:ghcr-prod"])
    assert (await call(http, gateway, key, "/api/registry/ghcr-prod/login", method))[0] == 200
    status, headers, body = await call(http, gateway, key, "/api/registry/dockerhub/login", method)
    assert status == 403 and headers["WWW-Authenticate"] == SCOPE_CHALLENGE
    assert body["error"] == "insufficient_scope"


async def test_wildcard_server_never_covers_admin(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """servers = ['*'] reaches every server but 'admin'; admin must be named."""
    _, everywhere = await gateway.key(name="all", operations=["*"])
    _, admin = await gateway.key(name="admin", operations=["*"], servers=["admin"])
    assert (await call(http, gateway, everywhere, "/api/servers/prod-9/status"))[0] == 200
    assert (await call(http, gateway, everywhere, "/api/servers/admin/status"))[0] == 403
    assert (await call(http, gateway, admin, "/api/servers/admin/status"))[0] == 200


async def test_role_and_operations_only_narrow(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """A key's effective operations are its role's grants intersected with its own."""
    async with gateway.service() as service:
        await service.put_role("ops", ["servers:*", "read"])
    _, key = await gateway.key(name="narrow", role="ops", operations=["servers:read", "deploy"])
    assert (await call(http, gateway, key, "/api/servers/prod-1/status"))[0] == 200
    # deploy is in the key's list but not the role's: refused.
    assert (await call(http, gateway, key, "/api/servers/prod-1/deploy", "POST"))[0] == 403
    # read is in the role but not in the key's list: refused.
    assert (await call(http, gateway, key))[0] == 403


async def test_per_user_key_is_bounded_by_member_role(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """A per-user key can do no more than its user's role in the org, and follows role changes."""
    import asyncio

    async with gateway.service() as service:
        await service.put_role("viewer", ["read"])
        await service.set_member("acme", "carol", "viewer")
        _, key = await service.create_key(name="carol", org="acme", user="carol", operations=["read", "write"])
    assert (await call(http, gateway, key))[0] == 200
    assert (await call(http, gateway, key, method="POST"))[0] == 403
    async with gateway.service() as service:
        await service.set_member("acme", "carol", "admin")
    await asyncio.sleep(1.0)
    assert (await call(http, gateway, key, method="POST"))[0] == 200


async def test_agent_key_acts_as_its_member(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """An agent key can do exactly what its member's role allows, and follows it."""
    import asyncio

    async with gateway.service() as service:
        await service.put_role("viewer", ["read"])
        await service.set_member("acme", "dave", "viewer")
        record, key, _ = await service.issue_agent_key("acme", "dave")
    status, _, echoed = await call(http, gateway, key)
    assert status == 200
    assert ["X-Keygate-Role", "viewer"] in echoed["headers"] and ["X-Keygate-User", "dave"] in echoed["headers"]
    assert (await call(http, gateway, key, method="POST"))[0] == 403
    async with gateway.service() as service:
        await service.put_role("viewer", ["read", "write"])
    await asyncio.sleep(1.0)
    assert (await call(http, gateway, key, method="POST"))[0] == 200
