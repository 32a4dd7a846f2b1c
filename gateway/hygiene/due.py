"""When a key is due for a hygiene event: the one statement of each rule, for the sweeper's store
queries to find candidates and for the service to re-check each one under its row lock."""

from __future__ import annotations

from datetime import datetime

from ..models import KeyRecord, KeyStatus


def idle_unannounced(record: KeyRecord, now: datetime, idle_after: float) -> bool:
    """Idle now (never a canary: see KeyRecord.status), and this idle spell not yet announced.

    A spell begins at the key's last activity (last use, else creation): a key used since
    ``key.idle`` was sent is announced again when it next falls idle.
    """
    if idle_after <= 0 or record.status(now, idle_after) is not KeyStatus.IDLE:
        return False
    return record.idle_notified_at is None or record.idle_notified_at < record.last_activity()


def expiry_unwarned(record: KeyRecord, now: datetime, warning: float) -> bool:
    """Unrevoked, expiring within ``warning`` seconds, made to live longer than that (so 15-minute
    exchanged keys are not announced at birth), and not yet warned for this ``expires_at``."""
    expires_at = record.expires_at
    if warning <= 0 or expires_at is None or record.revoked_at is not None or expires_at <= now:
        return False
    return ((expires_at - now).total_seconds() <= warning
            and (expires_at - record.created_at).total_seconds() > warning
            and record.expiry_warned_for != expires_at)
