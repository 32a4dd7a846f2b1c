"""Envoy (HTTP ext_authz) in front of an upstream, asking Keygate: deploy/ingress/envoy/envoy.yaml, run for real."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from .ingress import Answer, Envoy, IngressContract, ingress_binary, http_filters


class TestEnvoy(IngressContract):
    ingress_type = Envoy
    # status_on_error, dressed by local_reply_config as Keygate's own 503.
    unreachable_status = 503
    # allowed_client_headers_on_success.
    ratelimit_on_success = True
    # Envoy takes any 5xx from Keygate for a failure to ask it; local_reply_config writes the 503 again.
    passes_keygate_503 = False
    # An allowed answer carries Keygate's RateLimit headers but the app's own request id, if any: Envoy could
    # add Keygate's x-request-id as it adds RateLimit (allowed_client_headers_on_success, with the route's
    # response_headers_to_remove so it is not joined to the app's: "app-id,client-id"); not done, as Istio's
    # settings, written from this file, have no route of their own to remove the app's from.
    answers_request_id_on_success = False
    # GAP (found by the nginx/Caddy work): X-HTTP-Method-Override, X-Original-URI and the like reach the app.

    def check_unreachable_answer(self, answer: Answer) -> None:
        assert answer.headers["Retry-After"] == "5"
        assert answer.headers["Cache-Control"] == "no-store"
        assert answer.headers["Content-Type"] == "application/json; charset=utf-8"
        assert answer.json["error"] == "temporarily_unavailable"


def test_the_shipped_configuration_is_valid_envoy_configuration() -> None:
    """`envoy --mode validate` accepts deploy/ingress/envoy/envoy.yaml as it is."""
    result = subprocess.run([ingress_binary("envoy"), "--mode", "validate", "-c", str(Envoy.SHIPPED),
                             "--disable-hot-restart"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_shipped_configuration_fails_closed() -> None:
    """ext_authz refuses when Keygate cannot answer, and runs before the router."""
    names = [f["name"] for f in http_filters(yaml.safe_load(Envoy.SHIPPED.read_text()))]
    assert names[-1] == "envoy.filters.http.router"
    assert names.index("envoy.filters.http.header_mutation") < names.index("envoy.filters.http.ext_authz")
    (authz,) = [f for f in http_filters(yaml.safe_load(Envoy.SHIPPED.read_text()))
                if f["name"] == "envoy.filters.http.ext_authz"]
    assert authz["typed_config"]["failure_mode_allow"] is False
    assert "path_prefix" not in authz["typed_config"]["http_service"]


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)],
                         ids=["ci", "local"])
def test_a_missing_ingress_binary_fails_in_ci_and_skips_elsewhere(ci: str, outcome: type[BaseException]) -> None:
    """Under CI=true a missing binary is a failure, never a skip."""
    with pytest.raises(outcome, match="not installed"):
        ingress_binary("no-such-ingress", environ={"CI": ci, "PATH": "/nonexistent"})
