"""503: the store is unreachable; cached keys keep working, others get 503, never 401."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from urllib.parse import urlparse

import aiohttp
import pytest

from .conftest import bearer
from .harness import KEYGATE, Keygate, Upstream, clean_env
from .relay import Relay


@pytest.fixture
async def pg_gateway(upstream: Upstream, pg_database: str, tmp_path) -> AsyncIterator[tuple[Keygate, Relay]]:
    """A gateway on PostgreSQL reached through a relay the test can cut."""
    subprocess.run([KEYGATE, "migrate"], env=clean_env(KEYGATE_STORE__URL=pg_database), check=True,
                   capture_output=True, timeout=60)
    db = urlparse(pg_database)
    relay = Relay(db.hostname or "127.0.0.1", db.port or 5432)
    relayed = pg_database.replace(f"{db.hostname}:{db.port or 5432}", f"127.0.0.1:{relay.port}")
    keygate = Keygate(tmp_path, upstream.url, store_url=relayed)
    # Service calls from the test go straight to the database, not through the relay.
    keygate.start()
    try:
        yield keygate, relay
    finally:
        relay.cut()
        keygate.stop()


async def test_store_down_cached_keys_work_others_503(
    http: aiohttp.ClientSession, pg_gateway: tuple[Keygate, Relay], pg_database: str
) -> None:
    """With the store cut, a cached key still gets 200 and an uncached valid key 503 with Retry-After."""
    keygate, relay = pg_gateway
    keygate.store_url = pg_database
    _, cached = await keygate.key(name="cached", role="admin")
    _, uncached = await keygate.key(name="uncached", role="admin")
    async with http.get(keygate.proxy_url + "/echo", headers=bearer(cached)) as r:
        assert r.status == 200
    relay.cut()
    await asyncio.sleep(0.5)
    async with http.get(keygate.proxy_url + "/echo", headers=bearer(cached)) as r:
        assert r.status == 200
    async with http.get(keygate.proxy_url + "/echo", headers=bearer(uncached)) as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == "5"
        assert json.loads(await r.read())["error"] == "temporarily_unavailable"
    async with http.get(keygate.admin_url + "/readyz") as r:
        assert r.status == 200  # the cache is warm, so keys can still be checked
    relay.restore()
    for _ in range(50):
        async with http.get(keygate.proxy_url + "/echo", headers=bearer(uncached)) as r:
            if r.status == 200:
                break
        await asyncio.sleep(0.2)
    assert r.status == 200  # recovery is automatic
