"""The proxy listener of an in-process runtime, as ``keygate serve`` starts it, on a free loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.dataplane.listener import proxy_listener
from gateway.runtime import Runtime


@asynccontextmanager
async def serving(rt: Runtime) -> AsyncIterator[str]:
    """Yields the listener's base URL (``http://127.0.0.1:PORT``); closed (in-flight requests cut) on exit."""
    listener = proxy_listener(rt.gateway.handle, rt.gateway.forwarder.sweeper, rt.settings.proxy)
    bound = await listener.start("127.0.0.1", 0)
    try:
        yield f"http://{bound}"
    finally:
        await listener.shutdown(0)
