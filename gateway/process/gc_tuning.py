"""Garbage-collector settings for a serving process.

A proxy worker allocates many short-lived container objects per request (the
request, its headers, futures, coroutine frames), and reference counting frees
almost all of them. With CPython's default young-generation threshold (700 net
allocations) the collector runs every few dozen requests under load, each time
scanning every request in flight and promoting the live ones to older
generations, whose collections then cost more still. On the benchmark of
issue 3 (``tests/perf/bench.py``) that was about a tenth of the worker's CPU
and tens of milliseconds of p99.
"""

from __future__ import annotations

import gc

# Measured on the benchmark: 5 000 to 20 000 cost the least CPU; far larger
# thresholds cost more again (each collection then walks a bigger young heap).
YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Leave what start-up built out of later collections, and collect young objects less often."""
    gc.collect()
    # Modules, settings and the runtime live as long as the process: once
    # frozen, no collection walks them again.
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
