"""The Redis policies' script calls, as bytes: what the lean path sends is what redis-py would send."""

from __future__ import annotations

import hashlib

import pytest
from redis.asyncio import Redis

from gateway.cache.redis_link import RedisLink
from gateway.config.ratelimit_spec import parse_rate_limit
from gateway.config.schema import RedisSettings
from gateway.pipeline.ratelimit_redis import TAKE_SCRIPT, SharedBuckets, _Call


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
