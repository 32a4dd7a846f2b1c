"""The gateway's side of `keygate login`: discovery, an ID token of login.issuer traded for the member's agent key.

The sign-in provider here is the test issuer (tests/identity_issuer.py) minting
ID tokens directly; the whole device grant against a real OpenID provider, as a
person runs it, is in tests/integrations/test_login.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from gateway.manage.audit import AuditFilter
from tests.conftest import create_pg_database, drop_pg_database, pg_url_for
from tests.identity_issuer import OidcIssuer

from .conftest import bearer
from .harness import KEYGATE, Keygate, Upstream, clean_env

CLIENT = "keygate-cli"
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"


@pytest.fixture
async def issuer() -> AsyncIterator[OidcIssuer]:
    async with OidcIssuer() as running:
        yield running


@pytest.fixture(params=["sqlite", "postgres"])
async def gateway(request: pytest.FixtureRequest, issuer: OidcIssuer, upstream: Upstream,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Keygate]:
    """`keygate serve` on each store (PostgreSQL migrated first, as an operator would)."""
    store_url, database = "", None
    if request.param == "postgres":
        database = await create_pg_database()
        store_url = pg_url_for(database)
        subprocess.run([KEYGATE, "migrate"], env=clean_env(KEYGATE_STORE__URL=store_url), check=True,
                       capture_output=True, timeout=60)
    keygate = Keygate(tmp_path_factory.mktemp("login"), upstream.url, store_url=store_url,
                      config=f'[login]\nissuer = "{issuer.url}"\nclient_id = "{CLIENT}"\norgs = ["acme", "ops"]\n')
    keygate.start()
    async with keygate.service() as service:
        await service.put_role("dev", ["read"])
        await service.set_member("acme", "alice@example.com", "dev")
        await service.set_member("acme", "carol@example.com", "dev")
        await service.set_member("ops", "carol@example.com", "dev")
        await service.set_member("elsewhere", "dave@example.com", "dev")
    yield keygate
    keygate.stop()
    if database is not None:
        await drop_pg_database(database)


def id_token(issuer: OidcIssuer, person: str, **overrides: Any) -> str:
    """An ID token for ``person`` (their email) as the provider issues it to the CLI; a None override drops a claim."""
    iat = int(datetime.now(UTC).timestamp())
    claims = {"iss": issuer.url, "sub": f"user-{person}", "aud": CLIENT, "email": person, "email_verified": True,
              "iat": iat, "exp": iat + 300, "jti": str(uuid.uuid4()), **overrides}
    return issuer.token({k: v for k, v in claims.items() if v is not None})


async def sign_in(http: aiohttp.ClientSession, gateway: Keygate, token: str, org: str | None = None,
                  ) -> tuple[int, dict[str, Any]]:
    form = {"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": token}
    if org:
        form["org"] = org
    async with http.post(gateway.proxy_url + "/.well-known/keygate/token", data=form) as r:
        return r.status, json.loads(await r.read())


async def status_of(http: aiohttp.ClientSession, gateway: Keygate, key: str) -> int:
    async with http.get(gateway.proxy_url + "/items", headers=bearer(key)) as r:
        return r.status


async def test_discovery_names_the_provider_and_client_and_no_secret(
    http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer, upstream: Upstream,
) -> None:
    before = upstream.count()
    async with http.get(gateway.proxy_url + "/.well-known/keygate") as r:
        assert r.status == 200
        found = await r.json()
    assert found["issuer"] == issuer.url and found["client_id"] == CLIENT and found["audience"] == CLIENT
    assert found["token_endpoint"] == "/.well-known/keygate/token"
    assert found["revocation_endpoint"] == "/.well-known/keygate/revoke"
    assert upstream.count() == before
    # A path that only begins like Keygate's is the upstream's.
    async with http.get(gateway.proxy_url + "/.well-known/keygateway") as r:
        assert r.status == 401  # an ordinary request: it needs a key


async def test_a_member_signs_in_and_signing_in_again_rotates_the_key(
    http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer,
) -> None:
    status, first = await sign_in(http, gateway, id_token(issuer, "alice@example.com"))
    assert status == 200, first
    assert (first["org"], first["user"], first["token_type"]) == ("acme", "alice@example.com", "Bearer")
    assert "expires_in" not in first  # an agent key does not expire
    assert await status_of(http, gateway, first["access_token"]) == 200
    async with http.get(gateway.proxy_url + "/.well-known/keygate/whoami", headers=bearer(first["access_token"])) as r:
        me = await r.json()
    assert (me["user"], me["org"], me["agent"], me["key_id"]) == ("alice@example.com", "acme", True, first["key_id"])

    status, second = await sign_in(http, gateway, id_token(issuer, "alice@example.com"), org="acme")
    assert status == 200 and second["key_id"] != first["key_id"]
    assert await status_of(http, gateway, second["access_token"]) == 200
    assert await status_of(http, gateway, first["access_token"]) == 401

    async with gateway.service() as service:
        page = await service.audit(AuditFilter(key=second["key_id"], type="event"), limit=10)
    (entry,) = page.entries
    assert entry.item.action == "key.login"  # type: ignore[union-attr]
    assert entry.item.details["user"] == "alice@example.com"  # type: ignore[union-attr]
    assert entry.item.details["client_ip"] == "127.0.0.1"  # type: ignore[union-attr]
    assert entry.item.details["replaced"] == first["key_id"]  # type: ignore[union-attr]


REFUSED = [
    # (case, email, token overrides, org, status, error, says)
    ("not a member anywhere", "mallory@example.com", {}, None, 403, "access_denied", "not a member"),
    ("a member only of an org login.orgs leaves out", "dave@example.com", {}, None, 403, "access_denied",
     "not a member"),
    ("another org than theirs", "alice@example.com", {}, "ops", 403, "access_denied", "may not sign in to org ops"),
    ("several orgs, none named", "carol@example.com", {}, None, 400, "invalid_request", "acme, ops"),
    # Text no member can be named by, and not every store can hold: never asked of the store.
    ("a NUL in the user claim", "alice\x00@example.com", {}, None, 403, "access_denied", "not a member"),
    ("a lone surrogate in the user claim", "\ud800@example.com", {}, None, 403, "access_denied", "not a member"),
    ("a NUL in the org asked for", "alice@example.com", {}, "acme\x00", 403, "access_denied", "may not sign in"),
    ("an unverified email", "alice@example.com", {"email_verified": False}, None, 400, "invalid_grant", "verified"),
    # Entra ID sends no email_verified, and its email claim is whatever the account's mail attribute says (nOAuth).
    ("an email the provider does not say it verified", "alice@example.com", {"email_verified": None}, None, 400,
     "invalid_grant", "verified"),
    ("email_verified as the string false", "alice@example.com", {"email_verified": "false"}, None, 400,
     "invalid_grant", "verified"),
    ("no email claim", "alice@example.com", {"email": None}, None, 400, "invalid_grant", "not accepted"),
    ("a token for another client", "alice@example.com", {"aud": "another-client"}, None, 400, "invalid_grant",
     "not accepted"),
    # OpenID Connect Core 3.1.3.7: an ID token the provider gave another client (its azp), even one that
    # lists this client among its audiences, is that client's: it must not sign in here.
    ("a token another client was given, listing ours too", "alice@example.com",
     {"aud": ["another-client", CLIENT], "azp": "another-client"}, None, 400, "invalid_grant", "not accepted"),
    ("several audiences and no azp", "alice@example.com", {"aud": ["another-client", CLIENT]}, None, 400,
     "invalid_grant", "not accepted"),
    ("an expired token", "alice@example.com", {"exp": 1_000_000_000, "iat": 999_999_000}, None, 400,
     "invalid_grant", "not accepted"),
]


@pytest.mark.parametrize(("case", "email", "overrides", "org", "status", "error", "says"), REFUSED,
                         ids=[c[0] for c in REFUSED])
async def test_a_refused_sign_in_says_why_and_makes_no_key(
    http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer, case: str, email: str,
    overrides: dict[str, Any], org: str | None, status: int, error: str, says: str,
) -> None:
    got, answer = await sign_in(http, gateway, id_token(issuer, email, **overrides), org=org)
    assert (got, answer["error"]) == (status, error), answer
    assert says in answer["error_description"]
    assert "access_token" not in answer
    async with gateway.service() as service:
        assert [k for k in await service.list_keys() if k.agent] == []


async def test_an_id_token_signs_in_once(http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer) -> None:
    token = id_token(issuer, "alice@example.com")
    assert (await sign_in(http, gateway, token))[0] == 200
    status, answer = await sign_in(http, gateway, token)
    assert (status, answer["error"]) == (400, "invalid_grant")


async def test_removing_the_member_kills_the_key(
    http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer,
) -> None:
    _, answer = await sign_in(http, gateway, id_token(issuer, "alice@example.com"))
    assert await status_of(http, gateway, answer["access_token"]) == 200
    async with gateway.service() as service:
        await service.remove_member("acme", "alice@example.com")
    # The change feed reaches the gateway within its poll interval.
    for _ in range(40):
        if await status_of(http, gateway, answer["access_token"]) != 200:
            break
        await asyncio.sleep(0.1)
    assert await status_of(http, gateway, answer["access_token"]) in (401, 403)


async def test_a_job_token_of_the_same_issuer_is_still_a_trust_policys(
    http: aiohttp.ClientSession, gateway: Keygate, issuer: OidcIssuer,
) -> None:
    """One provider can be both (GitLab signs people in and CI jobs' tokens): a token for a trust policy's
    audience goes to the trust policies, without naming one, as it did before [login] was set."""
    async with gateway.service() as service:
        await service.put_trust_policy("ci", issuer=issuer.url, audience="https://keygate.example", org="acme",
                                       conditions={"sub": "project_path:acme/shop:*"}, operations=["read"])
    iat = int(datetime.now(UTC).timestamp())
    job = issuer.token({"iss": issuer.url, "sub": "project_path:acme/shop:ref_type:branch:ref:main",
                        "aud": "https://keygate.example", "iat": iat, "exp": iat + 300, "jti": str(uuid.uuid4())})
    status, answer = await sign_in(http, gateway, job)
    assert status == 200, answer
    assert "org" not in answer  # a trust policy's key, not a person's
