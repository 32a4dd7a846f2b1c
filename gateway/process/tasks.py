"""Background tasks owned by one resource: started with it, stopped with it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

from ..store import StoreError

log = logging.getLogger("keygate.tasks")

STOP_TIMEOUT = 5.0  # seconds a cancelled task gets to finish before shutdown goes on without it


async def stop_task(task: asyncio.Task[object] | None, *, timeout: float = STOP_TIMEOUT) -> None:
    """Cancel ``task`` (if any) and wait until it has finished, for at most ``timeout`` seconds.

    A task still running after that (a library that swallowed the cancellation,
    a socket that never answers) is logged and left behind: a shutdown must not
    hang on it. Its exceptions, other than the cancellation, propagate.
    """
    if task is None:
        return
    task.cancel()
    done, _pending = await asyncio.wait({task}, timeout=timeout)
    if not done:
        log.warning(json.dumps({"event": "task_did_not_stop", "task": task.get_name(), "seconds": timeout}))
        return
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def every(interval: float, work: Callable[[], Awaitable[object]], logger: logging.Logger, event: str) -> None:
    """Run ``work`` now and then every ``interval`` seconds, until cancelled.

    Nothing stops the loop: a store that fails is a warning (``<event>_failed``, tried again next
    time), anything else is logged whole (``<event>_error``): background work must outlive surprises.
    """
    while True:
        try:
            await work()
        except StoreError as exc:
            logger.warning(json.dumps({"event": f"{event}_failed", "error": str(exc)}))
        except Exception:
            logger.exception(json.dumps({"event": f"{event}_error"}))
        await asyncio.sleep(interval)


def running_tasks() -> list[dict[str, object]]:
    """Every unfinished task of the running loop and where it waits: what a stuck shutdown logs."""
    found = []
    for task in asyncio.all_tasks():
        if task.done():
            continue
        frames = task.get_stack(limit=4)
        found.append({"task": task.get_name(), "coro": getattr(task.get_coro(), "__qualname__", "?"),
                      "at": [f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} {f.f_code.co_name}"
                             for f in frames]})
    return found
