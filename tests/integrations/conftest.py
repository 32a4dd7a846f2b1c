"""Fixtures for the ingress integrations: an upstream, a Keygate with its authz listener, the ingress, clients.

Each test module names its ingress with a ``make_ingress`` fixture. The
ingress reaches Keygate from 127.0.0.1 (``authz.trusted_proxies``); clients
reach the ingress from 127.0.0.2 and 127.0.0.3, so the address Keygate judges
is visibly the one the ingress saw, not the ingress's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from ..e2e.harness import Keygate, Upstream

from .ingresses import Ingress

INGRESS_PEER = "127.0.0.1"
CLIENT = "127.0.0.2"
OTHER_CLIENT = "127.0.0.3"
ROUTES = (
    '[[routes]]\nmethods = ["POST"]\npath = "/api/servers/{server}/deploy"\noperation = "deploy"\n'
    '[[routes]]\npath = "/api/servers/{server}/*"\noperation = "servers:read"\n'
    '[[routes]]\npath = "/private/*"\noperation = "private"\npass_credentials = true\n'
)
# The tests' own refusals must not add up to too_many_attempts (every client shares 127.0.0.0/24).
FAILURES = "[failures]\nper_client = 1000\nper_network = 1000\nper_key = 1000\n"

MakeIngress = Callable[[Path, Keygate, Upstream], Ingress]


def start_keygate(folder: Path, upstream: Upstream) -> Keygate:
    return Keygate(folder, upstream.url, config=ROUTES + FAILURES,
                   authz=f'trusted_proxies = ["{INGRESS_PEER}/32"]').start()


def authz_address(keygate: Keygate) -> str:
    return f"127.0.0.1:{keygate.authz_port}"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keygate(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    gateway = start_keygate(tmp_path_factory.mktemp("keygate"), upstream)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def ingress(make_ingress: MakeIngress, keygate: Keygate, upstream: Upstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingress]:
    server = make_ingress(tmp_path_factory.mktemp("ingress"), keygate, upstream)
    yield server
    server.stop()


def session_from(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from ``address``."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)), auto_decompress=False)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client at 127.0.0.2."""
    async with session_from(CLIENT) as session:
        yield session


