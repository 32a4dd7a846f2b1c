"""The admin listener's application: health, readiness, metrics, the admin API and the web page."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web, web_response
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from ..runtime import Runtime
from ..manage.service import hasher_from
from .api import ENDPOINTS
from .auth import AdminAuth
from .endpoints import PREFIX, Call, Context, Endpoint, route_handler
from .metrics import metrics_routes
from .openapi import openapi_document
from .problems import PROBLEM_JSON, TYPE_PREFIX, problem_middleware, request_id_middleware
from .ui import add_ui_routes

# Admin requests are small JSON; anything bigger is refused with 413 before it is read whole.
MAX_BODY = 1024 * 1024


def api_endpoints() -> tuple[Endpoint, ...]:
    """Every endpoint under /admin/v1, the document itself included."""
    document: dict[str, Any] = {}

    async def openapi(_call: Call) -> dict[str, Any]:
        return document

    endpoints = (*ENDPOINTS, Endpoint("GET", "/openapi.json", "This API's OpenAPI 3.1 document", openapi, None,
                                      dict[str, Any]))
    document.update(openapi_document(endpoints))
    return endpoints


# aiohttp gives every answer `Server: Python/3.x aiohttp/3.y`, which tells an attacker what to try. The app's
# answers go through no_server_header, which drops it; aiohttp's own answers to a request it cannot parse (400)
# are made before any app hook, so its default for them is a fixed name without a version.
web_response.SERVER_SOFTWARE = "keygate"


async def no_server_header(_request: web.Request, response: web.StreamResponse) -> None:
    """Keygate's own answers carry no Server header (README, "Server header")."""
    response.headers.popall(hdrs.SERVER, None)


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server log on the admin listener: a request it cannot parse is one info line, as on the proxy.

    aiohttp logs those at error with a traceback; anyone who reaches the port could fill the error
    log with them. Its other errors (a handler that raised) stay errors, traceback included.
    """

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self._bad_http(exc_info)
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg: object, *args: object, exc_info: Any = None, **kwargs: Any) -> None:
        # (aiohttp logs a first request that is not HTTP at all, TLS say, at debug: the proxy logs it too.)
        if isinstance(exc_info, HttpProcessingError):
            self._bad_http(exc_info)
        else:
            super().debug(msg, *args, exc_info=exc_info, **kwargs)

    @staticmethod
    def _bad_http(exc: HttpProcessingError) -> None:
        reason = exc.message or type(exc).__name__
        _HTTP_LOG.info(json.dumps({"event": "bad_http", "listener": "admin", "status": 400, "reason": reason[:200]}))


_HTTP_LOG = logging.getLogger("keygate.http")

# SECURITY: aiohttp answers a request it cannot parse with its parser's message, which quotes the
# offending bytes: a whole header line (an Authorization header and its key, say) or request line.
# The admin listener answers with this fixed problem instead, as the proxy listener answers with its
# own JSON: a request is never echoed. (The reason is logged, keys shown as their ids: ServerLog.)
_UNREADABLE = json.dumps({
    "type": TYPE_PREFIX + "invalid_request", "title": "Bad Request", "status": 400,
    "detail": "The request is not well-formed HTTP.",
}).encode()


class _AdminRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering an unparseable request with :data:`_UNREADABLE`."""

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # aiohttp's own first: it logs (through ServerLog) and refuses once an answer has begun.
        answer = super().handle_error(request, status, exc, message)
        if status != 400:
            return answer  # 500 and 504: aiohttp's fixed texts, nothing of the request in them
        fixed = web.Response(status=400, body=_UNREADABLE, content_type=PROBLEM_JSON)
        fixed.force_close()
        return fixed


class _AdminServer(web.Server):
    """The server of :func:`admin_runner`: connections handled by :class:`_AdminRequestHandler`."""

    __slots__ = ()

    def __call__(self) -> RequestHandler:
        return _AdminRequestHandler(self, loop=self._loop, **self._kwargs)


class _AdminRunner(web.AppRunner):
    __slots__ = ()

    async def _make_server(self) -> web.Server:
        # aiohttp builds its Server itself (Application._make_handler) and has no setting for the
        # connection handler's class: the server it built becomes an _AdminServer (same fields).
        server = await super()._make_server()
        server.__class__ = _AdminServer
        return server


def admin_runner(app: web.Application) -> web.AppRunner:
    """The admin listener's runner: no access log of aiohttp's own, its server log through :class:`ServerLog`,
    requests it cannot parse answered without an echo (:data:`_UNREADABLE`)."""
    return _AdminRunner(app, access_log=None, shutdown_timeout=5,
                        logger=ServerLog(logging.getLogger("aiohttp.server"), {}))


def admin_app(rt: Runtime, *, metrics_dir: Path | None = None) -> web.Application:
    """The admin listener's app; ``metrics_dir`` is the per-run directory workers share metrics through."""
    auth = AdminAuth(rt.authenticator, rt.recorder)

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ready = rt.ready()
        body = {"ready": ready, "draining": rt.draining, "store": rt.watcher.store_ok, "cached_keys": len(rt.cache),
                "redis": rt.redis_state(),
                "ratelimit_degraded": rt.fallback.decisions if rt.fallback is not None else 0}
        return web.json_response(body, status=200 if ready else 503)

    # The request id first, so the auth middleware's records and the problem name the same request;
    # the auth middleware next, so it records the final status, problems included.
    app = web.Application(middlewares=[request_id_middleware, auth.middleware, problem_middleware],
                          client_max_size=MAX_BODY)
    app.on_response_prepare.append(no_server_header)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    metrics_routes(app, rt, auth, metrics_dir)
    ctx = Context(auth=auth, store=rt.store, settings=rt.settings, hasher=hasher_from(rt.settings),
                  notifier=rt.publisher)
    for endpoint in api_endpoints():
        app.router.add_route(endpoint.method, PREFIX + endpoint.path, route_handler(ctx, endpoint))
    add_ui_routes(app)
    return app
