"""GitHub's secret-scanning reports, in-process: the runtime's proxy listener, both stores, a stand-in for GitHub.

Everything is real but the clock of GitHub's key cache (injected, for the
refetch and retry intervals) and, for the batch that outlasts its answer,
the answer budget. What a client sees of a refusal is tested here case by
case; the whole path through `keygate serve` is tests/e2e/test_secret_scanning.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlparse

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.config.schema import Settings
from gateway.hygiene import leaks
from gateway.hygiene.github_keys import GitHubKeys
from gateway.keys import generate
from gateway.manage.service import KeyService
from gateway.quickstart import demo_app
from gateway.runtime import Runtime, runtime
from tests.proxy_listener import serving

from ...clocks import FakeClock
from ...e2e.relay import Relay
from ...github_scanning import TYPE, GitHubScanning, ScanningKey, match, report
from ..dataplane.test_proxy import migrated

PATH = "/.well-known/keygate/secret-scanning"


@dataclass
class Scene:
    rt: Runtime
    url: str
    github: GitHubScanning
    clock: FakeClock[float]  # the clock of GitHub's key cache
    http: aiohttp.ClientSession

    def service(self) -> KeyService:
        return KeyService(self.rt.store, self.rt.settings, actor="test:operator")

    async def key(self) -> tuple[str, str]:
        record, full = await self.service().create_key(name="ci", role="admin")
        return record.id, full

    async def post(self, body: bytes, headers: dict[str, str] | list[tuple[str, str]]) -> tuple[int, Any, Any]:
        async with self.http.post(self.url + PATH, data=body, headers=headers) as r:
            raw = await r.read()
            return r.status, r.headers, json.loads(raw) if raw else None

    async def signed(self, matches: list[dict[str, Any]]) -> tuple[int, Any, Any]:
        body = report(matches)
        return await self.post(body, self.github.sign(body))

    async def proxied(self, full: str) -> int:
        async with self.http.get(self.url + "/items", headers={"Authorization": f"Bearer {full}"}) as r:
            await r.read()
            return r.status

    async def untouched(self, key_id: str, full: str) -> None:
        """The key works, is not leaked and has no key.leaked in its audit trail."""
        assert await self.proxied(full) == 200
        record = await self.service().get_key(key_id)
        assert record.leaked_at is None and record.revoked_at is None
        async with self.rt.store.read() as tx:
            assert "key.leaked" not in [e.action for e in await tx.list_audit(key=key_id)]


def settings_for(store_url: str, upstream: str, keys_url: str, *, per_client: str, **argon2: int) -> Settings:
    return Settings.model_validate({
        "store": {"url": store_url, "connect_timeout": 1}, "keys": {"argon2": {"memory_cost": 1024, **argon2}},
        "upstreams": [{"name": "app", "url": upstream}],
        "leaks": {"github_keys_url": keys_url, "per_client": per_client},
    })


@asynccontextmanager
async def scene(store_url: str, *, per_client: str = "100000/minute; burst=100000", **argon2: int,
                ) -> AsyncIterator[Scene]:
    """A runtime (migrated store, demo upstream) with its proxy listener, GitHub's stand-in and a client."""
    upstream = TestServer(demo_app())
    await upstream.start_server()
    clock: FakeClock[float] = FakeClock()
    async with GitHubScanning() as github:
        await migrated(store_url)
        settings = settings_for(store_url, str(upstream.make_url("/")), github.keys_url, per_client=per_client,
                                **argon2)
        async with runtime(settings) as rt, aiohttp.ClientSession() as http:
            assert rt.leaks is not None
            rt.leaks.keys = keys = GitHubKeys(github.keys_url, timeout=2.0, clock=clock)
            try:
                async with serving(rt) as url:
                    yield Scene(rt, url, github, clock, http)
            finally:
                await keys.close()
    await upstream.close()


@pytest.fixture
async def s(store_url: str) -> AsyncIterator[Scene]:
    async with scene(store_url) as running:
        yield running


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# -- 200 ----------------------------------------------------------------------------------------------

async def test_a_reported_key_is_revoked_and_answered_true_positive(s: Scene) -> None:
    """The feedback names the token by its SHA-256 and the report's type; the key is 401 at once in this process."""
    key_id, full = await s.key()
    assert await s.proxied(full) == 200  # cached: the report must drop it from the cache
    status, headers, answer = await s.signed([match(full, source="commit")])
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert answer == [{"token_hash": token_hash(full), "token_type": TYPE, "label": "true_positive"}]
    assert await s.proxied(full) == 401
    record = await s.service().get_key(key_id)
    assert record.leaked_at is not None and record.revoked_at is not None
    assert s.rt.leaks is not None and s.rt.leaks.results["true_positive"] == 1


async def test_garbage_and_other_vendors_tokens_cost_no_store_query(s: Scene) -> None:
    """Tokens that fail the key format's checksum are false positives before any store read or argon2 run."""
    _, full = await s.key()
    lookup = s.rt.authenticator.lookup
    reads, verifications = lookup.store_reads, lookup.verifications
    garbage = ["ghp_" + "a" * 36, "kg_short", full[:-1] + ("A" if full[-1] != "A" else "B"), "x" * 5000,
               "AKIAIOSFODNN7EXAMPLE", "kg_" + "A" * 50]
    status, _, answer = await s.signed([match(token) for token in garbage])
    assert status == 200
    assert [(a["token_hash"], a["label"]) for a in answer] == [(token_hash(t), "false_positive") for t in garbage]
    assert (lookup.store_reads, lookup.verifications) == (reads, verifications)


# -- 401, 400, 413: refused whole, nothing revoked -------------------------------------------------

STRANGER = ScanningKey.generate()


def _unsigned(g: GitHubScanning, body: bytes) -> tuple[bytes, Any]:
    return body, {"Content-Type": "application/json"}


def _only(header: str) -> Callable[[GitHubScanning, bytes], tuple[bytes, Any]]:
    return lambda g, body: (body, {k: v for k, v in g.sign(body).items() if k != header})


def _twice(g: GitHubScanning, body: bytes) -> tuple[bytes, Any]:
    signed = g.sign(body)
    return body, [*signed.items(), ("Github-Public-Key-Signature", signed["Github-Public-Key-Signature"])]


def _stranger_as_github(g: GitHubScanning, body: bytes) -> tuple[bytes, Any]:
    return body, g.sign(body, key=STRANGER, identifier=g.signing.identifier)


def _other_body(g: GitHubScanning, body: bytes) -> tuple[bytes, Any]:
    return body, g.sign(body.replace(b"content", b"commit"))


def _respaced(g: GitHubScanning, body: bytes) -> tuple[bytes, Any]:
    """The same JSON, serialised with spaces: a signature is over bytes, not over what they parse to."""
    return json.dumps(json.loads(body)).encode(), g.sign(body)


def _unknown_identifier(g: GitHubScanning, body: bytes) -> tuple[bytes, Any]:
    return body, g.sign(body, key=STRANGER)


def _signed(replacement: bytes) -> Callable[[GitHubScanning, bytes], tuple[bytes, Any]]:
    return lambda g, body: (replacement, g.sign(replacement))


def _signed_matches(make: Callable[[str], Any]) -> Callable[[GitHubScanning, bytes], tuple[bytes, Any]]:
    """A signed body built around the real key's token."""
    def build(g: GitHubScanning, body: bytes) -> tuple[bytes, Any]:
        token = json.loads(body)[0]["token"]
        replacement = json.dumps(make(token)).encode()
        return replacement, g.sign(replacement)
    return build


@pytest.mark.parametrize(
    ("case", "status"),
    [
        (_unsigned, 401),
        (_only("Github-Public-Key-Identifier"), 401),
        (_only("Github-Public-Key-Signature"), 401),
        (_twice, 401),
        (_stranger_as_github, 401),
        (_other_body, 401),
        (_respaced, 401),
        (_unknown_identifier, 401),
        (_signed(b"[{"), 400),
        (_signed(b"\xff\xfe not utf-8"), 400),
        (_signed(b"{}"), 400),
        (_signed(b'"kg_token"'), 400),
        (_signed_matches(lambda t: {"token": t, "type": TYPE, "url": ""}), 400),  # an object, not an array
        (_signed_matches(lambda t: [t]), 400),  # an array of strings
        (_signed_matches(lambda t: [{"type": TYPE, "url": ""}, match(t)]), 400),  # a match without token
        (_signed_matches(lambda t: [{"token": t, "url": ""}]), 400),  # no type
        (_signed_matches(lambda t: [{"token": t, "type": TYPE}]), 400),  # no url
        (_signed_matches(lambda t: [{"token": [t], "type": TYPE, "url": ""}]), 400),
        (_signed_matches(lambda t: [{"token": "", "type": TYPE, "url": ""}, match(t)]), 400),
        (_signed_matches(lambda t: [match(t, source=None) | {"source": 7}]), 400),
        (_signed_matches(lambda t: [match(t)] + [match("kg_x")] * leaks.MAX_TOKENS), 413),
        (_signed_matches(lambda t: [match(t, url="https://x/" + "a" * (1024 * 1024))]), 413),  # past 1 MiB
    ],
    ids=["unsigned", "no-signature", "no-identifier", "signature-twice", "wrong-key", "other-body", "respaced",
         "unknown-identifier", "malformed-json", "not-utf8", "empty-object", "json-string", "object-not-array",
         "array-of-strings", "missing-token", "missing-type", "missing-url", "token-not-string", "empty-token",
         "source-not-string", "too-many-tokens", "huge-body"],
)
async def test_a_bad_report_is_refused_whole_and_revokes_nothing(
    s: Scene, case: Callable[[GitHubScanning, bytes], tuple[bytes, Any]], status: int,
) -> None:
    """Each bad report gets its status with a JSON error, the key in it keeps working, and it counts as refused."""
    key_id, full = await s.key()
    body, headers = case(s.github, report([match(full)]))
    answered, _, answer = await s.post(body, headers)
    assert answered == status and answer["error"] and "request_id" in answer
    assert full not in json.dumps(answer)
    await s.untouched(key_id, full)
    assert s.rt.leaks is not None and s.rt.leaks.results == {"true_positive": 0, "false_positive": 0, "refused": 1}


async def test_a_body_that_does_not_arrive_in_time_is_408(s: Scene, monkeypatch: pytest.MonkeyPatch) -> None:
    """A report trickled in slower than the body deadline is refused 408, nothing revoked."""
    monkeypatch.setattr(leaks, "BODY_DEADLINE", 0.5)
    key_id, full = await s.key()
    body = report([match(full)])
    host, port = urlparse(s.url).hostname, urlparse(s.url).port
    reader, writer = await asyncio.open_connection(host, port)
    head = "".join(f"{k}: {v}\r\n" for k, v in s.github.sign(body).items())
    writer.write(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode()
                 + body[:10])
    await writer.drain()
    for index in range(10, 14):
        await asyncio.sleep(0.2)
        writer.write(body[index:index + 1])
        await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    await s.untouched(key_id, full)


async def test_a_client_over_its_limit_is_429_before_anything_is_read(store_url: str) -> None:
    """leaks.per_client: past it a report is 429 with Retry-After, and neither GitHub's keys nor the store are asked."""
    async with scene(store_url, per_client="2/minute") as s:
        key_id, full = await s.key()
        garbage = [match("kg_nothing")]
        assert [(await s.signed(garbage))[0] for _ in range(2)] == [200, 200]
        fetched, reads = s.github.fetches["keys"], s.rt.authenticator.lookup.store_reads
        status, headers, answer = await s.signed([match(full)])
        assert (status, answer["error"]) == (429, "temporarily_unavailable") and int(headers["Retry-After"]) >= 1
        assert (s.github.fetches["keys"], s.rt.authenticator.lookup.store_reads) == (fetched, reads)
        await s.untouched(key_id, full)


# -- GitHub's keys: rotation and outages ------------------------------------------------------------

async def test_an_unknown_identifier_refetches_once_then_401(s: Scene) -> None:
    """A key GitHub does not publish: one refetch, then 401; again within a minute, no fetch; a rotated key is found."""
    key_id, full = await s.key()
    garbage = report([match("kg_nothing")])
    assert (await s.signed([match("kg_nothing")]))[0] == 200  # the list is cached
    fetched = s.github.fetches["keys"]
    assert (await s.post(garbage, s.github.sign(garbage, key=STRANGER)))[0] == 401
    assert s.github.fetches["keys"] == fetched + 1
    assert (await s.post(garbage, s.github.sign(garbage, key=STRANGER)))[0] == 401
    assert s.github.fetches["keys"] == fetched + 1
    s.clock.advance(60)
    s.github.rotate()
    assert (await s.signed([match(full)]))[0] == 200  # signed by the new key, found by the refetch
    assert (await s.service().get_key(key_id)).revoked_at is not None


@pytest.mark.parametrize("outage", ["status", "offline"])
async def test_keys_out_of_reach_are_503_with_retry_after_and_the_report_can_be_sent_again(
    s: Scene, outage: str,
) -> None:
    """No key list to check the signature with: 503 and Retry-After (not 401); sent again once it is back, it works."""
    key_id, full = await s.key()
    if outage == "status":
        s.github.status = 503
    else:
        await s.github.go_offline()
    status, headers, answer = await s.signed([match(full)])
    assert (status, answer["error"]) == (503, "temporarily_unavailable") and int(headers["Retry-After"]) >= 1
    await s.untouched(key_id, full)
    s.github.status = None
    await s.github.go_online()
    s.clock.advance(5)
    status, _, answer = await s.signed([match(full)])
    assert (status, answer[0]["label"]) == (200, "true_positive")


# -- large batches -------------------------------------------------------------------------------------

async def test_a_batch_that_outlasts_the_budget_is_answered_in_time_and_finished_after(store_url: str) -> None:
    """With argon2 slower than the budget allows, the answer comes at the budget with the tokens settled so far;
    the rest are settled after it, the real key among them revoked and every token counted."""
    async with scene(store_url, memory_cost=65536) as s:
        assert s.rt.leaks is not None
        s.rt.leaks.answer_budget = 0.3
        key_id, full = await s.key()
        decoys = [replace(generate("kg_"), key_id=key_id).full for _ in range(20)]  # the real id, wrong secrets
        started = time.monotonic()
        status, _, answer = await s.signed([match(t) for t in [*decoys, full]])
        elapsed = time.monotonic() - started
        assert status == 200 and elapsed < 1.5
        assert len(answer) < 21 and all(a["label"] == "false_positive" for a in answer)
        assert {a["token_hash"] for a in answer} <= {token_hash(t) for t in decoys}
        for _ in range(200):
            if s.rt.leaks.unfinished == 0:
                break
            await asyncio.sleep(0.05)
        assert s.rt.leaks.results == {"true_positive": 1, "false_positive": 20, "refused": 0}
        assert (await s.service().get_key(key_id)).revoked_at is not None


async def test_duplicates_in_a_batch_count_once(s: Scene) -> None:
    """A token reported three times is verified, reported and answered once, in its first place."""
    key_id, full = await s.key()
    status, _, answer = await s.signed([match(full), match("kg_x"), match(full, url="https://other"), match(full)])
    assert status == 200
    assert [(a["token_hash"], a["label"]) for a in answer] == [
        (token_hash(full), "true_positive"), (token_hash("kg_x"), "false_positive")]
    async with s.rt.store.read() as tx:
        assert [e.action for e in await tx.list_audit(key=key_id)].count("key.leaked") == 1


# -- 503: the store ---------------------------------------------------------------------------------

async def test_a_store_that_cannot_be_read_is_503_and_the_report_can_be_sent_again(pg_database: str) -> None:
    """PostgreSQL cut before the answer: 503 with Retry-After (GitHub sends the report again), nothing lost."""
    db = urlparse(pg_database)
    relay = Relay(db.hostname or "127.0.0.1", db.port or 5432)
    relayed = pg_database.replace(f"{db.hostname}:{db.port or 5432}", f"127.0.0.1:{relay.port}")
    await migrated(pg_database)
    try:
        async with scene(relayed) as s:
            key_id, full = await s.key()
            relay.cut()
            status, headers, answer = await s.signed([match(full)])
            assert (status, answer["error"]) == (503, "temporarily_unavailable") and "Retry-After" in headers
            relay.restore()
            status, _, answer = await s.signed([match(full)])
            assert (status, answer[0]["label"]) == (200, "true_positive")
            assert (await s.service().get_key(key_id)).revoked_at is not None
    finally:
        relay.cut()
