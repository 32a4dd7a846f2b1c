"""Stage 3 — status: revoked, expired and member-removed keys all get the same INVALID_TOKEN."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gateway.models import KeyRecord
from gateway.cache.shared import KeyFacts
from gateway.pipeline.prepared import PreparedKey, prepare
from gateway.pipeline.outcomes import Denied, Outcome
from gateway.pipeline.status import check_status
from gateway.config.ratelimit_spec import parse_rate_limit

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
T = NOW.timestamp()
DEFAULT_RATE_LIMIT = parse_rate_limit("100/minute")

RECORD = KeyRecord(
    id="kg_7Hq2ZrT9xLmP", kind="integration", name="ci", org="default", user="", role="admin",
    operations=(), servers=("*",), ip_allowlist=(), rate_limit=None, created_by="test",
    created_at=NOW - timedelta(days=1), expires_at=None, revoked_at=None, last_used_at=None, last_used_ip=None,
)


def prepared(*, is_member: bool = True, **changes: object) -> PreparedKey:
    """The key as the pipeline gets it from the cache (:func:`prepare`, as the lookup calls it)."""
    record = replace(RECORD, **changes)  # type: ignore[arg-type]
    return prepare(KeyFacts(record, ("*",), is_member, "member" if is_member else None, ("*",)), DEFAULT_RATE_LIMIT)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"expires_at": NOW + timedelta(seconds=1)},
        {"revoked_at": NOW + timedelta(hours=1)},
        {"user": "alice"},
    ],
    ids=["no-dates", "expires-later", "revocation-scheduled", "per-user-member"],
)
def test_active_key_passes(changes: dict[str, object]) -> None:
    """An unrevoked, unexpired key (with its user still a member) passes the status check."""
    check_status(prepared(**changes), T)


@pytest.mark.parametrize(
    ("changes", "is_member"),
    [
        ({"revoked_at": NOW}, True),
        ({"revoked_at": NOW - timedelta(days=3)}, True),
        ({"expires_at": NOW}, True),
        ({"expires_at": NOW - timedelta(microseconds=1)}, True),
        ({"revoked_at": NOW - timedelta(days=1), "expires_at": NOW - timedelta(days=1)}, True),
        ({"user": "alice"}, False),
    ],
    ids=["revoked-now", "revoked-earlier", "expires-now", "expired", "revoked-and-expired", "member-removed"],
)
def test_dead_key_is_invalid_token(changes: dict[str, object], is_member: bool) -> None:
    """Revoked (revoked_at <= now), expired (expires_at <= now) and member-removed keys are INVALID_TOKEN."""
    with pytest.raises(Denied) as caught:
        check_status(prepared(is_member=is_member, **changes), T)
    assert caught.value.outcome is Outcome.INVALID_TOKEN


def test_scheduled_revocation_takes_effect_on_time() -> None:
    """A revocation set for later (a rotation's grace) lets the key work until then and not after."""
    key = prepared(revoked_at=NOW + timedelta(hours=1))
    check_status(key, T + 3599)
    with pytest.raises(Denied) as caught:
        check_status(key, T + 3600)
    assert caught.value.outcome is Outcome.INVALID_TOKEN


def test_expiry_needs_no_cache_event() -> None:
    """The same cached entry passes before its expiry and is refused from that instant, with no refresh."""
    key = prepared(expires_at=NOW + timedelta(days=30))
    check_status(key, T + 30 * 86400 - 0.001)
    with pytest.raises(Denied):
        check_status(key, T + 30 * 86400)


def test_org_level_key_needs_no_membership() -> None:
    """An org-level key (no user) is not refused for lacking a member record."""
    check_status(prepared(is_member=False, user=""), T)


def test_all_refusals_share_one_outcome() -> None:
    """Revoked, expired and member-removed keys are told apart only by the log-only reason, never the outcome."""
    keys = [
        prepared(revoked_at=NOW),
        prepared(expires_at=NOW),
        prepared(is_member=False, user="alice"),
    ]
    refusals = []
    for key in keys:
        with pytest.raises(Denied) as caught:
            check_status(key, T)
        refusals.append(caught.value)
    assert {d.outcome for d in refusals} == {Outcome.INVALID_TOKEN}
    assert len({d.reason for d in refusals}) == 3


def test_directly_built_entry_is_checked_by_its_epochs() -> None:
    """The stage reads only the entry's epoch fields and member flag, so a hand-built entry behaves the same."""
    base = prepared()
    check_status(replace(base, revoked_at=float("inf"), expires_at=float("inf")), T)
    with pytest.raises(Denied):
        check_status(replace(base, revoked_at=T - 1), T)
    with pytest.raises(Denied):
        check_status(replace(base, expires_at=T), T)
    with pytest.raises(Denied):
        check_status(replace(base, member_missing=True), T)
