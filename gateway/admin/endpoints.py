"""How an admin API endpoint is declared, and how a declaration becomes an aiohttp handler.

An :class:`Endpoint` names its method, path, the operation it needs on the
server ``admin``, and the models of its query string, body and answer. The
same declarations build the routes (:func:`route_handler`) and the OpenAPI
document (:mod:`gateway.admin.openapi`), so neither can list an endpoint the
other lacks.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter, ValidationError

from ..config.schema import Settings
from ..keys import SecretHasher
from ..manage.acting import AdminKey, kind_operation
from ..manage.service import InvalidInput, KeyService, Notifier
from ..pipeline.prepared import PreparedKey
from ..pipeline.scope import ADMIN_SERVER, KEYS_SELF
from ..store import KeyStore
from .auth import AdminAuth
from .problems import Problem

PREFIX = "/admin/v1"


@dataclass(frozen=True, slots=True)
class Call:
    """What a handler gets: the service acting as the admin key, and the parsed query and body."""

    service: KeyService
    params: Mapping[str, str]
    query: Any
    body: Any


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str  # below PREFIX, with {name} path parameters
    summary: str
    handler: Handler
    operation: str | None  # on the server "admin"; None = no key needed
    response: Any = None  # a model (or annotated union) for the answer; None = 204 No Content
    status: int = 200
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    body_required: bool = True
    conflicts: bool = False  # may answer 409
    description: str = ""
    location: str | None = None  # for a 201: the new resource's path, formatted with the answer's fields
    # The operation depends on the key's kind: keys:write:<kind> (which keys:write covers) admits the
    # request too, and the service checks the one of the key at hand.
    per_kind: bool = False
    # keys:self admits the request too: a member managing their own per-user keys (the service
    # keeps them to those).
    self_service: bool = False

    def admitting(self, kinds: Iterable[str]) -> tuple[str, ...]:
        """The operations that admit a request besides ``operation``, for the configured key kinds."""
        per_kind = tuple(kind_operation(k) for k in kinds) if self.per_kind else ()
        return per_kind + ((KEYS_SELF,) if self.self_service else ())


@dataclass(frozen=True, slots=True)
class Context:
    """What every handler's service needs, built once per app."""

    auth: AdminAuth
    store: KeyStore
    settings: Settings
    hasher: SecretHasher
    # With Redis: publishes each change once committed, so every replica hears of it at once.
    notifier: Notifier | None = None


def field_errors(exc: ValidationError, prefix: str = "") -> list[dict[str, str]]:
    """One ``{field, message}`` per problem with the shape of a query string or body."""
    errors = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "missing":
            message = "required"
        else:
            message = error["msg"]
        errors.append({"field": field or "body", "message": message})
    return errors


def invalid(errors: list[dict[str, str]]) -> Problem:
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return Problem(422, "invalid_input", f"invalid input: {summary}", errors=errors)


def body_field_errors(endpoint: Endpoint, exc: InvalidInput) -> list[dict[str, str]]:
    """The service's problems with fields of the request body, listed like the body's shape problems.

    A problem with a path parameter (``/roles/{name}``) or with the input as a
    whole has no body field to name: it is the answer's detail (as the service
    words it) only when the body has no problem of its own.
    """
    declared = endpoint.body.model_fields if endpoint.body is not None else {}
    return [{"field": p.field, "message": p.message} for p in exc.problems
            if p.field is not None and p.field.partition(".")[0] in declared]


def _parse_query(model: type[BaseModel] | None, request: web.Request) -> Any:
    if model is None:
        return None
    try:
        return model.model_validate(dict(request.query.items()))
    except ValidationError as exc:
        raise invalid(field_errors(exc, "query")) from None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _parse_body(endpoint: Endpoint, request: web.Request) -> Any:
    if endpoint.body is None:
        return None
    raw = await request.read()
    if not raw.strip():
        if endpoint.body_required:
            raise Problem(400, "invalid_json", "Send a JSON object as the request body.")
        return endpoint.body()
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise Problem(400, "invalid_json", "The request body is not valid JSON.") from None
    try:
        return endpoint.body.model_validate(data)
    except ValidationError as exc:
        raise invalid(field_errors(exc)) from None


def acting_key(key: PreparedKey) -> AdminKey:
    """What bounds an admin request's key: its org and user, its effective grants and servers."""
    record = key.record
    return AdminKey(key_id=record.id, org=record.org, user=record.user, grants=key.grants, servers=key.servers,
                    admin=key.servers.allows(ADMIN_SERVER))


def route_handler(ctx: Context, endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    answer = TypeAdapter(endpoint.response) if endpoint.response is not None else None
    admitting = endpoint.admitting(ctx.settings.keys.kinds)

    async def handle(request: web.Request) -> web.StreamResponse:
        actor, acting = "anonymous", None
        if endpoint.operation is not None:
            # Authentication first: who is not allowed in learns nothing about their input.
            key = await ctx.auth.authenticate(request, endpoint.operation, admitting)
            # The audit actor of everything done through the API is the admin key's id; its org,
            # kinds and grants bound what it may do.
            actor, acting = key.record.id, acting_key(key)
        query = _parse_query(endpoint.query, request)
        body = await _parse_body(endpoint, request)
        service = KeyService(ctx.store, ctx.settings, actor=actor, hasher=ctx.hasher, notifier=ctx.notifier,
                             **({"acting": acting} if acting is not None else {}))
        try:
            result = await endpoint.handler(Call(service, request.match_info, query, body))
        except InvalidInput as exc:
            if errors := body_field_errors(endpoint, exc):
                raise invalid(errors) from None
            raise
        if answer is None:
            return web.Response(status=204)
        # Validated against the declared model on the way out: the answer cannot drift from the document.
        data = answer.dump_python(answer.validate_python(result), mode="json")
        headers = {"Cache-Control": "no-store"}
        if endpoint.location is not None:
            headers["Location"] = PREFIX + endpoint.location.format(**data)
        return web.json_response(data, status=endpoint.status, headers=headers)

    return handle
