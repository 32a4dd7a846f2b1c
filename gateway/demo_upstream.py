"""The quickstart's demo upstream: answers every request with what it received, as JSON."""

from __future__ import annotations

from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({
        "method": request.method,
        "path": request.path_qs,
        "headers": dict(request.headers),
        "body_bytes": len(body),
        "message": "Hello from the demo upstream: Keygate let this request through.",
    })


def demo_app() -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{path:.*}", echo)
    return app
