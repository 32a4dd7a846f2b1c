"""Stage 3 — status: revoked, expired, or a per-user key whose user left the org.

All three get the same public answer as an unknown key, to avoid leaking
that the key exists.
"""

from __future__ import annotations

from .prepared import PreparedKey
from .outcomes import Denied, Outcome


def check_status(key: PreparedKey, now: float) -> None:
    if key.revoked_at <= now:
        raise Denied(Outcome.INVALID_TOKEN, "revoked")
    if key.expires_at <= now:
        raise Denied(Outcome.INVALID_TOKEN, "expired")
    if key.member_missing:
        raise Denied(Outcome.INVALID_TOKEN, "user is no longer a member of the org")
