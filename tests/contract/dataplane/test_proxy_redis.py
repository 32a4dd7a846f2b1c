"""Two in-process replicas on one store and one Redis: the whole pipeline with its counters in reach."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import aiohttp
import pytest
import redis.asyncio
from aiohttp.test_utils import TestServer

from gateway.runtime import Runtime, runtime
from gateway.config.schema import Settings
from gateway.quickstart import demo_app
from gateway.manage.service import KeyService, bootstrap
from gateway.store import create_store
from tests.proxy_listener import serving

from ...redis_server import RedisServer

Replica = tuple[Runtime, str]


@pytest.fixture
async def replicas(request: pytest.FixtureRequest, store_url: str, own_redis: RedisServer) -> AsyncIterator[list[Replica]]:
    """Two runtimes (as two replicas would be) in front of the demo upstream, with the policy of the test."""
    policy = getattr(request, "param", "redis")
    upstream = TestServer(demo_app())
    await upstream.start_server()
    settings = Settings.model_validate({
        "store": {"url": store_url}, "keys": {"argon2": {"memory_cost": 1024}},
        "redis": {"url": own_redis.url}, "ratelimit": {"policy": policy},
        "upstreams": [{"name": "app", "url": str(upstream.make_url("/"))}],
    })
    store = create_store(store_url)
    await store.open()
    await bootstrap(store)
    await store.close()
    async with AsyncExitStack() as stack:
        made = []
        for _ in range(2):
            rt = await stack.enter_async_context(runtime(settings))
            made.append((rt, await stack.enter_async_context(serving(rt))))
        yield made
    await upstream.close()


async def commands(url: str, name: str) -> int:
    """How many times Redis has run command ``name`` so far."""
    client = redis.asyncio.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


async def get(http: aiohttp.ClientSession, url: str, key: str) -> int:
    async with http.get(url + "/x", headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status


async def test_second_replica_serves_a_key_without_argon2(replicas: list[Replica]) -> None:
    """A key verified by one replica is served by the other from Redis: no store read, no argon2."""
    (first, url1), (second, url2) = replicas
    _, key = await KeyService(first.store, first.settings, actor="test").create_key(name="ci", role="admin")
    async with aiohttp.ClientSession() as http:
        assert await get(http, url1, key) == 200
        assert await get(http, url2, key) == 200
    assert (first.authenticator.lookup.verifications, second.authenticator.lookup.verifications) == (1, 0)
    assert second.authenticator.lookup.store_reads == 0


@pytest.mark.parametrize(("replicas", "scripts_per_hit"), [("redis", 1), ("local", 0)], indirect=["replicas"])
async def test_cache_hit_costs_only_the_rate_limit_round_trip(
    replicas: list[Replica], own_redis: RedisServer, scripts_per_hit: int
) -> None:
    """On an in-process hit the exact policy makes one script call, the local policy none, and nothing else."""
    (first, url), _ = replicas
    _, key = await KeyService(first.store, first.settings, actor="test").create_key(name="ci", role="admin")
    async with aiohttp.ClientSession() as http:
        assert await get(http, url, key) == 200  # the miss: Redis cache, store, argon2
        before = {name: await commands(own_redis.url, name) for name in ("evalsha", "get", "set", "incr")}
        for _ in range(20):
            assert await get(http, url, key) == 200
        after = {name: await commands(own_redis.url, name) for name in before}
    assert after["evalsha"] - before["evalsha"] == 20 * scripts_per_hit
    assert (after["get"], after["set"], after["incr"]) == (before["get"], before["set"], before["incr"])


async def test_revoke_on_one_replica_is_published_to_the_other(replicas: list[Replica]) -> None:
    """A revoke made through one replica's service with its publisher reaches the other at once."""
    (first, url1), (second, url2) = replicas
    service = KeyService(first.store, first.settings, actor="test")
    record, key = await service.create_key(name="ci", role="admin")
    async with aiohttp.ClientSession() as http:
        assert [await get(http, url, key) for url in (url1, url2)] == [200, 200]
        notifying = KeyService(first.store, first.settings, actor="test", notifier=first.publisher)
        await notifying.revoke_key(record.id)
        deadline = asyncio.get_running_loop().time() + 1.0
        while await get(http, url2, key) != 401 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert await get(http, url2, key) == 401
        assert second.subscriber is not None and second.subscriber.received == 1
