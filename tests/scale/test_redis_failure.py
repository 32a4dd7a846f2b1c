"""Redis dies mid-load under two replicas x two workers: no decision changes for cached keys.

The replicas use a ``redis-server`` of this module's own, which the test
kills; PostgreSQL stays up, so uncached keys are still checked against it.
Then the same on a Redis Cluster of the module's own: the master holding the
loaded key's bucket dies, its replica takes over, and no answer changes
(while the slot has no master, on_backend_error decides; after, the cluster).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..e2e.harness import Upstream
from ..redis_server import ClusterServers, RedisServer
from .fleet import Fleet, statuses


class OwnRedis:
    """One redis-server or a Redis Cluster of the module's own, and how to take the part under load away."""

    def __init__(self, folder: Path, cluster: bool) -> None:
        self.cluster = ClusterServers(folder).start() if cluster else None
        self.server = None if cluster else RedisServer(folder).start()
        self.url = self.cluster.url if self.cluster is not None else self.server.url  # type: ignore[union-attr]

    def kill_under(self, key_id: str) -> None:
        """Kill the one Redis, or the cluster master that holds ``key_id``'s rate-limit bucket."""
        if self.cluster is not None:
            self.cluster.master_for(f"kg:rl:{{{key_id}}}").kill()
        else:
            assert self.server is not None
            self.server.kill()

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        elif self.server is not None:
            self.server.kill()


@pytest.fixture(scope="module", params=["one-redis", "redis-cluster"])
def own_redis(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    redis = OwnRedis(tmp_path_factory.mktemp("redis"), cluster=request.param == "redis-cluster")
    yield redis
    redis.stop()


@pytest.fixture(scope="module")
def fleet(upstream: Upstream, own_redis: OwnRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), upstream, own_redis.url, "kg:", replicas_count=2,
                  policy="redis", extra='on_backend_error = "local"\n', cluster=own_redis.cluster is not None)
    try:
        yield fleet.start()
    finally:
        fleet.stop()


async def test_killing_redis_changes_no_decision_for_cached_keys(fleet: Fleet, own_redis: OwnRedis) -> None:
    """Allowed, revoked and out-of-scope keys get the same answers before and after Redis (a master) dies.

    Rate-limit decisions are the exception by design: they follow on_backend_error (here: per process).
    """
    allowed_id, allowed = fleet.create_key("--role", "admin", "--rate-limit", "100000/minute")
    revoked_id, revoked = fleet.create_key("--role", "admin")
    _, scoped = fleet.create_key("--operation", "deploy")
    fleet.cli("keys", "revoke", revoked_id, "--yes")
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
    own_redis.kill_under(allowed_id)  # mid-load
    # Past a cluster's failover (node timeout 1 s, then the election): answers must not change across it.
    await asyncio.sleep(1.0 if own_redis.cluster is None else 4.0)
    stop.set()
    await loader
    assert under_load == {200}
    during = await decisions()
    assert during == before
    if own_redis.cluster is None:
        # The rate limit is now per process (on_backend_error = "local") and says so.
        results = await statuses(allowed, urls)
        assert all(headers.get("X-Keygate-RateLimit-Degraded") == "1" for _, _, headers in results)
    # A new key is still checked against the store.
    _, fresh = fleet.create_key("--role", "admin")
    assert {status for _, status, _ in await statuses(fresh, urls)} == {200}


async def test_requests_recover_global_limits_when_redis_returns(fleet: Fleet, own_redis: OwnRedis) -> None:
    """With Redis back (or the dead master's replica promoted), decisions are global again, not marked degraded."""
    if own_redis.server is not None and own_redis.server.process is None:
        own_redis.server.start()
    if own_redis.cluster is not None:
        await asyncio.to_thread(own_redis.cluster.wait_until_healthy)  # every slot has a live master again
    _, key = fleet.create_key("--role", "admin")
    urls = [r.proxy_url for _ in range(4) for r in fleet.replicas]
    for _ in range(100):
        results = await statuses(key, urls)
        if not any("X-Keygate-RateLimit-Degraded" in h for _, _, h in results):
            break
        await asyncio.sleep(0.1)
    assert {status for _, status, _ in results} == {200}
    assert not any("X-Keygate-RateLimit-Degraded" in h for _, _, h in results)
