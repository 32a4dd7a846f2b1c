"""The authz listener, asked directly: what it believes from whom, what it answers, what it records.

The trusted ingress is 127.0.0.2 (``authz.trusted_proxies``); requests from
127.0.0.1 are anyone's. The ingresses themselves (nginx, Envoy, Traefik,
Caddy) are in ``tests/integrations/``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from multidict import CIMultiDict

from .conftest import bearer, metric
from .harness import Keygate, Upstream, stored_requests

INGRESS = "127.0.0.2"
ROUTES = (
    '[[routes]]\nmethods = ["POST"]\npath = "/api/servers/{server}/deploy"\noperation = "deploy"\n'
    '[[routes]]\npath = "/api/servers/{server}/*"\noperation = "servers:read"\n'
    '[[routes]]\npath = "/private/*"\noperation = "private"\npass_credentials = true\n'
)
IDENTITY = ("X-Keygate-Key-Id", "X-Keygate-Key-Name", "X-Keygate-Org", "X-Keygate-User", "X-Keygate-Role",
            "X-Request-Id", "RateLimit-Policy", "RateLimit")


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    keygate = Keygate(tmp_path_factory.mktemp("authz"), upstream.url, config=ROUTES,
                      authz=f'trusted_proxies = ["{INGRESS}/32"]').start()
    yield keygate
    keygate.stop()


@pytest.fixture
async def ingress() -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose requests come from the trusted ingress's address."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(INGRESS, 0))) as session:
        yield session


async def ask(http: aiohttp.ClientSession, gateway: Keygate, headers: dict[str, str], path: str = "/auth",
              method: str = "GET") -> tuple[int, CIMultiDict[str], bytes]:
    async with http.request(method, gateway.authz_url + path, headers=headers) as r:
        return r.status, r.headers.copy(), await r.read()


async def test_allowed_is_200_with_identity_for_the_ingress_and_the_key_stripped(
    ingress: aiohttp.ClientSession, gateway: Keygate, upstream: Upstream,
) -> None:
    record, key = await gateway.key(name="ci", role="admin")
    before = upstream.count()
    status, headers, body = await ask(ingress, gateway, {
        **bearer(key), "X-Original-Method": "GET", "X-Original-URI": "/api/servers/prod/status?x=1"})
    assert (status, body) == (200, b"")
    assert [name for name in IDENTITY if name not in headers] == []
    assert headers["X-Keygate-Key-Id"] == record.id
    assert headers["X-Envoy-Auth-Headers-To-Remove"] == "authorization" and "Authorization" not in headers
    assert upstream.count() == before  # nothing is forwarded


async def test_pass_credentials_route_hands_the_key_back(ingress: aiohttp.ClientSession, gateway: Keygate) -> None:
    _, key = await gateway.key(name="ci", role="admin")
    status, headers, _ = await ask(ingress, gateway, {**bearer(key), "X-Forwarded-Method": "GET",
                                                      "X-Forwarded-Uri": "/private/x"})
    assert status == 200 and headers["Authorization"] == f"Bearer {key}"
    assert "X-Envoy-Auth-Headers-To-Remove" not in headers


@pytest.mark.parametrize(("original", "status"), [
    ({"X-Original-Method": "POST", "X-Original-URI": "/api/servers/prod/deploy"}, 403),
    ({"X-Original-Method": "GET", "X-Original-URI": "/api/servers/prod/deploy"}, 200),
    ({"X-Original-Method": "POST", "X-Original-URL": "https://api.example/api/servers/prod/deploy?a=1"}, 403),
    ({"X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/api/servers/prod/deploy"}, 403),
    ({"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/api/servers/prod/x"}, 200),
], ids=["nginx-deploy", "nginx-read", "ingress-nginx-url", "traefik-deploy", "traefik-read"])
async def test_the_original_request_is_judged_when_the_ingress_is_trusted(
    ingress: aiohttp.ClientSession, gateway: Keygate, original: dict[str, str], status: int,
) -> None:
    """A key that may read but not deploy: the ingress's account of the request decides."""
    _, key = await gateway.key(name="reader", operations=["servers:read"])
    got, headers, body = await ask(ingress, gateway, {**bearer(key), **original}, path="/auth", method="GET")
    assert got == status
    if status == 403:
        assert json.loads(body)["error"] == "insufficient_scope"
        assert headers["WWW-Authenticate"] == 'Bearer realm="keygate", error="insufficient_scope"'


async def test_an_untrusted_peer_is_judged_on_its_own_request(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """Spoofed X-Original-URI / X-Forwarded-Uri and X-Forwarded-For from anyone else change nothing."""
    _, key = await gateway.key(name="deployer", operations=["deploy"], ip_allowlist=["127.0.0.1/32"])
    spoofed = {**bearer(key), "X-Original-Method": "POST", "X-Original-URI": "/api/servers/prod/deploy",
               "X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/api/servers/prod/deploy",
               "X-Forwarded-For": "10.9.9.9"}
    # Judged as what it is: a POST to the deploy route from 127.0.0.1, which this key may do.
    status, _, _ = await ask(http, gateway, spoofed, path="/api/servers/prod/deploy", method="POST")
    assert status == 200
    # ... and a GET of /auth is not the deploy the headers claim.
    status, _, body = await ask(http, gateway, spoofed, path="/auth")
    assert status == 403 and json.loads(body)["error"] == "insufficient_scope"


async def test_client_address_comes_from_the_trusted_ingress_x_forwarded_for(
    ingress: aiohttp.ClientSession, gateway: Keygate,
) -> None:
    _, key = await gateway.key(name="office", role="admin", ip_allowlist=["10.0.0.0/8"])
    original = {"X-Original-Method": "GET", "X-Original-URI": "/api/servers/prod/x"}
    inside, _, _ = await ask(ingress, gateway, {**bearer(key), **original, "X-Forwarded-For": "10.1.2.3"})
    outside, _, body = await ask(ingress, gateway, {**bearer(key), **original, "X-Forwarded-For": "192.0.2.7"})
    assert (inside, outside) == (200, 403)
    assert json.loads(body)["error"] == "ip_not_allowed"


@pytest.mark.parametrize("credential", [None, "Bearer kg_nope", "Basic x"], ids=["none", "unknown", "malformed"])
async def test_refusals_are_the_proxy_listener_s_own(
    http: aiohttp.ClientSession, ingress: aiohttp.ClientSession, gateway: Keygate, credential: str | None,
) -> None:
    """Same status, headers and body (but for the request id) on both listeners."""
    headers = {"X-Request-Id": "same-id-123"} | ({"Authorization": credential} if credential else {})
    async with http.get(gateway.proxy_url + "/api/servers/prod/x", headers=headers) as r:
        inline = (r.status, {k: v for k, v in r.headers.items() if k not in ("Date", "Content-Length", "Via")},
                  await r.read())
    status, got, body = await ask(ingress, gateway, {**headers, "X-Original-URI": "/api/servers/prod/x"})
    assert (status, {k: v for k, v in got.items() if k not in ("Date", "Content-Length")}, body) == inline
    assert status in (400, 401)


async def test_decisions_are_recorded_with_the_original_request(ingress: aiohttp.ClientSession, gateway: Keygate) -> None:
    record, key = await gateway.key(name="recorded", operations=["servers:read"])
    for method in ("GET", "POST"):
        await ask(ingress, gateway, {**bearer(key), "X-Original-Method": method,
                                     "X-Original-URI": "/api/servers/prod/deploy", "X-Forwarded-For": "10.4.4.4"})
    stored = await stored_requests(gateway, record.id, count=2)
    seen = sorted((r.method, r.path, r.decision, r.status, r.client_ip) for r in stored)
    assert seen == [("GET", "/api/servers/prod/deploy", "allowed", 200, "10.4.4.4"),
                    ("POST", "/api/servers/prod/deploy", "insufficient_scope", 403, "10.4.4.4")]


async def test_decisions_are_counted_in_metrics(
    http: aiohttp.ClientSession, ingress: aiohttp.ClientSession, gateway: Keygate,
) -> None:
    before = await metric(http, gateway, "keygate_authz_requests_total", decision="denied", reason="no_credentials")
    await ask(ingress, gateway, {"X-Original-URI": "/api/servers/prod/x"})
    after = await metric(http, gateway, "keygate_authz_requests_total", decision="denied", reason="no_credentials")
    assert after == before + 1


@pytest.mark.parametrize("extra", [
    {"X-Original-URI": "/api/servers/prod/x"},  # a client's header passed along by Traefik
    {"X-Forwarded-Uri": "/api/servers/prod/x"},  # ... or by nginx, which sets only X-Original-URI
    {"X-Forwarded-Method": "GET"},
], ids=["second-uri", "second-uri-other-spelling", "second-method"])
async def test_an_original_request_named_twice_is_400(
    ingress: aiohttp.ClientSession, gateway: Keygate, extra: dict[str, str],
) -> None:
    """Two spellings of the original method or target: one is the client's, so neither is believed."""
    _, key = await gateway.key(name="reader2", operations=["servers:read"])
    base = {"X-Original-Method": "POST", "X-Original-URI": "/api/servers/prod/deploy"} \
        if "X-Original-URI" not in extra else {"X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/api/servers/prod/deploy"}
    status, _, body = await ask(ingress, gateway, {**bearer(key), **base, **extra})
    assert status == 400 and json.loads(body)["error"] == "invalid_request"


# Traefik ForwardAuth (without authRequestHeaders), Caddy forward_auth and ingress-nginx pass the client's own
# headers along with their account of the request: a client's X-Original-* must never win.
@pytest.mark.parametrize("ingress_said,client_added", [
    # Traefik / Caddy: the ingress says POST .../deploy; the client added nginx's headers to its request.
    ({"X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/api/servers/prod/deploy"},
     {"X-Original-Method": "GET", "X-Original-URI": "/api/servers/prod/status"}),
    # ingress-nginx: the ingress says X-Original-URL (and X-Original-Method); the client added X-Original-URI.
    ({"X-Original-Method": "POST", "X-Original-URL": "https://api.example/api/servers/prod/deploy"},
     {"X-Original-URI": "/api/servers/prod/status"}),
], ids=["traefik-caddy", "ingress-nginx"])
async def test_client_supplied_original_headers_do_not_override_the_ingress_s(
    ingress: aiohttp.ClientSession, gateway: Keygate, ingress_said: dict[str, str], client_added: dict[str, str],
) -> None:
    _, key = await gateway.key(name="reader-told-twice", operations=["servers:read"])
    async with ingress.get(gateway.authz_url + "/auth", headers={**bearer(key), **client_added, **ingress_said}) as r:
        status = r.status
    # The request the ingress will forward is a POST to the deploy route, which this key may not do;
    # with two accounts of it Keygate believes neither (400).
    assert status == 400, f"a read-only key was not refused ({status})"


async def test_x_original_url_is_judged_on_the_path_the_ingress_forwards(
    ingress: aiohttp.ClientSession, gateway: Keygate,
) -> None:
    """ingress-nginx builds X-Original-URL as ``$scheme://$http_host$request_uri``: ``$http_host`` is the
    client's raw Host header. nginx accepts ``Host: api.example:80?x`` (it routes on ``$host`` =
    ``api.example``), and urlsplit then reads ``?x/api/servers/prod/deploy`` as a query of path ``/``."""
    _, key = await gateway.key(name="writer-by-url", operations=["write"])  # the catch-all's write, not deploy
    said = {"X-Original-Method": "POST", "X-Original-URL": "http://api.example:80?x/api/servers/prod/deploy"}
    async with ingress.get(gateway.authz_url + "/auth", headers={**bearer(key), **said}) as r:
        status = r.status
    assert status == 403, f"judged on another path than /api/servers/prod/deploy ({status})"
