"""A real upstream for end-to-end tests, run as its own process: ``python upstream_server.py PORT``.

``/echo`` (and any unknown path) answers with what it received; the other
paths misbehave on purpose. ``/__count`` tells how many requests arrived.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys

from aiohttp import WSMsgType, web

seen = 0
completed = 0


async def echo(request: web.Request) -> web.Response:
    global seen
    seen += 1
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    global completed
    completed += 1
    return web.json_response({
        "method": request.method,
        "path": request.raw_path,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_len": length,
        "body_sha256": digest.hexdigest(),
        "chunked": request.headers.get("Transfer-Encoding", "").lower() == "chunked",
    })


async def own_headers(request: web.Request) -> web.Response:
    """The echo, answered with a request id and RateLimit headers of the upstream's own making, as some apps
    answer (and the header Keygate's proxy answers when its rate limit is degraded)."""
    answer = await echo(request)
    answer.headers["X-Request-Id"] = "made-by-the-app"
    answer.headers["RateLimit"] = '"app";r=1;t=1'
    answer.headers["RateLimit-Policy"] = '"app";q=2;w=1'
    answer.headers["X-Keygate-RateLimit-Degraded"] = "made-by-the-app"
    return answer


async def close_header(request: web.Request) -> web.Response:
    """The echo with a header named Close: hop-by-hop (RFC 9110 7.6.1), which no proxy passes on."""
    answer = await echo(request)
    answer.headers["Close"] = "1"
    answer.headers["X-Other"] = "2"
    return answer


async def count(_request: web.Request) -> web.Response:
    return web.json_response({"seen": seen, "completed": completed})


async def stream_bytes(request: web.Request) -> web.StreamResponse:
    total = int(request.match_info["n"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = total
    await response.prepare(request)
    block = bytes(range(256)) * 256  # 64 KiB
    sent = 0
    while sent < total:
        piece = block[: min(len(block), total - sent)]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response


async def slow(request: web.Request) -> web.Response:
    global seen
    seen += 1
    await asyncio.sleep(float(request.match_info["seconds"]))
    return web.json_response({"slept": float(request.match_info["seconds"])})


async def hang(_request: web.Request) -> web.Response:
    await asyncio.sleep(3600)
    return web.Response(text="never")


async def reset(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_length = 100_000
    await response.prepare(request)
    await response.write(b"x" * 1000)
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()
    return response


async def stall(request: web.Request) -> web.StreamResponse:
    """Headers and part of the body, then nothing for an hour (the connection stays open)."""
    response = web.StreamResponse()
    response.content_length = 100_000
    await response.prepare(request)
    await response.write(b"x" * 1000)
    await asyncio.sleep(3600)
    return response


async def gzip_body(_request: web.Request) -> web.Response:
    import gzip

    return web.Response(body=gzip.compress(b"hello " * 100), headers={"Content-Encoding": "gzip",
                                                                      "Content-Type": "text/plain"})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    global seen
    seen += 1
    ws = web.WebSocketResponse(protocols=("echo.v1",))
    await ws.prepare(request)
    await ws.send_str("hello " + request.headers.get("X-Keygate-Key-Id", "?"))
    async for message in ws:
        if message.type is WSMsgType.TEXT:
            await ws.send_str("echo:" + message.data)
        elif message.type is WSMsgType.BINARY:
            await ws.send_bytes(message.data[::-1])
    return ws


def app() -> web.Application:
    application = web.Application(client_max_size=0)
    application.router.add_get("/__count", count)
    application.router.add_get("/bytes/{n}", stream_bytes)
    application.router.add_get("/slow/{seconds}", slow)
    application.router.add_get("/hang", hang)
    application.router.add_get("/reset", reset)
    application.router.add_get("/stall", stall)
    application.router.add_get("/gzip", gzip_body)
    application.router.add_get("/ws", websocket)
    application.router.add_get("/own-headers", own_headers)
    application.router.add_get("/close-header", close_header)
    application.router.add_route("*", "/{path:.*}", echo)
    return application


if __name__ == "__main__":
    web.run_app(app(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                shutdown_timeout=0.5)
