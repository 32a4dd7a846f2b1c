"""429: a key's token bucket runs dry (failed authentications never charge it); too many failed attempts."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import aiohttp

from gateway.keys import generate

from .conftest import bearer, from_address, metric, wrong_secret
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


# --- too many failed attempts: the attacker is throttled, before any argon2 (issue 11) ---------


async def test_wrong_secrets_are_throttled_without_argon2(http: aiohttp.ClientSession, guarded: Keygate) -> None:
    """Past failures.per_key (10) wrong secrets, an id's guesses get 429 with Retry-After and run no argon2."""
    record, _ = await guarded.key(name="victim", role="admin")
    verified = await metric(http, guarded, "keygate_argon2_verifications_total")
    throttled = await metric(http, guarded, "keygate_lookups_refused_total", reason="throttled")

    async def guess(address: str) -> tuple[int, dict[str, str], dict[str, str]]:
        async with http.get(guarded.proxy_url + "/echo", headers=from_address(address, wrong_secret(record.id))) as r:
            return r.status, dict(r.headers), json.loads(await r.read())

    # Ten wrong secrets, then the id's one verification while suspicious (verify_per_second = 0.1)...
    first = [await guess(f"203.0.113.{i + 1}") for i in range(11)]
    assert [status for status, _, _ in first] == [401] * 11
    # ...then 429s, each held until its Retry-After (at most 1 s): sent at once, so the test stays short.
    rest = await asyncio.gather(*(guess(f"198.51.100.{i + 1}") for i in range(30)))
    assert [status for status, _, _ in rest] == [429] * 30
    _, headers, body = rest[-1]
    assert body["error"] == "too_many_attempts" and 1 <= int(headers["Retry-After"]) <= 10
    assert "RateLimit" not in headers and "WWW-Authenticate" not in headers
    assert await metric(http, guarded, "keygate_argon2_verifications_total") - verified == 11
    assert await metric(http, guarded, "keygate_lookups_refused_total", reason="throttled") - throttled == 30
    assert await metric(http, guarded, "keygate_requests_total", decision="denied",
                        reason="too_many_attempts") >= 30


async def test_admin_api_throttles_with_a_problem(http: aiohttp.ClientSession, guarded: Keygate) -> None:
    """The admin listener answers a throttled guess with a problem+json 429 and Retry-After."""
    record, _ = await guarded.key(name="ops", role="admin", servers=["admin"])
    for i in range(12):
        headers = from_address(f"198.51.100.{i + 1}", wrong_secret(record.id))
        async with http.get(guarded.admin_url + "/admin/v1/keys", headers=headers) as r:
            status, content_type, body = r.status, r.content_type, await r.json(content_type=None)
            retry_after = r.headers.get("Retry-After")
    assert (status, content_type) == (429, "application/problem+json")
    assert body["type"] == "urn:keygate:problem:too_many_attempts" and body["status"] == 429
    assert retry_after is not None and int(retry_after) >= 1
