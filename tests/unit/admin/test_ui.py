"""The web page's files: served from the package with strict security headers, nothing else reachable."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from html.parser import HTMLParser
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.admin.ui import CONTENT_SECURITY_POLICY, UI_DIR, add_ui_routes

Client = TestClient[Any, web.Application]


@pytest.fixture
async def client(aiohttp_client: Callable[[web.Application], Awaitable[Client]]) -> Client:
    app = web.Application()
    add_ui_routes(app)
    return await aiohttp_client(app)


# -- 200 / 304 -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "content_type", "cache_control"),
    [
        ("/ui/", "text/html", "no-store"),
        ("/ui/api/", "text/html", "no-cache"),
        ("/ui/reference.js", "text/javascript", "no-cache"),
        ("/ui/app.js", "text/javascript", "no-cache"),
        ("/ui/app.css", "text/css", "no-cache"),
        ("/ui/favicon.svg", "image/svg+xml", "no-cache"),
    ],
)
async def test_files_carry_the_security_headers(client: Client, path: str, content_type: str, cache_control: str) -> None:
    """Every file is served with the strict CSP, nosniff, no-referrer and its cache rule."""
    response = await client.get(path)
    assert response.status == 200
    assert response.content_type == content_type
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["Cache-Control"] == cache_control


def test_policy_allows_only_this_origin() -> None:
    """The CSP names no host and allows no inline code or framing."""
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives == {
        "default-src": "'none'", "script-src": "'self'", "style-src": "'self'", "connect-src": "'self'",
        "img-src": "'self' data:", "base-uri": "'none'", "form-action": "'none'", "frame-ancestors": "'none'",
    }


async def test_unchanged_file_answers_304(client: Client) -> None:
    """A browser holding the current ETag is told its copy is still good."""
    first = await client.get("/ui/app.js")
    again = await client.get("/ui/app.js", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status == 304 and await again.read() == b""


# -- 308 -------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "location"), [("/ui", "/ui/"), ("/ui/api", "/ui/api/")])
async def test_ui_without_slash_redirects(client: Client, path: str, location: str) -> None:
    """/ui and /ui/api redirect to their folder so the pages' relative file names resolve."""
    response = await client.get(path, allow_redirects=False)
    assert response.status == 308 and response.headers["Location"] == location


# -- 404 -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    ["/ui/missing.js", "/ui/index.html", "/ui/api.html", "/ui/api/app.js", "/ui/..%2fui.py", "/ui/%2e%2e/ui.py", "/ui/ui.py", "/ui/sub/app.js"],
)
async def test_only_the_pages_own_files_are_served(client: Client, path: str) -> None:
    """Names outside the page's fixed set of files, traversal included, are 404."""
    response = await client.get(path)
    assert response.status == 404


# -- what the files may contain ----------------------------------------------------
class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text_in_script = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if self.tags and self.tags[-1][0] in ("script", "style"):
            self.text_in_script += data.strip()


@pytest.mark.parametrize("page", ["index.html", "api.html"])
def test_page_has_no_inline_code_and_no_external_reference(page: str) -> None:
    """A page loads only its own files: no inline script, style or event handler, no absolute URL."""
    parser = _Tags()
    parser.feed((UI_DIR / page).read_text())
    assert parser.text_in_script == ""
    for tag, attrs in parser.tags:
        assert tag != "style" and "style" not in attrs
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not re.match(r"^([a-z]+:|//)", value), (tag, value)


@pytest.mark.parametrize("script", sorted(p.name for p in UI_DIR.glob("*.js")))
def test_scripts_never_parse_markup(script: str) -> None:
    """No script inserts HTML from strings: key names are user input and stay text."""
    source = (UI_DIR / script).read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in source, f"{script} uses {sink}"
    # The SVG namespace is a name createElementNS needs, never fetched.
    assert not re.search(r"https?://", source.replace('"http://www.w3.org/2000/svg"', "")), \
        f"{script} names an absolute URL"
