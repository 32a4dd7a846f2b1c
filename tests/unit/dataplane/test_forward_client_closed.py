"""Stage 8 — forward: a client that has gone away is a ClientClosed, not an upstream failure or a fault.

Real HTTP in-process: an upstream, a listener whose handler forwards once the
client has hung up, and a raw socket client. The handler waits for the hang-up
first, so the write that meets the closed connection is deterministic.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from gateway.config.schema import UpstreamSettings
from gateway.dataplane.forward import ClientClosed, Forwarder
from gateway.pipeline.scope import Target


async def _serve(handler: web.Application | web.Server) -> tuple[web.BaseRunner, int]:
    runner: web.BaseRunner = web.AppRunner(handler) if isinstance(handler, web.Application) \
        else web.ServerRunner(handler)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async def small(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def large(_request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 8 << 20
        await response.prepare(_request)
        for _ in range(128):
            await response.write(b"x" * (64 << 10))
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/small", small)
    app.router.add_get("/large", large)
    runner, port = await _serve(app)
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.parametrize("path", ["/small", "/large"], ids=["one-write answer", "streamed answer"])
async def test_forwarding_to_a_client_that_hung_up_raises_client_closed(upstream: str, path: str) -> None:
    """Writing the answer to a client that has closed its connection raises ClientClosed with the response."""
    outcome: asyncio.Future[BaseException | web.StreamResponse] = asyncio.get_running_loop().create_future()
    target = Target(upstream=UpstreamSettings(name="app", url=upstream), server="app", operation="read",
                    pass_credentials=False)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        forwarder = Forwarder(session, max_body_size=0, client_timeout=5)

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.01)  # until the client's hang-up has reached us
            try:
                response = await forwarder.forward(request, target, request.raw_path, CIMultiDict(), {})
            except BaseException as exc:
                outcome.set_result(exc)
                raise
            outcome.set_result(response)
            return response

        runner, port = await _serve(web.Server(handler, handler_cancellation=False))
        try:
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            result = await asyncio.wait_for(outcome, 10)
        finally:
            await runner.cleanup()
    assert isinstance(result, ClientClosed), result
    assert forwarder.upstream_errors == 0
