"""Errors of the admin API as ``application/problem+json`` (RFC 9457).

Handlers and the auth stage raise :class:`Problem`; :func:`problem_middleware`
turns it, the service layer's refusals and aiohttp's own HTTP errors (unknown
route, wrong method, body too large) into one JSON shape, and any bug into a
500 that tells the client nothing about it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

from aiohttp import web

from ..manage.errors import ConflictError, Forbidden, InvalidInput, NotFound, ServiceError
from ..pipeline.request_ids import request_id_of
from ..pipeline.responses import STORE_RETRY_AFTER
from ..process.log_format import REQUEST_ID
from ..store import Conflict, StoreError, StoreUnavailable

log = logging.getLogger("keygate.admin")

PROBLEM_JSON = "application/problem+json"
# Problem types are URNs: stable identifiers that need no web page to exist.
TYPE_PREFIX = "urn:keygate:problem:"


class Problem(Exception):
    """An admin API error: ``code`` names its type, ``detail`` is shown to the client as it is."""

    def __init__(
        self, status: int, code: str, detail: str, *, headers: Mapping[str, str] | None = None,
        errors: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        self.errors = errors


@web.middleware
async def request_id_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """The request's id for every record written while it is handled, its problem's ``instance`` and the
    ``X-Request-Id`` of its answer, whatever the answer.

    aiohttp handles a connection's requests one after another in one task, so the id is reset after each.
    """
    request_id = request_id_of(request.headers)
    token = REQUEST_ID.set(request_id)
    try:
        response = await handler(request)
    except web.HTTPException as answer:  # a redirect, say, raised as aiohttp's own answer
        answer.headers.setdefault("X-Request-Id", request_id)
        raise
    finally:
        REQUEST_ID.reset(token)
    if not response.prepared:  # (one already streaming has sent its head)
        response.headers.setdefault("X-Request-Id", request_id)
    return response


def problem_response(request: web.Request, problem: Problem) -> web.Response:
    request_id = REQUEST_ID.get() or request_id_of(request.headers)
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + problem.code,
        "title": HTTPStatus(problem.status).phrase,
        "status": problem.status,
        "detail": problem.detail,
        # SECURITY: not the path, which may hold a pasted full key: the request's id.
        "instance": f"urn:keygate:request:{request_id}",
    }
    if problem.errors is not None:
        body["errors"] = problem.errors
    headers = {**problem.headers, "Cache-Control": "no-store", "X-Request-Id": request_id}
    return web.Response(status=problem.status, text=json.dumps(body), content_type=PROBLEM_JSON,
                        headers=headers)


def from_service_error(exc: ServiceError) -> Problem:
    if isinstance(exc, NotFound):
        return Problem(404, "not_found", str(exc))
    if isinstance(exc, Forbidden):
        return Problem(403, "forbidden", str(exc))
    if isinstance(exc, ConflictError):
        return Problem(409, "conflict", str(exc))
    if isinstance(exc, InvalidInput):
        return Problem(422, "invalid_input", str(exc))
    return Problem(422, "refused", str(exc))


# aiohttp's own errors (no route, wrong method, body too large, ...) by status.
_HTTP_CODES = {
    404: ("not_found", "No such endpoint."),
    405: ("method_not_allowed", "This endpoint does not support this method."),
    413: ("request_too_large", "The request body is larger than allowed."),
}


@web.middleware
async def problem_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as problem:
        return problem_response(request, problem)
    except ServiceError as exc:
        return problem_response(request, from_service_error(exc))
    except StoreUnavailable:
        return problem_response(request, Problem(
            503, "store_unavailable", "The key store cannot be reached; retry shortly.",
            headers={"Retry-After": str(STORE_RETRY_AFTER)},
        ))
    except Conflict:
        # A uniqueness rule hit by a concurrent change: trying again sees the new state.
        return problem_response(request, Problem(409, "conflict", "A concurrent change conflicted; retry."))
    except StoreError as exc:
        log.error(json.dumps({"event": "admin_store_error", "error": str(exc), "path": request.path}))
        return problem_response(request, Problem(500, "store_error", "The key store refused the change."))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, detail = _HTTP_CODES.get(exc.status, ("http_error", exc.reason))
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return problem_response(request, Problem(exc.status, code, detail, headers=headers))
    except Exception:
        # A bug, not a decision: log it whole, tell the client nothing about it.
        log.exception(json.dumps({"event": "admin_internal_error", "path": request.path}))
        return problem_response(request, Problem(500, "internal_error", "Keygate failed to handle this request."))
