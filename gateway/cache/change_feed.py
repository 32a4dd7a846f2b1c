"""Change notices: running gateways drop cache entries when the store says something changed.

Every management action appends to the store's change feed in its own
transaction, so polling "anything after seq N?" misses nothing, whichever
process (CLI, admin API, another replica) made the change. A key change drops
that key's entries; a role or member change drops the whole cache (rare, and
it can affect many keys).

With Redis, changes normally arrive within milliseconds as pub/sub notices
(:mod:`gateway.cache.notices`) and this feed is the backstop: a change made by a
CLI without ``redis.url``, or published while Redis was down, still reaches
every worker within one poll interval -- and the watcher then also orphans
the change's entries in the Redis cache, so no replica warms from them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from .local import KeyCache
from .notices import DelayObserver, apply_change
from .redis_link import RedisUnavailable
from .shared import SharedKeyCache
from ..store import KeyStore, StoreError
from ..process.tasks import stop_task

log = logging.getLogger("keygate.invalidation")


class ChangeWatcher:
    def __init__(
        self, store: KeyStore, cache: KeyCache[object], *, interval: float = 0.25,
        shared: SharedKeyCache | None = None, observe_delay: DelayObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        # Told, per change applied, how long after it was made this process dropped what it affects.
        self.observe_delay = observe_delay
        self.clock = clock
        self.cache = cache
        self.shared = shared
        self.interval = interval
        # None until the feed's position is known (the store may be down at start).
        self.seq: int | None = None
        self.store_ok = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            self.seq = await self.store.latest_change()
            self.store_ok = True
        except StoreError as exc:
            # Start anyway: until the feed is readable, the cache TTL bounds staleness.
            log.warning(json.dumps({"event": "change_feed_unavailable", "error": str(exc)}))
        self._task = asyncio.create_task(self._run(), name="keygate-change-watcher")

    async def close(self) -> None:
        await stop_task(self._task)

    async def poll(self) -> None:
        if self.seq is None:
            # Changes before this point were missed: start from a clean cache.
            self.seq = await self.store.latest_change()
            self.cache.clear()
            return
        changes = await self.store.changes_since(self.seq)
        if not changes:
            return
        if self.shared is not None:
            # SECURITY: Redis's entries first, then ours. The other way round, a lookup between the two
            # (this worker's entry gone, Redis's not yet) reads the key as it was before the change from
            # Redis and caches it here again, after the drop that was to end it: a revoked key let in
            # for up to cache.ttl. This way such a lookup began before our drop, and KeyCache.put
            # refuses what it read.
            try:
                # Usually already done by the publisher; bumping again only orphans a few fresh entries.
                await self.shared.invalidate([(entity, target) for _seq, entity, target, _at in changes])
            except RedisUnavailable:
                pass  # the shared cache is marked dirty (not read) and orphaned when Redis is back
            except Exception:
                # A fault of ours must not keep this worker's own entries from being dropped below:
                # Redis's are suspect now, and not read until orphaned.
                self.shared.dirty = True
                log.exception(json.dumps({"event": "redis_invalidation_failed"}))
        for seq, entity, target, at in changes:
            apply_change(self.cache, entity, target)
            if self.observe_delay is not None:
                # A clock behind the changer's reads as no delay, never a negative one.
                self.observe_delay(max(0.0, self.clock() - at.timestamp()))
            self.seq = seq

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
                if not self.store_ok:
                    log.info(json.dumps({"event": "change_feed_recovered"}))
                self.store_ok = True
            except StoreError as exc:
                if self.store_ok:
                    log.warning(json.dumps({"event": "change_feed_unavailable", "error": str(exc)}))
                self.store_ok = False
            except Exception:  # the watcher must outlive any surprise
                log.exception("change watcher failed")
