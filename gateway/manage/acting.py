"""Who performs a management action, and what bounds them.

The CLI works on the store directly: its operator is bounded by nothing
(:data:`OPERATOR`). An admin key (:class:`AdminKey`) acts within its own
org: it sees only that org's keys, members, trust policies and audit trail,
and creates nothing elsewhere, unless it is granted ``orgs:any`` (the
built-in ``admin`` role's ``*`` is). Managing a key of a kind is the
operation ``keys:write:<kind>`` (``keys:write`` covers every kind), and a
key granted ``keys:self`` manages its own user's per-user keys. What an org
admin hands out never does more than it may itself: its effective grants
and its servers bound every key, role assignment and trust policy it makes.

The service (:mod:`.service`) asks these questions; each action asks them
once, in its one implementation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..models import KeyRecord
from ..pipeline.scope import KEYS_SELF
from .errors import Forbidden

# The grant that lets an admin key act in every org (the admin role's "*" holds it).
ORGS_ANY = "orgs:any"
KEYS_READ = "keys:read"


def kind_operation(kind: str) -> str:
    """The operation that creates, changes, rotates and revokes keys of ``kind``."""
    return f"keys:write:{kind}"


class GrantCheck(Protocol):
    def allows(self, operation: str) -> bool: ...
    def covers(self, grant: str) -> bool: ...


class ServerCheck(Protocol):
    def covers(self, names: Iterable[str]) -> bool: ...


def _quoted(items: Iterable[str]) -> str:
    return ", ".join(repr(i) for i in items)


class Operator:
    """The operator at the command line: every org, every kind, no bound."""

    org: str | None = None  # in the audit trail: no org (the store's operator)
    user = ""
    any_org = True
    self_service = False
    home_org = "default"

    def may(self, operation: str) -> bool:
        return True

    def sees_org(self, org: str) -> bool:
        return True

    def sees_key(self, record: KeyRecord, kinds: Iterable[str]) -> bool:
        return True

    def owns(self, record: KeyRecord) -> bool:
        return False

    def org_wide(self, kinds: Iterable[str]) -> bool:
        return True

    def check_org(self, org: str) -> None:
        return None

    def check_within(self, what: str, grant_sets: Sequence[Sequence[str]], servers: Sequence[str]) -> None:
        return None


OPERATOR = Operator()


@dataclass(frozen=True, slots=True)
class AdminKey:
    """An admin API request's key: its org and user, its effective grants and servers.

    ``admin`` is whether its grants apply on the server ``admin``: an agent key is
    admitted there for ``keys:self`` alone, whatever its member's role grants.
    """

    key_id: str
    org: str
    user: str
    grants: GrantCheck
    servers: ServerCheck
    admin: bool

    @property
    def home_org(self) -> str:
        """The org a new key goes to when none is named: the admin key's own."""
        return self.org

    def may(self, operation: str) -> bool:
        return self.admin and self.grants.allows(operation)

    @property
    def any_org(self) -> bool:
        return self.may(ORGS_ANY)

    @property
    def self_service(self) -> bool:
        """Whether it manages its own user's per-user keys: a per-user or agent key granted keys:self."""
        return bool(self.user) and self.grants.allows(KEYS_SELF)

    def sees_org(self, org: str) -> bool:
        return org == self.org or self.any_org

    def org_wide(self, kinds: Iterable[str]) -> bool:
        """Whether it manages its org's keys, not only its own: keys:read or keys:write of some kind."""
        return self.may(KEYS_READ) or any(self.may(kind_operation(k)) for k in kinds)

    def owns(self, record: KeyRecord) -> bool:
        """Whether ``record`` is one of its own user's per-user keys, and it may manage them."""
        return self.self_service and record.org == self.org and record.user == self.user

    def sees_key(self, record: KeyRecord, kinds: Iterable[str]) -> bool:
        """In its org (or it acts in any) and, for a key that manages only its own, one of those."""
        return self.sees_org(record.org) and (self.org_wide(kinds) or self.owns(record))

    def check_org(self, org: str) -> None:
        """Refuse (403) to make something in another org without orgs:any."""
        if not self.sees_org(org):
            raise Forbidden(f"org {org!r}: this admin key acts within its org {self.org!r}; acting in another "
                            f"org needs the operation {ORGS_ANY}")

    def check_within(self, what: str, grant_sets: Sequence[Sequence[str]], servers: Sequence[str]) -> None:
        """Refuse (403) a key (role, policy) whose grants or servers reach beyond this admin key's own.

        ``grant_sets`` are what bounds the new key (its role's grants, its own operations, its
        member's role): it is within reach when one of them lies wholly within this key's
        effective grants. An admin key acting in any org (orgs:any) is the platform's operator,
        bounded as the CLI is by nothing: the bootstrap admin key (servers ["admin"]) hands out
        keys for every server.
        """
        if self.any_org:
            return
        beyond: list[str] = []
        uncovered = [[g for g in grants if not self.grants.covers(g)] for grants in grant_sets]
        if uncovered and all(uncovered):
            beyond.append(f"operations {_quoted(min(uncovered, key=len))}")
        servers_beyond = [s for s in servers if not self.servers.covers([s])]
        if servers_beyond:
            beyond.append(f"servers {_quoted(servers_beyond)}")
        if beyond:
            raise Forbidden(f"{what} would do more than this admin key may: {' and '.join(beyond)} "
                            "not granted to this admin key")


Actor = Operator | AdminKey
