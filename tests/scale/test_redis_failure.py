"""Redis dies mid-load under two replicas x two workers: no decision changes for cached keys.

The replicas use a ``redis-server`` of this module's own, which the test
kills; PostgreSQL stays up, so uncached keys are still checked against it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from ..e2e.harness import Upstream
from ..redis_server import RedisServer
from .fleet import Fleet, statuses


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def fleet(upstream: Upstream, own_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), upstream, own_redis.url, "kg:", replicas_count=2,
                  policy="redis", extra='on_backend_error = "local"\n')
    try:
        yield fleet.start()
    finally:
        fleet.stop()


async def test_killing_redis_changes_no_decision_for_cached_keys(fleet: Fleet, own_redis: RedisServer) -> None:
    """Allowed, revoked and out-of-scope keys get the same answers before and after Redis dies.

    Rate-limit decisions are the exception by design: they follow on_backend_error (here: per process).
    """
    _, allowed = fleet.create_key("--role", "admin", "--rate-limit", "100000/minute")
    revoked_id, revoked = fleet.create_key("--role", "admin")
    _, scoped = fleet.create_key("--operation", "deploy")
    fleet.cli("keys", "revoke", revoked_id)
    urls = [r.proxy_url for _ in range(6) for r in fleet.replicas]

    async def decisions() -> dict[str, set[int]]:
        return {name: {status for _, status, _ in await statuses(key, urls)}
                for name, key in (("allowed", allowed), ("revoked", revoked), ("scoped", scoped))}

    before = await decisions()
    assert before == {"allowed": {200}, "revoked": {401}, "scoped": {403}}
    stop = asyncio.Event()
    under_load: set[int] = set()

    async def load() -> None:
        while not stop.is_set():
            under_load.update(status for _, status, _ in await statuses(allowed, urls))

    loader = asyncio.create_task(load())
    await asyncio.sleep(0.5)
    own_redis.kill()  # mid-load
    await asyncio.sleep(1.0)
    stop.set()
    await loader
    assert under_load == {200}
    during = await decisions()
    assert during == before
    # The rate limit is now per process (on_backend_error = "local") and says so.
    results = await statuses(allowed, urls)
    assert all(headers.get("X-Keygate-RateLimit-Degraded") == "1" for _, _, headers in results)
    # A new key is still checked against the store.
    _, fresh = fleet.create_key("--role", "admin")
    assert {status for _, status, _ in await statuses(fresh, urls)} == {200}


async def test_requests_recover_global_limits_when_redis_returns(fleet: Fleet, own_redis: RedisServer) -> None:
    """With Redis back, decisions are global again and no longer marked degraded."""
    if own_redis.process is None:
        own_redis.start()
    _, key = fleet.create_key("--role", "admin")
    urls = [r.proxy_url for _ in range(4) for r in fleet.replicas]
    for _ in range(100):
        results = await statuses(key, urls)
        if not any("X-Keygate-RateLimit-Degraded" in h for _, _, h in results):
            break
        await asyncio.sleep(0.1)
    assert {status for _, status, _ in results} == {200}
    assert not any("X-Keygate-RateLimit-Degraded" in h for _, _, h in results)
