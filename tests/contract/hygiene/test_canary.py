"""Canary keys against both stores: what the service accepts, and every use through the real pipeline."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.config.schema import Settings
from gateway.keys import SECRET_LENGTH, ParsedKey, generate, random_base62
from gateway.manage.service import InvalidInput, KeyService
from gateway.quickstart import demo_app
from gateway.runtime import Runtime, runtime
from gateway.store import KeyStore
from tests.proxy_listener import serving

from ..dataplane.test_proxy import migrated

HOOK = "https://hooks.example/canaries"


# -- the service -------------------------------------------------------------------------------

async def test_a_canary_is_created_without_access_and_shown_as_one(service: KeyService, store: KeyStore) -> None:
    """A canary needs no role or operations; its record, audit event and public view say it is one."""
    record, full = await service.create_key(name="decoy in .env", canary=True, expires="90d")
    assert full.startswith(record.id) and record.id.startswith("kg_")  # it looks like any key
    assert (record.canary, record.role, record.operations, record.servers) == (True, None, (), ("*",))
    stored = await store.get_key(record.id)
    assert stored is not None and stored.canary and stored.public(service.clock())["canary"] is True
    async with store.read() as tx:
        [created] = await tx.list_audit(key=record.id, action="key.create")
    assert created.details["canary"] is True


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"role": "admin"}, "role"),
        ({"operations": ["deploy"]}, "operations"),
        ({"servers": ["prod-1"]}, "servers"),
        ({"ip_allowlist": ["10.0.0.0/8"]}, "ip_allowlist"),
        ({"rate_limit": "10/minute"}, "rate_limit"),
    ],
)
async def test_a_canary_refuses_settings_that_would_grant_access(
    service: KeyService, store: KeyStore, given: dict, field: str,
) -> None:
    """Access settings given with --canary are refused (not silently dropped), and nothing is written."""
    with pytest.raises(InvalidInput, match="canary key never authorizes") as refused:
        await service.create_key(name="decoy", canary=True, **given)
    assert [p.field for p in refused.value.problems] == [field]
    assert await service.list_keys() == []


@pytest.mark.parametrize(
    ("change", "allowed"),
    [
        ({"name": "renamed decoy"}, True),
        ({"expires": "30d"}, True),
        ({"role": "admin"}, False),
        ({"operations": ["deploy"]}, False),
        ({"servers": ["admin"]}, False),
        ({"ip_allowlist": ["10.0.0.0/8"]}, False),
        ({"rate_limit": "1/second"}, False),
    ],
)
async def test_a_canary_cannot_be_updated_into_a_real_key(
    service: KeyService, change: dict, allowed: bool,
) -> None:
    """Only a canary's name and expiry change; anything that would let it authorize is refused."""
    record, _ = await service.create_key(name="decoy", canary=True)
    if allowed:
        assert (await service.update_key(record.id, **change)).canary
    else:
        with pytest.raises(InvalidInput, match="is a canary"):
            await service.update_key(record.id, **change)
        assert (await service.get_key(record.id)) == record


async def test_set_role_is_refused_and_rotation_makes_a_new_canary(service: KeyService) -> None:
    """keys set-role is refused for a canary; rotating one (a tripped decoy replaced) yields a canary again."""
    record, _ = await service.create_key(name="decoy", canary=True)
    with pytest.raises(InvalidInput, match="is a canary"):
        await service.set_role(record.id, "admin")
    new, full, old = await service.rotate_key(record.id)
    assert new.canary and full.startswith(new.id) and old.revoked_at is not None


# -- every use, through the pipeline --------------------------------------------------------

@pytest.fixture
async def rt(store_url: str) -> AsyncIterator[tuple[Runtime, str]]:
    """A runtime (webhook configured) in front of the demo upstream, and its proxy listener's URL."""
    upstream = TestServer(demo_app())
    await upstream.start_server()
    settings = Settings.model_validate({
        "store": {"url": store_url}, "keys": {"argon2": {"memory_cost": 1024}},
        "upstreams": [{"name": "app", "url": str(upstream.make_url("/"))}],
        "webhooks": [{"url": HOOK, "secret": "s" * 16, "events": ["key.canary_used"]}],
        "recorder": {"flush_interval": 3600},  # flushed by the test
    })
    await migrated(store_url)
    async with runtime(settings) as runtime_:
        async with serving(runtime_) as url:
            yield runtime_, url
    await upstream.close()


async def test_every_use_is_an_unknown_key_s_401_and_an_alarm(rt: tuple[Runtime, str]) -> None:
    """A canary's first use (from the store) and its next (from the cache) get an unknown key's exact bytes;
    each use is written with the next batch: an audit event and a key.canary_used webhook."""
    runtime_, url = rt
    service = KeyService(runtime_.store, runtime_.settings, actor="test")
    canary, full = await service.create_key(name="decoy", canary=True)
    unknown = generate("kg_").full
    answers = []
    async with aiohttp.ClientSession() as http:
        for key, path in [(unknown, "/x"), (full, "/x"), (full, "/x")]:
            headers = {"Authorization": f"Bearer {key}", "X-Request-Id": "same", "User-Agent": "curl/8.5.0"}
            async with http.get(url + path, headers=headers) as r:
                answers.append((r.status, sorted((k, v) for k, v in r.headers.items() if k != "Date"),
                                await r.read()))
        assert answers[0][0] == 401 and answers[0] == answers[1] == answers[2]
        async with http.post(url + f"/deploy/{full}?token={full}",
                             headers={"Authorization": f"Bearer {full}", "User-Agent": f"stolen {full}"}) as r:
            assert r.status == 401
    assert runtime_.store is not None
    async with runtime_.store.read() as tx:
        assert await tx.list_audit(key=canary.id, action="key.canary_used") == []  # not on the request path
    await runtime_.recorder.flush()
    async with runtime_.store.read() as tx:
        uses = [e for e in reversed(await tx.list_audit(key=canary.id, action="key.canary_used"))]
        hooks = [json.loads(d.body) for d in reversed(await tx.list_webhooks(key_id=canary.id))]
        reasons = {r.reason for r in await tx.list_requests(key_id=canary.id)}
    assert [(u.actor, u.details) for u in uses[:2]] == [("client:127.0.0.1", {
        "client_ip": "127.0.0.1", "method": "GET", "path": "/x", "user_agent": "curl/8.5.0", "request_id": "same"})] * 2
    # SECURITY: a key pasted into the path or the user agent is shown as its id only (the query is not kept).
    fresh = uses[2].details.pop("request_id")  # none sent: the one Keygate made for it
    assert isinstance(fresh, str) and len(fresh) == 32 and fresh != "same"
    assert uses[2].details == {"client_ip": "127.0.0.1", "method": "POST", "path": f"/deploy/{canary.id}",
                               "user_agent": f"stolen {canary.id}"}
    assert full not in json.dumps([u.details for u in uses]) and full not in json.dumps(hooks)
    assert [h["event"] for h in hooks] == ["key.canary_used"] * 3
    assert hooks[0]["details"]["client_ip"] == "127.0.0.1" and hooks[0]["key"]["canary"] is True
    assert reasons == {"canary key used"}  # the operator's records say why; the client never learns


async def test_a_revoked_canary_still_raises_the_alarm(rt: tuple[Runtime, str]) -> None:
    """Nobody has a reason to hold a decoy, whatever its state: a revoked canary's use is an alarm too."""
    runtime_, url = rt
    service = KeyService(runtime_.store, runtime_.settings, actor="test")
    canary, full = await service.create_key(name="decoy", canary=True)
    await service.revoke_key(canary.id)
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/x", headers={"Authorization": f"Bearer {full}"}) as r:
            assert r.status == 401
    await runtime_.recorder.flush()
    async with runtime_.store.read() as tx:
        assert len(await tx.list_audit(key=canary.id, action="key.canary_used")) == 1


async def _onset_of_429(store_url: str, suspect_is_canary: bool) -> list[int]:
    """The failure limiter's answers after one use of the suspect: one unknown key, then a fresh id twice
    (right length, random secrets). With failures.per_client = 2 the suspect decides whether the last is 429."""
    upstream = TestServer(demo_app())
    await upstream.start_server()
    settings = Settings.model_validate({
        "store": {"url": store_url}, "keys": {"argon2": {"memory_cost": 1024}},
        "upstreams": [{"name": "app", "url": str(upstream.make_url("/"))}], "failures": {"per_client": 2},
    })
    await migrated(store_url)
    statuses = []
    try:
        async with runtime(settings) as runtime_, serving(runtime_) as url:
            _, canary = await KeyService(runtime_.store, runtime_.settings, actor="test").create_key(
                name="decoy", canary=True)
            fresh = generate("kg_")
            twin = ParsedKey(fresh.prefix, fresh.key_id, random_base62(SECRET_LENGTH)).full  # valid checksum
            probes = [canary if suspect_is_canary else generate("kg_").full, generate("kg_").full, fresh.full, twin]
            async with aiohttp.ClientSession() as http:
                for key in probes:
                    async with http.get(url + "/x", headers={"Authorization": f"Bearer {key}"}) as r:
                        statuses.append(r.status)
    finally:
        await upstream.close()
    return statuses


async def test_the_failure_limiter_counts_a_canary_as_an_unknown_key(store_url: str) -> None:
    """SECURITY: the onset of 429 after a canary's use is the one after an unknown key's, so the limiter is no
    oracle telling a decoy from a key that does not exist."""
    assert await _onset_of_429(store_url, suspect_is_canary=True) == await _onset_of_429(
        store_url, suspect_is_canary=False)
