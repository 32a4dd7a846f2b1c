"""The Redis policies' script calls, as bytes: what the lean path sends is what redis-py would send."""

from __future__ import annotations

import hashlib

import pytest
from redis.asyncio import Redis

from gateway.cache.redis_link import RedisLink
from gateway.config.ratelimit_spec import parse_rate_limit
from gateway.config.schema import RedisSettings
from redis.exceptions import InvalidResponse

from gateway.pipeline.ratelimit_redis import TAKE_SCRIPT, SharedBuckets, _Call, _decoded


@pytest.mark.parametrize(("key_id", "spec", "want", "give_back"), [
    ("kg_AAAAAAAAAAAA", "20/hour", 1, 0),
    ("kg_AAAAAAAAAAAA", "100000000/minute", 1, 0),
    ("kg_BBBBBBBBBBBB", "7/second; burst=30", 3, 0),
    ("kg_CCCCCCCCCCCC", "1000/day", 0, 250),
])
async def test_a_script_call_is_the_command_redis_py_would_send(
    key_id: str, spec: str, want: int, give_back: int
) -> None:
    """EVALSHA with the script's SHA-1, the bucket's key under the prefix, and the numbers as redis-py encodes them."""
    link = RedisLink(RedisSettings(url="redis://127.0.0.1:6379/0", prefix="kgtest:"))
    try:
        shared = SharedBuckets(link)
        parsed = parse_rate_limit(spec)
        sha = hashlib.sha1(TAKE_SCRIPT.encode()).hexdigest()
        # The bucket's name as it has always been (link.key joins "rl:" and the id with ":"),
        # so buckets in a running Redis carry over.
        expected = Redis().connection_pool.make_connection().pack_command(
            "EVALSHA", sha, 1, f"kgtest:rl::{key_id}", parsed.capacity, parsed.refill_per_second, want, give_back)
        assert shared._command(_Call(key_id, parsed, want, give_back)) == b"".join(expected)
    finally:
        await link.close()


@pytest.mark.parametrize("reply", [
    [1, b"nan"], [1, b"inf"], [0, b"-inf"], [-1, b"3"], [1], b"OK", [b"one", b"2"],
])
def test_a_reply_no_script_run_gives_is_refused_whole(reply: object) -> None:
    """Only {tokens granted >= 0, a finite number left} makes decisions: anything else fails the batch as one
    InvalidResponse (its callers get the fallback's decision), not part-way through answering it."""
    with pytest.raises(InvalidResponse):
        _decoded([[1, b"19"], reply])
    assert _decoded([[1, b"19"], [0, b"0.25"]]) == [(1, 19.0), (0, 0.25)]
