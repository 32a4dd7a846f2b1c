"""Keygate behind Caddy (``forward_auth``): deploy/ingress/caddy/Caddyfile, run for real, unchanged.

Caddy passes any answer but 2xx on as it is (status, headers, body), so a
client gets Keygate's own refusal.
"""

from __future__ import annotations

import subprocess

import aiohttp

from ..e2e.harness import Keygate
from .ingress import Answer, Caddy, IngressContract, bearer, call, ingress_binary


class TestCaddy(IngressContract):
    ingress_type = Caddy
    # reverse_proxy's own 502, empty, when Keygate cannot be reached.
    unreachable_status = 502
    # The Caddyfile's header lines copy them from Keygate's answer.
    ratelimit_on_success = True
    # forward_auth passes any non-2xx answer on: status, headers, body.
    passes_keygate_503 = True

    def check_unreachable_answer(self, answer: Answer) -> None:
        assert answer.body == b""

    async def test_nothing_caddy_could_not_fill_in_reaches_the_upstream(
        self, client: aiohttp.ClientSession, ingress: Caddy, keygate: Keygate,
    ) -> None:
        """Caddy 2.6's copy_headers sends a header absent from Keygate's answer as its placeholder's text:
        none arrives (nor the Caddyfile's own X-Keygate-Authorization), and no key on a route without
        pass_credentials, even one the client names X-Keygate-Authorization."""
        _, key = await keygate.key(name="ci", role="admin")
        answer = await call(client, ingress.url, headers={**bearer(key), "X-Keygate-Authorization": f"Bearer {key}"})
        assert answer.status == 200, answer.body
        seen = answer.upstream_headers()
        assert "authorization" not in seen and "x-keygate-authorization" not in seen
        assert not [value for values in seen.values() for value in values if "{http." in value]


def test_the_shipped_caddyfile_is_valid() -> None:
    """`caddy validate` accepts deploy/ingress/caddy/Caddyfile as it is (its addresses defaulted)."""
    result = subprocess.run([ingress_binary("caddy", debian="caddy"), "validate", "--config", str(Caddy.SHIPPED),
                             "--adapter", "caddyfile"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "CADDY_ADMIN": "off"})
    assert result.returncode == 0, result.stdout + result.stderr
