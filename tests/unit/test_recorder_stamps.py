"""The stamps of request records and last-used times: the clock's UTC time to the millisecond, rounded up."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gateway.hygiene.due import idle_unannounced
from gateway.models import KeyRecord
from gateway.recorder import Stamps
from tests.clocks import WALL_START

T = datetime(2026, 12, 6, 17, 30, 5, tzinfo=UTC)
T_NS = int(T.timestamp()) * 1_000_000_000  # a whole second, as epoch nanoseconds


def at_ns(when: datetime) -> int:
    """``when`` as epoch nanoseconds, exactly (no float on the way)."""
    return (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


@pytest.mark.parametrize(
    ("ns", "expected"),
    [
        (T_NS, T),  # a whole millisecond is its own stamp
        (T_NS + 1, T + timedelta(milliseconds=1)),
        (T_NS + 123_456_789, T + timedelta(milliseconds=124)),
        (T_NS + 999_000_001, T + timedelta(seconds=1)),  # into the next second
        (T_NS - 1, T),
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
    ],
    ids=["whole", "just-after", "within", "next-second", "just-before", "epoch"],
)
def test_a_stamp_is_the_clocks_utc_time_rounded_up_to_the_millisecond(ns: int, expected: datetime) -> None:
    stamp = Stamps(lambda: ns)()
    assert stamp == expected
    assert stamp.tzinfo is UTC


def test_stamps_of_one_millisecond_are_one_datetime_and_the_clock_is_followed_both_ways() -> None:
    """Within a millisecond every stamp is the same object (a flush formats it once); the next
    millisecond gets its own, and so does an earlier one when the clock is set back."""
    now = [T_NS + 10_200_000]
    stamps = Stamps(lambda: now[0])
    first = stamps()
    now[0] += 500_000  # still before millisecond 11 ends
    assert stamps() is first
    now[0] += 500_000  # into millisecond 12
    later = stamps()
    assert later is not first and later - first == timedelta(milliseconds=1)
    now[0] -= 1_000_000_000  # set back (NTP): followed, not held at the latest time seen
    assert stamps() == T - timedelta(seconds=1) + timedelta(milliseconds=12)


def a_key(**changes: object) -> KeyRecord:
    record = KeyRecord(
        id="kg_AAAAAAAAAAAA", kind="service", name="n", org="o", user="u", role=None, operations=(),
        servers=(), ip_allowlist=(), rate_limit=None, created_by="t", created_at=WALL_START, expires_at=None,
        revoked_at=None, last_used_at=None, last_used_ip=None,
    )
    return replace(record, **changes)


def test_a_use_is_never_stamped_before_what_preceded_it() -> None:
    """Times the stamp is compared with keep their microseconds (WALL_START's .123456): a use 0.3 ms
    after them is stamped after them, so a first use is not before the key's creation, and a use
    after an idle notice starts a new idle spell, announced again once it is long enough."""
    used = WALL_START + timedelta(microseconds=300)
    stamp = Stamps(lambda: at_ns(used))()
    assert stamp >= used > WALL_START
    key = a_key(created_at=WALL_START - timedelta(days=60), last_used_at=stamp, idle_notified_at=WALL_START)
    assert idle_unannounced(key, used + timedelta(days=31), idle_after=30 * 86400)
