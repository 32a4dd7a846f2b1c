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
script of the ``redis`` policy. Calls on either go through :meth:`run`, but
for that script's batches on an open lean connection: they are written from
a loop callback with no coroutine, bounded by the connection's own timer,
and report a failure to :meth:`failed`, which trips the same circuit.

With ``redis.cluster`` the one client is redis-py's cluster client: it finds
the nodes from the seeds, sends each command to the master of its key's hash
slot and follows MOVED and ASK; a node that stops answering makes it read
the slot map again on the next call, so after a failover calls reach the
promoted replica. There is no lean client then (it speaks to one server).
Every script keeps all its keys in one hash slot: each name carries the key
id as its hash tag (:meth:`RedisLink.tagged`). The circuit is one for the
whole cluster: while any master a call needed is unreachable, every caller
uses its fallback, exactly as with one server, and the circuit closes once
every master of the slot map answers again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TypeAlias, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from ..config.schema import RedisSettings
from ..process.tasks import stop_task
from .resp import RespClient

T = TypeVar("T")
log = logging.getLogger("keygate.redis")

# Either client: the calls Keygate makes (GET, SET, INCR, EVALSHA, pipelines) read the same on both.
Client: TypeAlias = "Redis | RedisCluster"
# What a failed call raises: redis-py's errors, and the cluster client's own (no node for a slot).
FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)

# Where reconnect attempts start; they double up to ``reconnect_backoff_max``.
FIRST_BACKOFF = 0.05
# Round trips, each within redis.timeout, that opening a connection and a first PING may take in all (TCP,
# TLS, AUTH and CLIENT SETINFO, the PING): see RedisLink._answers.
_SETUP_ROUND_TRIPS = 4


class RedisUnavailable(Exception):
    """Redis did not answer in time, or is known to be down: the caller decides without it."""


class BucketUnusable(RedisUnavailable):
    """Redis answers, but one key of ours cannot be used (it holds another type): only its callers decide
    without Redis (see gateway.pipeline.ratelimit_redis)."""


def redis_client(settings: RedisSettings, **options: object) -> Redis:
    """A client whose every call is bounded and never retried: retries would only stretch the bound."""
    return Redis.from_url(
        settings.url, socket_timeout=settings.timeout, socket_connect_timeout=settings.timeout,
        retry=Retry(NoBackoff(), 0), **options,  # type: ignore[arg-type]
    )


def cluster_client(settings: RedisSettings) -> RedisCluster:
    """redis-py's cluster client on the seed nodes; credentials and TLS as ``redis.url`` gives them.

    A call is not retried after a connection error (the bound is ``redis.timeout``, and the
    circuit takes over), but the error makes the client read the slot map again first thing
    on the next call; MOVED and ASK are followed within the call.
    """
    seeds = [ClusterNode(host, int(port)) for host, _, port in (node.rpartition(":") for node in settings.nodes)]
    options: dict[str, object] = dict(
        socket_timeout=settings.timeout, socket_connect_timeout=settings.timeout, retry=Retry(NoBackoff(), 0),
    )
    if settings.url:
        return RedisCluster.from_url(settings.url, startup_nodes=seeds, **options)  # type: ignore[arg-type]
    return RedisCluster(startup_nodes=seeds, **options)  # type: ignore[arg-type]


def node_url(settings: RedisSettings, host: str, port: int) -> str:
    """``redis.url`` pointed at one node of the cluster (same scheme, credentials and options)."""
    if not settings.url:
        return f"redis://{host}:{port}"
    parts = urlsplit(settings.url)
    userinfo = parts.netloc.rpartition("@")[0]
    where = f"[{host}]" if ":" in host else host
    netloc = f"{userinfo}@{where}:{port}" if userinfo else f"{where}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class RedisLink:
    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.prefix = settings.prefix
        self.timeout = settings.timeout
        self.cluster = settings.cluster
        self.client: Client = cluster_client(settings) if settings.cluster else redis_client(settings)
        # Connects on first use, with the settings redis-py's client got from redis.url.
        self.resp = None if isinstance(self.client, RedisCluster) else RespClient(self.client, timeout=self.timeout)
        self.up = True
        self.failures = 0  # calls that failed or were refused while down, for /readyz and tests
        self.trips = 0  # times the circuit opened (outages)
        self._recover: list[Callable[[], Awaitable[None]]] = []
        self._reconnect: asyncio.Task[None] | None = None
        self._closed = False

    def key(self, *parts: str) -> str:
        """A Redis key (or channel) name in this deployment's namespace."""
        return self.prefix + ":".join(parts)

    def tagged(self, kind: str, key_id: str) -> str:
        """The name of a key id's ``kind`` of data: ``<prefix><kind>{<key id>}`` on a cluster.

        The braces are the hash tag: a Redis Cluster puts every name with the same
        tag in one hash slot, so a script may touch all of one key id's names.
        Key ids never contain braces (the key format has none). On one server the
        name stays what it always was (``<prefix><kind>:<key id>``), so buckets and
        epochs carry over a rolling upgrade, old and new processes sharing them.
        """
        if self.cluster:
            return f"{self.prefix}{kind}{{{key_id}}}"
        return self.key(kind, key_id)

    def on_recover(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` each time the circuit closes again after Redis was down."""
        self._recover.append(callback)

    def require_up(self) -> None:
        """Raise :class:`RedisUnavailable` at once while the circuit is open."""
        if not self.up:
            self.failures += 1
            raise RedisUnavailable("redis is down")

    async def run(self, call: Callable[[Client], Awaitable[T]]) -> T:
        """``call(client)`` within ``redis.timeout``, or :class:`RedisUnavailable`."""
        self.require_up()
        try:
            async with asyncio.timeout(self.timeout):
                return await call(self.client)
        except FAILURES as exc:
            raise self.failed(exc) from exc

    def failed(self, exc: BaseException) -> RedisUnavailable:
        """Count a call that failed with ``exc`` (one of :data:`FAILURES`), open the circuit; what to raise.

        :meth:`run` calls it for its calls; a caller that reaches the lean client
        without :meth:`run` (the ``redis`` policy's batches) calls it for its own.
        """
        self.failures += 1
        self._trip(exc)
        return RedisUnavailable(str(exc) or type(exc).__name__)

    async def probe(self) -> bool:
        """Whether Redis answers now; if not, the circuit opens and reconnecting starts."""
        try:
            self.require_up()
            await self._answers()
        except RedisUnavailable:
            return False
        except FAILURES as exc:
            self.failed(exc)
            return False
        return True

    async def open_lean(self) -> None:
        """The lean connection, opened if none is open; :class:`RedisUnavailable` if it cannot be.

        Its set-up (connect, TLS, AUTH, SELECT) is bounded on its own (the client's connect timeout,
        ``redis.timeout``), so that the calls then made within ``redis.timeout`` are only the calls.
        """
        self.require_up()
        assert self.resp is not None
        try:
            await self.resp.open()
        except FAILURES as exc:
            raise self.failed(exc) from exc

    async def _answers(self) -> None:
        """Redis answers a PING within ``redis.timeout``, on a connection opened beforehand if need be.

        Opening one (connect, TLS, AUTH, redis-py's CLIENT SETINFO) takes round trips of its own, each
        bounded by the client's socket timeouts: counted against ``redis.timeout`` with the PING, a Redis
        that answers in time from further than a third of it away would never be judged up again.
        """
        async with asyncio.timeout(_SETUP_ROUND_TRIPS * self.timeout):
            await self._ping()
        async with asyncio.timeout(self.timeout):
            await self._ping()

    async def _ping(self) -> None:
        if isinstance(self.client, RedisCluster):
            # Every master of the slot map (read again after a failure), not one node: the circuit
            # closes only when every slot's keys can be reached again.
            await self.client.ping(target_nodes=RedisCluster.PRIMARIES)
        else:
            await self.client.ping()

    def _trip(self, exc: BaseException) -> None:
        if not self.up or self._closed:
            return  # (closing fails the calls still out: that is no outage to reconnect from)
        self.up = False
        self.trips += 1
        log.warning(json.dumps({"event": "redis_unavailable", "error": str(exc) or type(exc).__name__}))
        if self.resp is not None:
            # Calls after the recovery go out on a new connection, to whichever server redis.url reaches then.
            self.resp.drop()
        self._reconnect = asyncio.create_task(self._reconnect_loop(), name="keygate-redis-reconnect")

    async def _reconnect_loop(self) -> None:
        backoff = FIRST_BACKOFF
        while True:
            await asyncio.sleep(backoff)
            try:
                if not isinstance(self.client, RedisCluster):
                    # Nor are redis-py's idle connections opened before the failure reused (see
                    # RespClient.drop): a demoted primary would answer the PING, then refuse every write.
                    await self.client.connection_pool.disconnect(inuse_connections=False)
                await self._answers()
            except FAILURES:
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
        self._closed = True
        self.up = False  # whatever asks after this decides without Redis, and nothing reconnects
        await stop_task(self._reconnect)
        if self.resp is not None:
            await self.resp.close()
        await self.client.aclose()
