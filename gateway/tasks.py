"""Background tasks owned by one resource: started with it, stopped with it."""

from __future__ import annotations

import asyncio
import contextlib


async def stop_task(task: asyncio.Task[object] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has finished."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
