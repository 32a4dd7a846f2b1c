"""Stage 5 — IP allowlist: the key's CIDRs (IPv4 and IPv6), parsed when the key was cached."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Final

from .client_ip import IPAddress, parse_network
from .outcomes import Denied, Outcome

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MEMO_SIZE: Final = 1024  # client addresses remembered per key


def parse_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    return tuple(parse_network(c) for c in cidrs)


def check_allowlist(networks: Sequence[Network], client_ip: IPAddress | None,
                    seen: dict[str, bool] | None = None, client: str | None = None) -> None:
    """An empty allowlist allows any client; otherwise the client must be in one network.

    ``seen`` memoises the answer per client address text (``client``) for one
    key's networks: a key is used from the same few addresses over and over.
    """
    if not networks:
        return
    allowed = seen.get(client) if seen is not None and client is not None else None
    if allowed is None:
        allowed = client_ip is not None and any(client_ip in net for net in networks)
        if seen is not None and client is not None and len(seen) < MEMO_SIZE:
            seen[client] = allowed
    if not allowed:
        raise Denied(Outcome.IP_NOT_ALLOWED, f"client {client_ip} not in allowlist")
