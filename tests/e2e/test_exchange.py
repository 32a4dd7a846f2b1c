"""The identity exchange through `keygate serve`: an OIDC token in, a short-lived key out, and that key as any other.

The issuer is run by the test (tests/identity_issuer.py: discovery and JWKS
on 127.0.0.1, tokens shaped like GitHub Actions' and Kubernetes'); the trust
policies are made as an operator makes them (the service the CLI and the
admin API share). The token's own bad cases are unit-tested at length in
tests/unit/identity/; here each kind of refusal is seen once as a client
sees it, answered as RFC 6749 section 5.2 says.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.models import KeyStatus
from tests.identity_issuer import OidcIssuer

from .conftest import bearer, metric
from .harness import KEYGATE, Keygate, Upstream, audit_events, clean_env, stored_requests

TOKEN = "/.well-known/keygate/token"
REVOKE = "/.well-known/keygate/revoke"
AUDIENCE = "https://keygate.example"
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def gateway(request: pytest.FixtureRequest, upstream: Upstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """`keygate serve` on each store (PostgreSQL migrated first, as an operator would)."""
    store_url = ""
    if request.param == "postgres":
        from tests.conftest import create_pg_database, drop_pg_database, pg_url_for
        name = asyncio.run(create_pg_database())
        store_url = pg_url_for(name)
        subprocess.run([KEYGATE, "migrate"], env=clean_env(KEYGATE_STORE__URL=store_url), check=True,
                       capture_output=True, timeout=60)
    # Every exchange of this module comes from 127.0.0.1: a client limit they never reach (its own test
    # is in test_exchange_requests.py).
    keygate = Keygate(tmp_path_factory.mktemp("exchange"), upstream.url, store_url=store_url,
                      config='[exchange]\nper_client = "10000/minute"\n').start()
    yield keygate
    assert keygate.stop() == 0
    if request.param == "postgres":
        asyncio.run(drop_pg_database(name))


@pytest.fixture
async def issuer() -> AsyncIterator[OidcIssuer]:
    async with OidcIssuer() as running:
        yield running


async def trust(gateway: Keygate, name: str, issuer: str, **settings: Any) -> None:
    settings.setdefault("conditions", {"repository": "acme/shop", "ref": "refs/heads/*"})
    settings.setdefault("operations", ["read"])
    async with gateway.service() as service:
        await service.put_trust_policy(name, issuer=issuer, audience=AUDIENCE, org="acme", replace=True,
                                       **settings)


async def exchange(http: aiohttp.ClientSession, gateway: Keygate, token: str, **extra: str,
                   ) -> tuple[int, dict[str, str], dict[str, Any]]:
    form = {"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": token, **extra}
    async with http.post(gateway.proxy_url + TOKEN, data=form) as r:
        return r.status, dict(r.headers), json.loads(await r.read())


async def status_of(http: aiohttp.ClientSession, gateway: Keygate, key: str, method: str = "GET",
                    path: str = "/items") -> int:
    async with http.request(method, gateway.proxy_url + path, headers=bearer(key)) as r:
        await r.read()
        return r.status


def now() -> datetime:
    return datetime.now(UTC)


# -- 200: the key, and the key as the policy says ---------------------------------------------


async def test_a_github_token_becomes_a_short_lived_key_that_works_as_its_policy_says(
    http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer,
) -> None:
    await trust(gateway, "shop-main", issuer.url, lifetime="10m", servers=["app"])
    claims = issuer.github_claims(now())
    status, headers, answer = await exchange(http, gateway, issuer.token(claims))
    assert status == 200, answer
    assert headers["Cache-Control"] == "no-store"
    key, key_id = answer["access_token"], answer["key_id"]
    assert key.startswith("kga_") and key.startswith(key_id)
    assert answer["token_type"] == "Bearer"
    assert answer["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert 595 <= answer["expires_in"] <= 600

    # An ordinary key of kind automation, expiring at the policy's lifetime, named from the claims.
    async with gateway.service() as service:
        record = await service.get_key(key_id)
    assert (record.kind, record.org, record.operations, record.servers) == ("automation", "acme", ("read",), ("app",))
    assert record.name == f"gh acme/shop@refs/heads/main run {claims['run_id']}"
    assert record.expires_at is not None and 590 <= (record.expires_at - now()).total_seconds() <= 600

    # The policy's operations hold: read yes, write no.
    assert await status_of(http, gateway, key) == 200
    assert await status_of(http, gateway, key, "POST") == 403

    # In the audit trail: who exchanged what, and the key's requests.
    events = await audit_events(gateway, key_id)
    action, details = events[0]
    assert action == "key.exchanged"
    assert details["policy"] == "shop-main" and details["issuer"] == issuer.url
    assert details["subject"] == "repo:acme/shop:ref:refs/heads/main"
    assert details["client_ip"] == "127.0.0.1"
    for claim in ("repository", "ref", "sha", "run_id", "workflow"):
        assert details["claims"][claim] == claims[claim]
    assert {r.status for r in await stored_requests(gateway, key_id)} >= {200}

    # The same token again: refused, and no second key.
    status, _, answer = await exchange(http, gateway, issuer.token(claims))
    assert (status, answer["error"]) == (400, "invalid_grant")
    async with gateway.service() as service:
        minted = [k for k in await service.list_keys(org="acme") if k.created_by == "exchange:shop-main"]
    assert [k.id for k in minted] == [key_id]


async def test_a_key_revokes_itself(http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer) -> None:
    await trust(gateway, "shop-revoke", issuer.url)
    _, _, answer = await exchange(http, gateway, issuer.token(issuer.github_claims(now())))
    key, key_id = answer["access_token"], answer["key_id"]
    assert await status_of(http, gateway, key) == 200

    async with http.post(gateway.proxy_url + REVOKE, headers=bearer(key)) as r:
        assert (r.status, await r.json()) == (200, {"revoked": key_id})
    # At once on this gateway (its cache forgets the key), and for good.
    assert await status_of(http, gateway, key) == 401
    async with http.post(gateway.proxy_url + REVOKE, headers=bearer(key)) as r:
        assert (r.status, (await r.json())["error"]) == (401, "invalid_token")
    async with gateway.service() as service:
        assert (await service.get_key(key_id)).status(now()) is KeyStatus.REVOKED
    events = await audit_events(gateway, key_id)
    assert [a for a, _ in events] == ["key.exchanged", "key.revoke"]
    assert events[1][1] == {"reason": "self"}


async def test_revoking_needs_a_valid_key(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    async with http.post(gateway.proxy_url + REVOKE) as r:
        assert (r.status, (await r.json())["error"]) == (401, "unauthorized")
    async with http.post(gateway.proxy_url + REVOKE, headers=bearer("kga_nonsense")) as r:
        assert (r.status, (await r.json())["error"]) == (401, "invalid_token")


async def test_the_policys_allowlist_and_rate_limit_hold(
    http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer,
) -> None:
    await trust(gateway, "shop-elsewhere", issuer.url, conditions={"repository": "acme/elsewhere"},
                ip_allowlist=["10.0.0.0/8"])
    await trust(gateway, "shop-slow", issuer.url, conditions={"repository": "acme/slow"}, rate_limit="2/minute")
    _, _, fenced = await exchange(http, gateway, issuer.token(issuer.github_claims(now(), repository="acme/elsewhere")))
    _, _, slow = await exchange(http, gateway, issuer.token(issuer.github_claims(now(), repository="acme/slow")))
    assert await status_of(http, gateway, fenced["access_token"]) == 403
    assert [await status_of(http, gateway, slow["access_token"]) for _ in range(3)] == [200, 200, 429]


async def test_a_kubernetes_token_is_checked_against_a_jwks_file(
    http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer, tmp_path: Path,
) -> None:
    jwks = issuer.write_jwks(tmp_path / "cluster-jwks.json")
    await issuer.go_offline()  # the API server's JWKS needs credentials: the file is all Keygate has
    await trust(gateway, "billing-pods", issuer.url, conditions={"sub": "system:serviceaccount:billing:*"},
                jwks_file=str(jwks))
    claims = issuer.kubernetes_claims(now(), namespace="billing", serviceaccount="invoicer", audience=AUDIENCE)
    status, _, answer = await exchange(http, gateway, issuer.token(claims),
                                       subject_token_type="urn:ietf:params:oauth:token-type:jwt")
    assert status == 200, answer
    assert await status_of(http, gateway, answer["access_token"]) == 200
    (action, details), = await audit_events(gateway, answer["key_id"])
    assert details["subject"] == "system:serviceaccount:billing:invoicer"
    assert details["claims"]["kubernetes.io"]["namespace"] == "billing"
    # No jti: the token itself is what is exchanged once.
    status, _, answer = await exchange(http, gateway, issuer.token(claims))
    assert (status, answer["error"]) == (400, "invalid_grant")
    # Another namespace's account matches no condition.
    other = issuer.kubernetes_claims(now(), namespace="shop", audience=AUDIENCE)
    assert (await exchange(http, gateway, issuer.token(other)))[0] == 400


# -- 400 invalid_grant, 503: what a token can be refused for -------------------------------------

BAD_TOKENS = [
    # (case, what is done to the claims or the token)
    ("wrong audience", lambda issuer, c: issuer.token({**c, "aud": "https://other.example"})),
    ("expired", lambda issuer, c: issuer.token({**c, "exp": c["iat"] - 3600, "nbf": c["iat"] - 7200,
                                                "iat": c["iat"] - 7200})),
    ("not yet valid", lambda issuer, c: issuer.token({**c, "nbf": c["iat"] + 600, "exp": c["iat"] + 900})),
    ("no condition holds", lambda issuer, c: issuer.token({**c, "repository": "acme/other"})),
    ("another ref", lambda issuer, c: issuer.token({**c, "ref": "refs/tags/v1"})),
    ("signed by a key the issuer never published", lambda issuer, c: issuer.token(c, key=issuer.attacker,
                                                                                   kid=issuer.signing.kid)),
    ("a kid the issuer does not know", lambda issuer, c: issuer.token(c, key=issuer.attacker)),
    ("alg none", lambda issuer, c: __import__("tests.identity_issuer", fromlist=["x"]).unsigned_token(c)),
    ("HS256 keyed with the public key", lambda issuer, c: __import__(
        "tests.identity_issuer", fromlist=["x"]).hmac_token(c, issuer.signing.public_pem())),
    ("wrong issuer", lambda issuer, c: issuer.token({**c, "iss": issuer.url + "/other"})),
]


@pytest.mark.parametrize(("case", "make"), BAD_TOKENS, ids=[c[0] for c in BAD_TOKENS])
async def test_a_token_no_policy_accepts_is_invalid_grant_without_saying_why(
    http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer, case: str, make: Any,
) -> None:
    await trust(gateway, "shop-strict", issuer.url)
    status, headers, answer = await exchange(http, gateway, make(issuer, issuer.github_claims(now())))
    assert (status, answer["error"]) == (400, "invalid_grant"), answer
    assert "access_token" not in answer
    # The same words whatever failed: which condition, key or claim is for the log.
    assert answer["error_description"].startswith("The subject token is not accepted")
    assert headers["Cache-Control"] == "no-store"


async def test_an_issuer_that_cannot_be_reached_is_503_never_invalid_grant(
    http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer,
) -> None:
    # A fresh issuer URL: nothing of it is cached in the gateway.
    await trust(gateway, "shop-down", issuer.url)
    token = issuer.token(issuer.github_claims(now()))
    issuer.status = 503
    status, headers, answer = await exchange(http, gateway, token)
    assert (status, answer["error"]) == (503, "temporarily_unavailable"), answer
    assert int(headers["Retry-After"]) >= 1
    # Not asked again before its retry delay has passed ...
    wait = int(headers["Retry-After"])
    assert wait <= 5
    status, _, answer = await exchange(http, gateway, token)
    assert (status, answer["error"]) == (503, "temporarily_unavailable")
    assert issuer.fetches["discovery"] == 1
    # ... and after it, the issuer back, the same token is exchanged: a 503 spent nothing.
    issuer.status = None
    await asyncio.sleep(wait + 0.5)
    status, _, answer = await exchange(http, gateway, token)
    assert status == 200, answer


async def test_several_matching_policies_need_one_named(
    http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer,
) -> None:
    await trust(gateway, "shop-any-ref", issuer.url, conditions={"repository": "acme/shop"})
    await trust(gateway, "shop-main-only", issuer.url, conditions={"sub": "repo:acme/shop:ref:refs/heads/main"},
                operations=["read", "write"])
    status, _, answer = await exchange(http, gateway, issuer.token(issuer.github_claims(now())))
    assert (status, answer["error"]) == (400, "invalid_request")
    assert "policy" in answer["error_description"]
    status, _, answer = await exchange(http, gateway, issuer.token(issuer.github_claims(now())),
                                       policy="shop-main-only")
    assert status == 200, answer
    assert await status_of(http, gateway, answer["access_token"], "POST") == 200


async def test_exchanges_are_counted(http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer) -> None:
    await trust(gateway, "shop-counted", issuer.url, conditions={"repository": "acme/counted"})
    before = await metric(http, gateway, "keygate_token_exchanges_total", result="exchanged")
    assert (await exchange(http, gateway, issuer.token(issuer.github_claims(now(), repository="acme/counted"))))[0] == 200
    for _ in range(30):
        if await metric(http, gateway, "keygate_token_exchanges_total", result="exchanged") == before + 1:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the exchange was not counted")


async def test_exchanges_past_a_policys_limit_get_429(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, http: aiohttp.ClientSession, issuer: OidcIssuer,
) -> None:
    keygate = Keygate(tmp_path_factory.mktemp("exchange-policy-limit"), upstream.url,
                      config='[exchange]\nper_policy = "2/hour"\n').start()
    try:
        await trust(keygate, "shop-limited", issuer.url)
        await trust(keygate, "other-repo", issuer.url, conditions={"repository": "acme/other"})
        statuses = [(await exchange(http, keygate, issuer.token(issuer.github_claims(now()))))[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        # Another policy has its own budget.
        other = issuer.token(issuer.github_claims(now(), repository="acme/other"))
        assert (await exchange(http, keygate, other))[0] == 200
    finally:
        keygate.stop()


async def test_the_key_stops_working_at_its_lifetime(
    http: aiohttp.ClientSession, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, issuer: OidcIssuer,
) -> None:
    """The shortest lifetime a policy allows (1 minute), waited out: the key is then 401 like any expired key.

    On one store only (its own gateway): the minute is the same on both, and the stores' expiry is the
    contract suite's (tests/contract/manage/test_trust.py, with an injected clock).
    """
    gateway = Keygate(tmp_path_factory.mktemp("exchange-lifetime"), upstream.url).start()
    await trust(gateway, "shop-brief", issuer.url, conditions={"repository": "acme/brief"}, lifetime="1m")
    _, _, answer = await exchange(http, gateway, issuer.token(issuer.github_claims(now(), repository="acme/brief")))
    key = answer["access_token"]
    assert 58 <= answer["expires_in"] <= 60  # whole seconds left when it was answered
    async with gateway.service() as service:
        expires_at = (await service.get_key(answer["key_id"])).expires_at
    assert expires_at is not None
    assert await status_of(http, gateway, key) == 200
    await asyncio.sleep(max(0.0, (expires_at - now()).total_seconds()) + 0.5)
    assert await status_of(http, gateway, key) == 401
    gateway.stop()
