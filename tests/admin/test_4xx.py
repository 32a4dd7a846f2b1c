"""Admin API answers to bad input: 400 malformed JSON, 404 unknown ids, 409 conflicts, 422 invalid fields.
None of them changes anything, and none is a 500."""

from __future__ import annotations

from typing import Any

import pytest

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
        ("GET", "/admin/v1/no-such-endpoint", None),
    ],
)
async def test_404_for_what_does_not_exist(admin: Admin, method: str, path: str, body: Any) -> None:
    """Unknown keys, roles, members and endpoints are 404 problems."""
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


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", KEYS, {"name": "ci"}, "body"),  # neither role nor operations
        ("POST", KEYS, {"name": "ci", "operations": ["Deploy!"]}, "operations.0"),
        ("POST", KEYS, {"name": "ci", "role": "nope"}, "body"),
        ("POST", KEYS, {"name": "ci", "role": "admin", "ip_allowlist": ["10.0.0.300/8"]}, "ip_allowlist.0"),
        ("POST", KEYS, {"name": "ci", "role": "admin", "expires": "yesterday"}, "body"),
        ("POST", KEYS, {"name": "ci", "role": "admin", "rate_limit": "lots"}, "rate_limit"),
        ("POST", KEYS, {"name": "ci", "role": "admin", "kind": "nope"}, "body"),
        ("POST", KEYS, {"name": "ci", "role": "admin", "user": "stranger"}, "body"),
        ("POST", KEYS, {"name": "ci", "role": "admin", "colour": "red"}, "colour"),
        ("POST", KEYS, {"role": "admin"}, "name"),
        ("POST", KEYS, ["not", "an", "object"], "body"),
        ("PUT", "/admin/v1/roles/ci", {"grants": []}, "grants"),
        ("PUT", "/admin/v1/roles/bad name", {"grants": ["read"]}, "body"),
        ("PUT", "/admin/v1/orgs/acme/members/bob", {"role": "nope"}, "body"),
        ("GET", KEYS, None, "query.limit"),
        ("GET", "/admin/v1/audit", None, "query.since"),
        ("GET", "/admin/v1/audit", None, "query.cursor"),
    ],
)
async def test_422_for_invalid_fields(admin: Admin, method: str, path: str, body: Any, field: str) -> None:
    """Invalid input is a 422 problem naming the field (or "body" for a rule across fields)."""
    params = {"GET " + KEYS: {"limit": "501"}, "GET /admin/v1/audit": {}}.get(f"{method} {path}")
    if field == "query.since":
        params = {"since": "last tuesday"}
    elif field == "query.cursor":
        params = {"cursor": "bm9wZQ"}
    reply = await admin.call(method, path, json=body, params=params)
    assert reply.status == 422, reply.body
    assert reply.body["type"] == "urn:keygate:problem:invalid_input"
    if "errors" in reply.body:
        assert [e["field"] for e in reply.body["errors"]][0] == field
    else:
        assert field == "body" and reply.body["detail"]
    assert await admin.cli.list_keys(limit=10) == [await admin.cli.get_key(admin.root_id)]


@pytest.mark.parametrize(
    ("setup", "method", "path", "body"),
    [
        ("revoked", "PATCH", KEYS + "/{id}", {"name": "again"}),
        ("revoked", "POST", KEYS + "/{id}/rotate", {}),
        ("in use", "DELETE", "/admin/v1/roles/ci", None),
        (None, "PUT", "/admin/v1/roles/admin", {"grants": ["read"]}),
        (None, "DELETE", "/admin/v1/roles/admin", None),
    ],
)
async def test_409_for_conflicts(admin: Admin, setup: str | None, method: str, path: str, body: Any) -> None:
    """Changing a revoked key, deleting a role in use or touching the built-in admin role is a 409."""
    key_id = ""
    if setup == "revoked":
        key_id, _ = await admin.key(name="ci", operations=["read"])
        await admin.cli.revoke_key(key_id)
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
