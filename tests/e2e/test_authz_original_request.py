"""The authz listener never believes an X-Original-* header the trusted ingress did not set.

Traefik ForwardAuth (unless authRequestHeaders is set), Caddy forward_auth and ingress-nginx copy the
client's own headers into the question they ask, and add their account of the request in *their* header
(X-Forwarded-Method / X-Forwarded-Uri, or X-Original-URL). Keygate reads X-Original-Method and
X-Original-URI first, so a client behind those ingresses names the request it is judged for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from .conftest import bearer
from .harness import Keygate, Upstream

INGRESS = "127.0.0.2"
ROUTES = (
    '[[routes]]\nmethods = ["POST"]\npath = "/api/servers/{server}/deploy"\noperation = "deploy"\n'
    '[[routes]]\npath = "/api/servers/{server}/*"\noperation = "servers:read"\n'
)


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    keygate = Keygate(tmp_path_factory.mktemp("authz13"), upstream.url, config=ROUTES,
                      authz=f'trusted_proxies = ["{INGRESS}/32"]').start()
    yield keygate
    keygate.stop()


@pytest.fixture
async def ingress() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(INGRESS, 0))) as session:
        yield session


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
    _, key = await gateway.key(name="reader", operations=["servers:read"])
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
    _, key = await gateway.key(name="writer", operations=["write"])  # the catch-all's write, not deploy
    said = {"X-Original-Method": "POST", "X-Original-URL": "http://api.example:80?x/api/servers/prod/deploy"}
    async with ingress.get(gateway.authz_url + "/auth", headers={**bearer(key), **said}) as r:
        status = r.status
    assert status == 403, f"judged on another path than /api/servers/prod/deploy ({status})"
