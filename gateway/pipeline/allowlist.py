"""Stage 5 — IP allowlist: the key's CIDRs (IPv4 and IPv6), parsed when the key was cached."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from .client_ip import IPAddress, parse_network
from .outcomes import Denied, Outcome

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    return tuple(parse_network(c) for c in cidrs)


def check_allowlist(networks: Sequence[Network], client_ip: IPAddress | None) -> None:
    """An empty allowlist allows any client; otherwise the client must be in one network."""
    if not networks:
        return
    if client_ip is not None:
        for net in networks:
            if client_ip in net:
                return
    raise Denied(Outcome.IP_NOT_ALLOWED, f"client {client_ip} not in allowlist")
