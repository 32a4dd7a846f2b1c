"""Fixtures for the keygate-login tests: its HTTP peers and a runner for its steps.

Keygate is a real ``keygate serve`` (tests/e2e/harness.py) in front of a real upstream, one
per module, with the routes of the example configs; the ID tokens are signed by an OIDC
issuer run by each test (tests/identity_issuer.py), whose keys that Keygate fetches.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.e2e.conftest import upstream  # noqa: F401  (the module-scoped upstream fixture)
from tests.e2e.harness import Keygate, Upstream
from tests.identity_issuer import OidcIssuer

from .actions_runner import Runner, node_binary
from .login_peers import ACTION_DIR, IdTokenService, KeygateStandIn, serve

ROUTES = (
    '[[routes]]\nmethods = ["POST"]\npath = "/api/servers/{server}/deploy"\noperation = "deploy"\n'
    '[[routes]]\npath = "/api/servers/{server}/*"\noperation = "servers:read"\n'
)


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """A real ``keygate serve``: the exchange, the revocation and the routes a deploy job calls.

    Every exchange of a module comes from 127.0.0.1: a client limit they never reach.
    """
    keygate = Keygate(tmp_path_factory.mktemp("keygate-login"), upstream.url,
                      config=ROUTES + '[exchange]\nper_client = "10000/minute"\n').start()
    yield keygate
    assert keygate.stop() == 0


@pytest.fixture
async def issuer() -> AsyncIterator[OidcIssuer]:
    """The issuer whose key signs the ID tokens; its discovery and JWKS are what Keygate fetches."""
    async with OidcIssuer() as running:
        yield running


@pytest.fixture
async def github(issuer: OidcIssuer) -> AsyncIterator[IdTokenService]:
    """The stand-in for GitHub's ID token service, signing with ``issuer``'s key."""
    service = IdTokenService(issuer)
    runner, service.url = await serve([web.get("/_apis/token", service.handle)])
    try:
        yield service
    finally:
        await runner.cleanup()


@pytest.fixture
async def stand_in() -> AsyncIterator[KeygateStandIn]:
    """The scripted stand-in for Keygate, for the answers a real one never gives."""
    keygate = KeygateStandIn()
    runner, keygate.url = await serve(keygate.routes())
    try:
        yield keygate
    finally:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def action(tmp_path: Path) -> Runner:
    """keygate-login's steps, run by the machine's node in the test's folder."""
    return Runner(ACTION_DIR, tmp_path, node_binary())
