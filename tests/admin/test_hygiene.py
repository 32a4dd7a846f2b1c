"""Key hygiene in the admin API: canary keys, status idle, allowlist suggestions, and a key's usage per hour."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from gateway.models import RequestRecord

from .conftest import Admin, admin_on

KEYS = "/admin/v1/keys"


async def test_create_a_canary(admin: Admin) -> None:
    """POST /keys with canary: a key without access, shown as a canary; access settings with it are 422."""
    reply = await admin.call("POST", KEYS, json={"name": "decoy", "canary": True})
    assert reply.status == 201, reply.body
    assert (reply.body["canary"], reply.body["role"], reply.body["operations"]) == (True, None, [])
    refused = await admin.call("POST", KEYS, json={"name": "decoy", "canary": True, "role": "admin",
                                                   "operations": ["read"]})
    assert refused.status == 422
    assert [e["field"] for e in refused.body["errors"]] == ["role", "operations"]
    patched = await admin.call("PATCH", f"{KEYS}/{reply.body['id']}", json={"role": "admin"})
    assert patched.status == 422 and "is a canary" in patched.body["detail"]


async def test_status_idle_is_refused_while_idleness_is_off(admin: Admin) -> None:
    """GET /keys?status=idle without keys.idle_after: 422 saying why."""
    reply = await admin.call("GET", KEYS, params={"status": "idle"})
    assert reply.status == 422 and "keys.idle_after is 0" in reply.body["detail"]


async def test_status_idle_lists_the_unused_keys(store_url: str) -> None:
    """With keys.idle_after, a key unused that long is idle in GET /keys and filtered by status=idle."""
    async with admin_on(store_url, keys={"argon2": {"memory_cost": 1024}, "idle_after": 2}) as admin:
        key_id, _ = await admin.key(name="quiet", operations=["read"])
        await asyncio.sleep(2.1)  # (2 s: the admin key's uses below must stay within idle_after of each other)
        assert (await admin.call("GET", f"{KEYS}/{key_id}")).body["status"] == "idle"
        await admin.rt.recorder.flush()  # the admin key's own use: it is not idle
        idle = await admin.call("GET", KEYS, params={"status": "idle"})
        active = await admin.call("GET", KEYS, params={"status": "active"})
        assert [k["id"] for k in idle.body["items"]] == [key_id]
        assert [k["id"] for k in active.body["items"]] == [admin.root_id]


async def test_allowlist_suggestion(admin: Admin) -> None:
    """GET /keys/{id}/allowlist-suggestion: the CIDRs of the key's allowed requests and the command."""
    key_id, _ = await admin.key(name="ci", operations=["read"])
    now = datetime.now(UTC)
    await admin.rt.store.add_request_records([
        RequestRecord(now, key_id, "GET", "/x", "app", "read", "allowed", 200, ip, 1.0)
        for ip in ("203.0.113.7", "203.0.113.7", "203.0.113.9", "2001:db8::1")
    ])
    reply = await admin.call("GET", f"{KEYS}/{key_id}/allowlist-suggestion", params={"max": 2, "days": 7})
    assert reply.status == 200, reply.body
    assert [(c["cidr"], c["requests"], c["addresses"]) for c in reply.body["cidrs"]] == [
        ("203.0.113.0/28", 3, 2), ("2001:db8::1/128", 1, 1)]
    assert reply.body["command"] == (f"keygate keys update {key_id} --allow-ip 203.0.113.0/28 "
                                     "--allow-ip 2001:db8::1/128")
    assert (reply.body["requests"], reply.body["addresses"], reply.body["days"]) == (4, 3, 7)


@pytest.mark.parametrize(
    ("path", "params", "status", "says"),
    [
        ("{id}", {}, 200, "nothing to suggest"),
        ("kg_AAAAAAAAAAAA", {}, 404, "no key with the id"),
        ("{id}", {"max": 0}, 422, "query.max"),
        ("{id}", {"days": 400}, 422, "query.days"),
    ],
)
async def test_allowlist_suggestion_refusals(
    admin: Admin, path: str, params: dict, status: int, says: str,
) -> None:
    """No records: a message and no command; an unknown key 404; max or days out of range 422."""
    key_id, _ = await admin.key(name="unused", operations=["read"])
    reply = await admin.call("GET", f"{KEYS}/{path.format(id=key_id)}/allowlist-suggestion", params=params)
    assert reply.status == status, reply.body
    assert says in str(reply.body)
    if status == 200:
        assert (reply.body["cidrs"], reply.body["command"]) == ([], None)


async def test_key_usage_counts_requests_per_hour_and_decision(admin: Admin) -> None:
    """GET /keys/{id}/usage: the key's request records of the window, per UTC hour and decision."""
    key_id, _ = await admin.key(name="busy", operations=["read"])
    now = datetime.now(UTC)
    await admin.rt.store.add_request_records([
        RequestRecord(now, key_id, "GET", "/x", "app", "read", decision, 200, "203.0.113.7", 1.0)
        for decision in ("allowed", "allowed", "rate_limited")
    ] + [RequestRecord(now - timedelta(hours=200), key_id, "GET", "/x", "app", "read", "allowed", 200, None, 1.0)])
    reply = await admin.call("GET", f"{KEYS}/{key_id}/usage")
    assert reply.status == 200, reply.body
    hour = now.replace(minute=0, second=0, microsecond=0).isoformat().replace("+00:00", "Z")
    assert reply.body["buckets"] == [{"hour": hour, "decision": "allowed", "requests": 2},
                                     {"hour": hour, "decision": "rate_limited", "requests": 1}]
    assert (reply.body["hours"], reply.body["total"]) == (168, 3)
    assert (await admin.call("GET", f"{KEYS}/{key_id}/usage", params={"hours": 201})).body["total"] == 4


@pytest.mark.parametrize(("path", "params", "status", "says"), [
    ("kg_AAAAAAAAAAAA", {}, 404, "no key with the id"),
    ("{id}", {"hours": 0}, 422, "query.hours"),
    ("{id}", {"hours": 745}, 422, "query.hours"),
])
async def test_key_usage_refusals(admin: Admin, path: str, params: dict, status: int, says: str) -> None:
    """An unknown key is 404; a window out of range 422, naming the parameter."""
    key_id, _ = await admin.key(name="unused", operations=["read"])
    reply = await admin.call("GET", f"{KEYS}/{path.format(id=key_id)}/usage", params=params)
    assert reply.status == status, reply.body
    assert says in str(reply.body)
