"""The stamps of request records and last-used times: the clock's UTC time to the millisecond."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.recorder import Stamps
from tests.clocks import FakeClock

T = datetime(2026, 12, 6, 17, 30, 5, tzinfo=UTC).timestamp()  # a whole second, as epoch seconds


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (T, datetime(2026, 12, 6, 17, 30, 5, 0, tzinfo=UTC)),
        (T + 0.123_456, datetime(2026, 12, 6, 17, 30, 5, 123_000, tzinfo=UTC)),  # the milliseconds kept
        (T + 0.999_999, datetime(2026, 12, 6, 17, 30, 5, 999_000, tzinfo=UTC)),  # cut, never into the next second
        (T + 59.000_4, datetime(2026, 12, 6, 17, 31, 4, 0, tzinfo=UTC)),
        (0.0, datetime(1970, 1, 1, tzinfo=UTC)),
    ],
    ids=["whole-second", "milliseconds", "cut-not-rounded", "next-minute", "epoch"],
)
def test_a_stamp_is_the_clocks_utc_time_cut_to_the_millisecond(seconds: float, expected: datetime) -> None:
    stamp = Stamps(FakeClock(seconds))()
    assert stamp == expected
    assert stamp.tzinfo is UTC


def test_stamps_of_one_millisecond_are_one_datetime_and_the_clock_is_followed_both_ways() -> None:
    """Within a millisecond every stamp is the same object (a flush formats it once); the next
    millisecond gets its own, and so does an earlier one when the clock is set back."""
    clock = FakeClock(T + 0.010_2)
    stamps = Stamps(clock)
    first = stamps()
    clock.advance(0.000_5)  # still millisecond 10
    assert stamps() is first
    clock.advance(0.000_5)  # millisecond 11
    later = stamps()
    assert later is not first and (later - first).total_seconds() == pytest.approx(0.001)
    clock.advance(-1.0)  # set back (NTP): followed, not held at the latest time seen
    assert stamps() == datetime(2026, 12, 6, 17, 30, 4, 11_000, tzinfo=UTC)
