"""When a key is due for key.idle or key.expiring: the rules the sweeper re-checks under each key's lock."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from gateway.hygiene.due import expiry_unwarned, idle_unannounced
from gateway.models import KeyRecord, KeyStatus

from ...clocks import WALL_START

DAY = 86400.0
T0 = WALL_START
KEY = KeyRecord(
    id="kg_AAAAAAAAAAAA", kind="integration", name="ci", org="default", user="", role="admin", operations=(),
    servers=("*",), ip_allowlist=(), rate_limit=None, created_by="test", created_at=T0, expires_at=None,
    revoked_at=None, last_used_at=None, last_used_ip=None,
)


@pytest.mark.parametrize(
    ("changes", "days_later", "due"),
    [
        ({}, 29, False),
        ({}, 30, True),
        ({"last_used_at": T0 + timedelta(days=5)}, 30, False),  # counted from the last use
        ({"last_used_at": T0 + timedelta(days=5)}, 35, True),
        ({"idle_notified_at": T0 + timedelta(days=30)}, 40, False),  # this spell was announced
        # Announced, used since, idle again: a new spell.
        ({"idle_notified_at": T0 + timedelta(days=30), "last_used_at": T0 + timedelta(days=31)}, 61, True),
        ({"canary": True}, 400, False),  # a decoy is unused by design
        ({"revoked_at": T0 + timedelta(days=1)}, 30, False),
        ({"expires_at": T0 + timedelta(days=20)}, 30, False),
    ],
)
def test_idle_unannounced(changes: dict, days_later: int, due: bool) -> None:
    """A live, non-canary key unused for idle_after whose current idle spell was not announced."""
    record = replace(KEY, **changes)
    now = T0 + timedelta(days=days_later)
    assert idle_unannounced(record, now, 30 * DAY) is due
    assert idle_unannounced(record, now, 0) is False  # idleness off


def test_a_canary_is_never_idle() -> None:
    """A canary's status stays active however long it is unused (it is shown as a canary instead)."""
    canary = replace(KEY, canary=True)
    assert canary.status(T0 + timedelta(days=400), 30 * DAY) is KeyStatus.ACTIVE
    assert KEY.status(T0 + timedelta(days=400), 30 * DAY) is KeyStatus.IDLE


@pytest.mark.parametrize(
    ("lifetime_days", "days_later", "changes", "due"),
    [
        (30, 22, {}, False),   # 8 days left
        (30, 23, {}, True),    # 7 days left
        (30, 30, {}, False),   # expired
        (7, 1, {}, False),     # made to live no longer than the warning
        (8, 2, {}, True),
        (30, 25, {"expiry_warned_for": T0 + timedelta(days=30)}, False),  # warned for this expiry
        (30, 25, {"expiry_warned_for": T0 + timedelta(days=20)}, True),   # warned for an earlier one
        (30, 25, {"revoked_at": T0 + timedelta(days=1)}, False),
    ],
)
def test_expiry_unwarned(lifetime_days: int, days_later: int, changes: dict, due: bool) -> None:
    """Unrevoked, within the warning of its expiry, made to live longer than the warning, not warned for it."""
    record = replace(KEY, expires_at=T0 + timedelta(days=lifetime_days), **changes)
    now = T0 + timedelta(days=days_later)
    assert expiry_unwarned(record, now, 7 * DAY) is due
    assert expiry_unwarned(record, now, 0) is False  # warnings off
