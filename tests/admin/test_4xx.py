"""Admin API answers to bad input: 400 malformed JSON, 404 unknown ids, 409 conflicts, 422 invalid fields.
None of them changes anything, and none is a 500."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.manage.cursor import encode_cursor
from gateway.manage.service import InvalidInput

from .conftest import Admin

KEYS = "/admin/v1/keys"
UNKNOWN = "kg_AAAAAAAAAAAA"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"{KEYS}/{UNKNOWN}", None),
        ("PATCH", f"{KEYS}/{UNKNOWN}", {"name": "x"}),
        ("POST", f"{KEYS}/{UNKNOWN}/revoke", None),
        ("POST", f"{KEYS}/{UNKNOWN}/rotate", None),
        ("GET", "/admin/v1/roles/nope", None),
        ("DELETE", "/admin/v1/roles/nope", None),
        ("DELETE", "/admin/v1/orgs/acme/members/nobody", None),
        ("POST", "/admin/v1/orgs/acme/members/nobody/agent-key", None),
        ("GET", "/admin/v1/trust-policies/nope", None),
        ("DELETE", "/admin/v1/trust-policies/nope", None),
        ("GET", "/admin/v1/no-such-endpoint", None),
    ],
)
async def test_404_for_what_does_not_exist(admin: Admin, method: str, path: str, body: Any) -> None:
    """Unknown keys, roles, members, trust policies and endpoints are 404 problems."""
    reply = await admin.call(method, path, json=body)
    assert reply.status == 404, reply.body
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert reply.body["type"] == "urn:keygate:problem:not_found"


async def test_404_never_echoes_a_secret(admin: Admin) -> None:
    """A mistyped full key in the path is repeated neither in the answer nor in the audit trail."""
    mistyped = admin.root[:-1] + ("x" if admin.root[-1] != "x" else "y")
    reply = await admin.call("GET", f"{KEYS}/{mistyped}")
    assert reply.status == 404
    secret = mistyped[len(admin.root_id):-6]
    assert secret not in str(reply.body) and secret not in str(dict(reply.headers))
    assert secret not in str(await admin.audit())


@pytest.mark.parametrize(
    ("data", "detail"),
    [(b"{", "not valid JSON"), (b"", "Send a JSON object"), (b"NaN", "not valid JSON"), (b"[" * 100_000, "JSON")],
)
async def test_400_for_a_body_that_is_not_json(admin: Admin, data: bytes, detail: str) -> None:
    """A body that is not JSON is a 400 problem."""
    reply = await admin.call("POST", KEYS, data=data, headers={"Content-Type": "application/json"})
    assert reply.status == 400 and detail in reply.body["detail"]


NAIVE_TIME_CURSOR = encode_cursor(["2026-01-01T00:00:00", "kg_AAAAAAAAAAAA"])


def assert_invalid(reply: Any, field: str) -> None:
    """A 422 problem naming ``field`` first (or "body": a rule across fields, a detail and no field list)."""
    assert reply.status == 422, reply.body
    assert reply.body["type"] == "urn:keygate:problem:invalid_input"
    if "errors" in reply.body:
        assert [e["field"] for e in reply.body["errors"]][0] == field
    else:
        assert field == "body" and reply.body["detail"]


@pytest.mark.parametrize(
    ("method", "path", "body", "params", "field"),
    [
        ("POST", KEYS, {"name": "ci"}, None, "body"),  # neither role nor operations
        ("POST", KEYS, {"name": "ci", "operations": ["Deploy!"]}, None, "operations.0"),
        ("POST", KEYS, {"name": "ci", "role": "nope"}, None, "body"),
        ("POST", KEYS, {"name": "ci", "role": "admin", "ip_allowlist": ["10.0.0.300/8"]}, None, "ip_allowlist.0"),
        ("POST", KEYS, {"name": "ci", "role": "admin", "expires": "yesterday"}, None, "body"),
        ("POST", KEYS, {"name": "ci", "role": "admin", "expires": "9999-12-31T23:59:59-05:00"}, None, "body"),
        ("POST", KEYS, {"name": "ci", "role": "admin", "rate_limit": "lots"}, None, "rate_limit"),
        ("POST", KEYS, {"name": "ci", "role": "admin", "kind": "nope"}, None, "body"),
        ("POST", KEYS, {"name": "ci", "role": "admin", "user": "stranger"}, None, "body"),
        ("POST", KEYS, {"name": "ci", "role": "admin", "colour": "red"}, None, "colour"),
        ("POST", KEYS, {"role": "admin"}, None, "name"),
        ("POST", KEYS, ["not", "an", "object"], None, "body"),
        ("POST", KEYS + "/kg_AAAAAAAAAAAA/rotate", {"grace": "forever"}, None, "body"),
        ("POST", KEYS + "/kg_AAAAAAAAAAAA/rotate", {"grace": [3600]}, None, "grace"),
        ("PUT", "/admin/v1/roles/ci", {"grants": []}, None, "grants"),
        ("PUT", "/admin/v1/roles/bad name", {"grants": ["read"]}, None, "body"),
        ("PUT", "/admin/v1/orgs/acme/members/bob", {"role": "nope"}, None, "body"),
        ("GET", KEYS, None, {"limit": "501"}, "query.limit"),
        ("GET", KEYS, None, {"stauts": "active"}, "query.stauts"),
        ("GET", KEYS, None, {"cursor": NAIVE_TIME_CURSOR}, "query.cursor"),
        ("GET", "/admin/v1/audit", None, {"since": "last tuesday"}, "query.since"),
        ("GET", "/admin/v1/audit", None, {"until": "9999-12-31T23:59:59-05:00"}, "query.until"),
        ("GET", "/admin/v1/audit", None, {"cursor": "bm9wZQ"}, "query.cursor"),
        ("GET", "/admin/v1/roles", None, {"cursor": "%%%"}, "query.cursor"),
    ],
)
async def test_422_for_invalid_fields(
    admin: Admin, method: str, path: str, body: Any, params: dict[str, str] | None, field: str,
) -> None:
    """Invalid input is a 422 problem naming the field (or "body" for a rule across fields), and changes nothing."""
    reply = await admin.call(method, path, json=body, params=params)
    assert_invalid(reply, field)
    assert await admin.cli.list_keys(limit=10) == [await admin.cli.get_key(admin.root_id)]


@pytest.mark.parametrize(
    ("method", "path", "body", "fields"),
    [
        ("POST", KEYS, {"name": "", "org": "bad org", "operations": ["read", "Bad!"], "ip_allowlist": ["nope"]},
         ["name", "org", "operations.1", "ip_allowlist.0"]),
        ("POST", KEYS, {"name": "ci", "kind": "nope", "role": "bad role", "expires": "soon"}, ["role"]),
        ("PATCH", f"{KEYS}/{UNKNOWN}", {"servers": ["bad!"], "rate_limit": "lots"}, ["servers.0", "rate_limit"]),
        ("PUT", "/admin/v1/roles/bad name", {"grants": ["read", "Bad!", "x y"]}, ["grants.1", "grants.2"]),
        ("PUT", "/admin/v1/orgs/bad org/members/bob", {"role": "bad role"}, ["role"]),
    ],
)
async def test_422_lists_every_bad_value_of_the_body(
    admin: Admin, method: str, path: str, body: Any, fields: list[str],
) -> None:
    """Every bad value in the body is listed in field order; a bad path, kind or expiry is told only without one."""
    reply = await admin.call(method, path, json=body)
    assert reply.status == 422, reply.body
    assert [e["field"] for e in reply.body["errors"]] == fields
    listed = "; ".join(f"{e['field']}: {e['message']}" for e in reply.body["errors"])
    assert reply.body["detail"] == f"invalid input: {listed}"


TRUST = "/admin/v1/trust-policies"
POLICY = {"issuer": "https://token.actions.githubusercontent.com", "audience": "https://keygate.example.com",
          "conditions": {"repository": "acme/shop"}, "org": "acme", "operations": ["deploy"]}


def without(name: str) -> dict[str, Any]:
    return {k: v for k, v in POLICY.items() if k != name}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (f"{TRUST}/shop", {**POLICY, "issuer": "http://issuer.example.com"}, "issuer"),
        (f"{TRUST}/shop", {**POLICY, "issuer": "https://issuer.example.com/?tenant=a"}, "issuer"),
        (f"{TRUST}/shop", {**POLICY, "issuer": "issuer.example.com"}, "issuer"),
        (f"{TRUST}/shop", without("issuer"), "issuer"),
        (f"{TRUST}/shop", {**POLICY, "audience": ""}, "audience"),
        (f"{TRUST}/shop", without("audience"), "audience"),
        (f"{TRUST}/shop", {**POLICY, "conditions": {}}, "conditions"),
        (f"{TRUST}/shop", {**POLICY, "conditions": {"ref": "refs/heads/main"}}, "conditions"),
        (f"{TRUST}/shop", {**POLICY, "conditions": {"repository": "*"}}, "conditions"),
        (f"{TRUST}/shop", {**POLICY, "conditions": {"repository": ""}}, "conditions.repository"),
        (f"{TRUST}/shop", {**POLICY, "conditions": {"repository": "acme/shop", "": "x"}}, "conditions."),
        (f"{TRUST}/shop", {**POLICY, "conditions": {"repository": 5}}, "conditions.repository"),
        (f"{TRUST}/shop", {**POLICY, "conditions": ["repository=acme/shop"]}, "conditions"),
        (f"{TRUST}/shop", {**POLICY, "org": "bad org"}, "org"),
        (f"{TRUST}/shop", without("org"), "org"),
        (f"{TRUST}/shop", {**POLICY, "operations": ["Bad!"]}, "operations.0"),
        (f"{TRUST}/shop", {**POLICY, "operations": []}, "body"),  # neither role nor operations
        (f"{TRUST}/shop", {**POLICY, "role": "ghost"}, "body"),
        (f"{TRUST}/shop", {**POLICY, "servers": ["bad!"]}, "servers.0"),
        (f"{TRUST}/shop", {**POLICY, "ip_allowlist": ["nope"]}, "ip_allowlist.0"),
        (f"{TRUST}/shop", {**POLICY, "rate_limit": "lots"}, "rate_limit"),
        (f"{TRUST}/shop", {**POLICY, "lifetime": "2h"}, "lifetime"),
        (f"{TRUST}/shop", {**POLICY, "lifetime": 30}, "lifetime"),
        (f"{TRUST}/shop", {**POLICY, "lifetime": 900.5}, "lifetime"),
        (f"{TRUST}/shop", {**POLICY, "lifetime": [900]}, "lifetime"),
        (f"{TRUST}/shop", {**POLICY, "jwks_file": "keys/jwks.json"}, "jwks_file"),
        (f"{TRUST}/shop", {**POLICY, "jwks_file": "/nonexistent/jwks.json"}, "jwks_file"),
        (f"{TRUST}/shop", {**POLICY, "jwks_file": "/"}, "jwks_file"),
        (f"{TRUST}/shop", {**POLICY, "jwks_file": "/tmp/\u0000jwks.json"}, "jwks_file"),
        (f"{TRUST}/shop", {**POLICY, "colour": "red"}, "colour"),
        (f"{TRUST}/shop", ["not", "an", "object"], "body"),
        (f"{TRUST}/bad name", POLICY, "body"),
        (TRUST, None, "query.cursor"),
    ],
)
async def test_422_for_invalid_trust_policies(admin: Admin, path: str, body: Any, field: str) -> None:
    """A bad trust policy is a 422 problem naming the field (or "body" for a rule across fields), and writes nothing."""
    if body is None:
        reply = await admin.call("GET", path, params={"cursor": "%%%"})
    else:
        reply = await admin.call("PUT", path, json=body)
    assert_invalid(reply, field)
    assert await admin.cli.list_trust_policies() == []
    assert [e for e in await admin.audit(type="event") if e["action"].startswith("trust.")] == []


async def test_422_lists_every_bad_value_of_a_trust_policy(admin: Admin) -> None:
    """Every bad value of a trust policy is listed, in the order of the body's fields."""
    body = {"issuer": "ftp://issuer.example.com", "audience": "", "conditions": {"ref": ""}, "org": "bad org",
            "operations": ["read", "Bad!"], "lifetime": "1d"}
    reply = await admin.call("PUT", f"{TRUST}/shop", json=body)
    assert reply.status == 422, reply.body
    assert [e["field"] for e in reply.body["errors"]] == [
        "issuer", "audience", "conditions.ref", "conditions", "org", "operations.1", "lifetime",
    ]
    with pytest.raises(InvalidInput) as refused:
        await admin.cli.put_trust_policy("shop", **body)
    assert reply.body["errors"] == [{"field": p.field, "message": p.message} for p in refused.value.problems]


async def test_422_is_the_services_refusal(admin: Admin) -> None:
    """The admin API answers with the problems the service (as the CLI runs it) finds in the same values."""
    body = {"name": "ci", "org": "bad org", "servers": ["prod-1", "bad!"], "rate_limit": "lots"}
    with pytest.raises(InvalidInput) as refused:
        await admin.cli.create_key(**body)
    reply = await admin.call("POST", KEYS, json=body)
    assert reply.body["errors"] == [{"field": p.field, "message": p.message} for p in refused.value.problems]


@pytest.mark.parametrize(
    ("setup", "method", "path", "body"),
    [
        ("revoked", "PATCH", KEYS + "/{id}", {"name": "again"}),
        ("revoked", "POST", KEYS + "/{id}/rotate", {}),
        ("rotating", "POST", KEYS + "/{id}/rotate", {"grace": "1h"}),
        ("in use", "DELETE", "/admin/v1/roles/ci", None),
        (None, "PUT", "/admin/v1/roles/admin", {"grants": ["read"]}),
        (None, "DELETE", "/admin/v1/roles/admin", None),
    ],
)
async def test_409_for_conflicts(admin: Admin, setup: str | None, method: str, path: str, body: Any) -> None:
    """Changing a revoked key, rotating a rotating one, deleting a role in use or touching the admin role is a 409."""
    key_id = ""
    if setup == "revoked":
        key_id, _ = await admin.key(name="ci", operations=["read"])
        await admin.cli.revoke_key(key_id)
    elif setup == "rotating":
        key_id, _ = await admin.key(name="ci", operations=["read"])
        await admin.cli.rotate_key(key_id, grace="1h")
    elif setup == "in use":
        await admin.cli.put_role("ci", ["read"])
        await admin.key(name="ci", role="ci")
    reply = await admin.call(method, path.format(id=key_id), json=body)
    assert reply.status == 409, reply.body
    assert reply.body["type"] == "urn:keygate:problem:conflict"


async def test_405_for_a_wrong_method(admin: Admin) -> None:
    """A known path with a method it does not take is a 405 problem with Allow."""
    reply = await admin.call("DELETE", KEYS)
    assert reply.status == 405 and set(reply.headers["Allow"].split(",")) == {"GET", "POST"}
