"""Keygate behind Caddy (``forward_auth``): ``deploy/ingress/caddy/Caddyfile``, run for real, unchanged.

Caddy copies a refusal (any answer but 2xx) to the client as it is, so the
client gets Keygate's own status, headers and body.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import aiohttp
import pytest

from ..e2e.conftest import bearer
from ..e2e.harness import Keygate, Upstream
from .conftest import MakeIngress, authz_address
from .contract import READ, IngressContract, received, send
from .ingresses import Caddy, Ingress


@pytest.fixture(scope="module")
def make_ingress() -> MakeIngress:
    def make(folder: Path, keygate: Keygate, upstream: Upstream) -> Ingress:
        return Caddy(folder, authz=authz_address(keygate), app=upstream.url.removeprefix("http://"))
    return make


class TestCaddy(IngressContract):
    # Keygate unreachable: Caddy's own 502, empty.
    unreachable_statuses: ClassVar[frozenset[int]] = frozenset({502})


async def test_no_other_keygate_header_reaches_the_upstream(
    client: aiohttp.ClientSession, ingress: Ingress, keygate: Keygate,
) -> None:
    """X-Keygate-* headers the client wrote are dropped before Keygate is asked, as Keygate's proxy drops them,
    and nothing Caddy could not fill in (a placeholder left as text) arrives."""
    _, key = await keygate.key(name="ci", role="admin")
    status, _, body = await send(client, ingress.url, READ, {**bearer(key), "X-Keygate-Admin": "yes",
                                                             "X-Keygate-RateLimit-Degraded": "1"})
    assert status == 200, body
    _, seen = received(body)
    assert sorted(name for name in seen if name.lower().startswith("x-keygate-")) == [
        "X-Keygate-Key-Id", "X-Keygate-Key-Name", "X-Keygate-Org", "X-Keygate-Role", "X-Keygate-User"]
    assert not [value for value in seen.values() if "{http." in value]
