"""Request ids: the proxy's fresh ids, read from the OS in batches."""

from __future__ import annotations

import re

from gateway.pipeline.request_ids import RequestIds


def test_fresh_request_ids_are_distinct_32_hex_digits_across_batches() -> None:
    """Three batches' worth of ids are all 32 lowercase hex digits and no two are equal."""
    ids = RequestIds()
    made = [ids() for _ in range(3 * RequestIds.BATCH)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in made)
    assert len(set(made)) == len(made)
