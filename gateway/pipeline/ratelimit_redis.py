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
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from redis.exceptions import ConnectionError as RedisConnectionError, InvalidResponse, NoScriptError, RedisError

from ..config.ratelimit_spec import RateLimitSpec
from ..cache.redis_link import BucketUnusable, RedisLink, RedisUnavailable
from ..cache.held import HeldTooLong
from ..cache.resp import bulk, command, encode
from ..process.tasks import stop_task
from .ratelimit import LocalTokenBuckets, RateLimitDecision, bucket_decision

log = logging.getLogger("keygate.ratelimit")

# KEYS: the bucket. ARGV: capacity, refill per second, tokens wanted, tokens returned.
# Returns {tokens granted, tokens left (as text: Lua numbers become integers in replies)}.
TAKE_SCRIPT: Final = """
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


# A reply (or its error) per script run: (tokens granted, tokens left), or the error of a run whose bucket
# cannot be used (its key holds another type: WRONGTYPE), that run's alone.
Result = tuple[int, float] | RedisError


def _decoded(replies: list[Any]) -> list[Result]:
    """Each script reply as (tokens granted, tokens left), or as its error if it is one bucket's own (see
    :func:`_bucket_error`); raises the first other error reply (the server's: OOM, READONLY, ...), or
    InvalidResponse."""
    results: list[Result] = []
    for reply in replies:
        if isinstance(reply, Exception):
            if isinstance(reply, RedisError) and _bucket_error(reply):
                results.append(reply)
                continue
            raise reply
        if not isinstance(reply, list) or len(reply) != 2:  # (a two-byte bytes reply would unpack too)
            raise InvalidResponse(f"unexpected reply to the rate-limit script: {reply!r:.80}")
        try:
            result = (int(reply[0]), float(reply[1]))
        except (TypeError, ValueError) as exc:  # not TAKE_SCRIPT's {granted, tokens left}
            raise InvalidResponse(f"unexpected reply to the rate-limit script: {reply!r:.80}") from exc
        if result[0] < 0 or not math.isfinite(result[1]):
            # Not what the script can return ("nan" or "inf" left, from a server that is not Redis): a
            # decision could not be made of it (bucket_decision rounds what is left), and the batch's
            # other callers would be left waiting on an answer that failed part-way.
            raise InvalidResponse(f"unexpected reply to the rate-limit script: {reply!r:.80}")
        results.append(result)
    return results


def _bucket_error(reply: RedisError) -> bool:
    """An error of one bucket, not of the server: its key holds something else than a bucket (a hash).

    Only that run fails (its callers get the fallback's decision); the batch's other runs are answered
    from their replies and the circuit stays closed. As one error of the server, one key overwritten by
    mistake opened the circuit again after every reconnect and made every key's decision the fallback's.
    """
    # Redis 7 replies "WRONGTYPE ..." for a script's call on such a key; Redis 6 wraps it: "ERR Error running
    # script (call to f_...): @user_script:...: WRONGTYPE ..." (redis-py and the lean client drop the "ERR ").
    message = str(reply)
    return message.startswith("WRONGTYPE") or ": WRONGTYPE " in message


class _Call:
    """One script run of a round trip: its arguments and the callers it answers.

    The exact policy's calls (one token wanted, none given back) of one key
    and limit asked for in one batch are one run asking for as many tokens
    as there are callers: Redis hands them out as the runs one after the
    other would have (the first ``granted`` callers get one each), in one
    script run rather than many. Such a run has a ``fallback``: its callers'
    futures resolve to their :class:`RateLimitDecision` (the fallback's when
    Redis cannot answer), not to (tokens granted, tokens left).
    """

    __slots__ = ("key_id", "spec", "want", "give_back", "futures", "fallback")

    def __init__(self, key_id: str, spec: RateLimitSpec, want: int, give_back: int,
                 fallback: Fallback | None = None) -> None:
        self.key_id = key_id
        self.spec = spec
        self.want = want
        self.give_back = give_back
        self.fallback = fallback
        self.futures: list[asyncio.Future[Any]] = []


# The script runs of one round trip, in the order they are sent.
Batch = list[_Call]


def _answer(batch: Batch, results: list[Result]) -> list[_Call]:
    """Each run's callers their decisions; the runs whose buckets could not be used (see :func:`_bucket_error`)
    get the fallback's, and are returned."""
    unusable: list[_Call] = []
    for call, result in zip(batch, results):
        if not isinstance(result, tuple):
            unusable.append(call)
            continue
        granted, left = result
        futures = call.futures
        if call.fallback is not None:
            # The exact policy's callers, in the order they asked: one token each while they last; each
            # sees the tokens left after its own, as if each had had a run of its own.
            spec = call.spec
            for i, future in enumerate(futures):
                if not future.done():  # its request may have been cancelled (client gone)
                    future.set_result(bucket_decision(True, spec, left + (granted - 1 - i)) if i < granted
                                      else bucket_decision(False, spec, left))
            continue
        if not futures[0].done():
            futures[0].set_result((granted, left))
    if unusable:
        _refuse(unusable, BucketUnusable("bucket unusable: its key holds another type"))
    return unusable


def _refuse(batch: Batch, exc: RedisUnavailable) -> None:
    for call in batch:
        fallback = call.fallback
        for future in call.futures:
            if not future.done():
                if fallback is not None:
                    future.set_result(fallback.decide(call.key_id, call.spec))
                else:
                    future.set_exception(type(exc)(str(exc)))  # (its kind kept: BucketUnusable)


class Fallback:
    """The decision when Redis cannot give one, per ``ratelimit.on_backend_error``."""

    def __init__(self, mode: str, *, local: LocalTokenBuckets | None = None) -> None:
        if mode not in ("local", "allow", "deny"):
            raise ValueError(f"unknown on_backend_error {mode!r}")
        self.mode = mode
        self.local = local or LocalTokenBuckets()
        self.decisions = 0  # degraded decisions made, for /readyz, /metrics and the logs
        self.limited = 0  # of which refused
        self._link: RedisLink | None = None
        self._announced = -1  # the link's outage (RedisLink.trips) the log last said so for

    def watch(self, link: RedisLink) -> None:
        """Log ``ratelimit_degraded`` again at the first degraded decision of each of ``link``'s outages."""
        self._link = link

    def decide(self, key_id: str, spec: RateLimitSpec) -> RateLimitDecision:
        outage = self._link.trips if self._link is not None else 0
        if outage != self._announced:
            # Once per outage (not once per process: an alert keyed on the line must fire for each), and
            # once for decisions degraded with the circuit closed (callers that waited redis.timeout).
            self._announced = outage
            log.warning(json.dumps({"event": "ratelimit_degraded", "on_backend_error": self.mode}))
        self.decisions += 1
        if self.mode == "allow":
            decision = RateLimitDecision(True, spec, spec.capacity, 0, None, degraded=True)
        elif self.mode == "deny":
            # Refused for a second (Retry-After: 1), and the quota not said to be back any sooner (t=1).
            decision = RateLimitDecision(False, spec, 0, 1, 1, degraded=True)
        else:
            decision = self.local.take_now(key_id, spec)._replace(degraded=True)
        if not decision.allowed:
            self.limited += 1
        return decision


# Lean batches out at once: what is asked for meanwhile waits for the next reply and goes out then, as one.
# The wait counts against redis.timeout for its callers (a decision not in within it of its asking is the
# fallback's), not for Redis (the circuit opens only when a batch was on the wire that long).
MAX_IN_FLIGHT: Final = 1
# ... but waits at most this share of redis.timeout: then it goes out beside the batch out. Held until the
# reply, a far Redis (a round trip over half the timeout, answering in time) would see most calls wait
# longer than the timeout in all, and decided by the fallback (found by a review).
HOLD_SHARE: Final = 0.25
# Seconds between two log lines about one key's unusable bucket (see _bucket_error).
_UNUSABLE_LOG_EVERY: Final = 60.0


class SharedBuckets:
    """The global buckets in Redis, reached through the one script.

    Decisions asked for in the same event-loop turn (concurrent requests)
    go to Redis together as one pipelined batch, each key's as one atomic
    script run (:class:`_Call`): the per-call cost is paid once per batch
    rather than once per request. While a batch is out, what is asked for
    waits and goes out as one batch when its replies are in
    (:data:`MAX_IN_FLIGHT`): Redis runs calls one at a time anyway, so a call
    held back is run only a return trip later than if it had been sent at
    once, and under load the batches grow instead of the round trips. The
    calls take the link's lean path (:mod:`gateway.cache.resp`): each run is
    encoded as RESP bytes when its batch goes out, from parts encoded here
    once (``EVALSHA <sha> 1``, the key prefix, each spec's numbers), written
    from a loop callback, its replies read by another; no coroutine, task or
    timer per round trip.
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
        self._last_spec: RateLimitSpec | None = None  # the spec of the last call encoded, and its entry
        self._last_args = b""
        # The script runs asked for since the last batch went out.
        self._queue: Batch = []
        # The queue's runs of the exact policy by key id: a caller asking for the same key joins its run.
        self._shared_runs: dict[str, _Call] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Lean batches written and not yet answered; at most MAX_IN_FLIGHT, the queue waits for the next reply.
        self._in_flight = 0
        self._since = 0.0  # when the queue's oldest call was asked for (loop.time())
        self._hold = (link.timeout or 0.0) * HOLD_SHARE
        self._hold_timer: asyncio.TimerHandle | None = None  # sends a held queue when it has waited _hold
        self.round_trips = 0
        self._unusable_logged: dict[str, float] = {}  # key id: when its unusable bucket was last logged
        # The event loop it serves, asked for once (see take).
        self._loop: asyncio.AbstractEventLoop | None = None

    def name(self, key_id: str) -> str:
        return self.link.tagged("rl:", key_id)

    def _loop_of(self) -> asyncio.AbstractEventLoop:
        # Not asyncio.get_running_loop() per call: on Python 3.11 each is a getpid() system call, and
        # that one cost about a twentieth of a request's CPU on this policy (py-spy, bench.py kg_redis).
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _queued(self, loop: asyncio.AbstractEventLoop) -> Batch:
        """The queue, its batch's sending asked for if it is the first call of the batch."""
        queue = self._queue
        if not queue:
            loop.call_soon(self._send)
            self._since = loop.time()  # the batch's oldest call: its redis.timeout runs from now
        return queue

    async def take(self, key_id: str, spec: RateLimitSpec, want: int, give_back: int = 0) -> tuple[int, float]:
        """Tokens granted (0..want) and tokens left; raises :class:`RedisUnavailable`."""
        link = self.link
        if not link.up:  # (RedisLink is not compiled: its method only when it raises, not per request)
            link.require_up()
        loop = self._loop_of()
        future: asyncio.Future[tuple[int, float]] = loop.create_future()
        call = _Call(key_id, spec, want, give_back)
        self._queued(loop).append(call)
        call.futures.append(future)
        return await future

    def decide(self, key_id: str, spec: RateLimitSpec, fallback: Fallback) -> asyncio.Future[RateLimitDecision]:
        """The exact policy's decision for one request (one token), as a future the caller awaits itself.

        Not a coroutine: the request's task waits on this future directly, two coroutine frames
        fewer to suspend and resume per request than ``await take(...)`` (bench.py kg_redis).
        Never fails: when Redis cannot answer, the future holds ``fallback``'s decision.
        """
        loop = self._loop_of()
        future: asyncio.Future[RateLimitDecision] = loop.create_future()
        link = self.link
        if not link.up:  # (RedisLink is not compiled: its method only when it raises, not per request)
            try:
                link.require_up()
            except RedisUnavailable:
                future.set_result(fallback.decide(key_id, spec))
                return future
        call = self._shared_runs.get(key_id)
        if call is None or call.spec is not spec or call.fallback is not fallback:
            call = self._shared_runs[key_id] = _Call(key_id, spec, 0, 0, fallback)
            self._queued(loop).append(call)
        call.want += 1
        call.futures.append(future)
        return future

    def _command(self, call: _Call) -> bytes:
        """``EVALSHA <sha> 1 <bucket> <capacity> <refill per second> <want> <give back>``, as RESP."""
        name = self._prefix + call.key_id.encode() + self._suffix
        spec = call.spec
        if spec is self._last_spec:
            args = self._last_args
        else:
            # By equality once per change of spec (a spec's hash is its dataclass's, run interpreted).
            found = self._spec_args.get(spec)
            if found is None:
                # Numbers encoded as redis-py encodes them (their repr), so the script reads the same text.
                found = self._spec_args[spec] = bulk(encode(spec.capacity)) + bulk(encode(spec.refill_per_second))
            args = self._last_args = found
            self._last_spec = spec
        return b"%s$%d\r\n%s\r\n%s%s%s" % (
            self._evalsha, len(name), name, args, bulk(b"%d" % call.want), bulk(b"%d" % call.give_back))

    def _arguments(self, call: _Call) -> tuple[Any, ...]:
        """The same call's arguments after ``EVALSHA <sha> 1``, for the cluster client."""
        return (self.name(call.key_id), call.spec.capacity, call.spec.refill_per_second, call.want, call.give_back)

    def _send(self, held_long: bool = False) -> None:
        if not self._queue:
            return  # sent already, by _replied, before this turn's call came round
        resp = self.link.resp
        if resp is not None and self._in_flight >= MAX_IN_FLIGHT and self.link.up and not held_long:
            # Held: _replied sends the queue when the batch out comes back, or _held_long after _hold.
            if self._hold_timer is None and self._loop is not None:
                self._hold_timer = self._loop.call_at(self._since + self._hold, self._held_long)
            return
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        batch, self._queue = self._queue, []
        self._shared_runs = {}
        try:
            if resp is not None and self.link.up:
                # The lean path, no coroutine: the batch is written now, from this loop callback, and
                # its replies are read by _replied, a callback on the batch's future. The connection
                # bounds it by redis.timeout on the wire, and its callers' wait by redis.timeout from
                # its oldest call's asking, held time included (HeldTooLong). (A
                # task, asyncio.timeout and two coroutines per round trip cost this policy a tenth
                # of its throughput: bench.py kg_redis.)
                future = resp.send(b"".join([self._command(call) for call in batch]), len(batch), self._since)
                if future is not None:
                    self.round_trips += 1
                    self._in_flight += 1
                    future.add_done_callback(functools.partial(self._replied, batch))
                    return
            # No connection open (first use, or dropped), Redis down, or a cluster: through RedisLink.run.
            self._in_task(self._run(batch, self._since))
        except Exception as exc:  # a loop callback: nobody else would ever answer these callers
            log.exception("sending rate-limit calls to Redis failed")
            _refuse(batch, RedisUnavailable(f"not sent: {exc!r}"))

    def _held_long(self) -> None:
        self._hold_timer = None
        self._send(held_long=True)

    def _in_task(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.Task(work, loop=self._loop)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _replied(self, batch: Batch,
                 replied: asyncio.Future[list[Any]]) -> None:
        """The lean path's replies: each caller's result, or the whole batch fails as one RedisLink.run call would."""
        self._in_flight -= 1
        try:
            self._settle(batch, replied)
        finally:
            if self._queue:
                self._send()  # what queued up meanwhile goes now (after a failure: Redis is down now)

    def _answer(self, batch: Batch, results: list[Result]) -> None:
        unusable = _answer(batch, results)
        if unusable:
            # Logged once a minute per key at most: every request of that key would otherwise log it.
            now = time.monotonic()
            logged = self._unusable_logged
            if len(logged) > 10_000:
                logged.clear()
            for call in unusable:
                if now - logged.get(call.key_id, -_UNUSABLE_LOG_EVERY) >= _UNUSABLE_LOG_EVERY:
                    logged[call.key_id] = now
                    log.warning(json.dumps({
                        "event": "ratelimit_bucket_unusable", "key_id": call.key_id, "bucket": self.name(call.key_id),
                        "detail": "the bucket's Redis key holds another type; this key's decisions are the "
                                  "fallback's until it is deleted",
                    }))

    def _settle(self, batch: Batch, replied: asyncio.Future[list[Any]]) -> None:
        error: BaseException | None = (
            RedisConnectionError("Connection dropped.") if replied.cancelled() else replied.exception())
        if error is None:
            replies = replied.result()
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                # Redis lost the script: those calls did not run; run them again, through RedisLink.run.
                self._in_task(self._run([batch[i] for i in missing], reload=True))
                replies = [reply for i, reply in enumerate(replies) if i not in missing]
                batch = [call for i, call in enumerate(batch) if i not in missing]
            try:
                results = _decoded(replies)
            except RedisError as exc:
                error = exc
            else:
                self._answer(batch, results)
                return
        elif isinstance(error, HeldTooLong):
            # Its callers waited redis.timeout from their asking, most of it held behind the batch before:
            # the fallback decides for them. Redis is not failing (it has had the batch less than that): the
            # connection is kept and the circuit stays closed.
            _refuse(batch, RedisUnavailable(str(error)))
            return
        _refuse(batch, self.link.failed(error))

    async def _run(self, batch: Batch, since: float | None = None, *, reload: bool = False) -> None:
        """The batch through :meth:`RedisLink.run`: connecting first if need be, or on a cluster.

        ``since`` (``loop.time()``): when its oldest call was asked for; its callers get the fallback
        redis.timeout after that, whatever the set-up and the call still take (those judge Redis).
        ``reload``: Redis answered NOSCRIPT: the script is loaded in the same round trip.
        """
        self.round_trips += 1
        give_up: asyncio.TimerHandle | None = None
        if since is not None and self.link.timeout and self._loop is not None:
            give_up = self._loop.call_at(since + self.link.timeout, _refuse, batch,
                                         RedisUnavailable("Timeout waiting for Redis (connecting)"))
        try:
            if self.link.resp is not None:
                commands = [self._command(call) for call in batch]
                await self.link.open_lean()  # (its set-up is not counted against redis.timeout)
                results = await self.link.run(lambda _client: self._evaluate(commands, reload))
            else:
                arguments = [self._arguments(call) for call in batch]
                results = await self.link.run(lambda _client: self._evaluate_on_cluster(arguments))
        except RedisUnavailable as exc:
            _refuse(batch, exc)
            return
        except Exception as exc:  # in a task of its own: nobody else would ever answer these callers
            log.exception("sending rate-limit calls to Redis failed")
            _refuse(batch, RedisUnavailable(f"not sent: {exc!r}"))
            return
        finally:
            if give_up is not None:
                give_up.cancel()
        self._answer(batch, results)

    async def _evaluate(self, calls: list[bytes], reload: bool = False) -> list[Result]:
        resp = self.link.resp
        assert resp is not None
        if reload:
            # The script is known lost: SCRIPT LOAD first, in the same write (Redis runs them in order).
            got = await resp.execute(self._load + b"".join(calls), 1 + len(calls))
            if isinstance(got[0], Exception):
                raise got[0]
            replies = got[1:]
        else:
            replies = await resp.execute(b"".join(calls), len(calls))
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # Redis restarted (or flushed its scripts): load it, and run exactly those again, in one round trip.
            again = await resp.execute(self._load + b"".join(calls[i] for i in missing), 1 + len(missing))
            if isinstance(again[0], Exception):
                raise again[0]
            for i, reply in zip(missing, again[1:]):
                replies[i] = reply
        return _decoded(replies)

    async def _evaluate_on_cluster(self, calls: list[Any]) -> list[Result]:
        """The batch through the cluster client's pipeline: each call to its bucket's master."""
        cluster: Any = self.link.client
        replies = await self._pipelined(cluster, calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # A master that never ran it (new, promoted, restarted): SCRIPT LOAD goes to every master.
            await cluster.script_load(TAKE_SCRIPT)
            for i, reply in zip(missing, await self._pipelined(cluster, [calls[i] for i in missing])):
                replies[i] = reply
        return _decoded(replies)

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

    def take_soon(self, key_id: str, spec: RateLimitSpec) -> asyncio.Future[RateLimitDecision]:
        """The decision as a future (the fallback's if Redis cannot give one); the pipeline awaits it itself."""
        return self.shared.decide(key_id, spec, self.fallback)

    async def take(self, key_id: str, spec: RateLimitSpec) -> RateLimitDecision:
        return await self.take_soon(key_id, spec)


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
                except BucketUnusable:
                    continue  # that bucket alone: the other leases still go back
                except RedisUnavailable:
                    return  # lost tokens only lower the limit until the bucket refills

    async def _return_idle(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval / 2)
            try:
                await self.return_idle()
            except Exception:  # the loop must outlive any surprise
                log.exception("returning idle leases failed")

