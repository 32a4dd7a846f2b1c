"""502 and 504: the upstream refuses, resets or hangs."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest

from .conftest import bearer
from .harness import Keygate, refusing_port


@pytest.fixture(scope="module")
def dead_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """A gateway whose upstream port has nothing listening."""
    keygate = Keygate(tmp_path_factory.mktemp("dead"), f"http://127.0.0.1:{refusing_port()}").start()
    yield keygate
    assert keygate.stop() == 0


@pytest.fixture(scope="module")
def garbage_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keygate]:
    """A gateway whose upstream answers every request with something that is not HTTP."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(b"SURPRISE / NOT-HTTP\r\n\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    keygate = Keygate(tmp_path_factory.mktemp("garbage"),
                      f"http://127.0.0.1:{listener.getsockname()[1]}").start()
    yield keygate
    stop.set()
    thread.join()
    listener.close()
    assert keygate.stop() == 0


async def test_upstream_answering_garbage_is_502(http: aiohttp.ClientSession, garbage_upstream: Keygate) -> None:
    """An upstream whose answer is not HTTP gives 502 bad_gateway, with or without a request body."""
    _, key = await garbage_upstream.key(name="ci", role="admin")
    for method, data in (("GET", None), ("POST", b"x" * 10)):
        async with http.request(method, garbage_upstream.proxy_url + "/echo", headers=bearer(key), data=data) as r:
            assert r.status == 502
            assert json.loads(await r.read())["error"] == "bad_gateway"


async def test_refused_upstream_is_502(http: aiohttp.ClientSession, dead_upstream: Keygate) -> None:
    """Nothing listening upstream gives 502 bad_gateway, not a 500."""
    _, key = await dead_upstream.key(name="ci", role="admin")
    async with http.get(dead_upstream.proxy_url + "/echo", headers=bearer(key)) as r:
        assert r.status == 502
        assert json.loads(await r.read())["error"] == "bad_gateway"


async def test_hanging_upstream_is_504(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """An upstream that does not answer within its timeout (3 s here) gives 504."""
    _, key = await gateway.key(name="ci", role="admin")
    async with http.get(gateway.proxy_url + "/hang", headers=bearer(key)) as r:
        assert r.status == 504
        assert json.loads(await r.read())["error"] == "gateway_timeout"


async def test_upstream_stalling_mid_body_is_cut_off_after_its_timeout(
    http: aiohttp.ClientSession, gateway: Keygate,
) -> None:
    """Once the body has started, an upstream silent for its timeout (3 s) gets the client cut off, not left hanging."""
    _, key = await gateway.key(name="ci", role="admin")
    started = time.monotonic()
    async with http.get(gateway.proxy_url + "/stall", headers=bearer(key)) as r:
        assert r.status == 200 and r.headers["Content-Length"] == "100000"
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.read(), 30)
    assert time.monotonic() - started >= 3  # never before the upstream's timeout
    async with http.get(gateway.proxy_url + "/echo", headers=bearer(key)) as r:
        assert r.status == 200


async def test_reset_mid_body_cuts_the_client_off(http: aiohttp.ClientSession, gateway: Keygate) -> None:
    """An upstream that dies mid-body cannot make the client take a short body for a whole one."""
    _, key = await gateway.key(name="ci", role="admin")
    async with http.get(gateway.proxy_url + "/reset", headers=bearer(key)) as r:
        assert r.status == 200 and r.headers["Content-Length"] == "100000"
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    # The gateway is fine afterwards.
    async with http.get(gateway.proxy_url + "/echo", headers=bearer(key)) as r:
        assert r.status == 200
