"""A webhook receiver for the tests: a real aiohttp server on loopback, on a thread of its own.

It runs its own event loop, so it answers while the test blocks (starting or
stopping ``keygate serve``) and while the test's own loop is busy. Every POST
is recorded as it arrived; what each path answers is scripted:

- ``answers[path]``: statuses answered in turn (then 200); a 3xx carries ``Location: /redirected``;
- ``delays[path]``: seconds to wait before answering;
- ``/redirected``: 200 (a deliverer that follows redirects would show up here).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() on arrival

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]

    def signed_by(self, secret: str) -> bool:
        """Whether X-Keygate-Signature is the HMAC-SHA256 of the body under ``secret``, as a receiver checks it."""
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.headers.get("X-Keygate-Signature", ""))


class WebhookReceiver:
    def __init__(self, port: int = 0) -> None:
        self.port = port  # 0: any free one (a receiver started again may take its predecessor's)
        self.answers: dict[str, list[int]] = {}
        self.delays: dict[str, float] = {}
        self._received: list[Received] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the webhook receiver did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self._received if path is None or r.path == path]

    def wait_for(self, count: int, path: str | None = None, timeout: float = 10.0) -> list[Received]:
        """At least ``count`` deliveries (to ``path``), waiting up to ``timeout`` seconds (blocking)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.received(path)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"{len(self.received(path))} deliveries to {path or 'any path'} within {timeout}s, "
                             f"expected {count}")

    async def arrived(self, count: int, path: str | None = None, timeout: float = 10.0) -> list[Received]:
        """:meth:`wait_for` without blocking the caller's event loop."""
        return await asyncio.to_thread(self.wait_for, count, path, timeout)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self._received.append(Received(request.path, dict(request.headers), body, time.monotonic()))
            queue = self.answers.get(request.path)
            status = queue.pop(0) if queue else 200
        delay = self.delays.get(request.path, 0.0)
        if delay:
            await asyncio.sleep(delay)
        headers = {"Location": "/redirected"} if 300 <= status < 400 else {}
        return web.Response(status=status, text="ok" if status < 300 else "no", headers=headers)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()
