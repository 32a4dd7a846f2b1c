"""Change notices over a real Redis: published changes reach subscribers; a lost connection clears the cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from gateway.cache.local import KeyCache
from gateway.config.schema import RedisSettings, Settings
from gateway.cache.change_feed import ChangeWatcher
from gateway.cache.notices import ChangePublisher, ChangeSubscriber, change_publisher
from gateway.cache.redis_link import RedisLink
from gateway.manage.service import KeyService, NotFound
from gateway.cache.shared import KeyFacts, SharedKeyCache
from gateway.store import KeyStore

from ...redis_server import RedisServer
from ...waiting import until


def a_cache() -> KeyCache[object]:
    cache: KeyCache[object] = KeyCache(ttl=30, negative_ttl=5, stale_if_error=300, max_entries=100)
    cache.put("digest-a", "kg_AAAAAAAAAAAA", "a")
    cache.put("digest-b", "kg_BBBBBBBBBBBB", "b")
    return cache


@pytest.fixture
def redis_settings(redis_on_both: RedisSettings) -> RedisSettings:
    """Every test here holds on one Redis and on a Redis Cluster."""
    return redis_on_both


@pytest.fixture
async def subscribed(redis_settings: RedisSettings) -> AsyncIterator[tuple[ChangeSubscriber, KeyCache[object]]]:
    cache = a_cache()
    subscriber = ChangeSubscriber(redis_settings, cache)
    await subscriber.start()
    await asyncio.wait_for(subscriber.connected.wait(), 5)
    yield subscriber, cache
    await subscriber.close()


@pytest.fixture
def publisher(link: RedisLink) -> ChangePublisher:
    return ChangePublisher(link, SharedKeyCache(link, ttl=30, negative_ttl=5))


async def test_key_change_drops_that_key_in_every_subscriber(
    subscribed: tuple[ChangeSubscriber, KeyCache[object]], publisher: ChangePublisher
) -> None:
    """A published key change drops exactly that key's entries."""
    subscriber, cache = subscribed
    assert await publisher.publish([("key", "kg_AAAAAAAAAAAA")])
    assert await until(lambda: subscriber.received == 1)
    assert (cache.get("digest-a"), cache.get("digest-b")) == (None, "b")


@pytest.mark.parametrize("entity", ["role", "member"])
async def test_role_or_member_change_clears_every_subscriber(
    subscribed: tuple[ChangeSubscriber, KeyCache[object]], publisher: ChangePublisher, entity: str
) -> None:
    """A published role or member change empties the in-process cache."""
    subscriber, cache = subscribed
    await publisher.publish([(entity, "ci")])
    assert await until(lambda: subscriber.received == 1)
    assert len(cache) == 0


@pytest.mark.parametrize(("clock_offset", "observed"), [(0.25, 0.25), (-3.0, 0.0)])
async def test_a_notice_carries_the_changes_time_and_its_delay_is_observed(
    redis_settings: RedisSettings, publisher: ChangePublisher, clock_offset: float, observed: float,
) -> None:
    """A subscriber observes now minus the change's time once per change; a clock behind the changer's is 0."""
    made = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    delays: list[float] = []
    subscriber = ChangeSubscriber(redis_settings, a_cache(), observe_delay=delays.append,
                                  clock=lambda: made.timestamp() + clock_offset)
    await subscriber.start()
    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        assert await publisher.publish([("key", "kg_AAAAAAAAAAAA"), ("key", "kg_BBBBBBBBBBBB")], at=made)
        assert await until(lambda: subscriber.received == 1)
    finally:
        await subscriber.close()
    assert delays == [pytest.approx(observed)] * 2


async def test_a_notice_without_a_time_is_applied_and_not_observed(
    redis_settings: RedisSettings, link: RedisLink,
) -> None:
    """A notice of an older publisher ([entity, target] only) still drops the key; no delay is made up."""
    delays: list[float] = []
    cache = a_cache()
    subscriber = ChangeSubscriber(redis_settings, cache, observe_delay=delays.append)
    await subscriber.start()
    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        message = '[["key", "kg_AAAAAAAAAAAA"]]'
        if link.cluster:
            await link.run(lambda r: r.spublish(subscriber.channel, message))
        else:
            await link.run(lambda r: r.publish(subscriber.channel, message))
        assert await until(lambda: subscriber.received == 1)
    finally:
        await subscriber.close()
    assert cache.get("digest-a") is None and delays == []


async def test_unreadable_notice_clears_the_cache(
    subscribed: tuple[ChangeSubscriber, KeyCache[object]], link: RedisLink
) -> None:
    """A message that is not a change list is read as 'anything may have changed'."""
    _, cache = subscribed
    publish = link.client.spublish if link.cluster else link.client.publish
    await publish(link.key("changes"), b"garbage")
    assert await until(lambda: len(cache) == 0)


async def test_service_publishes_after_commit(
    store: KeyStore, service: KeyService, subscribed: tuple[ChangeSubscriber, KeyCache[object]],
    publisher: ChangePublisher,
) -> None:
    """A revoke through a service with a notifier reaches subscribers."""
    subscriber, cache = subscribed
    record, _ = await service.create_key(name="ci", role="admin")
    cache.put("digest-c", record.id, "c")
    notifying = KeyService(store, service.settings, actor="test:bob", notifier=publisher)
    await notifying.revoke_key(record.id)
    assert await until(lambda: cache.get("digest-c") is None)


async def test_refused_change_publishes_nothing(
    store: KeyStore, service: KeyService, subscribed: tuple[ChangeSubscriber, KeyCache[object]],
    publisher: ChangePublisher,
) -> None:
    """A change the service refuses is not announced."""
    subscriber, _ = subscribed
    notifying = KeyService(store, service.settings, actor="test:bob", notifier=publisher)
    with pytest.raises(NotFound):
        await notifying.revoke_key("kg_ZZZZZZZZZZZZ")
    await publisher.publish([("key", "kg_BBBBBBBBBBBB")])  # a marker behind it
    assert await until(lambda: subscriber.received == 1)
    assert subscriber.received == 1


async def test_subscriber_clears_its_cache_when_it_reconnects(own_redis: RedisServer) -> None:
    """Notices may have been missed while Redis was gone, so a reconnected subscriber starts clean."""
    cache = a_cache()
    settings = RedisSettings(url=own_redis.url, prefix="kg:", timeout=0.5, reconnect_backoff_max=0.1)
    subscriber = ChangeSubscriber(settings, cache)
    await subscriber.start()
    try:
        await asyncio.wait_for(subscriber.connected.wait(), 5)
        own_redis.kill()
        assert await until(lambda: not subscriber.connected.is_set())
        assert len(cache) == 2  # while Redis is away, the cache keeps serving
        own_redis.start()
        assert await until(lambda: subscriber.reconnects == 1)
        assert len(cache) == 0
    finally:
        await subscriber.close()


async def test_publish_without_redis_reports_failure_and_keeps_the_change(
    store: KeyStore, service: KeyService, own_redis: RedisServer,
) -> None:
    """With Redis dead a change still commits; the publisher says the feed must carry it."""
    settings = Settings.model_validate({
        **service.settings.model_dump(), "redis": {"url": own_redis.url, "timeout": 0.5},
    })
    record, _ = await service.create_key(name="ci", role="admin")
    own_redis.kill()
    async with change_publisher(settings) as publisher:
        assert publisher is not None
        assert not await publisher.publish([("key", record.id)])
        notifying = KeyService(store, settings, actor="test:bob", notifier=publisher)
        revoked = await notifying.revoke_key(record.id)
    assert revoked.revoked_at is not None
    assert (await service.get_key(record.id)).revoked_at is not None


async def test_no_publisher_without_redis_url(settings: Settings) -> None:
    """Without redis.url the CLI has no publisher: the change feed alone informs gateways."""
    async with change_publisher(settings) as publisher:
        assert publisher is None


async def test_change_feed_also_orphans_redis_entries(
    store: KeyStore, service: KeyService, link: RedisLink
) -> None:
    """A change made without Redis (seen only in the store's feed) still orphans the Redis entry."""
    shared = SharedKeyCache(link, ttl=30, negative_ttl=5)
    record, _ = await service.create_key(name="ci", role="admin")
    slot, _ = await shared.fetch(record.id, "d1")
    await shared.put(slot, KeyFacts(record, ("*",), False, None, None))
    cache: KeyCache[object] = KeyCache(ttl=30, negative_ttl=5, stale_if_error=300, max_entries=100)
    watcher = ChangeWatcher(store, cache, shared=shared)
    await watcher.start()
    try:
        await service.revoke_key(record.id)  # no notifier: like a CLI without redis.url
        await watcher.poll()
        assert (await shared.fetch(record.id, "d1"))[1] is None
    finally:
        await watcher.close()
