"""Every timeout of the proxy listener on one coarse timer per event loop.

A timer handle per request (``asyncio.timeout``, ``loop.call_later``) costs
an allocation, a heap push and a cancel per request, while the timeouts of
a proxy are seconds long and need no millisecond precision. So each watched
object (a client connection waiting for a head, a body or its next
request; an upstream exchange waiting for an answer; an idle tunnel) keeps
its own ``deadline`` (``loop.time()`` seconds, ``inf`` for none) and joins
one set; one repeating timer, every ``resolution`` seconds and only while
something is watched, calls ``expire(now)`` on each whose deadline passed.
Moving a deadline is an attribute write. A timeout fires between 0 and
``resolution`` seconds late.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, Protocol

RESOLUTION: Final = 0.1  # seconds


class Watched(Protocol):
    deadline: float

    def expire(self, now: float) -> None: ...


class Sweeper:
    """The watched objects of one event loop and the timer that expires them."""

    __slots__ = ("_loop", "_timer", "resolution", "time", "watched")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = RESOLUTION,
                 clock: Callable[[], float] | None = None) -> None:
        self._loop = loop
        self.resolution = resolution
        # Deadlines are read on this clock (the loop's, unless a test injects one).
        self.time = clock or loop.time
        self.watched: set[Watched] = set()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, item: Watched) -> None:
        self.watched.add(item)
        if self._timer is None:
            self._timer = self._loop.call_later(self.resolution, self._tick)

    def forget(self, item: Watched) -> None:
        self.watched.discard(item)

    def _tick(self) -> None:
        self.sweep()
        self._timer = self._loop.call_later(self.resolution, self._tick) if self.watched else None

    def sweep(self) -> None:
        """Expire everything whose deadline has passed (the timer calls this; so may a test)."""
        now = self.time()
        for item in [item for item in self.watched if item.deadline <= now]:
            item.expire(now)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


_sweepers: dict[asyncio.AbstractEventLoop, Sweeper] = {}


def sweeper() -> Sweeper:
    """The running loop's sweeper (made on first use)."""
    loop = asyncio.get_running_loop()
    found = _sweepers.get(loop)
    if found is None or found._loop.is_closed():
        for old in [old for old in _sweepers if old.is_closed()]:
            del _sweepers[old]
        found = _sweepers[loop] = Sweeper(loop)
    return found
