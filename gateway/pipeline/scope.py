"""Stage 6 — scope: map the request to a server and an operation, and check the key's grants.

The route table is compiled once at start; grants are compiled once when a
key enters the cache. Per request this is one regex match per route tried
and, for a key, one dict lookup per operation after the first time.

A route's path may hold placeholders, each a whole segment: ``{server}`` names
the server, any other ``{name}`` may be used in the operation
(``registry_login:{credential}``), so ordinary grants limit a key to particular
resources. The settings check routes with :func:`route_path` and
:func:`route_operation`, the same reading the table compiles.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from ..config.routes import SERVER_PLACEHOLDER, path_segments, route_operation, route_path
from .outcomes import Denied, Outcome

# Imported at run time, not under TYPE_CHECKING: the compiled build's dataclasses (mypyc) resolve
# their field annotations when the module loads.
from ..config.schema import RouteSettings, UpstreamSettings

ADMIN_SERVER: Final = "admin"
# The admin API's operation for managing one's own per-user keys: the one operation an
# agent key may perform on the server admin without being given that server (see check_scope).
KEYS_SELF: Final = "keys:self"
# Operations that name a part of a broader one: ``keys:write:automation`` is the part of
# ``keys:write`` for keys of the kind automation, so a grant of ``keys:write`` covers every
# kind while ``keys:write:automation`` covers that kind alone.
_PART_OF: Final = ("keys:write:",)
READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# SECURITY: a segment's value goes into the operation only when it is made of RFC 3986
# unreserved characters (letters, digits, "-._~"); any other path is refused (400). Grants
# read ":" as the separator their wildcards anchor on and "*" as a wildcard, so a value
# holding them could make the operation match grants never meant for it: with
# "registry_login:{credential}", "/api/registry/x:read/login" would need
# "registry_login:x:read", which a key granted only "*:read" holds. Such values are refused
# rather than escaped: an escape's hex digits could still meet a grant's literal text
# ("registry_login:*2" would match the "%C3%A2" of "â"), and no exact grant (lower-case
# letters, digits, ":_.-") could name an escaped value anyway. Letter case is kept: grants
# are lower case, so "GHCR-Prod" is matched only by a wildcard covering it, never by the
# exact grant for "ghcr-prod", which a case-sensitive upstream reads as another resource.
_OPERATION_VALUE: Final = re.compile(r"[A-Za-z0-9._~-]+")


class GrantSet:
    """Operation grants such as ``deploy``, ``servers:*``, ``*:read`` or ``*``."""

    __slots__ = ("_exact", "_patterns")

    def __init__(self, grants: Iterable[str]) -> None:
        grants = tuple(grants)
        self._exact = frozenset(g for g in grants if "*" not in g)
        self._patterns = tuple(
            re.compile(".*".join(re.escape(part) for part in g.split("*"))) for g in grants if "*" in g
        )

    def allows(self, operation: str) -> bool:
        if operation in self._exact or any(p.fullmatch(operation) for p in self._patterns):
            return True
        whole = _whole_of(operation)
        return whole is not None and self.allows(whole)


def _whole_of(operation: str) -> str | None:
    """The broader operation ``operation`` is a part of (``keys:write`` for ``keys:write:automation``), or None.

    A grant is also read as an operation when one key's grants are checked against another's
    (:meth:`Grants.covers`): ``keys:write:*`` is then a part of ``keys:write`` too, which holds,
    since ``keys:write`` covers every kind.
    """
    for part in _PART_OF:
        if operation.startswith(part) and len(operation) > len(part):
            return part[:-1]
    return None


class Grants:
    """The operations a key may perform: allowed only if every set allows it.

    Sets are the key's role, its own operations and, for a per-user key, the
    member's role: permissions only ever narrow.
    """

    __slots__ = ("_sets", "_memo")

    def __init__(self, sets: Sequence[GrantSet]) -> None:
        self._sets = tuple(sets)
        self._memo: dict[str, bool] = {}

    def allows(self, operation: str) -> bool:
        allowed = self._memo.get(operation)
        if allowed is None:
            # No sets at all means nothing is granted (fail closed).
            allowed = bool(self._sets) and all(s.allows(operation) for s in self._sets)
            if len(self._memo) < 256:
                self._memo[operation] = allowed
        return allowed

    def covers(self, grant: str) -> bool:
        """Whether every operation ``grant`` matches is allowed here: ``grant`` read as text.

        Sound for wildcards: this set's literal text never matches a ``*`` of ``grant``, so each
        ``*`` of ``grant`` falls within a ``*`` of a grant here, which matches whatever it stands for.
        """
        return bool(self._sets) and all(s.allows(grant) for s in self._sets)


class Servers:
    """The servers a key may act on; ``*`` covers every upstream but never ``admin``."""

    __slots__ = ("_names", "_any", "self_service")

    def __init__(self, names: Iterable[str], *, self_service: bool = False) -> None:
        names = frozenset(names)
        self._any = "*" in names
        self._names = names - {"*"}
        # An agent key's: admitted to the server admin for keys:self alone (see check_scope).
        self.self_service = self_service

    def allows(self, server: str) -> bool:
        # SECURITY: admin access is never implied by a wildcard.
        return server in self._names or (self._any and server != ADMIN_SERVER)

    def covers(self, names: Iterable[str]) -> bool:
        """Whether every server of a key with the server list ``names`` is one of these."""
        return all(self._any if name == "*" else self.allows(name) for name in names)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes and what it needs; the admin API's targets (server ``admin``) have no upstream."""

    upstream: UpstreamSettings | None
    server: str
    operation: str
    pass_credentials: bool
    pass_method_override: bool = False
    # Operations that admit the request as well as ``operation`` (the admin API's endpoints whose
    # operation depends on the key kind or the key's owner: the service checks the exact one).
    alternatives: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Route:
    methods: frozenset[str]
    # One entry per path segment: the literal text, or None for a placeholder.
    segments: tuple[str | None, ...]
    prefix: bool  # a trailing "/*": matches this path and anything below it
    server_index: int | None
    upstream: UpstreamSettings
    operation: str
    # The operation in pieces when it uses placeholders: literal text, or the index of the
    # path segment whose value goes there. Empty when the operation is fixed.
    operation_pieces: tuple[str | int, ...]
    pass_credentials: bool
    pass_method_override: bool

    folded: tuple[str | None, ...]  # segments in lower case, for the case-insensitive reading

    def server_of(self, segments: tuple[str, ...], *, folded: bool = False) -> str | None:
        """The server named by the path when this route matches it, else None."""
        if len(segments) < len(self.segments) or (not self.prefix and len(segments) != len(self.segments)):
            return None
        for want, got in zip(self.folded if folded else self.segments, segments):
            if want is not None and want != got:
                return None
        return segments[self.server_index] if self.server_index is not None else self.upstream.name

    def operation_of(self, segments: tuple[str, ...]) -> str | None:
        """The operation a request for ``segments`` (a path this route matches) needs, or None
        when a segment's value may not go into it."""
        if not self.operation_pieces:
            return self.operation
        operation = []
        for piece in self.operation_pieces:
            if isinstance(piece, str):
                operation.append(piece)
            elif _OPERATION_VALUE.fullmatch(segments[piece]) is None:
                return None
            else:
                operation.append(segments[piece])
        return "".join(operation)


def _compile(route: RouteSettings, upstream: UpstreamSettings) -> _Route:
    segments, placeholders, problems = route_path(route.path)
    pieces, operation_problems = route_operation(route.operation, placeholders)
    if problems or operation_problems:  # the settings refuse these; routes built by hand may not
        raise ValueError(f"route {route.path}: " + "; ".join(problems + operation_problems))
    return _Route(
        methods=frozenset(route.methods), segments=segments, prefix=route.path.endswith("/*"),
        server_index=placeholders.get(SERVER_PLACEHOLDER), upstream=upstream, operation=route.operation,
        operation_pieces=pieces if any(type(piece) is int for piece in pieces) else (),
        pass_credentials=route.pass_credentials, pass_method_override=route.pass_method_override,
        folded=tuple(None if part is None else part.lower() for part in segments),
    )


class RouteTable:
    """Maps (method, raw path) to a :class:`Target`; the first matching route wins."""

    # Paths are memoised up to this length, this many at a time: a service sees
    # the same paths again and again, and a flood of new ones only evicts old ones.
    MEMO_PATH_LENGTH: ClassVar[int] = 256
    MEMO_SIZE: ClassVar[int] = 1024

    def __init__(self, routes: Sequence[RouteSettings], upstreams: Sequence[UpstreamSettings]) -> None:
        if not upstreams:
            raise ValueError("at least one upstream is needed")
        by_name = {u.name: u for u in upstreams}
        self.default = upstreams[0]
        self._routes = tuple(_compile(r, by_name[r.upstream] if r.upstream else self.default) for r in routes)
        self._catch_all = {
            True: Target(self.default, self.default.name, "read", False),
            False: Target(self.default, self.default.name, "write", False),
        }
        # Targets, or the reason a path is refused.
        self._memo: dict[tuple[str, str], Target | str] = {}

    def match(self, method: str, path: str) -> Target:
        """The target of ``method path``; ``path`` is canonical (:mod:`.target`) on the request path.

        Denied(INVALID_TARGET) when letter case alone would pick another route.
        """
        if not self._routes:
            return self._catch_all[method in READ_METHODS]
        # The query never takes part in matching.
        path = path.partition("?")[0]
        target = self._memo.get((method, path))
        if target is None:
            target = self._match(method, path)
            if len(path) <= self.MEMO_PATH_LENGTH:
                if len(self._memo) >= self.MEMO_SIZE:
                    del self._memo[next(iter(self._memo))]
                self._memo[method, path] = target
        if type(target) is str:
            raise Denied(Outcome.INVALID_TARGET, target)
        return target  # type: ignore[return-value]

    def _match(self, method: str, path: str) -> Target | str:
        # SECURITY: upstreams read "/deploy/", "//deploy", "/x/../deploy" or
        # "/%64eploy" as "/deploy"; matching one literal spelling would let the
        # others fall through to the catch-all operation. On the request path the
        # canonical form (.target) is matched and forwarded, so this is the same
        # reading; it stays here for paths that come from elsewhere.
        segments = path_segments(path)
        found = self._first(method, segments)
        # SECURITY: ASP.NET, Express and nginx "location ~*" route without regard to case, so
        # "/DEPLOY" runs deploy there while an exact reading falls to a wider route. A path
        # whose route depends on letter case is refused rather than guessed at.
        if self._first(method, tuple(s.lower() for s in segments), folded=True)[0] is not found[0]:
            return "letter case alone would select another route"
        route, server = found
        if route is None:
            # No route: the default upstream, "read" for safe methods, else "write".
            return self._catch_all[method in READ_METHODS]
        operation = route.operation_of(segments)
        if operation is None:
            return "a path segment named in the operation holds characters other than letters, digits and '-._~'"
        return Target(route.upstream, server, operation, route.pass_credentials, route.pass_method_override)

    def _first(self, method: str, segments: tuple[str, ...], *, folded: bool = False) -> tuple[_Route | None, str]:
        for route in self._routes:
            if route.methods and method not in route.methods:
                continue
            server = route.server_of(segments, folded=folded)
            if server is not None:
                return route, server
        return None, ""


def check_scope(servers: Servers, grants: Grants, target: Target) -> None:
    """Refuse unless the key may perform the target's operation (or one of its alternatives) on its server."""
    if not servers.allows(target.server):
        # SECURITY: an agent key acts as its person, who may manage their own keys: it reaches
        # the admin API for keys:self alone (when the member's role grants it), never for
        # anything else, whatever the role grants; the admin API bounds it to keys:self too.
        if not (servers.self_service and target.server == ADMIN_SERVER and KEYS_SELF in target.alternatives
                and grants.allows(KEYS_SELF)):
            raise Denied(Outcome.INSUFFICIENT_SCOPE, f"server {target.server!r} not granted")
        return
    if not grants.allows(target.operation) and not any(grants.allows(o) for o in target.alternatives):
        raise Denied(Outcome.INSUFFICIENT_SCOPE, f"operation {target.operation!r} not granted")
