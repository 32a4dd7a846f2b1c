"""Waiting in tests for what happens in the background (a flush, a poll, a reconnect): never a fixed sleep."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any


async def until(check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Call ``check`` (awaiting what it returns when that is awaitable) until its value is truthy or
    ``timeout`` seconds have passed; returns the last value, so ``assert await until(...)`` fails on
    a timeout and ``[item] = await until(...)`` unpacks what was found."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = check()
        if inspect.isawaitable(found):
            found = await found
        if found or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(interval)
