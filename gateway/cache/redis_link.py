"""One process's connection to Redis, with a circuit breaker: Redis may fail, a request may not.

Every Redis call Keygate makes goes through :meth:`RedisLink.run`, which
bounds it by ``redis.timeout``. The first failure opens the circuit: from
then on calls fail at once with :class:`RedisUnavailable` (each caller has a
defined fallback: the store, per-process buckets, the change feed) while one
background task pings Redis with exponential backoff up to
``redis.reconnect_backoff_max``; the first answer closes the circuit again.
Nothing waits on a Redis that is known to be down, so a dead or hanging
Redis costs at most one timeout per process, not one per request.

The link holds two clients to the one Redis: redis-py's, for everything, and
a lean one (:mod:`.resp`) for the one call made per request, the rate-limit
script of the ``redis`` policy. Calls on either go through :meth:`run`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..config.schema import RedisSettings
from ..process.tasks import stop_task
from .resp import RespClient

T = TypeVar("T")
log = logging.getLogger("keygate.redis")

# Where reconnect attempts start; they double up to ``reconnect_backoff_max``.
FIRST_BACKOFF = 0.05


class RedisUnavailable(Exception):
    """Redis did not answer in time, or is known to be down: the caller decides without it."""


def redis_client(settings: RedisSettings, **options: object) -> Redis:
    """A client whose every call is bounded and never retried: retries would only stretch the bound."""
    return Redis.from_url(
        settings.url, socket_timeout=settings.timeout, socket_connect_timeout=settings.timeout,
        retry=Retry(NoBackoff(), 0), **options,  # type: ignore[arg-type]
    )


class RedisLink:
    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.prefix = settings.prefix
        self.timeout = settings.timeout
        self.client = redis_client(settings)
        # Connects on first use, with the settings redis-py's client got from redis.url.
        self.resp = RespClient(self.client)
        self.up = True
        self.failures = 0  # calls that failed or were refused while down, for /readyz and tests
        self._recover: list[Callable[[], Awaitable[None]]] = []
        self._reconnect: asyncio.Task[None] | None = None

    def key(self, *parts: str) -> str:
        """A Redis key (or channel) name in this deployment's namespace."""
        return self.prefix + ":".join(parts)

    def on_recover(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` each time the circuit closes again after Redis was down."""
        self._recover.append(callback)

    def require_up(self) -> None:
        """Raise :class:`RedisUnavailable` at once while the circuit is open."""
        if not self.up:
            self.failures += 1
            raise RedisUnavailable("redis is down")

    async def run(self, call: Callable[[Redis], Awaitable[T]]) -> T:
        """``call(client)`` within ``redis.timeout``, or :class:`RedisUnavailable`."""
        self.require_up()
        try:
            async with asyncio.timeout(self.timeout):
                return await call(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            self.failures += 1
            self._trip(exc)
            raise RedisUnavailable(str(exc) or type(exc).__name__) from exc

    async def probe(self) -> bool:
        """Whether Redis answers now; if not, the circuit opens and reconnecting starts."""
        try:
            await self.run(lambda r: r.ping())
        except RedisUnavailable:
            return False
        return True

    def _trip(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        log.warning(json.dumps({"event": "redis_unavailable", "error": str(exc) or type(exc).__name__}))
        self._reconnect = asyncio.create_task(self._reconnect_loop(), name="keygate-redis-reconnect")

    async def _reconnect_loop(self) -> None:
        backoff = FIRST_BACKOFF
        while True:
            await asyncio.sleep(backoff)
            try:
                async with asyncio.timeout(self.timeout):
                    await self.client.ping()
            except (RedisError, OSError, TimeoutError):
                backoff = min(backoff * 2, self.settings.reconnect_backoff_max)
                continue
            self.up = True
            log.info(json.dumps({"event": "redis_recovered"}))
            for callback in self._recover:
                try:
                    await callback()
                except RedisUnavailable:
                    pass  # down again: the next trip starts a new loop
            return

    async def close(self) -> None:
        await stop_task(self._reconnect)
        await self.resp.close()
        await self.client.aclose()
