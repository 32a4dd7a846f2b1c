"""Stage 6 — scope: map the request to a server and an operation, and check the key's grants.

The route table is compiled once at start; grants are compiled once when a
key enters the cache. Per request this is one regex match per route tried
and, for a key, one dict lookup per operation after the first time.
"""

from __future__ import annotations

import re
from urllib.parse import unquote
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..config.schema import RouteSettings, UpstreamSettings
from .outcomes import Denied, Outcome

ADMIN_SERVER = "admin"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


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
        return operation in self._exact or any(p.fullmatch(operation) for p in self._patterns)


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


class Servers:
    """The servers a key may act on; ``*`` covers every upstream but never ``admin``."""

    __slots__ = ("_names", "_any")

    def __init__(self, names: Iterable[str]) -> None:
        names = frozenset(names)
        self._any = "*" in names
        self._names = names - {"*"}

    def allows(self, server: str) -> bool:
        # SECURITY: admin access is never implied by a wildcard.
        return server in self._names or (self._any and server != ADMIN_SERVER)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes and what it needs."""

    upstream: UpstreamSettings
    server: str
    operation: str
    pass_credentials: bool
    pass_method_override: bool = False


@dataclass(frozen=True, slots=True)
class _Route:
    methods: frozenset[str]
    # One entry per path segment: the literal text, or None for {server}.
    segments: tuple[str | None, ...]
    prefix: bool  # a trailing "/*": matches this path and anything below it
    server_index: int | None
    upstream: UpstreamSettings
    operation: str
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


def path_segments(raw_path: str) -> tuple[str, ...]:
    """The path as upstream servers commonly read it: segments percent-decoded one by one,
    without empty, ``.`` and ``..`` segments (and without the query)."""
    segments: list[str] = []
    for segment in raw_path.split("?", 1)[0].split("/"):
        if "%" in segment:
            # Decoded per segment, so an encoded "/" (%2F) stays inside its segment.
            segment = unquote(segment)
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    return tuple(segments)


def _compile(route: RouteSettings, upstream: UpstreamSettings) -> _Route:
    prefix = route.path.endswith("/*")
    parts = path_segments(route.path[:-2] if prefix else route.path)
    segments = tuple(None if part == "{server}" else part for part in parts)
    return _Route(
        methods=frozenset(route.methods), segments=segments, prefix=prefix,
        server_index=segments.index(None) if None in segments else None, upstream=upstream,
        operation=route.operation, pass_credentials=route.pass_credentials,
        pass_method_override=route.pass_method_override,
        folded=tuple(None if part is None else part.lower() for part in segments),
    )


class RouteTable:
    """Maps (method, raw path) to a :class:`Target`; the first matching route wins."""

    # Paths are memoised up to this length, this many at a time: a service sees
    # the same paths again and again, and a flood of new ones only evicts old ones.
    MEMO_PATH_LENGTH = 256
    MEMO_SIZE = 1024

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
        return Target(route.upstream, server, route.operation, route.pass_credentials, route.pass_method_override)

    def _first(self, method: str, segments: tuple[str, ...], *, folded: bool = False) -> tuple[_Route | None, str]:
        for route in self._routes:
            if route.methods and method not in route.methods:
                continue
            server = route.server_of(segments, folded=folded)
            if server is not None:
                return route, server
        return None, ""


def check_scope(servers: Servers, grants: Grants, target: Target) -> None:
    check_access(servers, grants, target.server, target.operation)


def check_access(servers: Servers, grants: Grants, server: str, operation: str) -> None:
    """Refuse unless the key may perform ``operation`` on ``server`` (the admin API calls this directly)."""
    if not servers.allows(server):
        raise Denied(Outcome.INSUFFICIENT_SCOPE, f"server {server!r} not granted")
    if not grants.allows(operation):
        raise Denied(Outcome.INSUFFICIENT_SCOPE, f"operation {operation!r} not granted")
