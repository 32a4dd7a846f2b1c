"""Stage 4 — client IP: the socket peer, or the rightmost untrusted X-Forwarded-For hop behind trusted proxies."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.pipeline.client_ip import ClientIpResolver, parse_ip

TRUSTED = ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]


@pytest.fixture
def resolver() -> ClientIpResolver:
    return ClientIpResolver(TRUSTED)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.9", IPv4Address("203.0.113.9")),
        ("  203.0.113.9 ", IPv4Address("203.0.113.9")),
        ("2001:db8::1", IPv6Address("2001:db8::1")),
        ("::ffff:10.0.0.1", IPv4Address("10.0.0.1")),
        ("::FFFF:203.0.113.9", IPv4Address("203.0.113.9")),
        ("fe80::1%eth0", IPv6Address("fe80::1")),
        (" fe80::1%eth0", IPv6Address("fe80::1")),
        ("", None),
        ("unknown", None),
        ("203.0.113.9:443", None),
        ("[2001:db8::1]", None),
        ("300.1.1.1", None),
    ],
    ids=["v4", "v4-padded", "v6", "v4-mapped", "v4-mapped-upper", "scoped", "scoped-padded",
         "empty", "word", "with-port", "bracketed", "out-of-range"],
)
def test_parse_ip(text: str, expected: IPv4Address | IPv6Address | None) -> None:
    """Addresses parse, IPv4-mapped IPv6 becomes IPv4, zone ids are dropped, and anything else is None."""
    assert parse_ip(text) == expected


@pytest.mark.parametrize(
    "forwarded_for",
    [[], ["198.51.100.1"], ["198.51.100.1, 10.0.0.2"], ["garbage"]],
    ids=["none", "one-hop", "two-hops", "garbage"],
)
def test_untrusted_peer_ignores_x_forwarded_for(resolver: ClientIpResolver, forwarded_for: list[str]) -> None:
    """From a peer that is not a trusted proxy, X-Forwarded-For changes nothing: the peer is the client."""
    assert resolver.resolve("203.0.113.50", forwarded_for) == ip_address("203.0.113.50")


def test_no_trusted_proxies_ignores_x_forwarded_for() -> None:
    """With no trusted proxies configured, even a loopback peer's X-Forwarded-For is ignored."""
    assert ClientIpResolver([]).resolve("127.0.0.1", ["198.51.100.1"]) == ip_address("127.0.0.1")


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        ("10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", ["192.0.2.200, 198.51.100.66"], "198.51.100.66"),
        ("10.0.0.1", ["198.51.100.66, 10.0.0.3, 10.0.0.2"], "198.51.100.66"),
        ("10.0.0.1", ["1.1.1.1, 198.51.100.66, 192.0.2.7, fd00::5"], "198.51.100.66"),
        ("10.0.0.1", ["1.1.1.1", "198.51.100.66, 10.0.0.2"], "198.51.100.66"),
        ("10.0.0.1", ["1.1.1.1, 2.2.2.2", "10.9.9.9", "10.0.0.2"], "2.2.2.2"),
        ("10.0.0.1", ["garbage, 198.51.100.66"], "198.51.100.66"),
        ("10.0.0.1", ["2001:db8::66, 10.0.0.2"], "2001:db8::66"),
        ("10.0.0.1", ["::ffff:198.51.100.66"], "198.51.100.66"),
        ("fd00::1", ["198.51.100.66"], "198.51.100.66"),
    ],
    ids=["one-hop", "allowlisted-then-attacker", "trusted-hops-skipped", "mixed-trusted-hops",
         "headers-joined", "three-headers", "garbage-left-of-client", "v6-client", "v4-mapped-hop", "v6-peer"],
)
def test_trusted_peer_uses_rightmost_untrusted_hop(
    resolver: ClientIpResolver, peer: str, forwarded_for: Sequence[str], expected: str
) -> None:
    """Behind trusted proxies the client is the rightmost X-Forwarded-For hop that is not itself trusted."""
    assert resolver.resolve(peer, forwarded_for) == ip_address(expected)


def test_allowlisted_then_attacker_is_the_attacker(resolver: ClientIpResolver) -> None:
    """A client that writes an allowlisted address before its own is still seen as itself."""
    client = resolver.resolve("10.0.0.1", ["192.0.2.1, 203.0.113.66"])
    assert client == ip_address("203.0.113.66")
    assert client != ip_address("192.0.2.1")


@pytest.mark.parametrize(
    "forwarded_for",
    [
        ["198.51.100.1, garbage"],
        ["198.51.100.1, 10.0.0.2, not-an-ip"],
        ["198.51.100.1, "],
        ["198.51.100.1:1234"],
        ["198.51.100.1", "unknown"],
        ["198.51.100.1, 10.0.0.2, ' fe80::1%eth0"],
    ],
    ids=["garbage", "garbage-after-trusted", "empty-hop", "with-port", "garbage-header", "quoted"],
)
def test_garbage_hop_gives_no_client(resolver: ClientIpResolver, forwarded_for: list[str]) -> None:
    """Garbage reached while walking back through X-Forwarded-For means the client cannot be known: None."""
    assert resolver.resolve("10.0.0.1", forwarded_for) is None


def test_scoped_hop_is_read_without_its_zone(resolver: ClientIpResolver) -> None:
    """A link-local hop with a zone id, after a comma and a space, is an address, not a failure."""
    assert resolver.resolve("10.0.0.1", ["198.51.100.1, fe80::1%eth0"]) == ip_address("fe80::1")


@pytest.mark.parametrize(
    ("forwarded_for", "expected"),
    [(["10.0.0.9, 10.0.0.8"], "10.0.0.9"), (["192.0.2.7", "fd00::3"], "192.0.2.7"), ([], "10.0.0.1")],
    ids=["two-trusted", "trusted-across-headers", "no-header"],
)
def test_all_hops_trusted_gives_leftmost(resolver: ClientIpResolver, forwarded_for: list[str], expected: str) -> None:
    """When every hop is a trusted proxy the leftmost one (or the peer, without hops) is the client."""
    assert resolver.resolve("10.0.0.1", forwarded_for) == ip_address(expected)


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        ("::ffff:10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("::ffff:203.0.113.5", ["198.51.100.1"], "203.0.113.5"),
    ],
    ids=["mapped-trusted-peer", "mapped-untrusted-peer"],
)
def test_ipv4_mapped_peer_is_normalised(
    resolver: ClientIpResolver, peer: str, forwarded_for: list[str], expected: str
) -> None:
    """An IPv4-mapped IPv6 peer is treated as its IPv4 address, for trust and as the answer."""
    result = resolver.resolve(peer, forwarded_for)
    assert result == ip_address(expected)
    assert isinstance(result, IPv4Address)


@pytest.mark.parametrize("peer", [None, "", "not-an-ip"], ids=["none", "empty", "garbage"])
def test_unknown_peer_gives_no_client(resolver: ClientIpResolver, peer: str | None) -> None:
    """Without a usable socket peer no header is believed and the client is None."""
    assert resolver.resolve(peer, ["198.51.100.1"]) is None


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),
        ("192.0.2.7", True),
        ("192.0.2.8", False),
        ("fd00::1", True),
        ("2001:db8::1", False),
        ("203.0.113.5", False),
        ("garbage", False),
        ("", False),
    ],
)
def test_is_trusted_peer(resolver: ClientIpResolver, peer: str, trusted: bool) -> None:
    """A peer is trusted only when its (normalised) address lies in a trusted network."""
    assert resolver.is_trusted_peer(peer) is trusted


def test_nobody_is_trusted_without_trusted_proxies() -> None:
    """With no trusted proxies configured no peer is trusted and trusts_anyone is False."""
    resolver = ClientIpResolver([])
    assert resolver.trusts_anyone is False
    assert resolver.is_trusted_peer("127.0.0.1") is False


def test_trusts_anyone_when_proxies_are_configured(resolver: ClientIpResolver) -> None:
    """trusts_anyone reports that some proxies are configured."""
    assert resolver.trusts_anyone is True


def test_client_of_a_request_is_resolved_once_per_chain(resolver: ClientIpResolver) -> None:
    """client() answers as resolve() for each peer and X-Forwarded-For chain, asked again and interleaved: the
    answer it keeps for a chain is never another chain's."""
    requests = [("10.0.0.1", ["198.51.100.1"]), ("10.0.0.1", ["192.0.2.200, 198.51.100.66"]),
                ("10.0.0.1", ["1.1.1.1", "198.51.100.66, 10.0.0.2"]), ("10.0.0.1", ["garbage"]),
                ("10.0.0.2", ["198.51.100.1"]), ("203.0.113.50", ["198.51.100.1"]), ("10.0.0.1", [])]
    for _ in range(2):
        for peer, chain in requests:
            headers = CIMultiDictProxy(CIMultiDict([("X-Forwarded-For", hop) for hop in chain]))
            ip = resolver.resolve(peer, chain)
            assert resolver.client(peer, headers) == (ip, str(ip) if ip is not None else None), (peer, chain)
