"""Stage 4 — client IP: the socket peer, unless the peer is a trusted proxy.

From a trusted peer, ``X-Forwarded-For`` is read right to left and the first
address that is not itself a trusted proxy is the client: everything left
of it was written by the client and can be forged (``allowlisted, attacker``
is the attacker). ``Forwarded`` and ``X-Real-IP`` are never believed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    """The address, with IPv4-mapped IPv6 (``::ffff:10.0.0.1``) turned into IPv4."""
    text = text.strip()
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
    return ip


@lru_cache(maxsize=4096)
def _parse_peer(peer: str) -> IPAddress | None:
    # A server sees the same few socket peers over and over: each is parsed once.
    return parse_ip(peer)


@lru_cache(maxsize=4096)
def address_text(ip: IPAddress) -> str:
    """``str(ip)``, made once per address (``ipaddress`` builds the text anew on every call)."""
    return str(ip)


@lru_cache(maxsize=4096)
def _peer_and_text(peer: str) -> tuple[IPAddress | None, str | None]:
    # The common case (no trusted proxy) in one cache lookup per request rather than two.
    ip = _parse_peer(peer) if peer else None
    return ip, (address_text(ip) if ip is not None else None)


_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A network, with IPv4-mapped IPv6 ranges (``::ffff:10.0.0.0/104``) turned into IPv4,
    the way client addresses are."""
    network = ipaddress.ip_network(text, strict=False)
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        base = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((base, network.prefixlen - 96))
    return network


class ClientIpResolver:
    def __init__(self, trusted_proxies: Iterable[str]) -> None:
        self._trusted = tuple(parse_network(n) for n in trusted_proxies)
        # Behind an ingress the same few (ingress, X-Forwarded-For) pairs arrive over and over (the authz
        # listener resolves one for every decision): each is resolved once, the answer depending on nothing
        # else. Bounded, so forged chains only evict.
        self._resolved = lru_cache(maxsize=4096)(self._resolve_with_text)

    @property
    def trusts_anyone(self) -> bool:
        return bool(self._trusted)

    def _is_trusted(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self._trusted)

    def is_trusted_peer(self, peer: str) -> bool:
        """Whether the socket peer is a trusted proxy (whose forwarding headers count)."""
        if not self._trusted:
            return False
        ip = _parse_peer(peer)
        return ip is not None and self._is_trusted(ip)

    def client(self, peer: str, headers: Mapping[str, str]) -> tuple[IPAddress | None, str | None]:
        """:meth:`resolve` for a request, with the address's text; cached per peer (and X-Forwarded-For)."""
        if not self._trusted:
            return _peer_and_text(peer)
        return self._resolved(peer, tuple(headers.getall("X-Forwarded-For", ())))  # type: ignore[attr-defined]

    def _resolve_with_text(self, peer: str, forwarded_for: tuple[str, ...]) -> tuple[IPAddress | None, str | None]:
        ip = self.resolve(peer, forwarded_for)
        return ip, (address_text(ip) if ip is not None else None)

    def resolve(self, peer: str | None, forwarded_for: Sequence[str]) -> IPAddress | None:
        """The client's address, or None when it cannot be known (then no allowlist matches)."""
        peer_ip = _parse_peer(peer) if peer else None
        if peer_ip is None or not self._trusted or not self._is_trusted(peer_ip):
            return peer_ip
        hops = [hop for header in forwarded_for for hop in header.split(",")]
        client = peer_ip
        for hop in reversed(hops):
            ip = parse_ip(hop)
            if ip is None:
                # SECURITY: garbage in the chain means we cannot tell who the client is.
                return None
            client = ip
            if not self._is_trusted(ip):
                return ip
        return client
