"""Stage 7 — the per-key token bucket, its headers and its denial, on a test clock."""

from __future__ import annotations

import pytest

from gateway.pipeline.outcomes import Denied, Outcome
from gateway.pipeline.ratelimit import (
    LocalTokenBuckets,
    RateLimitDecision,
    RateLimited,
    ratelimit_block,
    ratelimit_headers,
)
from gateway.config.ratelimit_spec import RateLimitSpec, parse_rate_limit

from ...clocks import FakeClock

KEY = "kg_AAAAAAAAAAAA"
OTHER = "kg_BBBBBBBBBBBB"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def buckets(clock: FakeClock) -> LocalTokenBuckets:
    return LocalTokenBuckets(clock=clock)


def drain(buckets: LocalTokenBuckets, key_id: str, spec: RateLimitSpec, count: int) -> list[RateLimitDecision]:
    return [buckets.take_now(key_id, spec) for _ in range(count)]


@pytest.mark.parametrize(
    ("text", "allowed"),
    [
        ("100/minute", 100),
        ("1/second", 1),
        ("10/second; burst=50", 50),
        ("1000/hour", 1000),
        ("1/day", 1),
    ],
)
def test_a_full_bucket_allows_its_capacity_at_once(buckets: LocalTokenBuckets, text: str, allowed: int) -> None:
    """A fresh key may make exactly its capacity of requests at once, and the next is refused."""
    spec = parse_rate_limit(text)
    decisions = drain(buckets, KEY, spec, allowed + 1)
    assert [d.allowed for d in decisions] == [True] * allowed + [False]


@pytest.mark.parametrize(
    ("text", "retry_after"),
    [
        ("100/minute", 1),  # 0.6 s to the next token, rounded up
        ("1/second", 1),
        ("10/second; burst=50", 1),  # 0.1 s
        ("30/minute", 2),
        ("1000/hour", 4),  # 3.6 s
        ("1/day", 86400),
    ],
)
def test_retry_after_is_the_wait_for_one_token_rounded_up(
    buckets: LocalTokenBuckets, text: str, retry_after: int,
) -> None:
    """A refused request is told the whole seconds, rounded up, until one token is back."""
    spec = parse_rate_limit(text)
    refused = drain(buckets, KEY, spec, spec.capacity + 1)[-1]
    assert (refused.allowed, refused.remaining, refused.retry_after) == (False, 0, retry_after)


@pytest.mark.parametrize(
    ("elapsed", "allowed"),
    [
        (0.5, 0),
        (0.6, 1),
        (30.0, 50),
        (59.0, 98),
        (60.0, 100),
        (3600.0, 100),  # never more than the capacity
    ],
)
def test_tokens_refill_with_time(buckets: LocalTokenBuckets, clock: FakeClock, elapsed: float, allowed: int) -> None:
    """An empty "100/minute" bucket gets 100 tokens back per minute, up to its capacity."""
    spec = parse_rate_limit("100/minute")
    drain(buckets, KEY, spec, 100)
    clock.advance(elapsed)
    decisions = drain(buckets, KEY, spec, allowed + 1)
    assert [d.allowed for d in decisions] == [True] * allowed + [False]


def test_burst_raises_capacity_not_rate(buckets: LocalTokenBuckets, clock: FakeClock) -> None:
    """With a burst the bucket holds more, but still refills at the limit's rate."""
    spec = parse_rate_limit("10/second; burst=50")
    assert all(d.allowed for d in drain(buckets, KEY, spec, 50))
    clock.advance(1.0)
    decisions = drain(buckets, KEY, spec, 11)
    assert [d.allowed for d in decisions] == [True] * 10 + [False]


def test_remaining_counts_down(buckets: LocalTokenBuckets) -> None:
    """Each allowed request reports the whole tokens left after it."""
    spec = parse_rate_limit("5/minute")
    assert [d.remaining for d in drain(buckets, KEY, spec, 6)] == [4, 3, 2, 1, 0, 0]


@pytest.mark.parametrize(
    ("text", "taken", "reset"),
    [
        ("100/minute", 1, 1),  # 0.6 s to refill one token
        ("100/minute", 50, 30),
        ("100/minute", 100, 60),
        ("10/second; burst=50", 50, 5),
        ("1/day", 1, 86400),
    ],
)
def test_reset_is_the_time_until_full(buckets: LocalTokenBuckets, text: str, taken: int, reset: int) -> None:
    """reset is the whole seconds, rounded up, until the bucket is full again."""
    spec = parse_rate_limit(text)
    assert drain(buckets, KEY, spec, taken)[-1].reset == reset


FIRST_OF_100 = RateLimitDecision(True, parse_rate_limit("100/minute"), remaining=99, reset=1, retry_after=None)


async def test_an_unseen_key_starts_with_a_full_bucket(buckets: LocalTokenBuckets) -> None:
    """A key's first request is taken from a full bucket: capacity - 1 left, one token's refill to full."""
    assert await buckets.take(KEY, parse_rate_limit("100/minute")) == FIRST_OF_100


@pytest.mark.parametrize("elapsed", [60.0, 3600.0])
async def test_a_refilled_bucket_is_a_full_one(buckets: LocalTokenBuckets, clock: FakeClock, elapsed: float) -> None:
    """A bucket that has refilled completely answers its next request as a fresh key's bucket does."""
    spec = parse_rate_limit("100/minute")
    drain(buckets, KEY, spec, 100)
    clock.advance(elapsed)
    assert await buckets.take(KEY, spec) == FIRST_OF_100


def test_keys_have_independent_buckets(buckets: LocalTokenBuckets) -> None:
    """Draining one key's bucket leaves every other key's untouched."""
    spec = parse_rate_limit("3/minute")
    drain(buckets, KEY, spec, 4)
    assert [d.allowed for d in drain(buckets, OTHER, spec, 4)] == [True, True, True, False]


@pytest.mark.parametrize(
    ("first", "used", "second", "allowed_after_change"),
    [
        ("100/minute", 10, "20/minute", 20),  # 90 left, capped at the new capacity
        ("100/minute", 95, "20/minute", 5),  # fewer left than the new capacity: kept
        ("10/minute", 5, "100/minute", 5),  # a higher limit does not refill at once
    ],
)
def test_a_changed_spec_keeps_tokens_capped_at_the_new_capacity(
    buckets: LocalTokenBuckets, first: str, used: int, second: str, allowed_after_change: int,
) -> None:
    """When a key's limit changes its bucket keeps its tokens, never more than the new capacity."""
    drain(buckets, KEY, parse_rate_limit(first), used)
    decisions = drain(buckets, KEY, parse_rate_limit(second), allowed_after_change + 1)
    assert [d.allowed for d in decisions] == [True] * allowed_after_change + [False]


@pytest.mark.parametrize(
    ("first", "second", "elapsed", "allowed_after"),
    [
        ("10/minute", "600/minute", 1.0, 10),  # refilled at the new rate, 10 a second
        ("600/minute", "10/minute", 6.0, 1),  # and at the new, slower one: 1 in 6 s, not 60
        ("10/minute", "10/second; burst=20", 1.5, 15),  # up to the new capacity, not the old one
    ],
)
def test_a_changed_spec_refills_at_its_own_rate(
    buckets: LocalTokenBuckets, clock: FakeClock, first: str, second: str, elapsed: float, allowed_after: int,
) -> None:
    """Once a key's limit changed, its bucket refills at the new rate and up to the new capacity."""
    old, new = parse_rate_limit(first), parse_rate_limit(second)
    drain(buckets, KEY, old, old.capacity)
    assert drain(buckets, KEY, new, 1)[0].allowed is False  # the change alone gives nothing back
    clock.advance(elapsed)
    decisions = drain(buckets, KEY, new, allowed_after + 1)
    assert [d.allowed for d in decisions] == [True] * allowed_after + [False]
    assert decisions[0].remaining == allowed_after - 1 and decisions[0].spec is new


def test_eviction_keeps_the_number_of_buckets_bounded(clock: FakeClock) -> None:
    """However many keys come by, no more than max_keys buckets are kept."""
    buckets = LocalTokenBuckets(clock=clock, max_keys=10)
    spec = parse_rate_limit("5/minute")
    for i in range(1000):
        buckets.take_now(f"kg_{i:012d}", spec)
        assert len(buckets) <= 10


def test_eviction_drops_full_buckets_before_used_ones(clock: FakeClock) -> None:
    """Full buckets go first (nothing is lost), so a drained key stays drained."""
    buckets = LocalTokenBuckets(clock=clock, max_keys=3)
    spec = parse_rate_limit("1/minute")
    drain(buckets, KEY, spec, 1)  # the least recently used, but empty
    clock.advance(1.0)
    slow = RateLimitSpec(limit=1, window=1.0)
    for name in ("kg_a", "kg_b"):  # full again a second later
        buckets.take_now(name, slow)
    clock.advance(1.0)
    buckets.take_now("kg_c", slow)  # the fourth bucket: over the bound
    assert len(buckets) == 2  # kg_a and kg_b were full and went; KEY and kg_c stay
    assert buckets.take_now(KEY, spec).allowed is False


def test_eviction_never_gives_a_key_more_than_its_capacity(clock: FakeClock) -> None:
    """An evicted key comes back to at most a full bucket, never more."""
    buckets = LocalTokenBuckets(clock=clock, max_keys=2)
    spec = parse_rate_limit("3/minute")
    for _ in range(5):
        for key_id in (KEY, OTHER, "kg_CCCCCCCCCCCC"):  # each one evicts the least recent
            decisions = drain(buckets, key_id, spec, 4)
            assert sum(d.allowed for d in decisions) <= spec.capacity
            assert all(d.remaining < spec.capacity for d in decisions)


@pytest.mark.parametrize(
    ("decision", "expected"),
    [
        (
            RateLimitDecision(True, parse_rate_limit("100/minute"), remaining=99, reset=1, retry_after=None),
            {"RateLimit-Policy": '"key";q=100;w=60', "RateLimit": '"key";r=99;t=1'},
        ),
        (
            RateLimitDecision(False, parse_rate_limit("100/minute"), remaining=0, reset=60, retry_after=1),
            {"RateLimit-Policy": '"key";q=100;w=60', "RateLimit": '"key";r=0;t=60', "Retry-After": "1"},
        ),
        (
            RateLimitDecision(True, parse_rate_limit("10/second; burst=50"), remaining=49, reset=1,
                              retry_after=None),
            {"RateLimit-Policy": '"key";q=50;w=1', "RateLimit": '"key";r=49;t=1'},
        ),
        (
            RateLimitDecision(False, parse_rate_limit("1/day"), remaining=0, reset=86400, retry_after=86400),
            {"RateLimit-Policy": '"key";q=1;w=86400', "RateLimit": '"key";r=0;t=86400', "Retry-After": "86400"},
        ),
    ],
)

def test_headers_follow_the_ietf_draft(decision: RateLimitDecision, expected: dict[str, str]) -> None:
    """RateLimit-Policy and RateLimit are structured fields; Retry-After only on a refusal."""
    assert ratelimit_headers(decision) == expected
    # The proxy's bytes say the same, degraded or not.
    for degraded in (False, True):
        lines = ratelimit_block(decision._replace(degraded=degraded)).decode().split("\r\n")
        assert lines[-1] == ""
        assert dict(line.split(": ", 1) for line in lines[:-1]) == ratelimit_headers(decision._replace(degraded=degraded))


async def test_an_allowed_take_reports_what_is_left(buckets: LocalTokenBuckets) -> None:
    """An allowed request gets its decision back, for the response headers."""
    decision = await buckets.take(KEY, parse_rate_limit("2/minute"))
    assert (decision.allowed, decision.remaining) == (True, 1)


async def test_an_empty_bucket_makes_a_rate_limited_denial(buckets: LocalTokenBuckets) -> None:
    """The denial the pipeline raises for an empty bucket carries RATE_LIMITED, retry_after and the decision."""
    spec = parse_rate_limit("1/day")
    await buckets.take(KEY, spec)
    denial = RateLimited(await buckets.take(KEY, spec))
    assert isinstance(denial, Denied)
    assert (denial.outcome, denial.retry_after) == (Outcome.RATE_LIMITED, 86400)
    assert denial.decision.allowed is False
    assert ratelimit_headers(denial.decision)["Retry-After"] == "86400"
