"""Stage 5 — IP allowlist: the key's CIDRs, IPv4 and IPv6; empty allows anyone."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from gateway.pipeline.allowlist import MEMO_SIZE, check_allowlist, parse_networks
from gateway.pipeline.client_ip import parse_ip
from gateway.pipeline.outcomes import Denied, Outcome


@pytest.mark.parametrize("client", ["203.0.113.9", "2001:db8::1", None], ids=["v4", "v6", "unknown"])
def test_empty_allowlist_allows_anyone(client: str | None) -> None:
    """A key without an allowlist may be used from any address, even an unknown one."""
    check_allowlist((), parse_ip(client) if client else None)


@pytest.mark.parametrize(
    ("cidrs", "client"),
    [
        (["203.0.113.0/24"], "203.0.113.255"),
        (["203.0.113.9/32"], "203.0.113.9"),
        (["203.0.113.9"], "203.0.113.9"),
        (["0.0.0.0/0"], "198.51.100.1"),
        (["10.0.0.0/8", "203.0.113.0/24"], "203.0.113.1"),
        (["2001:db8::/32"], "2001:db8:ffff::1"),
        (["2001:db8::1/128"], "2001:db8::1"),
        (["::/0"], "2001:db8::1"),
        (["10.0.0.0/8", "2001:db8::/32"], "2001:db8::7"),
        (["10.0.0.1/8"], "10.200.0.1"),
    ],
    ids=["v4-cidr", "v4-host", "v4-bare", "v4-any", "second-rule", "v6-cidr", "v6-host", "v6-any",
         "mixed-list", "host-bits-set"],
)
def test_client_inside_a_network_is_allowed(cidrs: list[str], client: str) -> None:
    """A client inside any one of the key's networks passes."""
    check_allowlist(parse_networks(cidrs), ip_address(client))


@pytest.mark.parametrize(
    ("cidrs", "client"),
    [
        (["203.0.113.0/24"], "203.0.114.1"),
        (["203.0.113.9/32"], "203.0.113.10"),
        (["10.0.0.0/8", "203.0.113.0/24"], "198.51.100.1"),
        (["2001:db8::/32"], "2001:db9::1"),
        (["2001:db8::1/128"], "2001:db8::2"),
    ],
    ids=["v4-outside", "v4-host-neighbour", "none-of-two", "v6-outside", "v6-host-neighbour"],
)
def test_client_outside_every_network_is_refused(cidrs: list[str], client: str) -> None:
    """A client in none of the key's networks is refused with IP_NOT_ALLOWED."""
    with pytest.raises(Denied) as caught:
        check_allowlist(parse_networks(cidrs), ip_address(client))
    assert caught.value.outcome is Outcome.IP_NOT_ALLOWED


@pytest.mark.parametrize(
    "mapped", ["::ffff:10.1.2.3", "::ffff:a01:203"], ids=["dotted", "hex"]
)
def test_ipv4_mapped_client_matches_ipv4_rule(mapped: str) -> None:
    """An IPv4-mapped IPv6 client, once parsed, matches an IPv4 rule."""
    check_allowlist(parse_networks(["10.0.0.0/8"]), parse_ip(mapped))


def test_ipv4_mapped_client_outside_ipv4_rule_is_refused() -> None:
    """Normalising an IPv4-mapped client does not let it past an IPv4 rule it is outside of."""
    with pytest.raises(Denied) as caught:
        check_allowlist(parse_networks(["10.0.0.0/8"]), parse_ip("::ffff:11.1.2.3"))
    assert caught.value.outcome is Outcome.IP_NOT_ALLOWED


@pytest.mark.parametrize("cidrs", [["10.0.0.0/8"], ["2001:db8::/32"], ["0.0.0.0/0", "::/0"]])
def test_unknown_client_is_refused_when_allowlist_is_set(cidrs: list[str]) -> None:
    """When the client address cannot be known, a key with an allowlist is refused, even with 0.0.0.0/0."""
    with pytest.raises(Denied) as caught:
        check_allowlist(parse_networks(cidrs), None)
    assert caught.value.outcome is Outcome.IP_NOT_ALLOWED


@pytest.mark.parametrize(
    ("cidrs", "client"),
    [(["2001:db8::/32"], "203.0.113.9"), (["::/0"], "203.0.113.9"), (["0.0.0.0/0"], "2001:db8::1")],
    ids=["v4-client-v6-net", "v4-client-v6-any", "v6-client-v4-any"],
)
def test_version_mismatch_is_refused_not_an_error(cidrs: list[str], client: str) -> None:
    """A client of one IP version is simply not in a network of the other: a denial, not a TypeError."""
    with pytest.raises(Denied) as caught:
        check_allowlist(parse_networks(cidrs), ip_address(client))
    assert caught.value.outcome is Outcome.IP_NOT_ALLOWED


def test_parse_networks_accepts_host_bits() -> None:
    """CIDRs with host bits set are read as their network, not rejected."""
    assert [str(n) for n in parse_networks(["10.0.0.1/8", "2001:db8::1/32", "203.0.113.9"])] == [
        "10.0.0.0/8", "2001:db8::/32", "203.0.113.9/32",
    ]


def test_ipv4_mapped_rules_match_ipv4_clients() -> None:
    """A rule written as an IPv4-mapped IPv6 range matches the IPv4 clients it names."""
    networks = parse_networks(["::ffff:10.0.0.0/104"])
    check_allowlist(networks, ip_address("10.1.2.3"))
    with pytest.raises(Denied):
        check_allowlist(networks, ip_address("11.1.2.3"))


def test_answers_are_remembered_per_client_and_bounded() -> None:
    """With a memo, each client address is matched once; refusals are remembered too; the memo stays bounded."""
    networks = parse_networks(["10.0.0.0/8"])
    seen: dict[str, bool] = {}
    check_allowlist(networks, ip_address("10.1.2.3"), seen, "10.1.2.3")
    with pytest.raises(Denied):
        check_allowlist(networks, ip_address("192.0.2.1"), seen, "192.0.2.1")
    assert seen == {"10.1.2.3": True, "192.0.2.1": False}
    # The memo answers (a memo is per key, so its networks never change under it).
    seen["192.0.2.1"] = True
    check_allowlist(networks, ip_address("192.0.2.1"), seen, "192.0.2.1")
    for i in range(MEMO_SIZE + 10):
        client = f"10.9.{i // 256}.{i % 256}"
        check_allowlist(networks, ip_address(client), seen, client)
    assert len(seen) == MEMO_SIZE
