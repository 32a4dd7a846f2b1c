"""The test clock: it only moves when told to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T", float, datetime)

# Where a wall clock starts unless a test says otherwise: microseconds included, so
# code that drops or rounds them is caught.
WALL_START = datetime(2026, 11, 22, 12, 0, 0, 123456, tzinfo=UTC)


class FakeClock(Generic[T]):
    """A clock for code that takes one: monotonic seconds by default (caches, buckets, limiters),
    or wall-clock time when started at a datetime (expiry, rotation, audit)."""

    @overload
    def __init__(self: FakeClock[float]) -> None: ...
    @overload
    def __init__(self, start: T) -> None: ...

    def __init__(self, start: Any = 1000.0) -> None:
        self.now: T = start

    def __call__(self) -> T:
        return self.now

    def advance(self, seconds: float = 0.0, **delta: float) -> None:
        """Move on by ``seconds``, or by ``minutes=``, ``hours=``, ``days=`` ... as for a timedelta."""
        if isinstance(self.now, datetime):
            self.now += timedelta(seconds=seconds, **delta)
        else:
            self.now += seconds + timedelta(**delta).total_seconds()
