"""Whose exchange budget a client spends (exchange.per_client)."""

from __future__ import annotations

import pytest

from gateway.identity.exchange import client_bucket


@pytest.mark.parametrize(("client", "bucket"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same host rotating addresses in its /64
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 client on a dual-stack socket
    ("not an address", "not an address"),
])
def test_an_ipv6_client_spends_the_budget_of_its_64(client: str, bucket: str) -> None:
    assert client_bucket(client) == bucket
