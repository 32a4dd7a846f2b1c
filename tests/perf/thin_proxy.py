"""A thin reference proxy for ``bench.py``: plain aiohttp forwarding with a dict key check.

Usage: ``THIN_PROXY_KEYS=KEY[,KEY...] python thin_proxy.py PORT UPSTREAM_URL``

Same building blocks as Keygate — aiohttp's low-level ``web.Server``, one
shared ``aiohttp.ClientSession`` and uvloop when importable — and nothing
else: ``Authorization: Bearer <key>`` is checked against a dict, hop-by-hop
headers are dropped, method/path/headers/body go upstream and the response
is streamed back. No access log, no pipeline, no recording, no client
timeouts (aiohttp's default 5-minute total timeout costs a timer per request).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

# Hop-by-hop headers, and Host (aiohttp sets it for the upstream).
NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "host",
})
NO_TIMEOUT = aiohttp.ClientTimeout(total=None)
UNAUTHORIZED = b'{"error":"invalid_token"}'


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


async def main(port: int, upstream: str, keys: list[str]) -> None:
    allowed = {f"Bearer {k}": True for k in keys}
    base = upstream.rstrip("/")
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.headers.get("Authorization") not in allowed:
            return web.Response(status=401, body=UNAUTHORIZED, content_type="application/json")
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in NOT_FORWARDED)
        async with session.request(
            request.method, URL(base + request.raw_path, encoded=True), headers=headers, timeout=NO_TIMEOUT,
            data=request.content if request.body_exists else None, allow_redirects=False,
        ) as upstream_response:
            response = web.StreamResponse(
                status=upstream_response.status, reason=upstream_response.reason,
                headers=CIMultiDict((k, v) for k, v in upstream_response.headers.items()
                                    if k.lower() not in NOT_FORWARDED),
            )
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_chunked(64 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response

    runner = web.ServerRunner(web.Server(handle, access_log=None), shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    print(f"thin proxy listening on 127.0.0.1:{port} ({loop_name()})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await session.close()


def run() -> None:
    keys = [k for k in os.environ.get("THIN_PROXY_KEYS", "").split(",") if k]
    if len(sys.argv) != 3 or not keys:
        sys.exit(__doc__.split("\n\n")[1])
    coro = main(int(sys.argv[1]), sys.argv[2], keys)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    run()
