"""The key a request was judged with is the very one the key cache holds, until a change: on both stores.

A WebSocket's tunnel is held to its key (gateway/dataplane/tunnels.py): as it
opens, a tunnel whose key the cache no longer holds (a change came while its
handshake was judged and relayed) is re-checked. That relies on a lookup
caching the very object it returns, and a hit returning it again.
"""

from __future__ import annotations

import time

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config.schema import Settings
from gateway.manage.service import KeyService, bootstrap
from gateway.pipeline.authenticate import Attempt
from gateway.runtime import runtime
from gateway.store import create_store


async def test_the_cache_holds_the_key_a_request_was_judged_with_until_it_changes(store_url: str) -> None:
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
        judged = []
        for _ in range(3):
            attempt = await authenticator.authenticate(Attempt(), headers, "127.0.0.1", "GET", "/items",
                                                       time.perf_counter())
            judged.append(attempt.key)
        key_id = judged[0].record.id
        assert judged[1] is judged[0] and judged[2] is judged[0]  # looked up once, then cache hits
        assert runtime_.cache.holds(key_id, judged[0])
        runtime_.cache.invalidate_key(key_id)  # a change notice
        assert not runtime_.cache.holds(key_id, judged[0])
        attempt = await authenticator.authenticate(Attempt(), headers, "127.0.0.1", "GET", "/items",
                                                   time.perf_counter())
        assert attempt.key is not judged[0] and runtime_.cache.holds(key_id, attempt.key)
