"""Admin API refusals of the key: the proxy's stages, answered as problem+json."""

from __future__ import annotations

import pytest

from gateway.admin.api import ENDPOINTS
from gateway.keys import generate

from .conftest import Admin

# One request per endpoint, with ids that exist in no store: refusal comes before any lookup.
ALL = [(e.method, "/admin/v1" + e.path.format(id="kg_AAAAAAAAAAAA", name="r", org="o", user="u"), e.operation)
       for e in ENDPOINTS]


@pytest.mark.parametrize(("method", "path", "operation"), ALL)
async def test_401_without_a_key(admin: Admin, method: str, path: str, operation: str) -> None:
    """Every endpoint refuses a request without a key with 401, a challenge and problem+json."""
    reply = await admin.call(method, path, key=None, json={})
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="keygate"'
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert reply.body["status"] == 401 and reply.body["instance"].startswith("urn:keygate:request:")
    assert {"type", "title", "detail"} <= set(reply.body)


@pytest.mark.parametrize(("method", "path", "operation"), ALL)
async def test_403_for_a_key_without_admin_access(admin: Admin, method: str, path: str, operation: str) -> None:
    """A key with servers ["*"] and every operation is no admin key: 403 insufficient_scope."""
    _, key = await admin.key(name="app-wide", role="admin")
    reply = await admin.call(method, path, key=key, json={})
    assert reply.status == 403
    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="keygate", error="insufficient_scope"'
    assert reply.body["type"].endswith("insufficient_scope")


@pytest.mark.parametrize(
    ("operations", "allowed", "refused"),
    [
        (["keys:read"], ("GET", "/admin/v1/keys"), ("POST", "/admin/v1/keys/kg_AAAAAAAAAAAA/revoke")),
        (["roles:read"], ("GET", "/admin/v1/roles"), ("DELETE", "/admin/v1/roles/ci")),
        (["audit:read"], ("GET", "/admin/v1/audit"), ("GET", "/admin/v1/keys")),
        (["*:read"], ("GET", "/admin/v1/orgs/default/members"), ("PUT", "/admin/v1/orgs/default/members/bob")),
        (["keys:read"], ("GET", "/admin/v1/keys"), ("GET", "/admin/v1/trust-policies")),
        (["keys:read", "keys:write"], ("GET", "/admin/v1/keys"), ("PUT", "/admin/v1/trust-policies/shop")),
        (["roles:read", "roles:write"], ("GET", "/admin/v1/roles"), ("GET", "/admin/v1/trust-policies/shop")),
        (["trust:read"], ("GET", "/admin/v1/trust-policies"), ("PUT", "/admin/v1/trust-policies/shop")),
        (["trust:read"], ("GET", "/admin/v1/trust-policies"), ("DELETE", "/admin/v1/trust-policies/shop")),
        (["trust:read"], ("GET", "/admin/v1/trust-policies"), ("GET", "/admin/v1/keys")),
        (["*:read"], ("GET", "/admin/v1/trust-policies"), ("PUT", "/admin/v1/trust-policies/shop")),
    ],
)
async def test_403_for_an_operation_not_granted(
    admin: Admin, operations: list[str], allowed: tuple[str, str], refused: tuple[str, str],
) -> None:
    """An admin key may do exactly the operations it is granted."""
    _, key = await admin.key(name="reader", operations=operations, servers=["admin"])
    assert (await admin.call(*allowed, key=key)).status == 200
    reply = await admin.call(*refused, key=key, json={"role": "admin"})
    assert reply.status == 403 and reply.body["type"].endswith("insufficient_scope")


POLICY = {"issuer": "https://token.actions.githubusercontent.com", "audience": "https://keygate.example.com",
          "conditions": {"repository": "acme/shop"}, "org": "acme", "operations": ["deploy"]}


async def test_trust_write_changes_policies_but_does_not_read_them(admin: Admin) -> None:
    """trust:write may PUT and DELETE a policy, not read one; a refused write leaves the store as it was."""
    # Admin keys of the policy's org; the writer may also make the keys the policy yields.
    _, reader = await admin.key(name="reader", org="acme", operations=["trust:read"], servers=["admin"])
    _, writer = await admin.key(name="writer", org="acme", operations=["trust:write", "keys:write:automation",
                                                                       "deploy"], servers=["admin", "*"])
    refused = await admin.call("PUT", "/admin/v1/trust-policies/shop", key=reader, json=POLICY)
    assert refused.status == 403 and await admin.cli.list_trust_policies() == []
    assert (await admin.call("PUT", "/admin/v1/trust-policies/shop", key=writer, json=POLICY)).status == 200
    for method, path in (("GET", "/admin/v1/trust-policies"), ("GET", "/admin/v1/trust-policies/shop")):
        assert (await admin.call(method, path, key=writer)).status == 403
        assert (await admin.call(method, path, key=reader)).status == 200
    assert (await admin.call("DELETE", "/admin/v1/trust-policies/shop", key=writer)).status == 204
    assert await admin.cli.list_trust_policies() == []


async def test_401_for_revoked_key_and_byte_identical_to_unknown(admin: Admin) -> None:
    """A revoked admin key gets the same 401 as a key that never existed."""
    key_id, key = await admin.key(name="admin2", role="admin", servers=["admin"])
    assert (await admin.call("GET", "/admin/v1/keys", key=key)).status == 200
    await admin.cli.revoke_key(key_id)
    await admin.rt.watcher.poll()
    same = {"X-Request-Id": "r1"}
    revoked = await admin.call("GET", "/admin/v1/keys", key=key, headers=same)
    unknown = await admin.call("GET", "/admin/v1/keys", key=generate("kg_").full, headers=same)
    assert revoked.status == unknown.status == 401
    assert revoked.headers["WWW-Authenticate"] == 'Bearer realm="keygate", error="invalid_token"'
    assert revoked.body == unknown.body


async def test_403_from_an_address_not_allowed(admin: Admin) -> None:
    """The admin key's IP allowlist applies to the admin API too."""
    _, key = await admin.key(name="far", role="admin", servers=["admin"], ip_allowlist=["10.0.0.0/8"])
    reply = await admin.call("GET", "/admin/v1/keys", key=key)
    assert reply.status == 403 and reply.body["type"].endswith("ip_not_allowed")
    assert "WWW-Authenticate" not in reply.headers


async def test_429_when_the_admin_key_is_rate_limited(admin: Admin) -> None:
    """The admin key's rate limit applies, with Retry-After and RateLimit headers."""
    _, key = await admin.key(name="slow", role="admin", servers=["admin"], rate_limit="2/hour")
    statuses = [(await admin.call("GET", "/admin/v1/roles", key=key)) for _ in range(3)]
    assert [r.status for r in statuses] == [200, 200, 429]
    assert statuses[0].headers["RateLimit-Policy"] == '"key";q=2;w=3600'
    assert int(statuses[2].headers["Retry-After"]) >= 1 and statuses[2].body["status"] == 429


async def test_400_for_two_authorization_headers(admin: Admin) -> None:
    """Two credentials are a malformed request, as on the proxy."""
    async with admin.client.get("/admin/v1/keys", headers=[("Authorization", f"Bearer {admin.root}"),
                                                          ("Authorization", f"Bearer {admin.root}")]) as r:
        assert r.status == 400
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="keygate", error="invalid_request"'


async def test_refusals_are_request_records_in_the_audit_trail(admin: Admin) -> None:
    """Every admin request, refused or not, leaves a request record on the server admin."""
    _, key = await admin.key(name="app-wide", role="admin")
    await admin.call("GET", "/admin/v1/keys", key=key)
    records = await admin.audit(type="request", decision="insufficient_scope")
    assert [(r["server"], r["operation"], r["status"], r["path"]) for r in records] == [
        ("admin", "keys:read", 403, "/admin/v1/keys"),
    ]
