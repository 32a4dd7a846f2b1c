"""The web page at ``/ui/`` on the admin listener, and the admin API's reference at ``/ui/api/``:
static files shipped in the package.

The page is a client of the admin API and holds no authority of its own: it
sends the admin key the operator pasted (kept in the tab's sessionStorage) as
``Authorization: Bearer`` on every API call. The files are read once at
start-up into memory, and only names in that fixed set are served, so no
request path ever reaches the filesystem.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

UI_DIR = Path(__file__).with_name("ui")

# SECURITY: nothing but this origin's own files may load or run; no inline
# script or style, no framing (clickjacking), no form posts or <base> tricks.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    # SECURITY: no MIME sniffing of our scripts and styles.
    "X-Content-Type-Options": "nosniff",
    # SECURITY: URLs (key ids in the hash) never leave in a Referer.
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets(folder: Path = UI_DIR) -> dict[str, Asset]:
    """Every servable file of the page, by name, read once."""
    assets: dict[str, Asset] = {}
    for path in sorted(folder.iterdir()):
        content_type = _CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        assets[path.name] = Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    if "index.html" not in assets or "api.html" not in assets:
        raise RuntimeError(f"the web page's files are missing from {folder}")
    return assets


def _answer(request: web.Request, asset: Asset, cache_control: str) -> web.Response:
    headers = {**_SECURITY_HEADERS, "Cache-Control": cache_control, "ETag": asset.etag}
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


def add_ui_routes(app: web.Application) -> None:
    """Serve the web page under ``/ui/`` and the API reference under ``/ui/api/``; without the
    trailing slash each redirects there."""
    assets = load_assets()
    index = assets["index.html"]
    reference = assets["api.html"]

    def redirect(to: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(_request: web.Request) -> web.Response:
            raise web.HTTPPermanentRedirect(to)
        return handle

    async def page(request: web.Request) -> web.Response:
        # The page itself is never stored: a signed-out browser must not show it from cache.
        return _answer(request, index, "no-store")

    async def reference_page(request: web.Request) -> web.Response:
        # Public like the document it draws (GET /admin/v1/openapi.json needs no key).
        return _answer(request, reference, "no-cache")

    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["name"])
        # Pages only at their own paths, so relative links in them always resolve the same.
        if found is None or found.content_type.startswith("text/html"):
            raise web.HTTPNotFound(text="not found", headers=_SECURITY_HEADERS)
        # Revalidated on every load (cheap with the ETag), so an upgrade never mixes old and new files.
        return _answer(request, found, "no-cache")

    app.router.add_get("/ui", redirect("/ui/"))
    app.router.add_get("/ui/", page)
    app.router.add_get("/ui/api", redirect("/ui/api/"))
    app.router.add_get("/ui/api/", reference_page)
    app.router.add_get("/ui/{name}", asset)
