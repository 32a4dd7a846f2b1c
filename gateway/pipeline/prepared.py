"""A verified key as the cache holds it: its record with every check precomputed.

Parsed once, when the key enters the cache (networks, grants, servers, rate
limit, identity headers), so the hit path does no parsing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models import KeyRecord
from ..config.ratelimit_spec import RateLimitSpec, parse_rate_limit
from ..cache.shared import KeyFacts
from .allowlist import Network, parse_networks
from .scope import Grants, GrantSet, Servers


@dataclass(frozen=True, slots=True)
class PreparedKey:
    """A verified key with its checks precomputed."""

    record: KeyRecord
    networks: tuple[Network, ...]
    grants: Grants
    servers: Servers
    rate_limit: RateLimitSpec
    # Epoch seconds; inf = never. Compared per request, so expiry needs no cache event.
    revoked_at: float
    expires_at: float
    member_role: str | None
    member_missing: bool
    identity_headers: tuple[tuple[str, str], ...]
    # The same as the header lines that go upstream, encoded once here rather than per request.
    identity_block: bytes = b""
    # A decoy (see .canary): the one field the hot path reads to refuse it as an unknown key.
    canary: bool = False
    # The allowlist's answer per client address, filled as requests come (see check_allowlist).
    allowlist_seen: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)


def _epoch(value: object) -> float:
    return value.timestamp() if value is not None else float("inf")  # type: ignore[attr-defined]


def prepare(facts: KeyFacts, default_rate_limit: RateLimitSpec) -> PreparedKey:
    """Parse everything the hot path needs, once, when a key enters the cache."""
    record, role_grants, member_role, member_grants = (
        facts.record, facts.role_grants, facts.member_role, facts.member_grants)
    is_member = facts.is_member
    sets: list[GrantSet] = []
    if record.agent:
        # An agent key acts as its user: exactly the member's role.
        sets.append(GrantSet(member_grants or ()))
    else:
        if record.role is not None:
            sets.append(GrantSet(role_grants or ()))  # a missing role grants nothing
        if record.operations:
            sets.append(GrantSet(record.operations))
        if record.user:
            sets.append(GrantSet(member_grants or ()))
    spec = parse_rate_limit(record.rate_limit) if record.rate_limit else default_rate_limit
    role_header = member_role if record.agent else record.role
    headers = (
        ("X-Keygate-Key-Id", record.id),
        ("X-Keygate-Key-Name", _header_safe(record.name)),
        ("X-Keygate-Org", record.org),
        ("X-Keygate-User", record.user),
        ("X-Keygate-Role", role_header or ""),
    )
    return PreparedKey(
        record=record, networks=parse_networks(record.ip_allowlist), grants=Grants(sets),
        servers=Servers(record.servers, self_service=record.agent), rate_limit=spec, revoked_at=_epoch(record.revoked_at),
        expires_at=_epoch(record.expires_at), member_role=member_role,
        member_missing=bool(record.user) and not is_member, identity_headers=headers,
        identity_block="".join([f"{name}: {value}\r\n" for name, value in headers]).encode("utf-8"),
        canary=record.canary,
    )


def _header_safe(text: str) -> str:
    # Names are free text; headers must stay one line of visible ASCII.
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
