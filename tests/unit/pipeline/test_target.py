"""The canonical request target: one form for the route table and the upstream, or a 400."""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from gateway.pipeline.outcomes import Denied, Outcome
from gateway.config.routes import path_segments
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
        ("/a%3D%2cb", "/a%3D%2Cb", ""),
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
     "/a;b=c", "/..;/a", "/a;", "/deploy%3Bx", "/deploy%3b", "/a%zz",
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
        ("/deploy%3Bjsessionid=1", "/deploy"),
        ("/x/..%3bx/deploy", "/deploy"),
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


def read_as_nginx_does(target: str) -> tuple[str, ...]:
    """The segments a decoding upstream routes by: every escape decoded (%2F too), then dot segments resolved."""
    segments: list[str] = []
    for segment in unquote(target.partition("?")[0]).split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    return tuple(segments)


@pytest.mark.parametrize(
    ("raw", "segments"),
    [
        ("/api/servers/p/deploy", ("api", "servers", "p", "deploy")),
        ("/api/servers/p/x/../deploy?a=%2F..%2F", ("api", "servers", "p", "deploy")),
        ("//api/servers/p/%64eploy/", ("api", "servers", "p", "deploy")),
        ("/api/servers/p/./deploy", ("api", "servers", "p", "deploy")),
        ("/api/servers/p/%2e%2e/q/status", ("api", "servers", "q", "status")),
        ("/api/servers/p/a%20b", ("api", "servers", "p", "a b")),
        ("/api/servers/p/caf%C3%A9", ("api", "servers", "p", "caf\u00e9")),
    ],
)
def test_a_decoding_upstream_reads_what_the_route_table_matched(raw: str, segments: tuple[str, ...]) -> None:
    """By default the forwarded target, decoded and resolved as nginx does, is exactly the matched segments."""
    target = STRICT(raw)
    assert path_segments(target.path) == segments
    assert read_as_nginx_does(target.forwarded) == segments
    # Canonical means stable: the form of the form is itself.
    assert STRICT(target.forwarded) == target


