"""Test clocks that only move when told to."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock (float seconds) for caches, buckets and limiters."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
