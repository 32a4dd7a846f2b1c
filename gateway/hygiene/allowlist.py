"""Allowlist suggestions: the narrowest CIDRs (at most N) covering the addresses a key was used from.

The algorithm, exact rather than greedy: per address family, the distinct
addresses form a binary trie of their bits. The one block that covers a
set of addresses with the least space is their smallest common supernet,
which is a branching node of that trie (or a single address). So, for each
branching node and each budget k of blocks, the least address space that
covers the node's addresses with at most k blocks is

    best(node, 1) = size of the node's block
    best(node, k) = min(best(node, 1), min over i of best(left, i) + best(right, k - i))

computed bottom-up (a leaf costs 1 address). The families are then joined:
IPv4 and IPv6 each need at least one block of their own when present, and
the N blocks are shared between them where the total number of addresses
covered (IPv4 and IPv6 counted alike) is least. Since one IPv6 /64 holds
2**32 times all of IPv4, a small N that cannot keep both families narrow
widens the IPv4 side first. Ties go to fewer blocks. IPv4-mapped IPv6
addresses count as the IPv4 addresses they are. Addresses of both families
with N = 1 cannot be covered (:class:`TooFewBlocks`).
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from ..models import iso

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Block(NamedTuple):
    """One suggested CIDR, with the requests and distinct addresses it covers."""

    network: Network
    requests: int
    addresses: int


class TooFewBlocks(ValueError):
    """Addresses of both families need at least two blocks."""


@dataclass(slots=True)
class _Plan:
    """A cover of one trie node's addresses: its total space and its blocks (as (prefix value, prefix length))."""

    space: int
    blocks: tuple[tuple[int, int], ...]

    def better_than(self, other: _Plan | None) -> bool:
        return other is None or (self.space, len(self.blocks)) < (other.space, len(other.blocks))


def _plans(values: Sequence[int], bits: int, budget: int) -> list[_Plan]:
    """``plans[k - 1]``: the least-space cover of ``values`` (sorted, distinct) with at most k blocks."""
    first, last = values[0], values[-1]
    # The smallest common supernet: the bits first and last share.
    prefix = bits - (first ^ last).bit_length()
    whole = _Plan(1 << (bits - prefix), ((first >> (bits - prefix) << (bits - prefix), prefix),))
    if len(values) == 1 or budget == 1:
        return [whole] * budget
    # The addresses split on the first bit they do not share.
    split_bit = 1 << (bits - prefix - 1)
    cut = next(i for i, v in enumerate(values) if v & split_bit)
    left, right = _plans(values[:cut], bits, budget - 1), _plans(values[cut:], bits, budget - 1)
    plans = [whole]
    for k in range(2, budget + 1):
        best = whole
        for i in range(1, k):
            a, b = left[i - 1], right[k - i - 1]
            candidate = _Plan(a.space + b.space, a.blocks + b.blocks)
            if candidate.better_than(best):
                best = candidate
        plans.append(best)
    return plans


def _family(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        parsed = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped
    return parsed


def narrowest_cover(counts: Iterable[tuple[str, int]], max_blocks: int) -> list[Block]:
    """At most ``max_blocks`` CIDRs covering every address in ``counts`` ((address, requests) pairs;
    unparsable addresses are left out) with the least address space; IPv4 blocks first, each family in
    address order. Empty when there are no addresses."""
    if max_blocks < 1:
        raise ValueError("max_blocks must be at least 1")
    requests: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, int] = {}
    for text, n in counts:
        address = _family(text)
        if address is not None:
            requests[address] = requests.get(address, 0) + n
    families = [(bits, sorted(int(a) for a in requests if a.max_prefixlen == bits)) for bits in (32, 128)]
    families = [(bits, values) for bits, values in families if values]
    if not families:
        return []
    if len(families) > max_blocks:
        raise TooFewBlocks(f"the key was used from IPv4 and IPv6 addresses: at least {len(families)} CIDRs are "
                           "needed to cover both")
    budget = max_blocks - len(families) + 1  # each family keeps at least one block for the other
    plans = [_plans(values, bits, budget) for bits, values in families]
    if len(plans) == 1:
        chosen = [plans[0][-1]]
    else:
        # IPv4 gets i blocks at most, IPv6 the other max_blocks - i.
        pairs = [(plans[0][i - 1], plans[1][max_blocks - i - 1]) for i in range(1, max_blocks)]
        chosen = list(min(pairs, key=lambda p: (p[0].space + p[1].space, len(p[0].blocks) + len(p[1].blocks))))
    blocks = []
    for (bits, _values), plan in zip(families, chosen):
        for value, prefix in plan.blocks:
            network: Network = ipaddress.IPv4Network((value, prefix)) if bits == 32 \
                else ipaddress.IPv6Network((value, prefix))
            covered = [n for a, n in requests.items() if a.max_prefixlen == bits and a in network]
            blocks.append(Block(network, sum(covered), len(covered)))
    return blocks


# The most distinct addresses a suggestion looks at (the most used first): beyond that it says so.
MAX_ADDRESSES = 10_000


@dataclass(frozen=True, slots=True)
class Suggestion:
    """The allowlist suggested for a key from its allowed requests since ``since``."""

    key_id: str
    days: int
    max_blocks: int
    since: datetime
    blocks: tuple[Block, ...]
    requests: int  # allowed requests counted
    addresses: int  # distinct client addresses counted
    truncated: bool = False  # more than MAX_ADDRESSES addresses: the least used were left out

    @property
    def command(self) -> str | None:
        """The command that applies it (``update --allow-ip`` replaces the allowlist); None without blocks."""
        if not self.blocks:
            return None
        return " ".join(["keygate keys update", shlex.quote(self.key_id),
                         *(f"--allow-ip {shlex.quote(str(b.network))}" for b in self.blocks)])

    @property
    def message(self) -> str:
        if not self.blocks:
            return (f"no allowed request of {self.key_id} was recorded in the last {self.days} days: nothing to "
                    "suggest (an allowlist must come from addresses the key is really used from)")
        cover = "all" if not self.truncated else f"the {MAX_ADDRESSES} most used addresses of the"
        cidrs = "1 CIDR covers" if len(self.blocks) == 1 else f"{len(self.blocks)} CIDRs cover"
        return (f"{cidrs} {cover} {self.requests} "
                f"allowed requests from {self.addresses} address{'es' if self.addresses != 1 else ''} in the last "
                f"{self.days} days")

    def public(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id, "days": self.days, "max": self.max_blocks, "since": iso(self.since),
            "requests": self.requests, "addresses": self.addresses, "truncated": self.truncated,
            "cidrs": [{"cidr": str(b.network), "requests": b.requests, "addresses": b.addresses} for b in self.blocks],
            "command": self.command, "message": self.message,
        }


def suggestion(key_id: str, counts: Sequence[tuple[str, int]], *, days: int, max_blocks: int,
               since: datetime) -> Suggestion:
    """The suggestion from the key's (address, allowed requests) counts, most used first (as the store gives them)."""
    kept = counts[:MAX_ADDRESSES]
    blocks = tuple(narrowest_cover(kept, max_blocks))
    return Suggestion(key_id, days, max_blocks, since, blocks, requests=sum(b.requests for b in blocks),
                      addresses=sum(b.addresses for b in blocks), truncated=len(counts) > MAX_ADDRESSES)
