"""The admin API's OpenAPI 3.1 document, generated from the endpoint declarations and their models.

The JSON Schemas come from the pydantic models that validate requests and
shape answers (OpenAPI 3.1 uses JSON Schema 2020-12, which pydantic writes),
so the document says exactly what the code accepts and returns.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import models_json_schema

from ..manage.inputs import IDENTIFIER_PATTERN
from .endpoints import PREFIX, Endpoint
from .models import ProblemOut
from .problems import PROBLEM_JSON

REF = "#/components/schemas/{model}"
# Path parameters as their values look; anything else still gets a clear 404 or 422.
_PATH_PATTERNS = {
    "id": r"^[A-Za-z0-9_]{1,128}$",
    "name": IDENTIFIER_PATTERN,
    "org": IDENTIFIER_PATTERN,
    "user": IDENTIFIER_PATTERN,
}
_PATH_DESCRIPTIONS = {
    "id": "A key's id (e.g. kg_7Hq2ZrT9xLmP); a pasted full key counts as its id.",
    "name": "A role's name.",
    "org": "An org.",
    "user": "A user in the org.",
}
# Where a parameter's name means something else under a collection: (collection, parameter) -> description.
_COLLECTION_PATH_DESCRIPTIONS = {
    ("trust-policies", "name"): "A trust policy's name.",
}

_ERRORS = {
    400: "Malformed request: a malformed Authorization header, or a body that is not JSON.",
    401: "No key, or a key that is invalid, expired or revoked (WWW-Authenticate says which).",
    403: "The key may not perform this operation on the server admin, or not from this address; or the "
         "action reaches beyond the admin key's org, the key kinds it manages or its own grants (forbidden).",
    404: "No such key, role, member or trust policy, or one in another org's keeping.",
    409: "The change conflicts with the current state.",
    413: "The request body is too large.",
    422: "Invalid input: `errors` lists each field's problem.",
    429: "The key's rate limit is exhausted (Retry-After, RateLimit headers), or too many failed attempts "
         "(too_many_attempts) or too many keys being verified (verification_busy) (Retry-After only).",
    503: "The key store cannot be reached and the key is not cached (Retry-After).",
}


def _header(description: str) -> dict[str, Any]:
    return {"description": description, "required": True, "schema": {"type": "string"}}


_RATELIMIT_HEADERS = {
    "RateLimit-Policy": _header('The key\'s bucket (IETF httpapi draft), e.g. "key";q=100;w=60.'),
    "RateLimit": _header('What is left of it, e.g. "key";r=99;t=1.'),
}
# Headers an error answer always carries, by status.
_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": _header('Bearer realm="keygate", with error="invalid_token" for a bad key.')},
    429: {"Retry-After": _header("Seconds until the bucket holds a token again, or until a retry may succeed."),
          # Only the key's own rate limit has a bucket to describe; the lookup's 429s come before any key.
          **{name: {**header, "required": False} for name, header in _RATELIMIT_HEADERS.items()}},
    503: {"Retry-After": _header("Seconds to wait before retrying.")},
}


def package_version() -> str:
    try:
        return version("keygate")
    except PackageNotFoundError:  # running from a source tree
        return "0"


def _models(endpoints: Sequence[Endpoint]) -> list[tuple[Any, str]]:
    found: dict[tuple[Any, str], None] = {(ProblemOut, "serialization"): None}
    for e in endpoints:
        for model, mode in ((e.query, "validation"), (e.body, "validation")):
            if model is not None:
                found[(model, mode)] = None
        if isinstance(e.response, type) and issubclass(e.response, BaseModel):
            found[(e.response, "serialization")] = None
    return list(found)


def _query_parameters(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """A query model's fields as parameters; a null alternative means "leave it out"."""
    params = []
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        variants = prop.pop("anyOf", None)
        if variants is not None:
            kept = [v for v in variants if v.get("type") != "null"]
            prop.update(kept[0] if len(kept) == 1 else {"anyOf": kept})
        if prop.get("default", ...) is None:
            del prop["default"]
        description = prop.pop("description", None)
        prop.pop("title", None)
        param = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def _problem(code: int) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": _ERRORS[code],
                              "content": {PROBLEM_JSON: {"schema": {"$ref": REF.format(model="ProblemOut")}}}}
    if code in _ERROR_HEADERS:
        answer["headers"] = _ERROR_HEADERS[code]
    return answer


def _operation(e: Endpoint, refs: dict[tuple[Any, str], Any], defs: dict[str, Any]) -> dict[str, Any]:
    names = re.findall(r"{(\w+)}", e.path)
    collection = e.path.strip("/").split("/")[0]
    parameters: list[dict[str, Any]] = [
        {"name": n, "in": "path", "required": True,
         "description": _COLLECTION_PATH_DESCRIPTIONS.get((collection, n), _PATH_DESCRIPTIONS[n]),
         "schema": {"type": "string", "pattern": _PATH_PATTERNS[n]}}
        for n in names
    ]
    if e.query is not None:
        parameters += _query_parameters(defs[e.query.__name__])
    op: dict[str, Any] = {
        "operationId": e.handler.__name__.strip("_"),
        "summary": e.summary,
        "tags": [collection],
    }
    if e.description or e.operation:
        needs = f"Needs a key with operation `{e.operation}` on the server `admin`." if e.operation else ""
        if e.per_kind or e.self_service:
            also = ["`keys:write:<kind>`"] * e.per_kind + ["`keys:self`"] * e.self_service
            needs = (f"Needs a key with operation `{e.operation}` (or {' or '.join(also)}) on the server "
                     "`admin`.")
        op["description"] = " ".join(part for part in (e.description, needs) if part)
    if parameters:
        op["parameters"] = parameters
    if e.body is not None:
        op["requestBody"] = {"required": e.body_required,
                             "content": {"application/json": {"schema": refs[(e.body, "validation")]}}}
    responses: dict[str, Any] = {}
    if e.response is None:
        responses[str(e.status)] = {"description": e.summary}
    else:
        schema = refs.get((e.response, "serialization")) or TypeAdapter(e.response).json_schema(
            ref_template=REF, mode="serialization")
        responses[str(e.status)] = {"description": e.summary, "content": {"application/json": {"schema": schema}}}
    codes: set[int] = set()
    if e.operation is not None:
        codes |= {400, 401, 403, 429, 503}
        op["security"] = [{"bearer": []}]
        op["x-keygate-operation"] = e.operation
        if e.per_kind or e.self_service:
            op["x-keygate-admitting"] = ["keys:write:<kind>"] * e.per_kind + ["keys:self"] * e.self_service
    else:
        op["security"] = []
    if names:
        codes |= {404, 422}
    if e.query is not None:
        codes.add(422)
    if e.body is not None:
        codes |= {400, 413, 422}
    if e.conflicts:
        codes.add(409)
    if e.operation is not None:
        responses[str(e.status)]["headers"] = dict(_RATELIMIT_HEADERS)
    if e.location is not None:
        responses[str(e.status)]["headers"]["Location"] = _header("The new key's path.")
    for code in sorted(codes):
        responses[str(code)] = _problem(code)
    op["responses"] = responses
    return op


def openapi_document(endpoints: Sequence[Endpoint]) -> dict[str, Any]:
    refs, top = models_json_schema(_models(endpoints), ref_template=REF)
    defs: dict[str, Any] = top.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        paths.setdefault(PREFIX + e.path, {})[e.method.lower()] = _operation(e, refs, defs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Keygate admin API",
            "version": package_version(),
            "description": "Manage Keygate's keys, roles, org members, trust policies and audit trail. "
                           "Authenticate with `Authorization: Bearer <key>`, a key granted the operation an "
                           "endpoint names on the server `admin` (a key with servers [\"*\"] does not cover "
                           "admin). An admin key acts within its own org: lists show that org only, another "
                           "org's keys, members and trust policies are answered 404 and making one in another "
                           "org 403, unless the key is granted `orgs:any` (the built-in admin role's `*` is). "
                           "Errors are application/problem+json (RFC 9457). Lists answer "
                           "{items, next_cursor}: pass next_cursor back as `cursor` for the next page.",
        },
        "paths": paths,
        "components": {
            "schemas": defs,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "A Keygate key with access to the server admin."}},
        },
    }
