"""Latency histograms: each observation counted in the bucket /metrics reports it under (Prometheus ``le``)."""

from __future__ import annotations

import pytest

from gateway.dataplane.latency import BUCKETS, Histogram


@pytest.mark.parametrize(("seconds", "bucket"), [
    (0.0, 0),  # nothing is below the first bound
    (0.0001, 0),
    (0.0005, 0),  # equal to a bound: that bound's bucket (le), not the next
    (0.00051, 1),
    (0.001, 1),
    (0.003, 3),
    (0.5, 9),
    (0.75, 10),
    (60.0, len(BUCKETS) - 1),  # the last bound
    (60.001, len(BUCKETS)),  # past every bound: +Inf
    (1e9, len(BUCKETS)),
], ids=lambda v: repr(v))
def test_an_observation_is_counted_once_in_its_le_bucket(seconds: float, bucket: int) -> None:
    histogram = Histogram()
    histogram.observe(seconds)
    expected = [0] * (len(BUCKETS) + 1)
    expected[bucket] = 1
    assert histogram.snapshot() == {"counts": expected, "sum": seconds}


def test_the_sum_and_counts_add_up_over_observations() -> None:
    histogram = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.2, 1.0, 2.0, 0.01):
        histogram.observe(seconds)
    assert histogram.snapshot() == {"counts": [3, 2, 1], "sum": pytest.approx(3.36)}
