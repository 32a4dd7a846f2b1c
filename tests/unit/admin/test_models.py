"""The admin API's request models: the shape problems they report, one per field the client sent."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from gateway.admin.endpoints import field_errors
from gateway.admin.models import KeyRotate, TrustPolicyPut

POLICY = {"issuer": "https://token.actions.githubusercontent.com", "audience": "keygate",
          "conditions": {"repository": "acme/shop"}, "org": "acme"}


@pytest.mark.parametrize(
    ("model", "body", "fields"),
    [
        (TrustPolicyPut, {**POLICY, "lifetime": 900.5}, ["lifetime"]),
        (TrustPolicyPut, {**POLICY, "lifetime": [900]}, ["lifetime"]),
        (TrustPolicyPut, {**POLICY, "lifetime": {"minutes": 15}}, ["lifetime"]),
        (TrustPolicyPut, {**POLICY, "conditions": {"repository": 5, "ref": None}},
         ["conditions.repository", "conditions.ref"]),
        (TrustPolicyPut, {**POLICY, "conditions": ["repository=acme/shop"]}, ["conditions"]),
        (TrustPolicyPut, {**POLICY, "operations": "deploy"}, ["operations"]),
        (TrustPolicyPut, {**POLICY, "name": "shop"}, ["name"]),  # the name is the path's
        (TrustPolicyPut, {"conditions": {}}, ["issuer", "audience", "org"]),
        (KeyRotate, {"grace": [3600]}, ["grace"]),
        (KeyRotate, {"grace": {"hours": 1}}, ["grace"]),
    ],
)
def test_each_bad_field_is_one_problem(model: type[BaseModel], body: dict[str, Any], fields: list[str]) -> None:
    """A value of the wrong shape is one problem named by the field the client sent (never `lifetime.str`)."""
    with pytest.raises(ValidationError) as refused:
        model.model_validate(body)
    assert [e["field"] for e in field_errors(refused.value)] == fields


@pytest.mark.parametrize(("lifetime", "kept"), [("15m", "15m"), (900, 900), (None, None), ("", "")])
def test_lifetime_passes_durations_and_seconds_to_the_service(lifetime: Any, kept: Any) -> None:
    """The model only checks the shape; the service parses and bounds the lifetime."""
    assert TrustPolicyPut.model_validate({**POLICY, "lifetime": lifetime}).lifetime == kept
