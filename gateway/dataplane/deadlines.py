"""Upstream timeouts for every in-flight request, on one coarse timer per process.

``asyncio.timeout()`` costs a timer handle, a ``Timeout`` object and two
coroutine hops per request: about a twentieth of the proxy's own work per
request. An upstream timeout is seconds long and needs no millisecond
precision, so each process keeps its running :class:`Clock` objects in one
set and one repeating timer (every ``resolution`` seconds, only while some
clock runs) cancels the tasks whose deadline has passed; the clock turns
that cancellation into ``TimeoutError``, as ``asyncio.timeout()`` does. A
timeout therefore fires between 0 and ``resolution`` seconds late.

A clock counts only while Keygate waits on the upstream: :meth:`Clock.stop`
pauses it (while the client's next body chunk is awaited) and
:meth:`Clock.restart` starts a full period again. aiohttp's ``sock_read`` is
not used for this: aiohttp 3.14 re-arms that timer on a connection whose
reading was paused when its response ended, after the connection went back
to the pool (aio-libs/aiohttp#12953 and #13000), and it then fires in the
middle of the next request on that connection.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

RESOLUTION = 0.05  # seconds


class Deadlines:
    """The running clocks of one event loop, and the timer that expires them."""

    def __init__(self, resolution: float = RESOLUTION) -> None:
        self.resolution = resolution
        self._running: set[Clock] = set()
        self._timer: asyncio.TimerHandle | None = None

    def clock(self, seconds: float) -> Clock:
        """A clock of ``seconds`` for the current task; it runs inside its ``with`` block."""
        return Clock(self, seconds)

    def __len__(self) -> int:
        return len(self._running)

    def _add(self, clock: Clock) -> None:
        self._running.add(clock)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(loop.time() + self.resolution, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for clock in [c for c in self._running if c.deadline <= now]:
            clock._expire()
        self._timer = loop.call_at(now + self.resolution, self._tick, loop) if self._running else None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Clock:
    """One request's upstream timeout; ``with clock:`` raises ``TimeoutError`` when it ran out."""

    __slots__ = ("_owner", "_task", "_loop", "_cancelling", "seconds", "deadline", "expired")

    def __init__(self, owner: Deadlines, seconds: float) -> None:
        self._owner = owner
        self._task: asyncio.Task[object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancelling = 0
        self.seconds = seconds
        self.deadline = math.inf
        self.expired = False

    def __enter__(self) -> Clock:
        self._task = asyncio.current_task()
        if self._task is None:
            raise RuntimeError("an upstream clock must be used inside a task")
        self._loop = asyncio.get_running_loop()
        # Cancellations already pending on the task are someone else's (as asyncio.timeout() counts them).
        self._cancelling = self._task.cancelling()
        self.deadline = self._loop.time() + self.seconds
        self._owner._add(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._owner._running.discard(self)
        self.deadline = math.inf  # a body still streaming (an early answer) must not restart it
        if self.expired and self._task is not None:
            # Take back our cancellation however the block ended; if no other is pending,
            # the CancelledError was ours: the upstream took too long.
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def restart(self) -> None:
        """A full period again from now (the upstream took a chunk: it is making progress)."""
        if self._loop is not None and not self.expired and self in self._owner._running:
            self.deadline = self._loop.time() + self.seconds

    def stop(self) -> None:
        """Pause: what is awaited now is the client, not the upstream."""
        self.deadline = math.inf

    def _expire(self) -> None:
        self._owner._running.discard(self)
        self.expired = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
