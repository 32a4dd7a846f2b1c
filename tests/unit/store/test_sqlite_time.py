"""SQLite timestamps: fixed-width UTC text that sorts like the instants it names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.store.rows import SQLITE_TIME_FORMAT as _TIME_FORMAT, sqlite_time_in as _sqlite_time_in, sqlite_time_out as _sqlite_time_out


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 23, 5, 0, 0, 123456, tzinfo=UTC),
        datetime(2026, 11, 23, 5, 0, 0, 0, tzinfo=UTC),  # no microseconds: still six digits
        datetime(2026, 1, 1, 0, 30, 0, 7, tzinfo=timezone(timedelta(hours=2))),  # converted to UTC
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),  # the last instant there is
    ],
    ids=["micro", "whole-second", "offset", "last"],
)
def test_text_is_the_documented_format_and_reads_back(value: datetime) -> None:
    """The stored text is exactly strftime(_TIME_FORMAT) of the UTC instant, and reads back to it."""
    text = _sqlite_time_in(value)
    assert text == value.astimezone(UTC).strftime(_TIME_FORMAT)
    assert _sqlite_time_out(text) == value


def test_years_before_1000_keep_the_strftime_text() -> None:
    """Years strftime does not pad are stored as strftime writes them, as before."""
    value = datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert _sqlite_time_in(value) == value.strftime(_TIME_FORMAT)


def test_none_stays_none() -> None:
    """A missing time is stored as NULL."""
    assert _sqlite_time_in(None) is None


def test_times_in_any_order_each_get_their_own_text() -> None:
    """Times within one second, across seconds, days and years, back and forth: each its own exact text."""
    start = datetime(2026, 12, 31, 23, 59, 58, 999_998, tzinfo=UTC)
    steps = [timedelta(microseconds=1), timedelta(microseconds=999_999), timedelta(seconds=1),
             timedelta(days=1), timedelta(days=-366), timedelta(seconds=-1), timedelta(0)]
    value = start
    for step in steps * 3:
        value += step
        for shown in (value, value.astimezone(timezone(timedelta(hours=-5)))):
            assert _sqlite_time_in(shown) == value.strftime(_TIME_FORMAT)


def test_one_time_given_again_keeps_its_text_between_others() -> None:
    """The records of one millisecond share one datetime (recorder.Stamps), whose text is made once:
    given again after other times, the very same object still gets its own text."""
    first = datetime(2026, 12, 6, 17, 30, 5, 123_000, tzinfo=UTC)
    second = datetime(2026, 12, 6, 17, 30, 5, 124_000, tzinfo=UTC)
    for value in (first, first, second, first, second, second, first):
        assert _sqlite_time_in(value) == value.strftime(_TIME_FORMAT)
