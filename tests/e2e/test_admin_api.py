"""The admin API as README shows it: the CLI makes the first admin key, then HTTP does the rest,
and the proxy honours every change within a second."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator

import aiohttp
import pytest

from .conftest import bearer
from .harness import KEYGATE, Keygate, Upstream, clean_env


@pytest.fixture(params=["sqlite", "postgres"])
def served(request: pytest.FixtureRequest, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[Keygate]:
    """`keygate serve` on each store (PostgreSQL migrated first, as an operator would)."""
    store_url = ""
    if request.param == "postgres":
        store_url = request.getfixturevalue("pg_database")
        subprocess.run([KEYGATE, "migrate"], env=clean_env(KEYGATE_STORE__URL=store_url), check=True,
                       capture_output=True, timeout=60)
    keygate = Keygate(tmp_path_factory.mktemp("admin-api"), upstream.url, store_url=store_url).start()
    yield keygate
    assert keygate.stop() == 0


def cli(keygate: Keygate, *args: str) -> str:
    done = subprocess.run([KEYGATE, "--config", str(keygate.config_path), *args], env=clean_env(), check=True,
                          capture_output=True, text=True, timeout=60)
    return done.stdout


async def proxy_status(keygate: Keygate, key: str) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.get(keygate.proxy_url + "/echo", headers=bearer(key)) as r:
            return r.status


async def test_bootstrap_with_the_cli_then_manage_over_http(served: Keygate) -> None:
    """CLI admin key -> POST /keys -> the proxy lets the new key in -> revoke over HTTP -> 401 within 1 s."""
    admin = json.loads(cli(served, "keys", "create", "--name", "ops", "--server", "admin", "--role", "admin",
                           "--json"))
    api = served.admin_url + "/admin/v1"
    async with aiohttp.ClientSession(headers=bearer(admin["key"])) as http:
        async with http.post(api + "/keys", json={"name": "ci", "operations": ["read"]}) as r:
            assert r.status == 201
            created = await r.json()
        assert await proxy_status(served, created["key"]) == 200
        async with http.post(f"{api}/keys/{created['id']}/revoke") as r:
            assert r.status == 200 and (await r.json())["status"] == "revoked"
        revoked_at = time.monotonic()
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - revoked_at)))
        assert await proxy_status(served, created["key"]) == 401
    events = json.loads(cli(served, "audit", "--key", created["id"], "--type", "event", "--json"))
    assert [(e["action"], e["actor"]) for e in reversed(events)] == [
        ("key.create", admin["id"]), ("key.revoke", admin["id"]),
    ]


async def test_cli_audit_shows_request_records(served: Keygate) -> None:
    """keygate audit lists the proxy's request records too, filtered by decision."""
    record, key = await served.key(name="ci", operations=["read"])
    assert await proxy_status(served, key) == 200
    async with aiohttp.ClientSession() as http:
        async with http.post(served.proxy_url + "/echo", headers=bearer(key)) as r:
            assert r.status == 403
    deadline = time.monotonic() + 10
    while True:  # records reach the store with the next batch (every 0.2 s in the harness)
        denied = json.loads(cli(served, "audit", "--key", record.id, "--decision", "insufficient_scope", "--json"))
        if denied or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert [(e["type"], e["method"], e["status"]) for e in denied] == [("request", "POST", 403)]
    table = cli(served, "audit", "--key", record.id)
    assert "request:allowed" in table and "request:insufficient_scope" in table and "key.create" in table


async def test_trust_policies_over_http_and_the_cli_see_one_store(served: Keygate) -> None:
    """A key with trust:read/trust:write manages policies over HTTP; the CLI sees them; both are in the audit trail."""
    # An admin key of the policy's org that may make the automation keys the policy yields (issue 20).
    admin = json.loads(cli(served, "keys", "create", "--name", "trust-admin", "--org", "acme", "--server", "admin",
                           "--server", "prod-1", "--operation", "trust:read", "--operation", "trust:write",
                           "--operation", "audit:read", "--operation", "keys:write:automation",
                           "--operation", "deploy", "--json"))
    api = served.admin_url + "/admin/v1"
    policy = {"issuer": "https://token.actions.githubusercontent.com", "audience": "https://keygate.example.com",
              "conditions": {"repository": "acme/shop", "environment": "production"}, "org": "acme",
              "operations": ["deploy"], "servers": ["prod-1"], "lifetime": "10m"}
    async with aiohttp.ClientSession(headers=bearer(admin["key"])) as http:
        async with http.put(api + "/trust-policies/shop", json=policy) as r:
            assert r.status == 200, await r.text()
            made = await r.json()
        assert json.loads(cli(served, "trust", "show", "shop", "--json")) == made
        assert (made["lifetime"], made["created_by"]) == (600, admin["id"])
        async with http.get(api + "/keys") as r:
            assert r.status == 403  # trust:* is no keys:read
        cli(served, "trust", "remove", "shop", "--yes")
        async with http.get(api + "/trust-policies/shop") as r:
            assert r.status == 404
        async with http.get(api + "/audit", params={"type": "event", "key": "shop"}) as r:
            events = (await r.json())["items"]
    assert [(e["action"], e["actor"]) for e in reversed(events)] == [
        ("trust.set", admin["id"]), ("trust.remove", events[0]["actor"]),
    ]
    assert events[0]["actor"].startswith("cli:")
