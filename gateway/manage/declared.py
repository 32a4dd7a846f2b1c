"""The state file of ``keygate apply`` and ``keygate export``: roles, members, trust policies and named keys.

Reading checks the whole file on its face (its shape, types and fields, and every value with the
service's own checks, so the file is refused with the messages ``keys create`` and ``trust add``
give) and reports every problem at once, each at its place in the file (``keys[2].rate_limit``).
Nothing here reads the store. Writing renders records in the same format: never a secret (the store
holds none) or a hash.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any

from . import inputs as fields
from .errors import FieldProblem, InvalidInput
from .service import ADMIN_ROLE, _new_key_values, _trust_policy_values
from ..config.render import render_toml
from ..config.schema import Settings
from ..models import KeyRecord, Member, Role, TrustPolicy, iso

SECTIONS = ("roles", "members", "trust", "keys")
ROLE_FIELDS = ("grants",)
TRUST_FIELDS = ("issuer", "audience", "conditions", "org", "role", "operations", "servers", "ip_allowlist",
                "rate_limit", "lifetime", "jwks_file")
KEY_FIELDS = ("name", "org", "kind", "user", "role", "operations", "servers", "ip_allowlist", "rate_limit",
              "expires", "canary")
_LISTS = ("operations", "servers", "ip_allowlist")
_TEXTS = ("issuer", "audience", "name", "org", "kind", "user", "role", "rate_limit", "jwks_file")
DEFAULT_ORG = "default"  # as for `keys create` and `trust add`
_RELATIVE = re.compile(r"\d+\s*[a-z]+", re.IGNORECASE)
_NO_CLOCK = datetime(1970, 1, 1, tzinfo=UTC)
EXPIRES_FORMS = "use a date (2027-01-31), a date-time (2027-01-31T12:00:00Z) or \"never\""


class StateProblems(InvalidInput):
    """The state file cannot be applied: every problem, each with its place in the file (or None)."""

    def lines(self) -> list[str]:
        return [f"{p.field}: {p.message}" if p.field else p.message for p in self.problems]


@dataclass(frozen=True, slots=True)
class DeclaredRole:
    path: str
    name: str
    grants: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeclaredMember:
    path: str
    org: str
    user: str
    role: str


@dataclass(frozen=True, slots=True)
class DeclaredPolicy:
    path: str
    name: str
    values: dict[str, Any]  # the checked settings, as the service normalises them (TrustPolicy's fields)


@dataclass(frozen=True, slots=True)
class DeclaredKey:
    path: str
    name: str
    org: str
    kind: str
    user: str
    role: str | None
    operations: tuple[str, ...]
    servers: tuple[str, ...]
    ip_allowlist: tuple[str, ...]
    rate_limit: str | None
    expires_at: datetime | None
    canary: bool


@dataclass(frozen=True, slots=True)
class State:
    """What a state file declares. A section the file leaves out entirely is None (``members``: an org
    it names no table for is absent): ``--prune`` removes nothing there."""

    roles: dict[str, DeclaredRole] | None
    members: dict[str, dict[str, DeclaredMember]]
    trust: dict[str, DeclaredPolicy] | None
    keys: dict[tuple[str, str], DeclaredKey] | None  # by (org, name)


def _place(path: str, field: str | None) -> str:
    """``keys[2]`` and the service's ``ip_allowlist.0`` as ``keys[2].ip_allowlist[0]``."""
    if not field:
        return path
    return f"{path}." + re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", field)


class _Reader:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.problems: list[FieldProblem] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(FieldProblem(path, message))

    def table(self, value: Any, path: str, what: str) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.problem(path, f"must be a table ({what})")
            return None
        return value

    def fields(self, table: Mapping[str, Any], allowed: Sequence[str], path: str) -> None:
        # SECURITY: unknown fields are refused, so a typo never silently does less than asked
        # (an "allow_ips" that would leave a key open to every address).
        for name in table:
            if name not in allowed:
                self.problem(f"{path}.{name}", f"unknown field; known fields are {', '.join(allowed)}")

    def typed(self, table: Mapping[str, Any], path: str) -> dict[str, Any]:
        """The entry's values whose type is right; a wrong one is a problem and left out."""
        kept: dict[str, Any] = {}
        for name, value in table.items():
            if name in _LISTS:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    self.problem(f"{path}.{name}", "must be a list of strings")
                    continue
            elif name in _TEXTS and not isinstance(value, str):
                self.problem(f"{path}.{name}", "must be a string")
                continue
            elif name == "canary" and not isinstance(value, bool):
                self.problem(f"{path}.{name}", "must be true or false")
                continue
            elif name == "lifetime" and (isinstance(value, bool) or not isinstance(value, str | int)):
                self.problem(f"{path}.{name}", "must be a duration such as \"15m\" or a number of seconds")
                continue
            kept[name] = value
        return kept

    def checked(self, path: str, check: Callable[[], Any]) -> Any:
        """The service's check of an entry; its problems placed in the file."""
        try:
            return check()
        except InvalidInput as exc:
            self.problems.extend(FieldProblem(_place(path, p.field), p.message) for p in exc.problems)
            return None

    def one(self, path: str, check: Callable[[Any], Any], value: Any) -> Any:
        try:
            return check(value)
        except fields.InvalidField as exc:
            self.problem(path, str(exc))
            return None


def read_state(text: str, settings: Settings) -> State:
    """The state ``text`` declares; :class:`StateProblems` lists every problem found."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        if text.startswith("\ufeff"):
            raise StateProblems("not valid TOML: the file starts with a byte order mark (BOM): "
                                "save it as UTF-8 without one") from None
        raise StateProblems(f"not valid TOML: {exc}") from None
    except ValueError as exc:  # an integer of over 4300 digits, which tomllib leaves to int()
        raise StateProblems(f"not valid TOML: {str(exc).split(';')[0]}") from None
    reader = _Reader(settings)
    for name in document:
        if name not in SECTIONS:
            reader.problem(name, f"unknown section; known sections are {', '.join(SECTIONS)}")
    state = State(
        roles=_roles(reader, document["roles"]) if "roles" in document else None,
        members=_members(reader, document.get("members", {})),
        trust=_trust(reader, document["trust"]) if "trust" in document else None,
        keys=_keys(reader, document["keys"]) if "keys" in document else None,
    )
    if reader.problems:
        raise StateProblems(reader.problems[0].message, problems=reader.problems)
    return state


def _roles(reader: _Reader, section: Any) -> dict[str, DeclaredRole]:
    roles: dict[str, DeclaredRole] = {}
    for name, entry in (reader.table(section, "roles", "[roles.NAME] with grants") or {}).items():
        path = f"roles.{name}"
        if reader.one(path, fields.role, name) is None or (entry := reader.table(entry, path, "grants = [...]")) is None:
            continue
        reader.fields(entry, ROLE_FIELDS, path)
        grants = reader.typed({k: v for k, v in entry.items() if k in ROLE_FIELDS}, path).get("grants")
        if not isinstance(grants, list):
            if "grants" not in entry:
                reader.problem(f"{path}.grants", "required: a role needs at least one grant")
            continue
        if not grants:
            reader.problem(f"{path}.grants", "a role needs at least one grant")
        checked = tuple(dict.fromkeys(reader.one(f"{path}.grants[{i}]", fields.operation, g)
                                      for i, g in enumerate(grants)))
        if name == ADMIN_ROLE and checked != ("*",):
            reader.problem(path, "the built-in admin role always grants '*'; declare another role")
        roles[name] = DeclaredRole(path, name, checked)
    return roles


def _members(reader: _Reader, section: Any) -> dict[str, dict[str, DeclaredMember]]:
    orgs: dict[str, dict[str, DeclaredMember]] = {}
    for org, users in (reader.table(section, "members", "[members.ORG] with USER = \"ROLE\"") or {}).items():
        path = f"members.{org}"
        if reader.one(path, fields.org, org) is None:
            continue
        orgs[org] = {}
        for user, role in (reader.table(users, path, "USER = \"ROLE\"") or {}).items():
            place = f"{path}.{user}"
            if not isinstance(role, str):
                reader.problem(place, "must be a role name (a string)")
                continue
            if reader.one(place, fields.user, user) is not None and reader.one(place, fields.role, role) is not None:
                orgs[org][user] = DeclaredMember(place, org, user, role)
    return orgs


def _trust(reader: _Reader, section: Any) -> dict[str, DeclaredPolicy]:
    policies: dict[str, DeclaredPolicy] = {}
    for name, entry in (reader.table(section, "trust", "[trust.NAME] with issuer, audience, ...") or {}).items():
        path = f"trust.{name}"
        if (entry := reader.table(entry, path, "issuer, audience, conditions, ...")) is None:
            continue
        reader.fields(entry, TRUST_FIELDS, path)
        given = reader.typed({k: v for k, v in entry.items() if k in TRUST_FIELDS}, path)
        for required in ("issuer", "audience", "conditions"):
            if required not in entry:
                reader.problem(f"{path}.{required}", "required")
        conditions = given.get("conditions", {})
        if not isinstance(conditions, dict) or not all(isinstance(v, str) for v in conditions.values()):
            reader.problem(f"{path}.conditions", "must be a table of claim = \"pattern\"")
            conditions = {}
        values = reader.checked(path, lambda: _trust_policy_values(
            name=name, issuer=given.get("issuer", ""), audience=given.get("audience", ""), conditions=conditions,
            org=given.get("org", DEFAULT_ORG), role=given.get("role"), operations=given.get("operations", ()),
            servers=given.get("servers", ()), ip_allowlist=given.get("ip_allowlist", ()),
            rate_limit=given.get("rate_limit"), lifetime=given.get("lifetime"), jwks_file=given.get("jwks_file"),
        ))
        if values is not None:
            policies[name] = DeclaredPolicy(path, values["name"], values)
    return policies


def _keys(reader: _Reader, section: Any) -> dict[tuple[str, str], DeclaredKey]:
    if not isinstance(section, list):
        reader.problem("keys", "must be an array of tables ([[keys]] entries)")
        return {}
    keys: dict[tuple[str, str], DeclaredKey] = {}
    for place, entry in enumerate(section):
        path = f"keys[{place}]"
        if (entry := reader.table(entry, path, "name, org, role, ...")) is None:
            continue
        reader.fields(entry, KEY_FIELDS, path)
        given = reader.typed({k: v for k, v in entry.items() if k in KEY_FIELDS}, path)
        if "name" not in entry:
            reader.problem(f"{path}.name", "required: a key is known by its name within its org")
        kind = given.get("kind", reader.settings.keys.default_kind)
        if kind not in reader.settings.keys.kinds:
            reader.problem(f"{path}.kind", f"kind {kind!r}: unknown; configured kinds are "
                                           f"{', '.join(sorted(reader.settings.keys.kinds))}")
            kind = reader.settings.keys.default_kind
        # Checked against the clock only when it is set (reconcile): a key that has expired,
        # declared as it is, is no change.
        expires = _expiry(reader, f"{path}.expires", entry["expires"]) if "expires" in entry else None
        values = reader.checked(path, lambda: _new_key_values(
            # An unnamed entry's problem is said once, above; its other fields are still checked. No
            # clock is read: the expiry is checked above, and against the clock only when set (reconcile).
            reader.settings, _NO_CLOCK, name=given.get("name", "unnamed"), kind=kind,
            org=given.get("org", DEFAULT_ORG), user=given.get("user", ""), role=given.get("role"),
            operations=given.get("operations", ()), servers=given.get("servers", ()),
            ip_allowlist=given.get("ip_allowlist", ()), rate_limit=given.get("rate_limit"), expires="never",
            canary=given.get("canary", False),
        ))
        if values is None or "name" not in given:
            continue
        identity = (values["org"], values["name"])
        if identity in keys:
            reader.problem(path, f"key {values['name']!r} in org {values['org']!r} is declared twice "
                                 f"(also {keys[identity].path}); a key is known by its name within its org")
            continue
        keys[identity] = DeclaredKey(
            path=path, name=values["name"], org=values["org"], kind=kind, user=values["user"], role=values["role"],
            operations=values["operations"], servers=values["servers"], ip_allowlist=values["ip_allowlist"],
            rate_limit=values["rate_limit"], expires_at=expires, canary=given.get("canary", False),
        )
    return keys


def _expiry(reader: _Reader, path: str, value: Any) -> datetime | None:
    """A fixed instant (a TOML date or date-time, or its ISO text) or None for ``never``.

    A relative expiry (``30d``) is refused: it would mean another instant at every apply, so a
    file applied twice would change the key twice.
    """
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, date):
        return datetime.combine(value, time(), UTC)
    if not isinstance(value, str):
        reader.problem(path, EXPIRES_FORMS)
        return None
    if value.strip().lower() == "never":
        return None
    if _RELATIVE.fullmatch(value.strip()):
        reader.problem(path, f"{value!r}: a relative expiry would move at every apply; {EXPIRES_FORMS}")
        return None
    try:
        text = value.strip()
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(), UTC)
        at = datetime.fromisoformat(text)
        return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    except ValueError:
        reader.problem(path, f"{value!r}: {EXPIRES_FORMS}")
        return None


# -- writing -------------------------------------------------------------
HEADER = ("# Keygate state (keygate export): roles, members, trust policies and named keys.\n"
          "# No secrets: a key's secret is shown once, when it is made, and never stored.\n"
          "# keygate apply -f FILE makes a store match it; --prune also removes what it leaves out.\n\n")


def lifetime_text(seconds: int) -> str:
    """900 -> 15m, 3600 -> 1h, 90 -> 90s."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def policy_entry(policy: TrustPolicy) -> dict[str, Any]:
    return {
        "issuer": policy.issuer, "audience": policy.audience, "org": policy.org, "role": policy.role,
        "operations": list(policy.operations) or None, "servers": list(policy.servers),
        "ip_allowlist": list(policy.ip_allowlist) or None, "rate_limit": policy.rate_limit,
        "lifetime": lifetime_text(policy.lifetime), "jwks_file": policy.jwks_file,
        "conditions": dict(policy.conditions),
    }


def key_entry(record: KeyRecord) -> dict[str, Any]:
    return {
        "name": record.name, "org": record.org, "kind": record.kind, "user": record.user or None,
        "role": record.role, "operations": list(record.operations) or None,
        "servers": list(record.servers) if not record.canary else None,
        "ip_allowlist": list(record.ip_allowlist) or None, "rate_limit": record.rate_limit,
        "expires": iso(record.expires_at), "canary": True if record.canary else None,
    }


def render_state(roles: Sequence[Role], members: Sequence[Member], policies: Sequence[TrustPolicy],
                 keys: Sequence[KeyRecord]) -> str:
    """The state file declaring exactly these records (the built-in admin role is left out: it is always there)."""
    by_org: dict[str, dict[str, str]] = {}
    for member in sorted(members, key=lambda m: (m.org, m.user)):
        by_org.setdefault(member.org, {})[member.user] = member.role
    document = {
        "roles": {r.name: {"grants": list(r.grants)} for r in sorted(roles, key=lambda r: r.name)
                  if r.name != ADMIN_ROLE},
        "members": by_org,
        "trust": {p.name: policy_entry(p) for p in sorted(policies, key=lambda p: p.name)},
        "keys": [key_entry(k) for k in sorted(keys, key=lambda k: (k.org, k.name))],
    }
    return HEADER + render_toml(document)
