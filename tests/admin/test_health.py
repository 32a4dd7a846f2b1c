"""/healthz and /readyz on the admin listener."""

from __future__ import annotations

from .conftest import Admin


async def test_healthz_is_ok_without_a_key(admin: Admin) -> None:
    """Liveness needs no key and says ok."""
    async with admin.client.get("/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"


async def test_readyz_is_503_while_draining(admin: Admin) -> None:
    """Ready when the store is reachable; 503 once draining has begun."""
    async with admin.client.get("/readyz") as r:
        assert r.status == 200 and (await r.json())["ready"] is True
    admin.rt.draining = True
    async with admin.client.get("/readyz") as r:
        assert r.status == 503 and (await r.json())["draining"] is True


async def test_readyz_is_503_without_store_or_warm_cache(admin: Admin) -> None:
    """With the store unreachable and nothing cached, keys cannot be checked: not ready."""
    await admin.rt.watcher.close()  # it would find the store again
    admin.rt.watcher.store_ok = False
    admin.rt.cache.clear()
    async with admin.client.get("/readyz") as r:
        body = await r.json()
    assert r.status == 503 and (body["store"], body["cached_keys"]) == (False, 0)
