"""Stage 6 — scope: grants with wildcards, narrowing, servers, the route table and the scope check."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gateway.config.schema import RouteSettings, UpstreamSettings
from gateway.pipeline.outcomes import Denied, Outcome
from gateway.pipeline.scope import Grants, GrantSet, RouteTable, Servers, Target, check_scope

APP = UpstreamSettings(name="app", url="http://127.0.0.1:8080")
BUILDS = UpstreamSettings(name="builds", url="http://127.0.0.1:8081")
UPSTREAMS = [APP, BUILDS]


def route(path: str, operation: str, *, methods: Sequence[str] = (), upstream: str | None = None,
          pass_credentials: bool = False) -> RouteSettings:
    return RouteSettings(methods=list(methods), path=path, upstream=upstream, operation=operation,
                         pass_credentials=pass_credentials)


ROUTES = [
    route("/api/servers/{server}/deploy", "deploy", methods=["POST"]),
    route("/api/servers/{server}/exec", "exec", methods=["POST", "PUT"], pass_credentials=True),
    route("/api/servers/{server}", "servers:read", methods=["GET"]),
    route("/builds/*", "pull", methods=["GET"], upstream="builds"),
    route("/builds/*", "push", upstream="builds"),
    route("/api/status", "status"),
    route("/api/status", "never-reached"),
]


@pytest.fixture
def table() -> RouteTable:
    return RouteTable(ROUTES, UPSTREAMS)


# GrantSet -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("grants", "operation", "allowed"),
    [
        (["deploy"], "deploy", True),
        (["deploy"], "deploy2", False),
        (["deploy"], "Deploy", False),
        (["deploy"], "", False),
        (["*"], "deploy", True),
        (["*"], "servers:read", True),
        (["servers:*"], "servers:read", True),
        (["servers:*"], "servers:write", True),
        (["servers:*"], "servers", False),
        (["servers:*"], "keys:read", False),
        (["servers:*"], "xservers:read", False),
        (["*:read"], "servers:read", True),
        (["*:read"], "keys:read", True),
        (["*:read"], "read", False),
        (["*:read"], "servers:readme", False),
        (["*:read"], "servers:write", False),
        (["read", "servers:*"], "read", True),
        (["a.b"], "aXb", False),
        ([], "read", False),
    ],
)
def test_grant_set_matches_exactly_or_by_wildcard(grants: list[str], operation: str, allowed: bool) -> None:
    """A grant matches its operation exactly, or by `*` standing for any run of characters."""
    assert GrantSet(grants).allows(operation) is allowed


# Grants: narrowing ----------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "operation", "allowed"),
    [
        ([["*"]], "deploy", True),
        ([["*"], ["deploy"]], "deploy", True),
        ([["*"], ["deploy"]], "exec", False),
        ([["deploy"], ["*"]], "exec", False),
        ([["servers:*"], ["*:read"]], "servers:read", True),
        ([["servers:*"], ["*:read"]], "servers:write", False),
        ([["servers:*"], ["*:read"]], "keys:read", False),
        ([["*"], ["deploy", "exec"], ["deploy"]], "deploy", True),
        ([["*"], ["deploy", "exec"], ["deploy"]], "exec", False),
        ([["admin:write"], ["*"], ["general:read"]], "admin:write", False),
    ],
    ids=["one-set", "role-and-ops", "ops-narrow-role", "role-narrows-ops", "wildcards-intersect",
         "wildcards-intersect-out", "wildcards-intersect-out2", "member-role-allows", "member-role-narrows",
         "member-role-disjoint"],
)
def test_grants_allow_only_what_every_set_allows(sets: list[list[str]], operation: str, allowed: bool) -> None:
    """Role ∩ key operations ∩ member role: an operation is allowed only if every set allows it."""
    assert Grants([GrantSet(s) for s in sets]).allows(operation) is allowed


@pytest.mark.parametrize("sets", [[], [[]], [["*"], []]], ids=["no-sets", "one-empty-set", "wildcard-and-empty"])
def test_empty_grants_grant_nothing(sets: list[list[str]]) -> None:
    """No sets, or any empty set among them, grants nothing (fail closed)."""
    grants = Grants([GrantSet(s) for s in sets])
    assert not grants.allows("read")
    assert not grants.allows("*")


def test_grants_answer_the_same_when_asked_again() -> None:
    """The memoised answer for an operation equals the first one, allowed or not."""
    grants = Grants([GrantSet(["*:read"]), GrantSet(["servers:read", "keys:read"])])
    first = [grants.allows(op) for op in ("servers:read", "servers:write", "keys:read")]
    again = [grants.allows(op) for op in ("servers:read", "servers:write", "keys:read")]
    assert first == again == [True, False, True]


def test_grants_stay_correct_past_the_memo_size() -> None:
    """Beyond the memo's bound, answers are still computed correctly."""
    grants = Grants([GrantSet(["op:*"])])
    for n in range(1000):
        assert grants.allows(f"op:{n}")
        assert not grants.allows(f"other:{n}")


# Servers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "server", "allowed"),
    [
        (["*"], "app", True),
        (["*"], "anything-at-all", True),
        (["*"], "admin", False),
        (["app"], "app", True),
        (["app"], "builds", False),
        (["app"], "admin", False),
        (["admin"], "admin", True),
        (["admin"], "app", False),
        (["*", "admin"], "admin", True),
        (["*", "admin"], "app", True),
        ([], "app", False),
        ([], "admin", False),
    ],
)
def test_servers(names: list[str], server: str, allowed: bool) -> None:
    """`*` covers every server except `admin`, which must be listed by name."""
    assert Servers(names).allows(server) is allowed


# RouteTable -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "upstream", "server", "operation"),
    [
        ("POST", "/api/servers/web-1/deploy", "app", "web-1", "deploy"),
        ("POST", "/api/servers/db/exec", "app", "db", "exec"),
        ("PUT", "/api/servers/db/exec", "app", "db", "exec"),
        ("GET", "/api/servers/web-1", "app", "web-1", "servers:read"),
        ("GET", "/builds", "builds", "builds", "pull"),
        ("GET", "/builds/", "builds", "builds", "pull"),
        ("GET", "/builds/a/b/c.tar", "builds", "builds", "pull"),
        ("PUT", "/builds/a/b/c.tar", "builds", "builds", "push"),
        ("DELETE", "/api/status", "app", "app", "status"),
    ],
    ids=["deploy", "exec-post", "exec-put", "server-read", "prefix-root", "prefix-slash", "prefix-deep",
         "prefix-other-method", "any-method"],
)
def test_route_table_maps_request_to_target(
    table: RouteTable, method: str, path: str, upstream: str, server: str, operation: str
) -> None:
    """A matching route gives its upstream, its operation, and the server from `{server}` or the upstream's name."""
    target = table.match(method, path)
    assert (target.upstream.name, target.server, target.operation) == (upstream, server, operation)


def test_first_matching_route_wins(table: RouteTable) -> None:
    """When two routes match, the earlier one decides."""
    assert table.match("GET", "/api/status").operation == "status"


def test_route_methods_filter(table: RouteTable) -> None:
    """A route listing methods is skipped for other methods, which fall through to later routes."""
    assert table.match("GET", "/builds/x").operation == "pull"
    assert table.match("POST", "/builds/x").operation == "push"
    assert table.match("GET", "/api/servers/web-1/deploy").operation == "read"


def test_pass_credentials_comes_from_the_route(table: RouteTable) -> None:
    """Only a route that says so passes the client's credentials upstream; the catch-all never does."""
    assert table.match("POST", "/api/servers/db/exec").pass_credentials is True
    assert table.match("POST", "/api/servers/db/deploy").pass_credentials is False
    assert table.match("POST", "/elsewhere").pass_credentials is False


@pytest.mark.parametrize(
    "path",
    [
        "/api/servers/web-1/deploy/x",
        "/api/servers/web-1/deployx",
        "/api/servers/web-1/deplo",
        "/api/servers//deploy",
        "/xapi/servers/web-1/deploy",
        "/api/servers/web-1/deploy.json",
        "/buildsx",
        "/api/servers.web-1/deploy",
    ],
    ids=["deeper", "longer-segment", "shorter-segment", "empty-server", "prefix-before", "suffix",
         "prefix-route-sibling", "dot-is-literal"],
)
def test_exact_routes_do_not_match_near_misses(table: RouteTable, path: str) -> None:
    """Only whole paths match an exact route; near misses use the catch-all."""
    assert table.match("POST", path) == Target(APP, "app", "write", False)


@pytest.mark.parametrize(
    "path",
    [
        "/api/servers/web-1/deploy/",
        "/api/servers/web-1/./deploy",
        "//api/servers/web-1/deploy",
        "/api//servers/web-1/deploy",
        "/api/servers/other/../web-1/deploy",
        "/api/servers/web-1/deploy/.",
        "/api/servers/web-1/%64eploy",
        "/api/servers/web-1/deploy?x=/../status",
        "/api/servers/web-1/%2e%2e/web-1/deploy",
    ],
    ids=["trailing-slash", "dot-segment", "leading-double-slash", "inner-double-slash", "dot-dot", "trailing-dot",
         "percent-encoded-letter", "query-ignored", "encoded-dot-dot"],
)
def test_equivalent_spellings_of_a_route_match_it(table: RouteTable, path: str) -> None:
    """Paths that upstream servers commonly treat as the route's path need the route's operation, not `write`."""
    target = table.match("POST", path)
    assert (target.server, target.operation) == ("web-1", "deploy")


@pytest.mark.parametrize("path", ["/", "/a", "/a/b/c", "//"], ids=["root", "one", "deep", "double-slash"])
def test_root_prefix_route_matches_everything(path: str) -> None:
    """A `/*` route matches every path, the root included."""
    assert RouteTable([route("/*", "anything")], UPSTREAMS).match("GET", path).operation == "anything"


@pytest.mark.parametrize("path", ["/api/jobs", "/api/jobs/"], ids=["without-slash", "with-slash"])
def test_configured_trailing_slash_is_not_significant(path: str) -> None:
    """A route configured with a trailing slash matches the path with or without one."""
    assert RouteTable([route("/api/jobs/", "jobs")], UPSTREAMS).match("POST", path).operation == "jobs"


@pytest.mark.parametrize(
    ("method", "operation"),
    [("GET", "read"), ("HEAD", "read"), ("OPTIONS", "read"), ("POST", "write"), ("PUT", "write"),
     ("PATCH", "write"), ("DELETE", "write"), ("TRACE", "write"), ("get", "write")],
)
def test_catch_all_uses_default_upstream_and_read_or_write(table: RouteTable, method: str, operation: str) -> None:
    """An unrouted request goes to the first upstream as `read` for GET/HEAD/OPTIONS and `write` otherwise."""
    assert table.match(method, "/not/routed") == Target(APP, "app", operation, False)


def test_route_without_upstream_uses_the_default() -> None:
    """A route that names no upstream goes to the first one, and its server is that upstream's name."""
    table = RouteTable([route("/jobs", "jobs")], [BUILDS, APP])
    target = table.match("POST", "/jobs")
    assert (target.upstream, target.server) == (BUILDS, "builds")


def test_route_upstream_overrides_the_default() -> None:
    """A route that names an upstream sends there, while unrouted requests still use the first."""
    table = RouteTable([route("/builds/*", "pull", upstream="builds")], UPSTREAMS)
    assert table.match("GET", "/builds/1").upstream == BUILDS
    assert table.match("GET", "/other").upstream == APP


def test_server_segment_can_name_admin() -> None:
    """The `{server}` segment is taken as written, so a request can ask for `admin` and scope decides."""
    assert RouteTable(ROUTES, UPSTREAMS).match("POST", "/api/servers/admin/deploy").server == "admin"


def test_route_table_needs_an_upstream() -> None:
    """A route table without upstreams cannot be built."""
    with pytest.raises(ValueError):
        RouteTable([], [])


# An operation that names a part of a broader one: keys:write:<kind> ---------


@pytest.mark.parametrize(
    ("grants", "operation", "allowed"),
    [
        (["keys:write"], "keys:write:automation", True),
        (["keys:write"], "keys:write:integration", True),
        (["keys:write:automation"], "keys:write:automation", True),
        (["keys:write:automation"], "keys:write:integration", False),
        (["keys:write:automation"], "keys:write", False),
        (["keys:write:automation"], "keys:write:automation-extra", False),
        (["keys:write:*"], "keys:write:integration", True),
        (["keys:write:*"], "keys:write", False),
        (["keys:*"], "keys:write:automation", True),
        (["*:write"], "keys:write:automation", True),
        (["keys:writer"], "keys:write:automation", False),
        (["deploy"], "deploy:prod", False),
        (["keys:write"], "keys:write:", False),
    ],
)
def test_keys_write_covers_every_kind_and_a_kind_only_itself(grants: list[str], operation: str, allowed: bool) -> None:
    """keys:write grants keys:write:<kind> of every kind; keys:write:<kind> grants that kind and nothing else."""
    assert GrantSet(grants).allows(operation) is allowed


@pytest.mark.parametrize(
    ("held", "grant", "covered"),
    [
        (["deploy", "read"], "deploy", True),
        (["deploy"], "write", False),
        (["servers:*"], "servers:*", True),
        (["servers:*"], "servers:read", True),
        (["servers:read"], "servers:*", False),
        (["*:read"], "x*:read", True),
        (["*:read"], "*", False),
        (["*"], "*", True),
        (["keys:write"], "keys:write:*", True),
        (["keys:write:automation"], "keys:write:*", False),
        (["keys:write:automation"], "keys:write", False),
        (["keys:*"], "orgs:any", False),
    ],
)
def test_covers_reads_a_grant_as_every_operation_it_matches(held: list[str], grant: str, covered: bool) -> None:
    """A grant is covered when every operation it could match is allowed: wildcards only by wider wildcards."""
    assert Grants([GrantSet(held)]).covers(grant) is covered


def test_covers_needs_every_set_to_allow_the_grant() -> None:
    """With a role and operations both, a grant is covered only if both allow it; no sets cover nothing."""
    grants = Grants([GrantSet(["*"]), GrantSet(["deploy"])])
    assert grants.covers("deploy") and not grants.covers("read")
    assert not Grants([]).covers("deploy")


@pytest.mark.parametrize(
    ("held", "names", "covered"),
    [
        (["admin", "app"], ["app"], True),
        (["admin", "app"], ["*"], False),
        (["*"], ["*", "billing"], True),
        (["*"], ["admin"], False),
        (["*", "admin"], ["admin", "*"], True),
    ],
)
def test_servers_cover_only_their_own(held: list[str], names: list[str], covered: bool) -> None:
    """A server list covers another when it allows each of its servers; "*" only when it holds "*"."""
    assert Servers(held).covers(names) is covered


# check_scope ----------------------------------------------------------------


def target(server: str = "app", operation: str = "read") -> Target:
    return Target(APP, server, operation, False)


@pytest.mark.parametrize(
    ("servers", "grants", "target_"),
    [
        (["*"], ["*"], target("app", "deploy")),
        (["app"], ["read"], target("app", "read")),
        (["admin"], ["keys:*"], target("admin", "keys:read")),
    ],
    ids=["wildcards", "exact", "admin-listed"],
)
def test_check_scope_passes_granted_requests(servers: list[str], grants: list[str], target_: Target) -> None:
    """A key granted both the server and the operation passes."""
    check_scope(Servers(servers), Grants([GrantSet(grants)]), target_)


@pytest.mark.parametrize(
    ("servers", "grants", "target_"),
    [
        (["builds"], ["*"], target("app", "read")),
        (["*"], ["*"], target("admin", "keys:read")),
        (["*"], ["read"], target("app", "write")),
        (["*"], [], target("app", "read")),
        ([], ["*"], target("app", "read")),
    ],
    ids=["other-server", "admin-by-wildcard", "operation-missing", "no-grants", "no-servers"],
)
def test_check_scope_refuses_with_insufficient_scope(servers: list[str], grants: list[str], target_: Target) -> None:
    """A server or operation not granted is refused with INSUFFICIENT_SCOPE."""
    with pytest.raises(Denied) as caught:
        check_scope(Servers(servers), Grants([GrantSet(grants)]), target_)
    assert caught.value.outcome is Outcome.INSUFFICIENT_SCOPE


SELF_SERVICE = Target(None, "admin", "keys:read", False, alternatives=("keys:self",))
KIND_OR_SELF = Target(None, "admin", "keys:write", False, alternatives=("keys:write:automation", "keys:self"))


@pytest.mark.parametrize(
    ("servers", "grants", "target_", "allowed"),
    [
        (Servers(["admin"]), ["keys:write:automation"], KIND_OR_SELF, True),
        (Servers(["admin"]), ["keys:write:integration"], KIND_OR_SELF, False),
        (Servers(["admin"]), ["keys:self"], SELF_SERVICE, True),
        # An agent key reaches the server admin for keys:self alone.
        (Servers(["*"], self_service=True), ["deploy", "keys:self"], SELF_SERVICE, True),
        (Servers(["*"], self_service=True), ["*"], SELF_SERVICE, True),
        (Servers(["*"], self_service=True), ["*"], target("admin", "keys:read"), False),
        (Servers(["*"], self_service=True), ["deploy"], SELF_SERVICE, False),
        (Servers(["app"], self_service=True), ["*"], Target(None, "builds", "read", False,
                                                            alternatives=("keys:self",)), False),
        (Servers(["*"]), ["keys:self"], SELF_SERVICE, False),
    ],
    ids=["kind-alternative", "other-kind", "self", "agent-self", "agent-admin-role-self", "agent-not-self",
         "agent-without-keys-self", "agent-other-server", "per-user-key-without-admin"],
)
def test_check_scope_admits_alternatives_and_agent_keys_for_keys_self_only(
    servers: Servers, grants: list[str], target_: Target, allowed: bool,
) -> None:
    """An endpoint's alternatives admit a key; an agent key reaches the server admin only for keys:self."""
    if allowed:
        check_scope(servers, Grants([GrantSet(grants)]), target_)
    else:
        with pytest.raises(Denied):
            check_scope(servers, Grants([GrantSet(grants)]), target_)


def test_encoded_slash_stays_inside_its_segment(table: RouteTable) -> None:
    """An encoded '/' cannot add a segment: the route still matches, with the server as spelled."""
    target = table.match("POST", "/api/servers/x%2Fy/deploy")
    assert (target.server, target.operation) == ("x/y", "deploy")


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/servers/web-1/DEPLOY"), ("POST", "/api/servers/web-1/Deploy"), ("GET", "/API/status"),
     ("GET", "/Builds/x"), ("PUT", "/api/servers/web-1/EXEC")],
)
def test_paths_whose_route_depends_on_letter_case_are_refused(table: RouteTable, method: str, path: str) -> None:
    """Where a case-insensitive upstream would pick another route than the exact reading, the path is a 400."""
    for _ in range(2):  # and again from the memo
        with pytest.raises(Denied) as refused:
            table.match(method, path)
        assert refused.value.outcome is Outcome.INVALID_TARGET


@pytest.mark.parametrize(
    ("method", "path", "server", "operation"),
    [("POST", "/api/servers/WEB-1/deploy", "WEB-1", "deploy"), ("GET", "/api/servers/Web-1", "Web-1", "servers:read"),
     ("GET", "/builds/ABC", "builds", "pull"), ("POST", "/Not/Routed", "app", "write")],
)
def test_letter_case_that_selects_the_same_route_is_fine(
    table: RouteTable, method: str, path: str, server: str, operation: str,
) -> None:
    """Upper case in a server name, below a prefix route or outside every route changes nothing."""
    target = table.match(method, path)
    assert (target.server, target.operation) == (server, operation)


# Placeholders in the operation ----------------------------------------------

PLACEHOLDER_ROUTES = [
    route("/api/registry/{credential}/login", "registry_login:{credential}", methods=["GET", "POST"]),
    route("/api/servers/{server}/secrets/{secret}/*", "secrets:{secret}:read", methods=["GET"]),
    route("/orgs/{org}/repos/{repo}", "repos:{org}:{repo}-push"),
    route("/items/{id}", "items:read"),
]


@pytest.fixture
def placeholders() -> RouteTable:
    return RouteTable(PLACEHOLDER_ROUTES, UPSTREAMS)


@pytest.mark.parametrize(
    ("method", "path", "server", "operation"),
    [
        ("POST", "/api/registry/ghcr-prod/login", "app", "registry_login:ghcr-prod"),
        ("GET", "/api/registry/dockerhub/login", "app", "registry_login:dockerhub"),
        ("POST", "/api/registry/ghcr%2Dprod/login", "app", "registry_login:ghcr-prod"),
        ("POST", "/api/registry/other/../ghcr-prod/./login/", "app", "registry_login:ghcr-prod"),
        ("POST", "/api/registry/GHCR-Prod/login", "app", "registry_login:GHCR-Prod"),
        ("POST", "/api/registry/v1.2_x~y/login", "app", "registry_login:v1.2_x~y"),
        ("GET", "/api/servers/web-1/secrets/db-password/versions/3", "web-1", "secrets:db-password:read"),
        ("PUT", "/orgs/acme/repos/api", "app", "repos:acme:api-push"),
        ("GET", "/items/42", "app", "items:read"),
    ],
    ids=["post", "get", "escaped-letter", "dot-segments", "letter-case-kept", "unreserved", "with-server-and-prefix",
         "two-placeholders", "unused-placeholder"],
)
def test_placeholder_value_goes_into_the_operation(
    placeholders: RouteTable, method: str, path: str, server: str, operation: str
) -> None:
    """A `{name}` in the operation is the path's segment of that name, decoded as the route table reads it."""
    target = placeholders.match(method, path)
    assert (target.server, target.operation) == (server, operation)


def test_each_path_keeps_its_own_operation(placeholders: RouteTable) -> None:
    """The memo keys on the path, so each path keeps its own operation when asked again."""
    paths = ["/api/registry/ghcr-prod/login", "/api/registry/dockerhub/login"] * 2
    assert [placeholders.match("POST", p).operation for p in paths] == [
        "registry_login:ghcr-prod", "registry_login:dockerhub"] * 2


@pytest.mark.parametrize(
    ("grants", "path", "allowed"),
    [
        (["registry_login:ghcr-prod"], "/api/registry/ghcr-prod/login", True),
        (["registry_login:ghcr-prod"], "/api/registry/dockerhub/login", False),
        (["registry_login:ghcr-prod"], "/api/registry/ghcr-prod2/login", False),
        (["registry_login:ghcr-prod"], "/api/registry/GHCR-PROD/login", False),
        (["registry_login:*"], "/api/registry/dockerhub/login", True),
        (["registry_login:ghcr-*"], "/api/registry/ghcr-prod/login", True),
        (["registry_login:ghcr-*"], "/api/registry/dockerhub/login", False),
        (["*"], "/api/registry/dockerhub/login", True),
        (["registry_login"], "/api/registry/dockerhub/login", False),
        (["*:read"], "/api/registry/dockerhub/login", False),
        (["registry_login:{credential}"], "/api/registry/dockerhub/login", False),
    ],
    ids=["exact", "exact-other", "exact-longer", "exact-other-case", "wildcard", "prefix-wildcard",
         "prefix-wildcard-other", "everything", "bare-name", "other-wildcard", "literal-template"],
)
def test_ordinary_grants_limit_a_key_to_particular_resources(grants: list[str], path: str, allowed: bool) -> None:
    """Grants match a placeholder's operation as any other: exactly, or by wildcard."""
    target = RouteTable(PLACEHOLDER_ROUTES, UPSTREAMS).match("POST", path)
    if allowed:
        check_scope(Servers(["*"]), Grants([GrantSet(grants)]), target)
    else:
        with pytest.raises(Denied) as caught:
            check_scope(Servers(["*"]), Grants([GrantSet(grants)]), target)
        assert caught.value.outcome is Outcome.INSUFFICIENT_SCOPE


@pytest.mark.parametrize(
    "path",
    [
        "/api/registry/*/login",
        "/api/registry/%2A/login",
        "/api/registry/x:read/login",
        "/api/registry/x%3Aread/login",
        "/api/registry/ghcr-prod:x/login",
        "/api/registry/a%25b/login",
        "/api/registry/a%2Fb/login",
        "/api/registry/a@b/login",
        "/api/registry/a+b/login",
        "/api/registry/caf%C3%A9/login",
        "/api/registry/a%20b/login",
    ],
    ids=["star", "escaped-star", "colon", "escaped-colon", "colon-after-granted", "percent", "encoded-slash",
         "at", "plus", "non-ascii", "space"],
)
def test_values_that_could_widen_a_grant_are_refused(placeholders: RouteTable, path: str) -> None:
    """A value other than letters, digits and `-._~` never reaches the operation: the path is a 400."""
    for _ in range(2):  # and again from the memo
        with pytest.raises(Denied) as refused:
            placeholders.match("POST", path)
        assert refused.value.outcome is Outcome.INVALID_TARGET


def test_a_colon_in_a_value_cannot_meet_another_grant() -> None:
    """SECURITY: "x:read" would make registry_login:x:read, which `*:read` matches; it is refused instead."""
    assert GrantSet(["*:read"]).allows("registry_login:x:read")  # what the refusal prevents
    with pytest.raises(Denied):
        RouteTable(PLACEHOLDER_ROUTES, UPSTREAMS).match("POST", "/api/registry/x:read/login")


def test_values_are_checked_only_where_the_operation_uses_them(placeholders: RouteTable) -> None:
    """A placeholder the operation does not name matches any segment, as `{server}` does."""
    assert placeholders.match("GET", "/items/a:b*").operation == "items:read"


def test_route_table_refuses_a_placeholder_the_settings_would() -> None:
    """A route built without the settings' checks cannot name an undefined placeholder in its operation."""
    bad = RouteSettings.model_construct(methods=[], path="/api/registry/login", upstream=None,
                                        operation="registry_login:{credential}", pass_credentials=False,
                                        pass_method_override=False)
    with pytest.raises(ValueError, match="credential"):
        RouteTable([bad], UPSTREAMS)
