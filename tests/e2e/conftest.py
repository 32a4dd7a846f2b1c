"""End-to-end fixtures: one upstream and one ``keygate serve`` per test module."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from .harness import Keygate, Upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """A running gateway with the default (catch-all) routing in front of the upstream."""
    folder = tmp_path_factory.mktemp("keygate")
    config = (
        '[[routes]]\nmethods = ["POST"]\npath = "/api/servers/{server}/deploy"\noperation = "deploy"\n'
        '[[routes]]\npath = "/api/servers/{server}/*"\noperation = "servers:read"\n'
        '[[routes]]\npath = "/private/*"\noperation = "private"\npass_credentials = true\n'
    )
    keygate = Keygate(folder, upstream.url, config=config, proxy='max_body_size = "2GiB"\n').start()
    yield keygate
    keygate.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
