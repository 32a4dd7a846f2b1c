"""Records the store keeps, as frozen dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple


class KeyStatus(StrEnum):
    ACTIVE = "active"
    # Active, but unused for keys.idle_after (only when that is set): still authorizes.
    IDLE = "idle"
    # Replaced by a rotation with a grace period: still authorizes until its revoked_at.
    ROTATING = "rotating"
    EXPIRED = "expired"
    REVOKED = "revoked"


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as stored: everything but its secret (only an argon2 hash is kept)."""

    id: str
    kind: str
    name: str
    org: str
    user: str
    role: str | None
    operations: tuple[str, ...]
    servers: tuple[str, ...]
    ip_allowlist: tuple[str, ...]
    rate_limit: str | None
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    last_used_ip: str | None
    agent: bool = False
    secret_hash: str = field(default="", repr=False, compare=False)
    # A decoy: never authorizes; any use of it is an alarm (audit event and webhook).
    canary: bool = False
    # When a leak was reported (the key is revoked too unless its kind only flags leaks).
    leaked_at: datetime | None = None
    # Hygiene bookkeeping: when key.idle was sent for the current idle spell, and the
    # expiry key.expiring was sent for.
    idle_notified_at: datetime | None = field(default=None, compare=False)
    expiry_warned_for: datetime | None = field(default=None, compare=False)

    def last_activity(self) -> datetime:
        """When the key was last used, or created if it never was: what idleness is counted from."""
        return self.last_used_at if self.last_used_at is not None else self.created_at

    def status(self, now: datetime, idle_after: float = 0) -> KeyStatus:
        """Revoked, expired, rotating (revoked at a time still to come: a rotation's grace), else idle
        (unused for ``idle_after`` seconds, when that is set) or active."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return KeyStatus.REVOKED
        if self.expires_at is not None and self.expires_at <= now:
            return KeyStatus.EXPIRED
        if self.revoked_at is not None:
            return KeyStatus.ROTATING
        # A canary is unused by design: never idle (nor expired for idleness, which would end the tripwire).
        if idle_after > 0 and not self.canary and (now - self.last_activity()).total_seconds() >= idle_after:
            return KeyStatus.IDLE
        return KeyStatus.ACTIVE

    def public(self, now: datetime, idle_after: float = 0) -> dict[str, Any]:
        """The record as users see it (CLI ``--json``, admin API): never the hash."""
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "org": self.org,
            "user": self.user,
            "role": self.role,
            "operations": list(self.operations),
            "servers": list(self.servers),
            "ip_allowlist": list(self.ip_allowlist),
            "rate_limit": self.rate_limit,
            "agent": self.agent,
            "created_by": self.created_by,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
            "last_used_ip": self.last_used_ip,
            "canary": self.canary,
            "leaked_at": iso(self.leaked_at),
            "status": str(self.status(now, idle_after)),
        }


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    grants: tuple[str, ...]
    created_at: datetime
    updated_at: datetime

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "grants": list(self.grants),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class Member:
    org: str
    user: str
    role: str
    created_at: datetime
    updated_at: datetime

    def public(self) -> dict[str, Any]:
        return {
            "org": self.org,
            "user": self.user,
            "role": self.role,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class TrustPolicy:
    """Which OIDC tokens may be exchanged for a short-lived key, and the key they yield.

    A token is trusted when it is signed by ``issuer`` (keys from the issuer's
    discovery document, or from ``jwks_file``), names ``audience`` among its
    ``aud`` and every ``(claim, pattern)`` of ``conditions`` holds (a pattern
    with ``*`` or ``?`` is a glob, else the claim must equal it).
    """

    name: str
    issuer: str
    audience: str
    conditions: tuple[tuple[str, str], ...]  # (claim, pattern), sorted by claim
    org: str
    role: str | None
    operations: tuple[str, ...]
    servers: tuple[str, ...]
    ip_allowlist: tuple[str, ...]
    rate_limit: str | None
    lifetime: int  # seconds a minted key lives: 60 to 3600
    jwks_file: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "issuer": self.issuer,
            "audience": self.audience,
            "conditions": dict(self.conditions),
            "org": self.org,
            "role": self.role,
            "operations": list(self.operations),
            "servers": list(self.servers),
            "ip_allowlist": list(self.ip_allowlist),
            "rate_limit": self.rate_limit,
            "lifetime": self.lifetime,
            "jwks_file": self.jwks_file,
            "created_by": self.created_by,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One event on its way to one webhook (a row of the store's outbox)."""

    id: int
    url: str
    event: str  # key.created, key.revoked, key.leaked, key.canary_used, key.expiring, key.idle
    key_id: str
    body: str  # the JSON body exactly as it is sent (and signed)
    created_at: datetime
    attempts: int
    next_attempt_at: datetime
    delivered_at: datetime | None = None
    abandoned_at: datetime | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One management action: who did what to which target, and when."""

    id: int
    at: datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any]
    org: str | None = None  # the org of what it is about; None for what every org shares (roles)
    actor_org: str | None = None  # the acting admin key's org; None at the command line

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = iso(self.at)
        return data


class CanaryUse(NamedTuple):
    """One use of a canary key, as the pipeline saw it: written off the request path (audit event and webhook).

    ``record`` is the key as the cache held it; ``path`` and ``user_agent`` are already redacted
    (a key in them shown as its id) and bounded.
    """

    at: datetime
    record: KeyRecord
    client_ip: str | None
    method: str
    path: str
    user_agent: str | None
    request_id: str | None = None  # the request's, as in its access line and the log

    def details(self) -> dict[str, Any]:
        """What the audit event and the webhook tell about the use."""
        return {"client_ip": self.client_ip, "method": self.method, "path": self.path, "user_agent": self.user_agent,
                "request_id": self.request_id}


# A NamedTuple's constructor is a lambda the interpreter runs, a frame per call even in the compiled
# build; new_tuple(Cls, (every field, defaults too)) makes the same tuple in one C call. For those the
# proxy makes per request: RequestRecord, RateLimitDecision.
new_tuple = tuple.__new__


class RequestRecord(NamedTuple):
    """One request through the proxy or the admin API (server ``admin``), kept for the audit trail.

    A tuple, not a dataclass: the proxy makes one per request, at a seventh
    of a frozen dataclass's cost, and builds it positionally (a keyword call
    costs twice as much). ``id`` is assigned by the store: 0 until written.
    """

    at: datetime
    key_id: str | None
    method: str
    path: str
    server: str | None
    operation: str | None
    decision: str
    status: int
    client_ip: str | None
    duration_ms: float
    reason: str | None = None
    id: int = 0

    def public(self) -> dict[str, Any]:
        data = self._asdict()
        data["at"] = iso(self.at)
        return data
