"""Whether a request's key came from the cache or from a lookup, on both stores (tunnels rely on it).

A WebSocket's tunnel is held to its key (gateway/dataplane/tunnels.py); a key
that a lookup read may come from a store read that began before a change, so
its tunnel is re-checked as it opens. The authenticator says which it was.
"""

from __future__ import annotations

import time

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config.schema import Settings
from gateway.manage.service import KeyService, bootstrap
from gateway.pipeline.authenticate import Attempt
from gateway.runtime import runtime
from gateway.store import create_store


async def test_a_key_is_looked_up_once_then_found_in_the_cache(store_url: str) -> None:
    settings = Settings.model_validate({
        "store": {"url": store_url}, "keys": {"argon2": {"memory_cost": 1024}},
        "upstreams": [{"name": "app", "url": "http://127.0.0.1:9"}],
    })
    if store_url.startswith("postgres"):
        store = create_store(store_url)
        await store.open()
        await bootstrap(store)
        await store.close()
    async with runtime(settings) as runtime_:
        _, key = await KeyService(runtime_.store, runtime_.settings, actor="test").create_key(name="ci", role="admin")
        headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {key}"}))
        authenticator = runtime_.gateway.authenticator
        seen = []
        for _ in range(3):
            attempt = await authenticator.authenticate(Attempt(), headers, "127.0.0.1", "GET", "/items",
                                                       time.perf_counter())
            seen.append(attempt.looked_up)
        assert seen == [True, False, False]
        runtime_.cache.invalidate_key(attempt.key_id)  # a change notice: the next one is looked up again
        attempt = await authenticator.authenticate(Attempt(), headers, "127.0.0.1", "GET", "/items",
                                                   time.perf_counter())
        assert attempt.looked_up
