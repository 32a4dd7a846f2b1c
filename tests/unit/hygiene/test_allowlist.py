"""The allowlist suggestion's algorithm: the least address space in at most N CIDRs, IPv4 and IPv6."""

from __future__ import annotations

import ipaddress
import itertools
import random
from datetime import UTC, datetime

import pytest

from gateway.hygiene.allowlist import TooFewBlocks, narrowest_cover, suggestion

SINCE = datetime(2026, 10, 23, tzinfo=UTC)


def cover(addresses: list[str], max_blocks: int) -> list[str]:
    return [str(b.network) for b in narrowest_cover([(a, 1) for a in addresses], max_blocks)]


@pytest.mark.parametrize(
    ("addresses", "max_blocks", "expected"),
    [
        (["10.0.0.1"], 4, ["10.0.0.1/32"]),
        (["10.0.0.1", "10.0.0.1"], 1, ["10.0.0.1/32"]),
        # Room for every address: each its own /32 (2 addresses beat a /30's 4).
        (["10.0.0.1", "10.0.0.2"], 4, ["10.0.0.1/32", "10.0.0.2/32"]),
        # One block: the smallest common supernet.
        (["10.0.0.1", "10.0.0.2"], 1, ["10.0.0.0/30"]),
        (["10.0.0.0", "10.0.0.1"], 1, ["10.0.0.0/31"]),
        # Full blocks merge when that costs nothing: fewer CIDRs for the same space.
        (["10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3"], 4, ["10.0.0.0/30"]),
        # Two clusters far apart: one block each, never one block over both.
        (["10.0.0.1", "10.0.0.9", "192.168.7.1", "192.168.7.3"], 2, ["10.0.0.0/28", "192.168.7.0/30"]),
        # The outlier keeps its own /32 and the cluster is merged (16 + 1 beats 4 + 2**31 ...).
        (["10.0.0.1", "10.0.0.2", "10.0.0.9", "192.168.1.1"], 2, ["10.0.0.0/28", "192.168.1.1/32"]),
        (["10.0.0.1", "10.0.0.2", "10.0.0.9", "192.168.1.1"], 3,
         ["10.0.0.0/30", "10.0.0.9/32", "192.168.1.1/32"]),
        (["10.0.0.1", "192.168.1.1"], 1, ["0.0.0.0/0"]),
        # IPv6 alone, and IPv4-mapped IPv6 counted as the IPv4 address it is.
        (["2001:db8::1", "2001:db8::3"], 1, ["2001:db8::/126"]),
        (["::ffff:10.0.0.1", "10.0.0.1"], 1, ["10.0.0.1/32"]),
        # Not addresses: left out.
        (["unknown", "10.0.0.1", ""], 2, ["10.0.0.1/32"]),
    ],
)
def test_narrowest_cover(addresses: list[str], max_blocks: int, expected: list[str]) -> None:
    """Each case: the CIDRs covering every address with the least space, in at most max_blocks."""
    assert cover(addresses, max_blocks) == expected


@pytest.mark.parametrize(
    ("addresses", "max_blocks", "expected"),
    [
        # Both families within N: each as narrow as it can be.
        (["10.0.0.1", "10.0.0.2", "2001:db8::1"], 3, ["10.0.0.1/32", "10.0.0.2/32", "2001:db8::1/128"]),
        # Together over N: the IPv4 side is widened, since any IPv6 merge costs more addresses.
        (["10.0.0.1", "10.0.0.2", "10.0.0.9", "2001:db8::1", "2001:db8:1::1"], 3,
         ["10.0.0.0/28", "2001:db8::1/128", "2001:db8:1::1/128"]),
        (["10.0.0.1", "192.168.0.1", "2001:db8::1", "2001:db8:1::1"], 2, ["0.0.0.0/0", "2001:db8::/47"]),
        (["10.0.0.1", "2001:db8::1"], 2, ["10.0.0.1/32", "2001:db8::1/128"]),
    ],
)
def test_families_share_the_blocks(addresses: list[str], max_blocks: int, expected: list[str]) -> None:
    """IPv4 and IPv6 each get at least one block, and share N where the total space is least."""
    assert cover(addresses, max_blocks) == expected


def test_both_families_need_two_blocks() -> None:
    """Addresses of both families cannot be covered by one CIDR: refused, with the reason."""
    with pytest.raises(TooFewBlocks, match="at least 2"):
        cover(["10.0.0.1", "2001:db8::1"], 1)


def test_no_addresses_no_blocks() -> None:
    """Nothing recorded gives no blocks (the suggestion says so; it never suggests an empty allowlist)."""
    assert cover([], 4) == []


def test_requests_and_addresses_are_counted_per_block() -> None:
    """Each block says how many requests and distinct addresses it covers."""
    blocks = narrowest_cover([("10.0.0.1", 5), ("10.0.0.2", 3), ("10.0.0.9", 1), ("192.168.1.1", 2)], 2)
    assert [(str(b.network), b.requests, b.addresses) for b in blocks] == [
        ("10.0.0.0/28", 9, 3), ("192.168.1.1/32", 2, 1)]


def _brute_force(addresses: list[str], max_blocks: int) -> int:
    """The least space of any cover with at most max_blocks CIDRs, each the supernet of a run of sorted addresses."""
    values = sorted({int(ipaddress.ip_address(a)) for a in addresses})
    best = None
    for k in range(1, min(max_blocks, len(values)) + 1):
        for cuts in itertools.combinations(range(1, len(values)), k - 1):
            runs = [values[i:j] for i, j in zip((0, *cuts), (*cuts, len(values)))]
            blocks = [ipaddress.ip_network((run[0] >> (32 - (p := 32 - (run[0] ^ run[-1]).bit_length()))
                                            << (32 - p), p)) for run in runs]
            # Overlapping blocks count once: a cover is a set of networks.
            merged = list(ipaddress.collapse_addresses(blocks))
            space = sum(n.num_addresses for n in merged)
            best = space if best is None else min(best, space)
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(20))
def test_it_is_optimal_against_brute_force(seed: int) -> None:
    """On random small sets, the suggested space equals the least any split into runs achieves."""
    rng = random.Random(seed)
    base = rng.choice([0x0A000000, 0xC0A80000])
    addresses = [str(ipaddress.IPv4Address(base + rng.randrange(0, 1 << rng.choice([4, 8, 12]))))
                 for _ in range(rng.randrange(2, 9))]
    max_blocks = rng.randrange(1, 5)
    blocks = narrowest_cover([(a, 1) for a in addresses], max_blocks)
    assert len(blocks) <= max_blocks
    assert all(any(ipaddress.ip_address(a) in b.network for b in blocks) for a in addresses)
    assert sum(b.network.num_addresses for b in blocks) == _brute_force(addresses, max_blocks)


@pytest.mark.parametrize(
    ("counts", "command", "message"),
    [
        ([], None, "no allowed request of kg_AAAAAAAAAAAA was recorded in the last 30 days: nothing to suggest"),
        ([("203.0.113.7", 12), ("203.0.113.9", 3)],
         "keygate keys update kg_AAAAAAAAAAAA --allow-ip 203.0.113.0/28",
         "1 CIDR covers all 15 allowed requests from 2 addresses in the last 30 days"),
    ],
)
def test_the_suggestion_says_what_to_run_or_why_there_is_nothing(
    counts: list[tuple[str, int]], command: str | None, message: str,
) -> None:
    """With addresses: the exact update command; without: a message and no command (never an empty allowlist)."""
    found = suggestion("kg_AAAAAAAAAAAA", counts, days=30, max_blocks=1, since=SINCE)
    assert found.command == command
    assert found.message.startswith(message)
    assert found.public()["cidrs"] == ([] if not counts else [{"cidr": "203.0.113.0/28", "requests": 15,
                                                               "addresses": 2}])
