"""The whole pipeline in-process, on both stores, with its counters in reach."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import RawTestServer, TestServer

from gateway.runtime import Runtime, runtime
from gateway.config.schema import Settings
from gateway.quickstart import demo_app
from gateway.manage.service import KeyService


@pytest.fixture
async def rt(store_url: str) -> AsyncIterator[tuple[Runtime, str]]:
    """A runtime in front of the demo upstream, and the URL of its proxy listener."""
    upstream = TestServer(demo_app())
    await upstream.start_server()
    settings = Settings.model_validate({
        "store": {"url": store_url}, "keys": {"argon2": {"memory_cost": 1024}},
        "upstreams": [{"name": "app", "url": str(upstream.make_url("/"))}],
    })
    if store_url.startswith("postgres"):
        from gateway.manage.service import bootstrap
        from gateway.store import create_store

        store = create_store(store_url)
        await store.open()
        await bootstrap(store)
        await store.close()
    async with runtime(settings) as runtime_:
        proxy = RawTestServer(runtime_.gateway.handle)
        await proxy.start_server()
        try:
            yield runtime_, str(proxy.make_url(""))
        finally:
            await proxy.close()
    await upstream.close()


async def test_bad_checksum_costs_no_store_query_and_no_argon2(rt: tuple[Runtime, str]) -> None:
    """Garbage and typos are refused before the cache, the store or argon2 see them."""
    runtime_, url = rt
    service = KeyService(runtime_.store, runtime_.settings, actor="test")
    _, key = await service.create_key(name="ci", role="admin")
    typo = key[:-1] + ("A" if key[-1] != "A" else "B")
    lookup = runtime_.gateway.lookup
    async with aiohttp.ClientSession() as http:
        for bad in (typo, "kg_" + "A" * 50, "nope", key + "x"):
            async with http.get(url + "/x", headers={"Authorization": f"Bearer {bad}"}) as r:
                assert r.status == 401
        assert (lookup.store_reads, lookup.verifications, lookup.cache.misses) == (0, 0, 0)
        async with http.get(url + "/x", headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
        assert (lookup.store_reads, lookup.verifications) == (1, 1)


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
    if store_url.startswith("postgres"):
        from gateway.manage.service import bootstrap
        from gateway.store import create_store

        store = create_store(store_url)
        await store.open()
        await bootstrap(store)
        await store.close()
    settings = Settings.model_validate({
        "store": {"url": store_url}, "upstreams": [{"name": "app", "url": "http://127.0.0.1:9"}],
        "keys": {"argon2": {"memory_cost": 1024, "concurrency": 3, "queue": 7}},
        "failures": {"per_client": 4, "per_network": 40, "per_key": 2, "window": 90, "verify_per_second": 0.5},
    })
    async with runtime(settings) as runtime_:
        lookup = runtime_.gateway.lookup
        failures = lookup.failures
        assert (failures.clients.limit, failures.networks.limit, failures.keys.limit) == (4, 40, 2)
        assert failures.window == 90 and failures.clean_budget.interval == failures.suspect_budget.interval == 2.0
        assert (lookup.verifier.concurrency, lookup.verifier.queue) == (3, 7)
        assert lookup.pace > 0  # one throwaway verification at start
