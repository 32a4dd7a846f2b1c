"""Admin API successes: every endpoint does its action through the service, and the audit trail
names the admin key as the actor of every change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import Admin

KEYS = "/admin/v1/keys"
# The CLI's --json record: exactly these fields (plus "key" when a key is made).
RECORD_FIELDS = {
    "id", "kind", "name", "org", "user", "role", "operations", "servers", "ip_allowlist", "rate_limit", "agent",
    "created_by", "created_at", "expires_at", "revoked_at", "last_used_at", "last_used_ip", "canary", "leaked_at",
    "status",
}


def secret_part(full_key: str, key_id: str) -> str:
    return full_key[len(key_id):-6]


async def events(admin: Admin, target: str) -> list[tuple[str, str]]:
    """(action, actor) of the management events about ``target``, oldest first."""
    return [(e["action"], e["actor"]) for e in reversed(await admin.audit(type="event", key=target))
            if e["target"] == target]


async def test_create_answers_201_with_the_key_once(admin: Admin) -> None:
    """POST /keys makes the key, shows it once in `key`, and audits the admin key as its creator."""
    body = {"name": "ci", "operations": ["deploy"], "servers": ["prod-1"], "ip_allowlist": ["10.1.2.3/8"],
            "rate_limit": "10/second", "expires": "30d"}
    reply = await admin.call("POST", "/admin/v1/keys", json=body)
    assert reply.status == 201, reply.body
    created = reply.body
    full = created.pop("key")
    assert set(created) == RECORD_FIELDS
    assert full.startswith(created["id"]) and created["status"] == "active"
    assert reply.headers["Location"] == f"/admin/v1/keys/{created['id']}"
    assert created["ip_allowlist"] == ["10.0.0.0/8"] and created["created_by"] == admin.root_id
    assert await events(admin, created["id"]) == [("key.create", admin.root_id)]


async def test_list_and_get_never_show_a_secret(admin: Admin) -> None:
    """GET /keys and GET /keys/{id} answer the record without the secret or its hash."""
    key_id, full = await admin.key(name="ci", operations=["read"])
    listed = await admin.call("GET", KEYS)
    shown = await admin.call("GET", f"{KEYS}/{key_id}")
    assert listed.status == shown.status == 200
    assert [k["id"] for k in listed.body["items"]] == [key_id, admin.root_id]
    assert listed.body["next_cursor"] is None
    assert set(shown.body) == RECORD_FIELDS and shown.body["id"] == key_id
    for reply in (listed, shown):
        text = str(reply.body)
        assert secret_part(full, key_id) not in text and "argon2" not in text


async def test_get_accepts_a_pasted_full_key(admin: Admin) -> None:
    """A leaked key pasted as the id finds its record, as with the CLI."""
    key_id, full = await admin.key(name="ci", operations=["read"])
    reply = await admin.call("GET", f"{KEYS}/{full}")
    assert reply.status == 200 and reply.body["id"] == key_id


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"org": "acme"}, {"acme"}),
        ({"status": "revoked"}, {"revoked"}),
        ({"kind": "automation"}, {"automation"}),
        ({"status": "active", "org": "default"}, {"root", "plain", "automation"}),
    ],
)
async def test_list_filters(admin: Admin, filters: dict[str, str], expected: set[str]) -> None:
    """GET /keys filters by org, user, status and kind."""
    await admin.key(name="plain", operations=["read"])
    await admin.key(name="acme", operations=["read"], org="acme")
    await admin.key(name="automation", operations=["read"], kind="automation")
    revoked, _ = await admin.key(name="revoked", operations=["read"])
    await admin.cli.revoke_key(revoked)
    reply = await admin.call("GET", KEYS, params=filters)
    assert reply.status == 200
    assert {k["name"] for k in reply.body["items"]} == expected


async def test_list_pages_with_a_cursor(admin: Admin) -> None:
    """limit and next_cursor walk every key once, newest first, even when keys are added meanwhile."""
    made = [admin.root_id] + [(await admin.key(name=f"k{i}", operations=["read"]))[0] for i in range(4)]
    seen: list[str] = []
    cursor = None
    while True:
        reply = await admin.call("GET", KEYS, params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert reply.status == 200 and len(reply.body["items"]) <= 2
        if not seen:
            await admin.key(name="late", operations=["read"])  # newer: must not shift later pages
        seen += [k["id"] for k in reply.body["items"]]
        cursor = reply.body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(made))


async def test_patch_changes_only_what_is_given(admin: Admin) -> None:
    """PATCH /keys/{id} changes the given settings, keeps the rest and audits the diff."""
    key_id, _ = await admin.key(name="ci", operations=["read"], rate_limit="5/second")
    reply = await admin.call("PATCH", f"{KEYS}/{key_id}", json={"name": "ci2", "role": "admin", "servers": ["a"]})
    assert reply.status == 200, reply.body
    assert (reply.body["name"], reply.body["role"], reply.body["servers"]) == ("ci2", "admin", ["a"])
    assert (reply.body["operations"], reply.body["rate_limit"]) == (["read"], "5/second")
    cleared = await admin.call("PATCH", f"{KEYS}/{key_id}", json={"rate_limit": None})
    assert cleared.status == 200 and cleared.body["rate_limit"] is None
    assert await events(admin, key_id) == [
        ("key.create", "cli:test"), ("key.update", admin.root_id), ("key.update", admin.root_id),
    ]


async def test_revoke_is_idempotent(admin: Admin) -> None:
    """POST /keys/{id}/revoke revokes once; a second call answers the same revoked record."""
    key_id, _ = await admin.key(name="ci", operations=["read"])
    first = await admin.call("POST", f"{KEYS}/{key_id}/revoke")
    second = await admin.call("POST", f"{KEYS}/{key_id}/revoke")
    assert first.status == second.status == 200
    assert first.body["status"] == "revoked" and first.body["revoked_at"] == second.body["revoked_at"]
    assert await events(admin, key_id) == [("key.create", "cli:test"), ("key.revoke", admin.root_id)]


@pytest.mark.parametrize(("body", "old_status"), [(None, "revoked"), ({"grace": "1h"}, "rotating")])
async def test_rotate_answers_the_new_key_and_the_old_record(
    admin: Admin, body: dict[str, str] | None, old_status: str,
) -> None:
    """POST /keys/{id}/rotate makes a key with the same settings; the old one is revoked now or after grace."""
    old_id, _ = await admin.key(name="ci", operations=["deploy"], servers=["prod-1"])
    reply = await admin.call("POST", f"{KEYS}/{old_id}/rotate", json=body)
    assert reply.status == 201, reply.body
    new = reply.body
    assert new["key"].startswith(new["id"]) and new["id"] != old_id
    assert (new["operations"], new["servers"]) == (["deploy"], ["prod-1"])
    assert new["rotated_from"] == old_id and new["old_key"]["id"] == old_id
    assert new["old_key"]["status"] == old_status and new["old_key_revoked_at"] == new["old_key"]["revoked_at"]
    assert (await admin.call("GET", f"{KEYS}/{old_id}")).body["status"] == old_status
    listed = await admin.call("GET", KEYS, params={"status": old_status})
    assert old_id in [k["id"] for k in listed.body["items"]]
    assert await events(admin, old_id) == [("key.create", "cli:test"), ("key.rotate", admin.root_id)]


async def test_roles_put_get_list_delete(admin: Admin) -> None:
    """PUT makes or replaces a role, GET/list show it, DELETE removes it; each change is audited."""
    made = await admin.call("PUT", "/admin/v1/roles/deployer", json={"grants": ["deploy", "servers:*"]})
    assert made.status == 200 and made.body["grants"] == ["deploy", "servers:*"]
    replaced = await admin.call("PUT", "/admin/v1/roles/deployer", json={"grants": ["deploy"]})
    assert replaced.body["grants"] == ["deploy"] and replaced.body["created_at"] == made.body["created_at"]
    shown = await admin.call("GET", "/admin/v1/roles/deployer")
    listed = await admin.call("GET", "/admin/v1/roles")
    assert shown.body == replaced.body
    assert [r["name"] for r in listed.body["items"]] == ["admin", "deployer"]
    assert (await admin.call("DELETE", "/admin/v1/roles/deployer")).status == 204
    assert (await admin.call("GET", "/admin/v1/roles/deployer")).status == 404
    assert await events(admin, "deployer") == [
        ("role.set", admin.root_id), ("role.set", admin.root_id), ("role.delete", admin.root_id),
    ]


async def test_roles_page(admin: Admin) -> None:
    """GET /roles pages by name with next_cursor."""
    for name in ("a1", "b2", "c3"):
        await admin.cli.put_role(name, ["read"])
    first = await admin.call("GET", "/admin/v1/roles", params={"limit": 2})
    second = await admin.call("GET", "/admin/v1/roles", params={"limit": 2, "cursor": first.body["next_cursor"]})
    assert [r["name"] for r in first.body["items"] + second.body["items"]] == ["a1", "admin", "b2", "c3"]
    assert second.body["next_cursor"] is None


async def test_members_put_list_delete(admin: Admin) -> None:
    """Members are added, listed with their role and removed; each change is audited."""
    added = await admin.call("PUT", "/admin/v1/orgs/acme/members/bob", json={"role": "admin"})
    assert added.status == 200 and (added.body["org"], added.body["user"], added.body["role"]) == ("acme", "bob", "admin")
    listed = await admin.call("GET", "/admin/v1/orgs/acme/members")
    assert [(x["user"], x["role"]) for x in listed.body["items"]] == [("bob", "admin")]
    assert (await admin.call("DELETE", "/admin/v1/orgs/acme/members/bob")).status == 204
    assert (await admin.call("GET", "/admin/v1/orgs/acme/members")).body["items"] == []
    assert await events(admin, "acme/bob") == [("member.set", admin.root_id), ("member.remove", admin.root_id)]


async def test_members_page(admin: Admin) -> None:
    """GET /orgs/{org}/members pages by user with next_cursor, only that org's members."""
    for user in ("carol", "alice", "bob"):
        await admin.cli.set_member("acme", user, "admin")
    await admin.cli.set_member("other", "zed", "admin")
    first = await admin.call("GET", "/admin/v1/orgs/acme/members", params={"limit": 2})
    second = await admin.call("GET", "/admin/v1/orgs/acme/members",
                              params={"limit": 2, "cursor": first.body["next_cursor"]})
    assert [x["user"] for x in first.body["items"] + second.body["items"]] == ["alice", "bob", "carol"]
    assert second.body["next_cursor"] is None


async def test_agent_key_replaces_the_previous_one(admin: Admin) -> None:
    """POST .../agent-key issues the member's key once and revokes their previous agent key."""
    await admin.cli.set_member("acme", "bob", "admin")
    first = await admin.call("POST", "/admin/v1/orgs/acme/members/bob/agent-key")
    second = await admin.call("POST", "/admin/v1/orgs/acme/members/bob/agent-key")
    assert first.status == second.status == 201
    assert first.body["revoked_previous"] is None and second.body["revoked_previous"] == first.body["id"]
    assert second.body["agent"] is True and second.body["key"].startswith(second.body["id"])
    old = await admin.call("GET", f"{KEYS}/{first.body['id']}")
    assert old.body["status"] == "revoked"
    assert await events(admin, first.body["id"]) == [("key.agent", admin.root_id), ("key.revoke", admin.root_id)]


TRUST = "/admin/v1/trust-policies"
POLICY = {"issuer": "https://token.actions.githubusercontent.com", "audience": "https://keygate.example.com",
          "conditions": {"repository": "acme/shop", "ref": "refs/heads/*"}, "org": "acme", "operations": ["deploy"]}
TRUST_FIELDS = {
    "name", "issuer", "audience", "conditions", "org", "role", "operations", "servers", "ip_allowlist", "rate_limit",
    "lifetime", "jwks_file", "created_by", "created_at", "updated_at",
}


async def test_trust_policies_put_get_list_delete(admin: Admin) -> None:
    """PUT creates or replaces the whole policy, GET/list show it as the CLI does, DELETE removes it; all audited."""
    made = await admin.call("PUT", f"{TRUST}/shop", json={
        **POLICY, "servers": ["prod-1"], "ip_allowlist": ["10.1.2.3/8"], "rate_limit": "10/second", "lifetime": "30m",
    })
    assert made.status == 200, made.body
    assert set(made.body) == TRUST_FIELDS and made.body["created_by"] == admin.root_id
    assert made.body["conditions"] == {"ref": "refs/heads/*", "repository": "acme/shop"}
    assert (made.body["ip_allowlist"], made.body["lifetime"], made.body["role"]) == (["10.0.0.0/8"], 1800, None)
    # PUT states the whole policy: what the body leaves out takes its default, not the old value.
    replaced = await admin.call("PUT", f"{TRUST}/shop", json={**POLICY, "operations": [], "role": "admin",
                                                             "lifetime": 600})
    assert replaced.status == 200, replaced.body
    assert (replaced.body["role"], replaced.body["operations"], replaced.body["servers"]) == ("admin", [], ["*"])
    assert (replaced.body["lifetime"], replaced.body["rate_limit"]) == (600, None)
    assert replaced.body["created_at"] == made.body["created_at"]
    shown = await admin.call("GET", f"{TRUST}/shop")
    listed = await admin.call("GET", TRUST)
    assert shown.status == listed.status == 200
    assert shown.body == replaced.body == (await admin.cli.get_trust_policy("shop")).public()
    assert listed.body == {"items": [replaced.body], "next_cursor": None}
    assert (await admin.call("DELETE", f"{TRUST}/shop")).status == 204
    assert (await admin.call("GET", f"{TRUST}/shop")).status == 404
    assert await events(admin, "shop") == [
        ("trust.set", admin.root_id), ("trust.set", admin.root_id), ("trust.remove", admin.root_id),
    ]
    first, second, _ = reversed(await admin.audit(type="event", key="shop"))
    assert first["details"]["before"] is None and first["details"]["operations"] == ["deploy"]
    assert second["details"]["before"]["operations"] == ["deploy"] and second["details"]["role"] == "admin"


async def test_trust_policy_with_a_jwks_file(admin: Admin, tmp_path: Path) -> None:
    """A policy may name a local JWKS file (Kubernetes' API server) instead of the issuer's discovery."""
    jwks = tmp_path / "cluster-jwks.json"
    jwks.write_text(json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "x": "AA", "y": "AA"}]}))
    body = {**POLICY, "issuer": "https://kubernetes.default.svc.cluster.local", "audience": "keygate",
            "conditions": {"sub": "system:serviceaccount:billing:*"}, "jwks_file": str(jwks)}
    reply = await admin.call("PUT", f"{TRUST}/k8s-billing", json=body)
    assert reply.status == 200, reply.body
    assert reply.body["jwks_file"] == str(jwks)


async def test_trust_policies_page(admin: Admin) -> None:
    """GET /trust-policies pages by name with next_cursor."""
    for name in ("c3", "a1", "b2"):
        await admin.cli.put_trust_policy(name, **POLICY)
    first = await admin.call("GET", TRUST, params={"limit": 2})
    second = await admin.call("GET", TRUST, params={"limit": 2, "cursor": first.body["next_cursor"]})
    assert [p["name"] for p in first.body["items"] + second.body["items"]] == ["a1", "b2", "c3"]
    assert second.body["next_cursor"] is None


async def test_audit_pages_and_filters(admin: Admin) -> None:
    """GET /audit filters by key, action and type and pages with next_cursor, newest first."""
    key_id, _ = await admin.key(name="ci", operations=["read"])
    await admin.call("POST", f"{KEYS}/{key_id}/revoke")
    revokes = await admin.call("GET", "/admin/v1/audit", params={"action": "key.revoke"})
    assert [(e["type"], e["target"], e["actor"]) for e in revokes.body["items"]] == [
        ("event", key_id, admin.root_id),
    ]
    mine = await admin.audit(key=admin.root_id, type="request")
    assert {(r["server"], r["decision"]) for r in mine} == {("admin", "allowed")}
    first = await admin.call("GET", "/admin/v1/audit", params={"limit": 1})
    second = await admin.call("GET", "/admin/v1/audit", params={"limit": 1, "cursor": first.body["next_cursor"]})
    assert first.body["items"][0] != second.body["items"][0]
    assert first.body["items"][0]["at"] >= second.body["items"][0]["at"]


async def test_openapi_document_needs_no_key(admin: Admin) -> None:
    """GET /openapi.json answers the OpenAPI 3.1 document without a key."""
    reply = await admin.call("GET", "/admin/v1/openapi.json", key=None)
    assert reply.status == 200 and reply.body["openapi"] == "3.1.0"
    assert reply.body["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
