"""The local-first policy across replicas: never more than the limit, and at most the documented shortfall.

Each process leases ``ratelimit.batch`` of the capacity at a time; tokens
leased by one process are not available to another until spent or returned
(after ``ratelimit.sync_interval``). So across P processes a key gets at most
N and at least N - (P - 1) x lease requests in a burst. This measures it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from ..e2e.harness import Upstream
from ..redis_server import SHARED_REDIS_URL, drop_prefix, unique_prefix
from .fleet import Fleet, by_status, statuses

LIMIT = 40
BATCH = 0.1  # the default: leases of 4 tokens
PROCESSES = 2 * 2


@pytest.fixture(scope="module")
def fleet(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    prefix = unique_prefix()
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), upstream, SHARED_REDIS_URL, prefix, replicas_count=2,
                  policy="local-first", extra=f"batch = {BATCH}\nsync_interval = 30\n")
    try:
        yield fleet.start()
    finally:
        fleet.stop()
        drop_prefix(SHARED_REDIS_URL, prefix)


async def test_local_first_stays_within_its_documented_tolerance(fleet: Fleet) -> None:
    """A 40/hour key hit 120 times across 2 replicas x 2 workers: at most 40 allowed, at least 40 - 3 x 4."""
    _, key = fleet.create_key("--role", "admin", "--rate-limit", f"{LIMIT}/hour")
    started = time.monotonic()
    results = await statuses(key, [r.proxy_url for _ in range(60) for r in fleet.replicas])
    refilled = int((time.monotonic() - started) * LIMIT / 3600)
    counts = by_status(results)
    lease = int(LIMIT * BATCH)
    print(f"local-first: {counts[200]} of {LIMIT} allowed across {PROCESSES} processes "
          f"(tolerance {LIMIT - (PROCESSES - 1) * lease}..{LIMIT})")
    degraded = sum("X-Keygate-RateLimit-Degraded" in headers for _, _, headers in results)
    assert set(counts) <= {200, 429} and degraded == 0, (counts, degraded)
    assert LIMIT - (PROCESSES - 1) * lease <= counts[200] <= LIMIT + refilled, counts
