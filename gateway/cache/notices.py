"""Change notices over Redis pub/sub: every worker of every replica drops changed keys at once.

Whoever changes authorization (the CLI, the admin API, any replica) first
orphans the affected entries of the Redis cache, then publishes the change
on ``<prefix>changes``. Every serving process subscribes and drops the
affected entries of its in-process cache. The store's change feed, polled
by :class:`gateway.cache.change_feed.ChangeWatcher`, stays the backstop for a
notice that was lost (publisher without Redis, Redis down).

A subscriber that lost its connection may have missed notices, so when it
is subscribed again it clears its whole in-process cache.

On a Redis Cluster plain pub/sub would copy every notice to every node;
notices go over sharded pub/sub instead (``SPUBLISH``/``SSUBSCRIBE``, Redis
7): the channel lives in one hash slot, and every subscriber holds one
connection to that slot's master. When that master fails or the slot moves,
the connection is lost (or Redis unsubscribes it): the subscriber reads the
slot map again, subscribes on the new master and clears its cache, as after
any lost connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from .local import KeyCache
from ..config.schema import RedisSettings, Settings
from .redis_link import FIRST_BACKOFF, RedisLink, RedisUnavailable, cluster_client, node_url, redis_client
from .shared import SharedKeyCache
from ..process.tasks import stop_task

log = logging.getLogger("keygate.invalidation")

CHANNEL = "changes"
# Told the seconds from a change being made to this process dropping what it affects (for /metrics).
DelayObserver = Callable[[float], None]
# Seconds, for that delay: a notice takes milliseconds, the change feed up to its poll interval (0.25 s)
# plus the store's answer; past a few seconds something is stuck.
PROPAGATION_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                          10.0, 30.0)


def apply_change(cache: KeyCache[object], entity: str, target: str) -> None:
    """Drop what a change affects: one key's entries, or everything for a role or member change."""
    if entity == "key":
        cache.invalidate_key(target)
    else:
        cache.clear()


class ChangePublisher:
    """Orphans the Redis cache entries a change affects and publishes it; never fails the change."""

    def __init__(self, link: RedisLink, shared: SharedKeyCache) -> None:
        self.link = link
        self.shared = shared
        self.channel = link.key(CHANNEL)
        self.published = 0  # notices Redis took
        self.unpublished = 0  # notices left to the change feed because Redis failed

    async def publish(self, changes: Sequence[tuple[str, str]], *, at: datetime | None = None) -> bool:
        """True if Redis took the notice; False leaves it to the change feed (within its poll interval).

        ``at``: when the changes were made (the time in the store's change feed), so subscribers can
        measure how long the notice took; now if not given.
        """
        if not changes:
            return True
        made = at.timestamp() if at is not None else time.time()
        # [entity, target, seconds since the epoch]; a subscriber reads the time only if it is there.
        message = json.dumps([[entity, target, made] for entity, target in changes])
        try:
            await self.shared.invalidate(list(changes))
            if self.link.cluster:
                await self.link.run(lambda r: r.spublish(self.channel, message))
            else:
                await self.link.run(lambda r: r.publish(self.channel, message))
        except RedisUnavailable as exc:
            log.warning(json.dumps({"event": "change_not_published", "error": str(exc)}))
            self.unpublished += 1
            return False
        self.published += 1
        return True


@asynccontextmanager
async def change_publisher(settings: Settings) -> AsyncIterator[ChangePublisher | None]:
    """A publisher for a process that changes keys (the CLI), or None without ``redis.url``."""
    if not settings.redis.enabled:
        yield None
        return
    link = RedisLink(settings.redis)
    try:
        yield ChangePublisher(link, SharedKeyCache(link, ttl=settings.cache.ttl,
                                                   negative_ttl=settings.cache.negative_ttl))
    finally:
        await link.close()


class ChangeSubscriber:
    """One pub/sub connection per process, reconnecting with backoff."""

    def __init__(
        self, settings: RedisSettings, cache: KeyCache[object], *, health_check_interval: int = 1,
        observe_delay: DelayObserver | None = None, clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.observe_delay = observe_delay
        self.clock = clock
        self.channel = settings.prefix + CHANNEL
        self._health_check_interval = health_check_interval
        # Its own client: a subscribed connection can do nothing else, and the
        # periodic PING (health check) notices a Redis that hangs without closing.
        # On a cluster, a client of the channel's master, found through the slot map on each (re)connect.
        self._cluster: RedisCluster | None = cluster_client(settings) if settings.cluster else None
        self._client = None if settings.cluster else redis_client(settings, health_check_interval=health_check_interval)
        self.connected = asyncio.Event()
        self.received = 0
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="keygate-change-subscriber")

    async def close(self) -> None:
        await stop_task(self._task)
        if self._client is not None:
            await self._client.aclose()
        if self._cluster is not None:
            await self._cluster.aclose()

    async def _channel_master(self) -> Redis:
        """A client of the master that holds the channel's slot now, by a freshly read slot map."""
        assert self._cluster is not None
        async with asyncio.timeout(4 * self.settings.timeout):
            await self._cluster.nodes_manager.initialize()
        node = self._cluster.get_node_from_key(self.channel)
        if self._client is not None:
            await self._client.aclose()
        settings = self.settings.model_copy(update={"url": node_url(self.settings, node.host, node.port)})
        self._client = redis_client(settings, health_check_interval=self._health_check_interval)
        return self._client

    async def _run(self) -> None:
        backoff = FIRST_BACKOFF
        lost = False
        while True:
            pubsub = None
            try:
                client = self._client if self._cluster is None else await self._channel_master()
                assert client is not None
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                if self._cluster is not None:
                    await pubsub.ssubscribe(self.channel)
                else:
                    await pubsub.subscribe(self.channel)
                if lost:
                    # Notices may have been published while we could not hear them.
                    self.cache.clear()
                    self.reconnects += 1
                    log.info(json.dumps({"event": "change_notices_resumed", "cache": "cleared"}))
                lost = False
                backoff = FIRST_BACKOFF
                self.connected.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") in ("message", "smessage"):
                        self._apply(message["data"])
                    if not pubsub.subscribed:
                        # Redis dropped the subscription (SUNSUBSCRIBE): the channel's slot moved to another master.
                        raise RedisClusterException("the change channel's hash slot moved")
            except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
                self.connected.clear()
                if not lost:
                    log.warning(json.dumps({"event": "change_notices_lost", "error": str(exc) or type(exc).__name__}))
                lost = True
            finally:
                try:
                    if pubsub is not None:
                        await pubsub.aclose()
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.reconnect_backoff_max)

    def _apply(self, data: bytes | str) -> None:
        try:
            changes = json.loads(data)
            made: list[float] = []
            for entity, target, *at in changes:
                apply_change(self.cache, str(entity), str(target))
                if at:
                    made.append(float(at[0]))
        except (ValueError, TypeError) as exc:
            # Someone else's message on our channel: the safe reading is "anything changed".
            log.warning(json.dumps({"event": "change_notice_unreadable", "error": str(exc)}))
            self.cache.clear()
            return
        self.received += 1
        if self.observe_delay is not None:
            now = self.clock()
            for when in made:
                self.observe_delay(max(0.0, now - when))  # a clock behind the changer's: no delay
