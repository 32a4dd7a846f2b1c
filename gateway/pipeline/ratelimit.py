"""Stage 7 — rate limit: a token bucket per key.

``"100/minute"`` is a bucket of 100 tokens refilled at 100 per minute (a
burst raises the capacity, not the rate); each request costs one token.
Buckets live in this process (policy ``local``); the Redis policies
(:mod:`gateway.pipeline.ratelimit_redis`) implement the same
:class:`RateLimiter` interface, which is why :meth:`LocalTokenBuckets.take`
is async although it never waits.

Only keys that passed every earlier stage reach this one, so a request that
fails authentication is never charged to the bucket of the key it claims.
"""

from __future__ import annotations

from math import ceil
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, NamedTuple, Protocol

from ..config.ratelimit_spec import RateLimitSpec
from ..models import new_tuple
from .outcomes import Denied, Outcome

# Float arithmetic can land a hair below a whole token (0.6 s of 100/minute
# is 0.99999... tokens); without the slack such a request would be refused
# and a wait of exactly 1 s would round up to 2.
_EPSILON: Final = 1e-9
DEGRADED_HEADER: Final = "X-Keygate-RateLimit-Degraded"
_DEGRADED_LINE: Final = f"{DEGRADED_HEADER}: 1\r\n".encode()


class RateLimitDecision(NamedTuple):
    """What the bucket said about one request, with what the headers report.

    A tuple: one is made per request, at a fifth of a frozen dataclass's cost.
    """

    allowed: bool
    spec: RateLimitSpec
    remaining: int  # whole tokens left after this request
    reset: int  # whole seconds, rounded up, until the bucket is full again
    retry_after: int | None  # whole seconds (>= 1) until one token is back; only when refused
    degraded: bool = False  # the shared policy failed and a fallback decided


class RateLimiter(Protocol):
    async def take(self, key_id: str, spec: RateLimitSpec) -> RateLimitDecision: ...


class RateLimited(Denied):
    """A rate-limit denial that carries its decision, for the 429's headers."""

    def __init__(self, decision: RateLimitDecision) -> None:
        super().__init__(Outcome.RATE_LIMITED, f"rate limit {decision.spec} exceeded",
                         retry_after=decision.retry_after)
        self.decision = decision


class _Bucket:
    """One key's tokens, with its spec's figures copied in (read per request: a spec's are slower to get)."""

    __slots__ = ("spec", "tokens", "stamp", "capacity", "limit", "window", "seconds_per_token")

    spec: RateLimitSpec
    capacity: float
    limit: float
    window: float
    seconds_per_token: float

    def __init__(self, spec: RateLimitSpec, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.respec(spec)

    def respec(self, spec: RateLimitSpec) -> None:
        """Take ``spec``'s figures; the tokens held never exceed its capacity (a key whose limit changed
        keeps what it has, up to that)."""
        self.spec = spec
        self.capacity = float(spec.capacity)
        self.limit = float(spec.limit)
        self.window = spec.window
        self.seconds_per_token = spec.seconds_per_token
        self.tokens = min(self.tokens, self.capacity)


class LocalTokenBuckets:
    """In-process token buckets per key id, bounded to ``max_keys`` buckets."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._clock = clock
        self._max_keys = max_keys
        # Ordered by last use, so the least recently used bucket is first.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    async def take(self, key_id: str, spec: RateLimitSpec) -> RateLimitDecision:
        return self.take_now(key_id, spec)

    def take_now(self, key_id: str, spec: RateLimitSpec) -> RateLimitDecision:
        """Charge one token to ``key_id``'s bucket if it holds a whole one."""
        now = self._clock()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = _Bucket(spec, float(spec.capacity), now)
            if len(self._buckets) > self._max_keys:
                self._shrink(now, keep=key_id)
        else:
            self._buckets.move_to_end(key_id)
            if bucket.spec is not spec:
                bucket.respec(spec)
            elapsed = now - bucket.stamp
            if elapsed > 0:
                bucket.tokens = min(bucket.capacity, bucket.tokens + elapsed * bucket.limit / bucket.window)
            bucket.stamp = now

        tokens = bucket.tokens
        allowed = tokens >= 1.0 - _EPSILON
        if allowed:
            tokens = bucket.tokens = max(0.0, tokens - 1.0)
        return _decision(allowed, spec, tokens, bucket.capacity, bucket.seconds_per_token)

    def _shrink(self, now: float, *, keep: str) -> None:
        """Bring the bucket count back under ``max_keys``.

        A full bucket behaves exactly like no bucket, so dropping those loses
        nothing; only if that is not enough do the least recently used go
        (they get a fresh, full bucket if they come back). The LRU pass goes
        down to 90 % so that a store of busy keys is not rescanned for every
        new key: the scan costs O(n) and then buys n/10 insertions.
        """
        for key_id, bucket in list(self._buckets.items()):
            spec = bucket.spec
            refilled = bucket.tokens + (now - bucket.stamp) * spec.limit / spec.window
            if key_id != keep and refilled >= spec.capacity - _EPSILON:
                del self._buckets[key_id]
        if len(self._buckets) > self._max_keys:
            low_water = max(1, self._max_keys - self._max_keys // 10)
            while len(self._buckets) > low_water:
                oldest = next(iter(self._buckets))
                if oldest == keep:  # cannot happen: the new key was used last
                    break
                del self._buckets[oldest]


def bucket_decision(allowed: bool, spec: RateLimitSpec, tokens: float) -> RateLimitDecision:
    """The decision for a bucket left holding ``tokens``."""
    return _decision(allowed, spec, tokens, float(spec.capacity), spec.seconds_per_token)


def _decision(allowed: bool, spec: RateLimitSpec, tokens: float, capacity: float,
              seconds_per_token: float) -> RateLimitDecision:
    reset = max(0, ceil((capacity - tokens) * seconds_per_token - _EPSILON))
    if allowed:
        return new_tuple(RateLimitDecision, (True, spec, int(tokens + _EPSILON), reset, None, False))
    retry_after = max(1, ceil((1.0 - tokens) * seconds_per_token - _EPSILON))
    return new_tuple(RateLimitDecision, (False, spec, 0, reset, retry_after, False))


def ratelimit_block(decision: RateLimitDecision) -> bytes:
    """:func:`ratelimit_headers` of an allowed request as header lines, built as bytes (once per request)."""
    # Unpacked at once: each field read by name would be a lookup of its own (compiled, a tuple's items are not).
    _allowed, spec, remaining, reset, retry_after, degraded = decision
    block = b'%sRateLimit: "key";r=%d;t=%d\r\n' % (spec.policy_line, remaining, reset)
    if retry_after is not None:
        block += b"Retry-After: %d\r\n" % retry_after
    if degraded:
        block += _DEGRADED_LINE
    return block


def ratelimit_headers(decision: RateLimitDecision) -> dict[str, str]:
    """The IETF httpapi RateLimit header fields (structured fields draft), and Retry-After on refusal."""
    headers = {
        "RateLimit-Policy": decision.spec.policy,
        "RateLimit": f'"key";r={decision.remaining};t={decision.reset}',
    }
    if decision.retry_after is not None:
        headers["Retry-After"] = str(decision.retry_after)
    if decision.degraded:
        # Tells operators (and clients) that the global limit was not consulted.
        headers[DEGRADED_HEADER] = "1"
    return headers
