"""The whole pipeline in-process, on both stores, with its counters in reach."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.config.ratelimit_spec import parse_rate_limit
from gateway.keys import generate
from gateway.models import RequestRecord
from gateway.pipeline.ratelimit import RateLimitDecision, bucket_decision
from gateway.runtime import Runtime, runtime
from gateway.config.schema import Settings
from gateway.quickstart import demo_app
from gateway.manage.service import KeyService, bootstrap
from gateway.store import create_store
from tests.proxy_listener import serving


async def migrated(store_url: str) -> None:
    """A PostgreSQL store is set up (as `keygate migrate` does) before a runtime opens it; SQLite sets itself up."""
    if store_url.startswith("postgres"):
        store = create_store(store_url)
        await store.open()
        try:
            await bootstrap(store)
        finally:
            await store.close()


@pytest.fixture
async def rt(store_url: str) -> AsyncIterator[tuple[Runtime, str]]:
    """A runtime in front of the demo upstream, and the URL of its proxy listener."""
    upstream = TestServer(demo_app())
    await upstream.start_server()
    settings = Settings.model_validate({
        "store": {"url": store_url}, "keys": {"argon2": {"memory_cost": 1024}},
        "upstreams": [{"name": "app", "url": str(upstream.make_url("/"))}],
    })
    await migrated(store_url)
    async with runtime(settings) as runtime_:
        async with serving(runtime_) as url:
            yield runtime_, url
    await upstream.close()


async def test_bad_checksum_costs_no_store_query_and_no_argon2(rt: tuple[Runtime, str]) -> None:
    """Garbage and typos are refused before the cache, the store or argon2 see them."""
    runtime_, url = rt
    service = KeyService(runtime_.store, runtime_.settings, actor="test")
    _, key = await service.create_key(name="ci", role="admin")
    typo = key[:-1] + ("A" if key[-1] != "A" else "B")
    lookup = runtime_.authenticator.lookup
    async with aiohttp.ClientSession() as http:
        for bad in (typo, "kg_" + "A" * 50, "nope", key + "x"):
            async with http.get(url + "/x", headers={"Authorization": f"Bearer {bad}"}) as r:
                assert r.status == 401
        assert (lookup.store_reads, lookup.verifications, lookup.cache.misses) == (0, 0, 0)
        async with http.get(url + "/x", headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
        assert (lookup.store_reads, lookup.verifications) == (1, 1)


async def test_every_dead_key_gets_the_same_bytes(rt: tuple[Runtime, str]) -> None:
    """Unknown id, wrong secret, a key refused from the negative cache, revoked, expired and ex-member keys:
    the proxy's 401s are byte-identical, headers included, though each was refused by another stage."""
    runtime_, url = rt
    service = KeyService(runtime_.store, runtime_.settings, actor="test")
    _, good = await service.create_key(name="good", role="admin")
    revoked_record, revoked = await service.create_key(name="revoked", role="admin")
    expired_record, expired = await service.create_key(name="expired", role="admin", expires="1d")
    await service.set_member("acme", "bob", "admin")
    _, member_key = await service.create_key(name="bob", org="acme", user="bob", role="admin")
    await service.revoke_key(revoked_record.id)
    await service.remove_member("acme", "bob")
    async with runtime_.store.transaction() as tx:
        # No user can set a past expiry; the store can, to simulate time passing.
        await tx.save_key(replace(expired_record, expires_at=datetime.now(UTC) - timedelta(minutes=1)))
    unknown = generate("kg_").full
    wrong = replace(generate("kg_"), key_id=good[:15]).full
    answers = {}
    async with aiohttp.ClientSession() as http:
        # The wrong secret twice: the second is refused from the negative cache, without argon2.
        for name, key in [("unknown", unknown), ("wrong secret", wrong), ("negative cache", wrong),
                          ("revoked", revoked), ("expired", expired), ("ex-member", member_key)]:
            async with http.get(url + "/x", headers={"Authorization": f"Bearer {key}", "X-Request-Id": "same"}) as r:
                headers = {k: v for k, v in r.headers.items() if k != "Date"}
                answers[name] = (r.status, sorted(headers.items()), await r.read())
    assert len(set(map(repr, answers.values()))) == 1, answers
    assert answers["revoked"][0] == 401
    assert runtime_.authenticator.lookup.verifications == 4  # revoked, expired, ex-member and one wrong secret
    # Each was refused for its own reason: the records say which (the client never does).
    await runtime_.recorder.flush()
    async with runtime_.store.read() as tx:
        reasons = [r.reason for r in reversed(await tx.list_requests())]
    assert reasons == ["unknown key or wrong secret", "unknown key or wrong secret", "negative cache", "revoked",
                       "expired", "user is no longer a member of the org"]


async def test_a_client_that_hangs_up_while_its_refusal_is_held_is_recorded_as_refused(
    rt: tuple[Runtime, str],
) -> None:
    """An unknown key's 401 is held (as long as a verification takes); a guesser that does not wait for it
    is still recorded and counted as invalid_token (status 499), never as allowed."""
    runtime_, url = rt
    runtime_.authenticator.lookup.pace = 0.8  # the hold: longer than the client waits
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    unknown = generate("kg_")
    writer.write(f"GET /x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {unknown.full}\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    async with asyncio.timeout(10):
        records = []
        while not records:  # past the hold (0.8 s; longer on a loaded machine)
            await asyncio.sleep(0.1)
            await runtime_.recorder.flush()
            async with runtime_.store.read() as tx:
                records = await tx.list_requests()
    assert [(r.key_id, r.decision, r.status, r.reason) for r in records] == [
        (unknown.key_id, "invalid_token", 499, "unknown key or wrong secret")]
    assert runtime_.gateway.decisions == {"invalid_token": 1}


async def test_decisions_are_counted(rt: tuple[Runtime, str]) -> None:
    """Every request is counted under its decision, allowed or not."""
    runtime_, url = rt
    service = KeyService(runtime_.store, runtime_.settings, actor="test")
    _, key = await service.create_key(name="ci", operations=["read"])
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/x", headers={"Authorization": f"Bearer {key}"}):
            pass
        async with http.post(url + "/x", headers={"Authorization": f"Bearer {key}"}):
            pass
        async with http.get(url + "/x"):
            pass
    assert runtime_.gateway.decisions == {"allowed": 1, "insufficient_scope": 1, "no_credentials": 1}


async def test_failure_and_argon2_settings_reach_the_lookup(store_url: str) -> None:
    """[failures] and keys.argon2.concurrency/queue configure the lookup, calibrated before it serves."""
    await migrated(store_url)
    settings = Settings.model_validate({
        "store": {"url": store_url}, "upstreams": [{"name": "app", "url": "http://127.0.0.1:9"}],
        "keys": {"argon2": {"memory_cost": 1024, "concurrency": 3, "queue": 7}},
        "failures": {"per_client": 4, "per_network": 40, "per_key": 2, "window": 90, "verify_per_second": 0.5},
    })
    async with runtime(settings) as runtime_:
        lookup = runtime_.authenticator.lookup
        failures = lookup.failures
        assert (failures.clients.limit, failures.networks.limit, failures.keys.limit) == (4, 40, 2)
        assert failures.window == 90 and failures.clean_budget.interval == failures.suspect_budget.interval == 2.0
        assert (lookup.verifier.concurrency, lookup.verifier.queue) == (3, 7)
        assert lookup.pace > 0  # one throwaway verification at start


async def test_the_proxys_request_records_have_every_field(store_url: str) -> None:
    """The proxy builds its records and rate-limit decisions field by field (tuple.__new__, which mypy
    does not check against the NamedTuple): each has every field, in order, as the constructor makes it."""
    upstream = TestServer(demo_app())
    await upstream.start_server()
    settings = Settings.model_validate({
        "store": {"url": store_url}, "keys": {"argon2": {"memory_cost": 1024}},
        "upstreams": [{"name": "app", "url": str(upstream.make_url("/"))}],
        "recorder": {"flush_interval": "1h"},  # nothing written (and taken from the buffer) during the test
    })
    await migrated(store_url)
    try:
        async with runtime(settings) as runtime_, serving(runtime_) as url:
            _, key = await KeyService(runtime_.store, runtime_.settings, actor="test").create_key(
                name="ci", role="admin")
            async with aiohttp.ClientSession() as http:
                async with http.get(url + "/hello", headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 200
                    assert r.headers["RateLimit"].startswith('"key";r=')
                async with http.get(url + "/hello") as r:
                    assert r.status == 401
            allowed, refused = list(runtime_.recorder._requests)
            for record in (allowed, refused):
                assert len(record) == len(RequestRecord._fields)
                assert record == RequestRecord(*record[:-1]) and record.id == 0
            assert (allowed.method, allowed.path, allowed.decision, allowed.status, allowed.reason) == (
                "GET", "/hello", "allowed", 200, None)
            assert (refused.key_id, refused.decision, refused.status) == (None, "no_credentials", 401)
    finally:
        await upstream.close()


def test_a_rate_limit_decision_has_every_field() -> None:
    spec = parse_rate_limit("100/minute")
    for allowed in (True, False):
        decision = bucket_decision(allowed, spec, 50.0 if allowed else 0.5)
        assert len(decision) == len(RateLimitDecision._fields)
        assert decision == RateLimitDecision(*decision) and decision.degraded is False
