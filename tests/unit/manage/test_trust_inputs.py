"""Validation of trust policy values: issuer URLs, audiences, claim conditions, lifetimes, JWKS files."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.config.schema import Settings
from gateway.manage import inputs as fields
from gateway.manage.inputs import InvalidField
from gateway.manage.service import FieldProblem, InvalidInput, KeyService

from ...clocks import FakeClock
from .test_service import Untouchable


@pytest.mark.parametrize(
    "text",
    [
        "https://token.actions.githubusercontent.com",
        "https://issuer.example/",  # a trailing '/' is kept: iss is compared exactly
        "https://issuer.example:8443/tenant/v2.0",
        "http://127.0.0.1:9000",
        "http://127.8.9.10/x",
        "http://[::1]:9000/",
        "http://localhost:9000",
        "http://LOCALHOST",
    ],
)
def test_issuers_accepted_as_given(text: str) -> None:
    """https anywhere, http on loopback only; the URL comes back unchanged."""
    assert fields.issuer(text) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("issuer.example", "use an https:// URL"),
        ("ftp://issuer.example", "use an https:// URL"),
        ("https://", "use an https:// URL"),
        ("https://issuer.example:99999", "use an https:// URL"),
        ("https://issuer.example/ x", "use an https:// URL"),
        (" https://issuer.example", "use an https:// URL"),
        ("http://issuer.example", "http:// only for a loopback host"),
        ("http://10.0.0.1", "http:// only for a loopback host"),
        ("http://localhost.evil.example", "http:// only for a loopback host"),
        ("http://127.0.0.1.nip.io", "http:// only for a loopback host"),
        ("https://issuer.example?", "no query or fragment"),
        ("https://issuer.example/#", "no query or fragment"),
        ("https://a:b@issuer.example", "no user:password@"),
    ],
)
def test_issuers_refused(text: str, reason: str) -> None:
    """Anything but an https URL (or http to a loopback host) without query, fragment or credentials is refused."""
    with pytest.raises(InvalidField, match=reason):
        fields.issuer(text)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, 900), ("", 900), ("15m", 900), ("1h", 3600), ("1m", 60), ("60", 60), (90, 90), (3600, 3600)],
)
def test_lifetimes(value: str | int | None, seconds: int) -> None:
    """Durations or seconds from one minute to one hour; none means 15 minutes."""
    assert fields.lifetime(value) == seconds


@pytest.mark.parametrize("value", ["30s", "59", 59, "2h", 3601, "1.5m1", 90.5, "soon", True, "-1m"])
def test_bad_lifetimes(value: Any) -> None:
    """Below a minute, above an hour, fractions and non-durations are refused."""
    with pytest.raises(InvalidField, match="use whole seconds from 1m to 1h"):
        fields.lifetime(value)


@pytest.mark.parametrize(
    "conditions",
    [{"sub": "repo:acme/shop:*"}, {"repository": "acme/shop"}, {"repository": "acme/*", "ref": "*"},
     {"sub": "repo:acme/*"}, {"sub": "system:serviceaccount:ci:*"}, {"sub": "x*"},
     {"repository": "acme*", "sub": "repo:acme/shop:*"}],
)
def test_subject_conditions_accepted(conditions: dict[str, str]) -> None:
    """A condition on sub or repository with literal text before its first wildcard (a GitHub owner whole) is enough."""
    fields.subject_condition(conditions)


@pytest.mark.parametrize(
    "conditions",
    [{}, {"ref": "refs/heads/main"}, {"sub": "*"}, {"repository": "?*"}, {"sub": ""}, {"repository": 3},
     # Literal text only after a wildcard: any subject that ends so, of any owner.
     {"sub": "*x"}, {"sub": "*:ref:refs/heads/main"}, {"repository": "*/shop"}, {"repository": "*/*"},
     # A GitHub owner cut short by a wildcard: acme* is acme-evil/anything too.
     {"repository": "acme*"}, {"repository": "acme?shop"}, {"sub": "repo:acme*"}, {"sub": "repo:*"},
     {"sub": "rep*"}],
)
def test_subject_conditions_refused(conditions: dict[str, Any]) -> None:
    """No condition on sub or repository that names whose tokens these are would trust tokens of anyone."""
    with pytest.raises(InvalidField, match="at least one condition on sub or repository"):
        fields.subject_condition(conditions)


@pytest.mark.parametrize(
    ("claim", "pattern"), [("", "x"), ("has space", "x"), ("x" * 129, "x"), ("ref", ""), ("ref", "a\nb"), (1, "x")],
)
def test_bad_conditions(claim: Any, pattern: Any) -> None:
    """Claim names are 1-128 characters without spaces; patterns 1-1024 printable characters."""
    with pytest.raises(InvalidField):
        fields.condition(claim, pattern)


def test_jwks_file_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO is not read (opening it would wait for a writer)."""
    path = tmp_path / "pipe"
    os.mkfifo(path)
    with pytest.raises(InvalidField, match="not a regular file"):
        fields.jwks_file(str(path))


def test_jwks_file_over_a_mebibyte_is_refused(tmp_path: Path) -> None:
    """A JWKS file larger than 1 MiB is refused before it is read."""
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "x" * (1024 * 1024)}]}))
    with pytest.raises(InvalidField, match="larger than 1 MiB"):
        fields.jwks_file(str(path))


@pytest.fixture
def service(settings: Settings, clock: FakeClock[datetime]) -> KeyService:
    return KeyService(Untouchable(), settings, actor="test:alice", clock=clock)


@pytest.mark.parametrize(
    ("call", "problems"),
    [
        (lambda s: s.put_trust_policy("bad name", issuer="http://issuer.example", audience="",
                                      conditions={"ref": ""}, org="bad org", lifetime="2h"),
         ["name", "issuer", "audience", "conditions.ref", "conditions", "org", "lifetime", None]),
        (lambda s: s.put_trust_policy("p", issuer="https://i.example", audience="a", conditions={"sub": "x"},
                                      org="acme", role="", operations=["Bad!"], servers=["bad!"],
                                      ip_allowlist=["nope"], rate_limit="lots", jwks_file="relative.json"),
         ["role", "operations.0", "servers.0", "ip_allowlist.0", "rate_limit", "jwks_file"]),
        (lambda s: s.put_trust_policy("p", issuer="https://i.example", audience="a", conditions=["sub=x"],
                                      org="acme", role="admin"),
         ["conditions"]),
    ],
)
async def test_every_problem_is_reported_before_the_store(
    service: KeyService, call: Callable[[KeyService], Awaitable[Any]], problems: list[str | None],
) -> None:
    """put_trust_policy checks every value before it opens the store, reporting one problem per bad field."""
    with pytest.raises(InvalidInput) as refused:
        await call(service)
    assert [p.field for p in refused.value.problems] == problems
    assert str(refused.value) == refused.value.problems[0].message
    assert all(isinstance(p, FieldProblem) for p in refused.value.problems)
