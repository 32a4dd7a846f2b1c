"""Records the store keeps, as frozen dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple


class KeyStatus(StrEnum):
    ACTIVE = "active"
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

    def status(self, now: datetime) -> KeyStatus:
        if self.revoked_at is not None and self.revoked_at <= now:
            return KeyStatus.REVOKED
        if self.expires_at is not None and self.expires_at <= now:
            return KeyStatus.EXPIRED
        return KeyStatus.ACTIVE

    def public(self, now: datetime) -> dict[str, Any]:
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
            "status": str(self.status(now)),
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
class AuditEvent:
    """One management action: who did what to which target, and when."""

    id: int
    at: datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any]

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = iso(self.at)
        return data


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
