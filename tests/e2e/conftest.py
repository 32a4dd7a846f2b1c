"""End-to-end fixtures: one upstream and one ``keygate serve`` per test module."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.keys import generate

from .harness import Keygate, Upstream
from .scripted_upstream import ScriptedUpstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    """An upstream that answers what each test scripts (tests/e2e/scripted_upstream.py)."""
    up = ScriptedUpstream()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """A running gateway in front of the upstream: a few routes (one with a placeholder in its operation), else the catch-all."""
    folder = tmp_path_factory.mktemp("keygate")
    config = (
        '[[routes]]\nmethods = ["POST"]\npath = "/api/servers/{server}/deploy"\noperation = "deploy"\n'
        '[[routes]]\npath = "/api/servers/{server}/*"\noperation = "servers:read"\n'
        '[[routes]]\npath = "/private/*"\noperation = "private"\npass_credentials = true\n'
        '[[routes]]\nmethods = ["GET", "POST"]\npath = "/api/registry/{credential}/login"\n'
        'operation = "registry_login:{credential}"\n'
    )
    keygate = Keygate(folder, upstream.url, config=config, proxy='max_body_size = "2GiB"\n').start()
    yield keygate
    keygate.stop()


@pytest.fixture(scope="module")
def guarded(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """A gateway behind a trusted proxy (127.0.0.1 sends X-Forwarded-For naming the client), with a 1 s key cache.

    The failure limits are the defaults but verify_per_second = 0.1: an attacker's one verification
    while suspicious keeps that key id's budget spent for 10 s, so a test that finds the real key
    working right after an attack proves it passed without that budget.
    """
    folder = tmp_path_factory.mktemp("guarded")
    keygate = Keygate(folder, upstream.url, proxy='trusted_proxies = ["127.0.0.1/32"]\n',
                      config="[cache]\nttl = 1\n[failures]\nverify_per_second = 0.1\n").start()
    yield keygate
    keygate.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def from_address(address: str, key: str) -> dict[str, str]:
    """Headers of a request from ``address``, as a trusted proxy in front of Keygate would send them."""
    return {**bearer(key), "X-Forwarded-For": address}


def wrong_secret(key_id: str) -> str:
    """A well-formed key (its checksum valid) for ``key_id`` with a random, wrong secret."""
    return replace(generate(key_id[: key_id.index("_") + 1]), key_id=key_id).full


async def metric(http: aiohttp.ClientSession, gateway: Keygate, name: str, **labels: str) -> float:
    """The sum of the gateway's /metrics samples ``name`` that carry ``labels`` (and any others); 0 when absent."""
    async with http.get(gateway.admin_url + "/metrics") as r:
        text = await r.text()
    return sum(float(sample.value) for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())
