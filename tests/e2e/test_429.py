"""429: a key's token bucket runs dry; failed authentications never charge it."""

from __future__ import annotations

import json
from dataclasses import replace

import aiohttp

from gateway.keys import generate

from .conftest import bearer
from .harness import Keygate


async def status_of(http: aiohttp.ClientSession, gateway: Keygate, key: str) -> tuple[int, dict[str, str], bytes]:
    async with http.get(gateway.proxy_url + "/echo", headers=bearer(key)) as r:
        return r.status, dict(r.headers), await r.read()


async def test_bucket_allows_the_limit_then_429(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """3/minute allows three requests, then 429 with Retry-After and RateLimit headers."""
    _, key = await gateway.key(name="ci", role="admin", rate_limit="3/minute")
    statuses = [(await status_of(http, gateway, key))[0] for _ in range(3)]
    status, headers, body = await status_of(http, gateway, key)
    assert statuses == [200, 200, 200] and status == 429
    assert headers["Retry-After"] == "20"  # one token every 20 s
    assert headers["RateLimit-Policy"] == '"key";q=3;w=60'
    assert headers["RateLimit"].startswith('"key";r=0;')
    assert json.loads(body)["error"] == "rate_limited"


async def test_burst_raises_capacity(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """A burst lets more requests through at once than the steady rate."""
    _, key = await gateway.key(name="ci", role="admin", rate_limit="1/minute; burst=3")
    statuses = [(await status_of(http, gateway, key))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


async def test_failed_authentication_is_not_charged(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """Wrong secrets for a key's id, and refusals, never use up that key's bucket."""
    record, key = await gateway.key(name="ci", operations=["read"], rate_limit="2/minute")
    wrong = replace(generate("kg_"), key_id=record.id).full
    for _ in range(5):
        assert (await status_of(http, gateway, wrong))[0] == 401
    async with http.post(gateway.proxy_url + "/echo", headers=bearer(key)) as r:
        assert r.status == 403  # refused by scope: not charged either
    assert [(await status_of(http, gateway, key))[0] for _ in range(3)] == [200, 200, 429]


async def test_keys_have_separate_buckets(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """One key running dry does not limit another."""
    _, first = await gateway.key(name="a", role="admin", rate_limit="1/minute")
    _, second = await gateway.key(name="b", role="admin", rate_limit="1/minute")
    assert [(await status_of(http, gateway, first))[0] for _ in range(2)] == [200, 429]
    assert (await status_of(http, gateway, second))[0] == 200
