"""Stage 7 with Redis: one token bucket per key shared by every worker of every replica.

The bucket lives in a Redis hash and is only ever changed by one Lua script
(atomic on the server, Redis ``TIME`` as the clock, so replicas' clocks do
not matter). The script refills the bucket, adds back what a caller returns
and hands out up to ``want`` whole tokens. Two policies use it:

* ``redis`` (:class:`RedisTokenBuckets`): one script run per request
  asking for one token -- exact; concurrent requests share a pipelined
  round trip on the link's lean RESP connection (:class:`SharedBuckets`).
* ``local-first`` (:class:`LocalFirstBuckets`): a process leases a batch of
  tokens (``ratelimit.batch`` of the capacity) and spends them without
  asking Redis; it asks again when the lease is spent, and returns what is
  left of a lease older than ``ratelimit.sync_interval``. Tokens are taken
  from the global bucket before they are spent, so a key never gets more
  than its limit across the fleet; the price is that tokens sitting in
  other processes' leases are not available to a process that ran out, so
  a key may get up to (processes - 1) x batch fewer requests than its limit
  within one ``sync_interval`` (measured in tests/scale).

On a Redis Cluster a bucket is named ``<prefix>rl:{<key id>}``: the key id
is its hash tag, so the script's one key (and any a later version adds for
the same key id) lives in that key id's slot. On a cluster the calls of one
batch go through redis-py's cluster pipeline instead of the lean connection:
it sends each node its share of the batch and follows MOVED and ASK.

When Redis fails, :class:`Fallback` decides per ``ratelimit.on_backend_error``
and marks the decision ``degraded`` (the response then carries
``X-Keygate-RateLimit-Degraded: 1`` and the limiter counts it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError

from ..config.ratelimit_spec import RateLimitSpec
from ..cache.redis_link import RedisLink, RedisUnavailable
from ..cache.resp import bulk, command, encode
from ..process.tasks import stop_task
from .ratelimit import LocalTokenBuckets, RateLimitDecision, bucket_decision

log = logging.getLogger("keygate.ratelimit")

# KEYS: the bucket. ARGV: capacity, refill per second, tokens wanted, tokens returned.
# Returns {tokens granted, tokens left (as text: Lua numbers become integers in replies)}.
TAKE_SCRIPT = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1])
local stamp = tonumber(state[2])
if tokens == nil or stamp == nil then
  tokens = capacity
elseif now > stamp then
  tokens = tokens + (now - stamp) * rate
end
tokens = math.min(capacity, tokens + tonumber(ARGV[4]))
local granted = 0
if want > 0 then
  granted = math.min(want, math.floor(tokens + 1e-9))
  tokens = math.max(0, tokens - granted)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'stamp', string.format('%.17g', now))
-- A full bucket is the same as none: let Redis forget it once it would be full.
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
return {granted, string.format('%.17g', tokens)}
"""


class Fallback:
    """The decision when Redis cannot give one, per ``ratelimit.on_backend_error``."""

    def __init__(self, mode: str, *, local: LocalTokenBuckets | None = None) -> None:
        if mode not in ("local", "allow", "deny"):
            raise ValueError(f"unknown on_backend_error {mode!r}")
        self.mode = mode
        self.local = local or LocalTokenBuckets()
        self.decisions = 0  # degraded decisions made, for /readyz, /metrics and the logs
        self.limited = 0  # of which refused

    def decide(self, key_id: str, spec: RateLimitSpec) -> RateLimitDecision:
        if self.decisions == 0:
            log.warning(json.dumps({"event": "ratelimit_degraded", "on_backend_error": self.mode}))
        self.decisions += 1
        if self.mode == "allow":
            decision = RateLimitDecision(True, spec, spec.capacity, 0, None, degraded=True)
        elif self.mode == "deny":
            decision = RateLimitDecision(False, spec, 0, 0, 1, degraded=True)
        else:
            decision = self.local.take_now(key_id, spec)._replace(degraded=True)
        if not decision.allowed:
            self.limited += 1
        return decision


class SharedBuckets:
    """The global buckets in Redis, reached through the one script.

    Decisions asked for in the same event-loop turn (concurrent requests)
    go to Redis together as one pipelined batch: each is still its own
    atomic script run, but the per-call cost is paid once per turn rather
    than once per request. The calls take the link's lean path
    (:mod:`gateway.cache.resp`): each is encoded as RESP bytes when it is
    asked for, from parts encoded here once (``EVALSHA <sha> 1``, the key
    prefix, each spec's numbers), and the batches of several turns can be in
    flight on its one connection at once.
    """

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self._sha = hashlib.sha1(TAKE_SCRIPT.encode()).hexdigest()
        self._evalsha = b"*8\r\n" + bulk(b"EVALSHA") + bulk(self._sha.encode()) + bulk(b"1")
        self._load = command("SCRIPT", "LOAD", TAKE_SCRIPT)
        # The bucket's name is this, the key id, then this suffix (see RedisLink.tagged).
        self._prefix, self._suffix = (part.encode() for part in self.name("\0").split("\0"))
        # Capacity and refill rate as sent, per spec: one entry per distinct limit in use.
        self._spec_args: dict[RateLimitSpec, bytes] = {}
        # Calls as RESP bytes for the lean connection, as argument tuples for the cluster client.
        self._queue: list[tuple[Any, asyncio.Future[tuple[int, float]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.round_trips = 0
        # The event loop it serves, asked for once (see take).
        self._loop: asyncio.AbstractEventLoop | None = None

    def name(self, key_id: str) -> str:
        return self.link.tagged("rl:", key_id)

    async def take(self, key_id: str, spec: RateLimitSpec, want: int, give_back: int = 0) -> tuple[int, float]:
        """Tokens granted (0..want) and tokens left; raises :class:`RedisUnavailable`."""
        self.link.require_up()
        # Not asyncio.get_running_loop() per call: on Python 3.11 each is a getpid() system call, and
        # that one cost about a twentieth of a request's CPU on this policy (py-spy, bench.py kg_redis).
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, float]] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._send)
        if self.link.resp is not None:
            call: Any = self._command(key_id, spec, want, give_back)
        else:
            call = (self.name(key_id), spec.capacity, spec.refill_per_second, want, give_back)
        self._queue.append((call, future))
        return await future

    def _command(self, key_id: str, spec: RateLimitSpec, want: int, give_back: int) -> bytes:
        """``EVALSHA <sha> 1 <bucket> <capacity> <refill per second> <want> <give back>``, as RESP."""
        name = self._prefix + key_id.encode() + self._suffix
        args = self._spec_args.get(spec)
        if args is None:
            # Numbers encoded as redis-py encodes them (their repr), so the script reads the same text.
            args = self._spec_args[spec] = bulk(encode(spec.capacity)) + bulk(encode(spec.refill_per_second))
        return b"%s$%d\r\n%s\r\n%s%s%s" % (
            self._evalsha, len(name), name, args, bulk(b"%d" % want), bulk(b"%d" % give_back))

    def _send(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.Task(self._run(batch), loop=self._loop)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Any, asyncio.Future[tuple[int, float]]]]) -> None:
        self.round_trips += 1
        evaluate = self._evaluate if self.link.resp is not None else self._evaluate_on_cluster
        try:
            replies = await self.link.run(lambda _client: evaluate([call for call, _future in batch]))
        except RedisUnavailable as exc:
            for _call, future in batch:
                if not future.done():
                    future.set_exception(RedisUnavailable(str(exc)))
            return
        for (_call, future), (granted, left) in zip(batch, replies):
            if not future.done():  # its request may have been cancelled (client gone)
                future.set_result((int(granted), float(left)))

    async def _evaluate(self, calls: list[bytes]) -> list[Any]:
        resp = self.link.resp
        assert resp is not None
        replies = await resp.execute(b"".join(calls), len(calls))
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # Redis restarted (or flushed its scripts): load it once, then run exactly those again.
            (loaded,) = await resp.execute(self._load, 1)
            if isinstance(loaded, Exception):
                raise loaded
            again = await resp.execute(b"".join(calls[i] for i in missing), len(missing))
            for i, reply in zip(missing, again):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies


    async def _evaluate_on_cluster(self, calls: list[Any]) -> list[Any]:
        """The batch through the cluster client's pipeline: each call to its bucket's master."""
        cluster: Any = self.link.client
        replies = await self._pipelined(cluster, calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # A master that never ran it (new, promoted, restarted): SCRIPT LOAD goes to every master.
            await cluster.script_load(TAKE_SCRIPT)
            for i, reply in zip(missing, await self._pipelined(cluster, [calls[i] for i in missing])):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return list(replies)

    async def _pipelined(self, cluster: Any, calls: list[Any]) -> list[Any]:
        pipe = cluster.pipeline(transaction=False)
        for call in calls:
            # (The pipeline blocks its evalsha method, not the command: every call here names its one key.)
            pipe.execute_command("EVALSHA", self._sha, 1, *call)
        return list(await pipe.execute(raise_on_error=False))


class RedisTokenBuckets:
    """Policy ``redis``: every decision is one atomic script call on the global bucket."""

    def __init__(self, shared: SharedBuckets, fallback: Fallback) -> None:
        self.shared = shared
        self.fallback = fallback

    async def take(self, key_id: str, spec: RateLimitSpec) -> RateLimitDecision:
        try:
            granted, left = await self.shared.take(key_id, spec, 1)
        except RedisUnavailable:
            return self.fallback.decide(key_id, spec)
        return bucket_decision(granted == 1, spec, left)


class _Lease:
    __slots__ = ("spec", "tokens", "until", "shared_left", "empty_until")

    def __init__(self, spec: RateLimitSpec, tokens: int, until: float, shared_left: float, now: float) -> None:
        self.spec = spec
        self.tokens = tokens
        self.until = until
        self.shared_left = shared_left  # what the global bucket held at the lease, for the headers
        # When nothing was granted: until when the global bucket cannot hold a whole token.
        self.empty_until = now + (1.0 - shared_left) * spec.window / spec.limit if tokens == 0 else now


class LocalFirstBuckets:
    """Policy ``local-first``: spend leased tokens locally, lease more from Redis in batches."""

    def __init__(
        self, shared: SharedBuckets, fallback: Fallback, *, batch: float, sync_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shared = shared
        self.fallback = fallback
        self.batch = batch
        self.sync_interval = sync_interval
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._syncing: dict[str, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.syncs = 0

    def lease_size(self, spec: RateLimitSpec) -> int:
        return max(1, int(spec.capacity * self.batch))

    async def take(self, key_id: str, spec: RateLimitSpec) -> RateLimitDecision:
        while True:
            lease = self._leases.get(key_id)
            if lease is not None and lease.spec is spec:
                now = self._clock()
                if lease.tokens > 0 and now < lease.until:
                    lease.tokens -= 1
                    return bucket_decision(True, spec, lease.tokens + lease.shared_left)
                if lease.tokens == 0 and now < lease.empty_until:
                    # The global bucket was empty at the last sync: refuse without asking again
                    # until a token can have come back, so a flood of refusals costs no round trips.
                    return bucket_decision(False, spec, lease.shared_left)
            pending = self._syncing.get(key_id)
            if pending is None:
                # One lease request per key at a time; concurrent requests wait for it.
                pending = asyncio.ensure_future(self._sync(key_id, spec))
                self._syncing[key_id] = pending
                pending.add_done_callback(lambda _f: self._syncing.pop(key_id, None))
            try:
                await asyncio.shield(pending)
            except RedisUnavailable:
                return self.fallback.decide(key_id, spec)
            # Each sync either leased tokens (someone spends them) or found the bucket
            # empty (the check above refuses), so this loop ends.

    async def _sync(self, key_id: str, spec: RateLimitSpec) -> None:
        old = self._leases.pop(key_id, None)
        give_back = old.tokens if old is not None else 0
        self.syncs += 1
        try:
            granted, left = await self.shared.take(key_id, spec, self.lease_size(spec), give_back)
        except RedisUnavailable:
            if old is not None and old.spec is spec:
                self._leases[key_id] = old  # still ours: spend it when Redis is back
            raise
        now = self._clock()
        self._leases[key_id] = _Lease(spec, granted, now + self.sync_interval, left, now)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._return_idle(), name="keygate-lease-return")

    async def close(self) -> None:
        await stop_task(self._task)
        await self.return_idle(everything=True)

    async def return_idle(self, *, everything: bool = False) -> None:
        """Give the unused rest of leases older than ``sync_interval`` (or all) back to the global bucket."""
        now = self._clock()
        for key_id, lease in list(self._leases.items()):
            if not everything and now < lease.until:
                continue
            if key_id in self._syncing:
                continue
            del self._leases[key_id]
            if lease.tokens > 0:
                try:
                    await self.shared.take(key_id, lease.spec, 0, lease.tokens)
                except RedisUnavailable:
                    return  # lost tokens only lower the limit until the bucket refills

    async def _return_idle(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval / 2)
            try:
                await self.return_idle()
            except Exception:  # the loop must outlive any surprise
                log.exception("returning idle leases failed")

