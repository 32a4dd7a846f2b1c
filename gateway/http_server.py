"""The proxy listener's HTTP server: aiohttp's low-level server with our error answers.

aiohttp answers requests it cannot parse itself, echoing the offending bytes
(which may hold the client's key) in a text body. Here those answers are
our JSON ones, without the echo, and the connection is closed after them.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("keygate.http")

_BODIES = {
    400: ("invalid_request", "The request is not well-formed HTTP."),
    413: ("request_too_large", "The request line or headers are too large."),
    500: ("internal_error", "Keygate failed to handle this request."),
}


class _Handler(RequestHandler):
    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # SECURITY: never echo the request (it may carry a key) and never a traceback.
        log.info(json.dumps({"event": "bad_http", "status": status, "error": type(exc).__name__ if exc else None}))
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        error, description = _BODIES.get(status, ("invalid_request", "The request could not be handled."))
        response = web.Response(
            status=status, content_type="application/json",
            text=json.dumps({"error": error, "error_description": description}),
        )
        response.force_close()
        return response


class ProxyHTTPServer(web.Server):
    """``web.Server`` whose connections use :class:`_Handler`."""

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)
