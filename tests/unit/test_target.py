"""The canonical request target: one form for the route table and the upstream, or a 400."""

from __future__ import annotations

import pytest

from gateway.config import RouteSettings, UpstreamSettings
from gateway.pipeline.outcomes import Denied, Outcome
from gateway.pipeline.scope import RouteTable
from gateway.pipeline.target import RequestTarget, TargetCanonicalizer

STRICT = TargetCanonicalizer()
LENIENT = TargetCanonicalizer(encoded_slashes="pass", path_parameters="strip")


@pytest.mark.parametrize(
    ("raw", "path", "query"),
    [
        ("/", "/", ""),
        ("/a/b", "/a/b", ""),
        ("/a/b?c=d&e=%2F#", None, None),
        ("/a/b?c=d&e=%2F", "/a/b", "?c=d&e=%2F"),
        ("/a?", "/a", "?"),
        ("/a/b/", "/a/b/", ""),
        ("//a//b", "/a/b", ""),
        ("/a/./b", "/a/b", ""),
        ("/a/x/../b", "/a/b", ""),
        ("/a/%2e%2E/b", "/b", ""),
        ("/../../a", "/a", ""),
        ("/a/b/..", "/a/", ""),
        ("/a/b/.", "/a/b/", ""),
        ("/..", "/", ""),
        ("/%64eploy", "/deploy", ""),
        ("/a%7e%41%2d", "/a~A-", ""),
        ("/a%3b%3Db", "/a%3B%3Db", ""),
        ("/a%20b", "/a%20b", ""),
        ("/caf\u00e9", "/caf%C3%A9", ""),
        ("/a{b}|c", "/a%7Bb%7D%7Cc", ""),
        ("/.well-known/x", "/.well-known/x", ""),
        ("/a.b/..c/...", "/a.b/..c/...", ""),
        ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,=", ""),
    ],
)
def test_canonical_form(raw: str, path: str | None, query: str | None) -> None:
    """Escapes of unreserved characters are decoded, others upper-cased, empty and dot segments resolved."""
    if path is None:
        with pytest.raises(Denied):
            STRICT(raw)
        return
    assert STRICT(raw) == RequestTarget(path, query or "")
    assert STRICT(raw).forwarded == path + (query or "")


@pytest.mark.parametrize(
    "raw",
    ["/a#b", "/a?b#c", "/a%2Fb", "/a%2fb", "/a%5Cb", "/a%5cb", "/a\\b", "/a%00b", "/deploy%0A", "/a%09", "/a%7f",
     "/a;b=c", "/..;/a", "/a;", "/a%zz",
     "/a%", "/a%2", "*", "http://example.com/a", "example.com:443", ""],
)
def test_refused_by_default(raw: str) -> None:
    """Fragments, encoded slashes, backslashes, NULs, path parameters, bad escapes and other forms are 400."""
    with pytest.raises(Denied) as refused:
        STRICT(raw)
    assert refused.value.outcome is Outcome.INVALID_TARGET


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("/a%2fb", "/a%2Fb"),
        ("/a%5cb", "/a%5Cb"),
        ("/a\\b", "/a%5Cb"),
        ("/x/a%2fb%2fc", "/x/a%2Fb%2Fc"),
        ("/deploy;jsessionid=1", "/deploy"),
        ("/a;x/b;y=1,2/", "/a/b/"),
        ("/a/x/..;/b", "/a/b"),
        ("/a/;x/b", "/a/b"),
    ],
)
def test_lenient_settings(raw: str, path: str) -> None:
    """"pass" keeps encoded slashes inside their segment; "strip" drops path parameters from every segment."""
    assert LENIENT(raw).path == path


@pytest.mark.parametrize(
    "raw",
    ["/a%00", "/a%0A", "/deploy%0a", "/a%1f", "/a%7F", "/a#b", "/a%g0",
     "/x/..%2fdeploy", "/x/a%2F..%2Fdeploy", "/x/%2Fdeploy", "/x/a%2F.%2E%2Fdeploy", "/x/..%5cdeploy", "/x/a%2F"],
)
def test_lenient_settings_still_refuse(raw: str) -> None:
    """Control characters, fragments, bad escapes, and dot or empty parts between encoded slashes: always 400."""
    with pytest.raises(Denied):
        LENIENT(raw)


@pytest.mark.parametrize("raw", ["/a/b", "/a/../b", "/x%2fy", "/a#b"] * 3)
def test_remembered_answers_are_the_same(raw: str) -> None:
    """Asking again (answered from the memo) gives the same target or the same refusal."""
    canonical = TargetCanonicalizer()
    first: object
    try:
        first = canonical(raw)
    except Denied as denied:
        first = denied.reason
    for _ in range(3):
        try:
            again: object = canonical(raw)
        except Denied as denied:
            again = denied.reason
        assert again == first


def test_memo_is_bounded() -> None:
    """A flood of distinct targets keeps the memo at its size, and answers stay right."""
    canonical = TargetCanonicalizer()
    for i in range(TargetCanonicalizer.MEMO_SIZE * 2):
        assert canonical(f"/a/{i}/../b{i}").path == f"/a/b{i}"
    assert len(canonical._memo) <= TargetCanonicalizer.MEMO_SIZE


ROUTES = [
    RouteSettings(methods=["POST"], path="/api/servers/{server}/deploy", operation="deploy"),
    RouteSettings(path="/api/servers/{server}/*", operation="servers:read"),
]


@pytest.mark.parametrize(
    "raw",
    ["/api/servers/p/deploy", "/api/servers/p/x/../deploy", "//api/servers/p/%64eploy/", "/api/servers/p/./deploy",
     "/api/servers/p/x", "/api/servers/p%2fq/deploy", "/api/servers/p/x/..%2fdeploy", "/api/servers/p/deploy;a"],
)
@pytest.mark.parametrize("canonical", [STRICT, LENIENT], ids=["strict", "lenient"])
def test_what_is_matched_is_what_is_forwarded(raw: str, canonical: TargetCanonicalizer) -> None:
    """The forwarded target, read again as an upstream reads it, matches the same route as the request did."""
    try:
        target = canonical(raw)
    except Denied:
        return
    table = RouteTable(ROUTES, [UpstreamSettings(name="app", url="http://127.0.0.1:1")])
    assert table.match("POST", target.path) == table.match("POST", target.forwarded)
    # Canonical means stable: the form of the form is itself.
    assert canonical(target.forwarded) == target
