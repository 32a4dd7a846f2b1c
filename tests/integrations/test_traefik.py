"""Traefik (ForwardAuth) in front of an upstream, asking Keygate: deploy/ingress/traefik/, run for real."""

from __future__ import annotations

import yaml

from .ingress import Answer, IngressContract, Traefik


class TestTraefik(IngressContract):
    ingress_type = Traefik
    # ForwardAuth answers 500, empty, when it cannot reach the auth server.
    unreachable_status = 500
    # ForwardAuth copies auth response headers into the request only (authResponseHeaders), never to the client.
    ratelimit_on_success = False
    # Nor the request id (the app still gets Keygate's, see authResponseHeaders).
    answers_request_id_on_success = False
    # ForwardAuth passes any non-2xx answer on: status, headers, body.
    passes_keygate_503 = True
    # GAP (found by the nginx/Caddy work): X-HTTP-Method-Override, X-Original-URI and the like reach the app.

    def check_unreachable_answer(self, answer: Answer) -> None:
        assert answer.body == b""


def test_the_shipped_middleware_trusts_only_its_own_forwarded_headers() -> None:
    """trustForwardHeader is false and the client's headers reaching Keygate are listed."""
    forward_auth = yaml.safe_load(Traefik.DYNAMIC.read_text())["http"]["middlewares"]["keygate"]["forwardAuth"]
    assert forward_auth["trustForwardHeader"] is False
    assert forward_auth["authRequestHeaders"] == ["Authorization", "X-Request-Id"]
    assert {"X-Keygate-Key-Id", "Authorization", "X-Request-Id"} <= set(forward_auth["authResponseHeaders"])
