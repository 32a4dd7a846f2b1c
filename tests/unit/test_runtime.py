"""Start-up checks of the wiring."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack

import pytest

from gateway.runtime import rate_limiter, warn_if_exposed
from gateway.config.schema import Settings
from gateway.pipeline.ratelimit import LocalTokenBuckets
from gateway.pipeline.ratelimit_redis import LocalFirstBuckets, RedisTokenBuckets
from gateway.cache.redis_link import RedisLink


@pytest.mark.parametrize(
    ("proxy", "warned"),
    [
        ({"listen": "0.0.0.0:8000"}, True),
        ({"listen": "[::]:8000"}, True),
        ({"listen": "0.0.0.0:8000", "trusted_proxies": ["10.0.0.0/8"]}, False),
        ({"listen": "127.0.0.1:8000"}, False),
        ({"listen": "[::1]:8000"}, False),
    ],
)
def test_warns_when_exposed_without_trusted_proxies(
    caplog: pytest.LogCaptureFixture, proxy: dict[str, object], warned: bool
) -> None:
    """A listener beyond loopback with no trusted proxies logs a warning at start."""
    with caplog.at_level(logging.WARNING, logger="keygate"):
        warn_if_exposed(Settings.model_validate({"proxy": proxy}))
    assert ("no_trusted_proxies" in caplog.text) is warned


@pytest.mark.parametrize(
    ("redis_url", "policy", "expected"),
    [
        ("", "redis", LocalTokenBuckets),
        ("", "local-first", LocalTokenBuckets),
        ("redis://127.0.0.1:6379/0", "local", LocalTokenBuckets),
        ("redis://127.0.0.1:6379/0", "redis", RedisTokenBuckets),
        ("redis://127.0.0.1:6379/0", "local-first", LocalFirstBuckets),
    ],
)
async def test_policy_in_force(redis_url: str, policy: str, expected: type) -> None:
    """Without Redis every policy is per-process; with Redis the configured policy is used."""
    settings = Settings.model_validate({"redis": {"url": redis_url}, "ratelimit": {"policy": policy}})
    link = RedisLink(settings.redis) if redis_url else None
    async with AsyncExitStack() as stack:
        limiter, fallback = await rate_limiter(settings, link, stack)
        assert type(limiter) is expected
        assert (fallback is None) is (expected is LocalTokenBuckets)
    if link is not None:
        await link.close()
