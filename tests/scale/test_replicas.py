"""Three replicas with two workers each on one PostgreSQL and one Redis (then a Redis Cluster): global limits,
fleet-wide revocation.

Changes come from the CLI and from one replica's admin API (which publishes
through its runtime's ChangePublisher).

Every request goes on a new connection, so SO_REUSEPORT spreads them over
both workers of each replica: six processes decide, one bucket counts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from ..e2e.harness import Upstream
from ..redis_server import SHARED_REDIS_URL, ClusterServers, drop_prefix, unique_prefix
from .fleet import Fleet, by_status, statuses

LIMIT = 30
HOUR = 3600.0


@pytest.fixture(scope="module", params=["one-redis", "redis-cluster"])
def fleet(request: pytest.FixtureRequest, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    prefix = unique_prefix()
    cluster: ClusterServers | None = None
    if request.param == "redis-cluster":
        cluster = request.getfixturevalue("redis_cluster")
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), upstream, cluster.url if cluster else SHARED_REDIS_URL, prefix,
                  policy="redis", cluster=cluster is not None)
    try:
        yield fleet.start()
    finally:
        fleet.stop()
        if cluster is not None:
            cluster.drop_prefix(prefix)
        else:
            drop_prefix(SHARED_REDIS_URL, prefix)


def urls(fleet: Fleet, per_replica: int) -> list[str]:
    return [r.proxy_url for _ in range(per_replica) for r in fleet.replicas]


# --- 200 / 429: one global bucket ------------------------------------------------------------------------


async def test_exact_policy_allows_the_limit_in_total_across_replicas(fleet: Fleet) -> None:
    """A 30/hour key hit 90 times across 3 replicas x 2 workers gets exactly 30 allowed, the rest 429."""
    _, key = fleet.create_key("--role", "admin", "--rate-limit", f"{LIMIT}/hour")
    started = time.monotonic()
    results = await statuses(key, urls(fleet, 30))
    refilled = int((time.monotonic() - started) * LIMIT / HOUR)  # one token per 2 minutes
    counts = by_status(results)
    assert set(counts) <= {200, 429}
    assert LIMIT <= counts[200] <= LIMIT + refilled
    # Every replica refused some: they all saw the one global bucket run dry.
    assert {url for url, status, _ in results if status == 429} == {r.proxy_url for r in fleet.replicas}
    assert not any("X-Keygate-RateLimit-Degraded" in headers for _, _, headers in results)


# --- 401 after a change: every worker of every replica within 1 s ----------------------------------------


@pytest.mark.parametrize("redis", [True, False], ids=["cli-publishes", "cli-without-redis"])
async def test_cli_revoke_is_honoured_by_every_replica_within_a_second(fleet: Fleet, redis: bool) -> None:
    """After `keygate keys revoke` returns, every replica refuses the key within 1 s (notice, or the feed)."""
    key_id, key = fleet.create_key("--role", "admin")
    assert by_status(await statuses(key, urls(fleet, 8))) == {200: 24}  # cached on (nearly) every worker
    await asyncio.to_thread(fleet.cli, "keys", "revoke", key_id, "--yes", redis=redis)
    await asyncio.sleep(1.0)
    assert by_status(await statuses(key, urls(fleet, 10))) == {401: 30}


async def test_role_change_reaches_every_replica_within_a_second(fleet: Fleet) -> None:
    """Narrowing a role takes effect on every replica within 1 s: its keys get 403."""
    fleet.cli("roles", "set", "scale-ops", "--grant", "read")
    _, key = fleet.create_key("--role", "scale-ops")
    assert by_status(await statuses(key, urls(fleet, 8))) == {200: 24}
    await asyncio.to_thread(fleet.cli, "roles", "set", "scale-ops", "--grant", "deploy")
    await asyncio.sleep(1.0)
    assert by_status(await statuses(key, urls(fleet, 10))) == {403: 30}


@asynccontextmanager
async def changes_channel(fleet: Fleet) -> AsyncIterator[Any]:
    """A subscription to the fleet's change notices, as every serving worker has (sharded on a cluster)."""
    channel = fleet.redis_prefix + "changes"
    if fleet.cluster:
        async with redis.asyncio.RedisCluster.from_url(fleet.redis_url) as cluster:
            node = cluster.get_node_from_key(channel)
        client = redis.asyncio.Redis(host=node.host, port=node.port)
    else:
        client = redis.asyncio.Redis.from_url(fleet.redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await (pubsub.ssubscribe(channel) if fleet.cluster else pubsub.subscribe(channel))
        yield pubsub
    finally:
        await pubsub.aclose()
        await client.aclose()


async def next_notice(pubsub: Any) -> Any:
    """The next notice's [entity, target] pairs; each carries when the change was made, within seconds of now."""
    for _ in range(50):
        message = await pubsub.get_message(timeout=0.1)
        if message is not None:
            notice = json.loads(message["data"])
            for _entity, _target, made in notice:
                assert abs(time.time() - made) < 30, notice  # the time subscribers measure propagation from
            return [[entity, target] for entity, target, _made in notice]
    return None


async def test_cli_publishes_its_changes_on_redis(fleet: Fleet) -> None:
    """With redis.url set, `keygate keys revoke` announces the change on <prefix>changes."""
    key_id, _ = fleet.create_key("--role", "admin")
    async with changes_channel(fleet) as pubsub:
        await asyncio.to_thread(fleet.cli, "keys", "revoke", key_id, "--yes")
        assert await next_notice(pubsub) == [["key", key_id]]


# --- admin API on one replica: its changes reach all, and are published on Redis ----------------------


async def admin_call(replica_admin_url: str, admin_key: str, method: str, path: str, body: Any = None) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, replica_admin_url + "/admin/v1" + path, json=body,
                                headers={"Authorization": f"Bearer {admin_key}"}) as r:
            await r.read()
            return r.status


@pytest.fixture(scope="module")
def admin_key(fleet: Fleet) -> str:
    """An admin key bootstrapped with the CLI, as an operator's first step."""
    _, key = fleet.create_key("--server", "admin", "--role", "admin")
    return key


async def test_admin_api_revoke_on_one_replica_is_honoured_by_every_replica_within_a_second(
    fleet: Fleet, admin_key: str,
) -> None:
    """A revoke through replica A's admin API: within 1 s every worker of every replica answers 401."""
    key_id, key = fleet.create_key("--role", "admin")
    assert by_status(await statuses(key, urls(fleet, 8))) == {200: 24}  # cached on (nearly) every worker
    assert await admin_call(fleet.replicas[0].admin_url, admin_key, "POST", f"/keys/{key_id}/revoke") == 200
    await asyncio.sleep(1.0)
    assert by_status(await statuses(key, urls(fleet, 10))) == {401: 30}


@pytest.mark.parametrize(("method", "path", "body", "notice"), [
    ("POST", "/keys/{id}/revoke", None, [["key", "{id}"]]),
    ("PATCH", "/keys/{id}", {"ip_allowlist": ["10.0.0.0/8"]}, [["key", "{id}"]]),
    ("POST", "/keys/{id}/rotate", {}, [["key", "{id}"]]),
    ("PUT", "/roles/scale-notice", {"grants": ["read"]}, [["role", "scale-notice"]]),
    ("PUT", "/orgs/scale/members/alice", {"role": "admin"}, [["member", "scale/alice"]]),
], ids=["revoke", "patch", "rotate", "role", "member"])
async def test_admin_api_publishes_its_changes_on_redis(
    fleet: Fleet, admin_key: str, method: str, path: str, body: Any, notice: list[list[str]],
) -> None:
    """Each authorization change made through a replica's admin API is announced on <prefix>changes."""
    key_id, _ = fleet.create_key("--role", "admin")
    async with changes_channel(fleet) as pubsub:
        status = await admin_call(fleet.replicas[1].admin_url, admin_key, method, path.format(id=key_id), body)
        assert status in (200, 201)
        assert await next_notice(pubsub) == [[entity, target.format(id=key_id)] for entity, target in notice]
