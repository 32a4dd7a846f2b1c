"""WebSocket tunnels held to their key (gateway/dataplane/tunnels.py): a change re-checks them.

The guard reads the key anew (here a function returning what the store would:
``prepare`` over a record, as KeyLookup.current does) and ends exactly the
tunnels the key no longer admits through stages 3, 5 and 6.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gateway.cache.local import KeyCache
from gateway.cache.shared import KeyFacts
from gateway.config.ratelimit_spec import parse_rate_limit
from gateway.dataplane.tunnels import UNSEEN, Admission, TunnelGuard, still_admitted
from gateway.models import KeyRecord
from gateway.pipeline.prepared import PreparedKey, prepare
from gateway.pipeline.scope import Target
from gateway.store import StoreUnavailable

from ...waiting import until

NOW = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
T = NOW.timestamp()

RECORD = KeyRecord(
    id="kg_7Hq2ZrT9xLmP", kind="integration", name="agent", org="default", user="", role=None,
    operations=("chat:stream",), servers=("app",), ip_allowlist=("10.0.0.0/8",), rate_limit=None, created_by="test",
    created_at=NOW - timedelta(days=1), expires_at=None, revoked_at=None, last_used_at=None, last_used_ip=None,
)
OTHER = replace(RECORD, id="kg_other00000000", name="other")
ROUTE = Target(upstream=None, server="app", operation="chat:stream", pass_credentials=False)
ADMITTED = Admission(RECORD.id, ipaddress.ip_address("10.1.2.3"), "10.1.2.3", ROUTE, 0)


def new_cache() -> KeyCache[object]:
    return KeyCache(ttl=30, negative_ttl=5, stale_if_error=300, max_entries=10)


def prepared(record: KeyRecord, *, is_member: bool = True) -> PreparedKey:
    return prepare(KeyFacts(record, None, is_member, "member" if is_member else None, ("*",)),
                   parse_rate_limit("100/minute"))


@pytest.mark.parametrize(
    ("changes", "admitted"),
    [
        ({"name": "renamed", "rate_limit": "5/second"}, True),
        ({"expires_at": NOW + timedelta(hours=1)}, True),
        ({"ip_allowlist": ("10.1.0.0/16", "192.0.2.0/24")}, True),
        ({"operations": ("chat:*",)}, True),
        ({"revoked_at": NOW}, False),
        ({"revoked_at": NOW - timedelta(seconds=1)}, False),
        ({"expires_at": NOW}, False),
        ({"ip_allowlist": ("192.0.2.0/24",)}, False),
        ({"operations": ("chat:read",)}, False),
        ({"servers": ("billing",)}, False),
        ({"canary": True}, False),
        ({"user": "alice"}, False),  # a per-user key whose user is no longer a member (is_member below)
    ],
    ids=["renamed", "expiry-later", "allowlist-still-covers", "wider-operations", "revoked-now", "revoked-earlier",
         "expired", "allowlist-narrowed", "operation-taken-away", "server-taken-away", "turned-canary",
         "member-removed"],
)
def test_a_key_admits_its_tunnel_as_its_handshake_was_judged(changes: dict[str, object], admitted: bool) -> None:
    """A changed key still admits the tunnel exactly when stages 3, 5 and 6 would let its handshake in now."""
    key = prepared(replace(RECORD, **changes), is_member="user" not in changes)  # type: ignore[arg-type]
    assert still_admitted(key, ADMITTED, T) is admitted


def test_a_deleted_key_admits_nothing() -> None:
    assert still_admitted(None, ADMITTED, T) is False


class FakeTunnel:
    """What the guard needs of a tunnel: end() (forward.Tunnel's cuts both sides)."""

    def __init__(self, guard: TunnelGuard, key_id: str) -> None:
        self.guard, self.key_id, self.ended = guard, key_id, False
        self.ends_at: list[float] = []

    def end(self) -> None:
        self.ended = True
        self.guard.closed(self, self.key_id)

    def end_at(self, epoch: float) -> None:
        self.ends_at.append(epoch)


class Store:
    """The keys as the store has them (KeyLookup.current's answers), and whether it can be read."""

    def __init__(self) -> None:
        self.keys = {RECORD.id: RECORD, OTHER.id: OTHER}
        self.down = False
        self.fails: Exception | None = None  # raised by the next reads (an error other than down)
        self.reads: list[str] = []
        self.reading = self.most_at_once = 0

    async def current(self, key_id: str) -> PreparedKey | None:
        self.reads.append(key_id)
        self.reading += 1
        self.most_at_once = max(self.most_at_once, self.reading)
        try:
            await asyncio.sleep(0)
            if self.down:
                raise StoreUnavailable("store down")
            if self.fails is not None:
                raise self.fails
        finally:
            self.reading -= 1
        record = self.keys.get(key_id)
        return None if record is None else prepared(record)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_change_notice_ends_the_tunnels_its_key_no_longer_admits_and_only_those() -> None:
    store = Store()
    cache = new_cache()
    guard = TunnelGuard(cache, store.current, clock=lambda: T)
    allowed_ip = FakeTunnel(guard, RECORD.id)
    other_ip = FakeTunnel(guard, RECORD.id)
    other_key = FakeTunnel(guard, OTHER.id)
    guard.opened(allowed_ip, ADMITTED)
    guard.opened(other_ip, replace(ADMITTED, client_ip=ipaddress.ip_address("10.9.9.9"), client="10.9.9.9"))
    guard.opened(other_key, replace(ADMITTED, key_id=OTHER.id))

    # A change that leaves the key admitting both of its tunnels: read, nothing ends.
    store.keys[RECORD.id] = replace(RECORD, name="renamed")
    cache.invalidate_key(RECORD.id)
    await settle()
    assert store.reads == [RECORD.id] and len(guard) == 3

    # Narrowed to one of its clients: that tunnel ends, the other goes on; the other key is not read.
    store.keys[RECORD.id] = replace(RECORD, ip_allowlist=("10.1.0.0/16",))
    cache.invalidate_key(RECORD.id)
    await settle()
    assert (allowed_ip.ended, other_ip.ended, other_key.ended) == (False, True, False)
    assert store.reads == [RECORD.id, RECORD.id] and guard.ended == 1

    # Revoked: its last tunnel ends.
    store.keys[RECORD.id] = replace(RECORD, revoked_at=NOW)
    cache.invalidate_key(RECORD.id)
    await settle()
    assert allowed_ip.ended and not other_key.ended and len(guard) == 1


async def test_anything_changed_rechecks_every_key_with_an_open_tunnel() -> None:
    """cache.clear() (a role or member change, a lost notice channel): each key read once, the deleted one's ended."""
    store = Store()
    guard = TunnelGuard(new_cache(), store.current, clock=lambda: T)
    tunnels = [FakeTunnel(guard, RECORD.id), FakeTunnel(guard, RECORD.id), FakeTunnel(guard, OTHER.id)]
    for tunnel in tunnels:
        guard.opened(tunnel, replace(ADMITTED, key_id=tunnel.key_id))
    del store.keys[OTHER.id]
    guard.changed(None)
    await settle()
    assert sorted(store.reads) == sorted([RECORD.id, OTHER.id])
    assert [t.ended for t in tunnels] == [False, False, True]


@pytest.mark.parametrize(
    ("changes_meanwhile", "unseen", "reads"),
    [(0, False, 0), (1, False, 1), (3, False, 1), (0, True, 1)],
    ids=["none", "one", "several", "key-from-a-lookup"],
)
async def test_a_tunnel_opened_after_a_change_it_did_not_see_is_rechecked_at_once(
    changes_meanwhile: int, unseen: bool, reads: int,
) -> None:
    """A change heard between the handshake's judgement and its tunnel's registration (the upstream's 101
    takes a round trip): the key may be the one that changed, so the new tunnel is re-checked; with no
    change meanwhile, nothing is read. A key that came from a lookup (UNSEEN: the read it joined may have
    begun before a change) is re-checked as its tunnel opens."""
    store = Store()
    cache = new_cache()
    guard = TunnelGuard(cache, store.current, clock=lambda: T)
    # Read as the handler does, before judging (UNSEEN when the key was looked up).
    admission = replace(ADMITTED, generation=UNSEEN if unseen else cache.generation)
    store.keys[RECORD.id] = replace(RECORD, revoked_at=NOW)
    for _ in range(changes_meanwhile):
        cache.invalidate_key(RECORD.id)  # no tunnel registered yet: nothing to re-check then
    tunnel = FakeTunnel(guard, RECORD.id)
    guard.opened(tunnel, admission)
    await settle()
    assert len(store.reads) == reads and tunnel.ended is bool(reads)


@pytest.mark.parametrize(
    ("changes", "ends_at"),
    [
        ({}, float("inf")),
        ({"expires_at": NOW + timedelta(hours=2)}, T + 7200),
        ({"revoked_at": NOW + timedelta(minutes=5)}, T + 300),  # rotated with a grace period
        ({"revoked_at": NOW + timedelta(minutes=5), "expires_at": NOW + timedelta(minutes=1)}, T + 60),
    ],
    ids=["never", "expiry-moved", "revocation-scheduled", "the-earlier-of-both"],
)
async def test_a_tunnel_its_key_still_admits_ends_when_the_key_now_says(
    changes: dict[str, object], ends_at: float,
) -> None:
    """A re-check that keeps a tunnel moves its end to the key's expiry or scheduled revocation as now read."""
    store = Store()
    guard = TunnelGuard(new_cache(), store.current, clock=lambda: T)
    tunnel = FakeTunnel(guard, RECORD.id)
    guard.opened(tunnel, ADMITTED)
    store.keys[RECORD.id] = replace(RECORD, **changes)  # type: ignore[arg-type]
    guard.changed(RECORD.id)
    await settle()
    assert not tunnel.ended and tunnel.ends_at == [ends_at]


async def test_a_change_to_a_key_without_tunnels_reads_nothing() -> None:
    store = Store()
    guard = TunnelGuard(new_cache(), store.current, clock=lambda: T)
    guard.changed(RECORD.id)
    guard.changed(None)
    await settle()
    assert store.reads == []


async def test_while_the_store_is_down_tunnels_stay_and_the_read_is_retried() -> None:
    """As the cache serves keys while the store is down, tunnels go on; the re-check lands once it is back."""
    store = Store()
    guard = TunnelGuard(new_cache(), store.current, clock=lambda: T, retry=0.01)
    tunnel = FakeTunnel(guard, RECORD.id)
    guard.opened(tunnel, ADMITTED)
    store.down = True
    store.keys[RECORD.id] = replace(RECORD, revoked_at=NOW)
    guard.changed(RECORD.id)
    assert await until(lambda: len(store.reads) >= 3, interval=0.01) and not tunnel.ended
    store.down = False
    assert await until(lambda: tunnel.ended, interval=0.01) and len(guard) == 0
    await guard.close()


async def test_closing_the_guard_stops_a_retrying_recheck() -> None:
    store = Store()
    store.down = True
    guard = TunnelGuard(new_cache(), store.current, clock=lambda: T, retry=60)
    guard.opened(FakeTunnel(guard, RECORD.id), ADMITTED)
    guard.changed(RECORD.id)
    await settle()
    await asyncio.wait_for(guard.close(), 1)


async def test_a_read_that_fails_otherwise_is_retried_and_spares_no_other_key() -> None:
    """Not only an unreachable store: a refused or unreadable read is logged and tried again, and the
    other keys of the same re-check are judged meanwhile."""
    store = Store()
    guard = TunnelGuard(new_cache(), store.current, clock=lambda: T, retry=0.01)
    mine, other = FakeTunnel(guard, RECORD.id), FakeTunnel(guard, OTHER.id)
    guard.opened(mine, ADMITTED)
    guard.opened(other, replace(ADMITTED, key_id=OTHER.id))
    store.keys = {}  # both deleted
    store.fails = RuntimeError("statement timeout")
    guard.changed(RECORD.id)
    await settle()
    store.fails = None
    guard.changed(OTHER.id)  # the other key is read at once, the failed one again after retry
    assert await until(lambda: mine.ended, interval=0.01) and other.ended and store.reads.count(RECORD.id) >= 2
    await guard.close()


async def test_a_key_that_cannot_be_read_for_stale_if_error_has_its_tunnels_cut() -> None:
    """Retried for as long as a cached key may outlive an unreachable store, and then no longer trusted."""
    store = Store()
    now = [T]
    cache = KeyCache(ttl=30, negative_ttl=5, stale_if_error=60, max_entries=10)
    guard = TunnelGuard(cache, store.current, clock=lambda: now[0], retry=0.01)
    tunnel = FakeTunnel(guard, RECORD.id)
    guard.opened(tunnel, ADMITTED)
    store.down = True
    guard.changed(RECORD.id)
    await asyncio.sleep(0.05)
    assert not tunnel.ended  # retried, within the bound
    now[0] = T + 60
    assert await until(lambda: tunnel.ended, interval=0.01) and len(guard) == 0
    await guard.close()


async def test_keys_are_read_a_few_at_a_time() -> None:
    """Anything-changed with many keys open: reads overlap (bounded), so a revocation waits for no queue."""
    store = Store()
    guard = TunnelGuard(new_cache(), store.current, clock=lambda: T, concurrency=8)
    records = [replace(RECORD, id=f"kg_{n:012d}") for n in range(40)]
    store.keys = {record.id: record for record in records}
    for record in records:
        guard.opened(FakeTunnel(guard, record.id), replace(ADMITTED, key_id=record.id))
    guard.changed(None)
    await settle()
    assert len(store.reads) == 40 and store.most_at_once == 8
