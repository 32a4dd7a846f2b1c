"""The OpenAPI document: generated from the endpoint declarations, so routes and document agree,
and a property-based run of the whole API from it (schemathesis) finds no 5xx and no answer off its schema."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
import json
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_headers_conformance, response_schema_conformance, status_code_conformance,
)

from gateway.admin.api import ENDPOINTS
from gateway.admin.listener import admin_app, api_endpoints
from gateway.admin.openapi import openapi_document
from gateway.runtime import runtime

from ..e2e.harness import Keygate, Upstream
from .conftest import settings_for

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


async def test_every_route_is_documented_and_every_documented_route_exists(sqlite_url: str) -> None:
    """The admin app's /admin/v1 routes and the document's operations are the same set."""
    document = openapi_document(api_endpoints())
    documented = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    async with runtime(settings_for(sqlite_url, "http://127.0.0.1:9")) as rt:
        app = admin_app(rt)
    routed = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/admin/v1/") and r.method != "HEAD"}
    assert routed == documented
    # 20 + allowlist-suggestion, report-leak (issue 17) + whoami, orgs (issue 20) + a key's usage (issue 19)
    assert len(documented) == 25


def test_every_authenticated_operation_declares_its_admin_operation_and_problems() -> None:
    """Each operation names the admin operation it needs, bearer security and its problem answers."""
    document = openapi_document(api_endpoints())
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            if path.endswith("/openapi.json"):
                assert op["security"] == []
                continue
            assert op["security"] == [{"bearer": []}], (method, path)
            assert op["x-keygate-operation"] in {"keys:read", "keys:write", "roles:read", "roles:write",
                                                 "members:write", "trust:read", "trust:write", "audit:read"}
            assert {"401", "403", "429"} <= set(op["responses"]), (method, path)
            assert op["responses"]["401"]["content"] == {
                "application/problem+json": {"schema": {"$ref": "#/components/schemas/ProblemOut"}}
            }


def test_request_bodies_are_the_validating_models() -> None:
    """The documented body of POST /keys is the schema of the model that validates it."""
    from gateway.admin.models import KeyCreate

    document = openapi_document(api_endpoints())
    body = document["paths"]["/admin/v1/keys"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/KeyCreate"}
    assert set(document["components"]["schemas"]["KeyCreate"]["properties"]) == set(KeyCreate.model_fields)


@pytest.mark.parametrize(
    ("method", "path", "operation", "body", "answer"),
    [
        ("get", "/admin/v1/trust-policies", "trust:read", None, ("200", "TrustPolicyPage")),
        ("get", "/admin/v1/trust-policies/{name}", "trust:read", None, ("200", "TrustPolicyOut")),
        ("put", "/admin/v1/trust-policies/{name}", "trust:write", "TrustPolicyPut", ("200", "TrustPolicyOut")),
        ("delete", "/admin/v1/trust-policies/{name}", "trust:write", None, ("204", None)),
    ],
)
def test_trust_policy_endpoints_are_documented(
    method: str, path: str, operation: str, body: str | None, answer: tuple[str, str | None],
) -> None:
    """The trust-policy endpoints are in the document with their operation, body and answer models."""
    from gateway.admin import models

    op = openapi_document(api_endpoints())["paths"][path][method]
    assert op["x-keygate-operation"] == operation and op["tags"] == ["trust-policies"]
    status, model = answer
    content = op["responses"][status].get("content")
    assert (content["application/json"]["schema"] if content else None) == (
        {"$ref": f"#/components/schemas/{model}"} if model else None)
    if body is None:
        assert "requestBody" not in op
    else:
        assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{body}"}
        schema = openapi_document(api_endpoints())["components"]["schemas"][body]
        assert set(schema["properties"]) == set(getattr(models, body).model_fields)
    for parameter in op.get("parameters", []):
        if parameter["name"] == "name":
            assert parameter["description"] == "A trust policy's name."


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Keygate, str]]:
    """A real `keygate serve` with an admin key (made as the CLI does) and a little data to find."""
    upstream = Upstream()
    keygate = Keygate(tmp_path_factory.mktemp("openapi"), upstream.url).start()

    async def seed() -> str:
        async with keygate.service() as service:
            await service.put_role("ci", ["read"])
            await service.set_member("acme", "bob", "ci")
            await service.create_key(name="ci", role="ci")
            _, key = await service.create_key(name="root", role="admin", servers=["admin"],
                                              rate_limit="100000/minute")
            return key

    key = asyncio.run(seed())
    yield keygate, key
    keygate.stop()
    upstream.stop()


# The document the code generates; the test below checks the server serves exactly this one.
schema = schemathesis.openapi.from_dict(openapi_document(api_endpoints()))


def test_the_server_serves_the_generated_document(served: tuple[Keygate, str]) -> None:
    """GET /admin/v1/openapi.json on a running server is the document the property run uses."""
    keygate, _ = served
    with urllib.request.urlopen(keygate.admin_url + "/admin/v1/openapi.json", timeout=10) as r:
        assert json.load(r) == openapi_document(api_endpoints())


@schema.parametrize()
@settings(max_examples=8, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_document(case: schemathesis.Case, served: tuple[Keygate, str]) -> None:
    """Generated requests to every operation get no 5xx and answers that match the document."""
    keygate, key = served
    case.call_and_validate(base_url=keygate.admin_url, headers={"Authorization": f"Bearer {key}"}, checks=CHECKS)


def test_the_property_run_reached_the_server(served: tuple[Keygate, str]) -> None:
    """The generated requests reached every endpoint (their request records are in the audit trail)."""
    keygate, _ = served
    expected = {f"{e.method} {e.operation}" for e in ENDPOINTS}

    async def reached() -> set[str]:
        """What the store holds once every endpoint's record is there, or after 10 s (the recorder
        flushes every 0.2 s in the harness; a loaded machine may take a few)."""
        seen: set[str] = set()
        for _ in range(50):
            async with keygate.service() as service:
                async with service.store.read() as tx:
                    records = await tx.list_requests(limit=100_000)
            seen = {f"{r.method} {r.operation}" for r in records if r.server == "admin"}
            if seen >= expected:
                break
            await asyncio.sleep(0.2)
        return seen

    assert asyncio.run(reached()) == expected
    assert "admin_internal_error" not in keygate.log()
