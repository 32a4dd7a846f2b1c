"""The in-process key cache: TTL, negative entries, stale-if-error, bounded size and invalidation, on a test clock."""

from __future__ import annotations

import pytest

from gateway.cache.local import KeyCache

from ...clocks import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, *, ttl: float = 30, negative_ttl: float = 5, stale_if_error: float = 300,
         max_entries: int = 100) -> KeyCache[str]:
    return KeyCache(ttl=ttl, negative_ttl=negative_ttl, stale_if_error=stale_if_error,
                    max_entries=max_entries, clock=clock)


@pytest.fixture
def cache(clock: FakeClock) -> KeyCache[str]:
    return make(clock)


@pytest.mark.parametrize(("elapsed", "fresh"), [(0, True), (29.999, True), (30, False), (31, False)])
def test_entry_is_fresh_for_ttl(cache: KeyCache[str], clock: FakeClock, elapsed: float, fresh: bool) -> None:
    """An entry is returned until ttl seconds have passed since it was stored, and not from then on."""
    cache.put("d1", "kg_A", "value")
    clock.advance(elapsed)
    assert cache.get("d1") == ("value" if fresh else None)


def test_unknown_digest_is_a_miss(cache: KeyCache[str]) -> None:
    """A digest never stored gives None and counts a miss."""
    assert cache.get("nope") is None
    assert (cache.hits, cache.misses) == (0, 1)


def test_hits_and_misses_are_counted(cache: KeyCache[str], clock: FakeClock) -> None:
    """Fresh reads count as hits; absent or expired reads count as misses."""
    cache.put("d1", "kg_A", "value")
    cache.get("d1")
    cache.get("d1")
    clock.advance(30)
    cache.get("d1")
    assert (cache.hits, cache.misses) == (2, 1)


def test_put_again_restarts_the_ttl(cache: KeyCache[str], clock: FakeClock) -> None:
    """Storing a digest again replaces its value and restarts its ttl."""
    cache.put("d1", "kg_A", "old")
    clock.advance(20)
    cache.put("d1", "kg_A", "new")
    clock.advance(20)
    assert cache.get("d1") == "new"
    assert len(cache) == 1


@pytest.mark.parametrize(("elapsed", "negative"), [(0, True), (4.999, True), (5, False), (60, False)])
def test_negative_entry_lasts_negative_ttl(cache: KeyCache[str], clock: FakeClock, elapsed: float,
                                          negative: bool) -> None:
    """A negative entry is remembered for negative_ttl seconds and then forgotten."""
    cache.put_negative("bad")
    clock.advance(elapsed)
    assert cache.is_negative("bad") is negative


def test_negative_entry_is_per_digest(cache: KeyCache[str]) -> None:
    """Marking one digest negative says nothing about another."""
    cache.put_negative("bad")
    assert not cache.is_negative("other")


def test_negative_ttl_zero_disables_negative_entries(clock: FakeClock) -> None:
    """With negative_ttl 0 nothing is ever remembered as negative."""
    cache = make(clock, negative_ttl=0)
    cache.put_negative("bad")
    assert not cache.is_negative("bad")


def test_negative_entries_are_not_values(cache: KeyCache[str]) -> None:
    """A negative entry is not returned by get or get_stale and does not count towards len."""
    cache.put_negative("bad")
    assert cache.get("bad") is None and cache.get_stale("bad") is None
    assert len(cache) == 0


def test_positive_entry_replaces_negative(cache: KeyCache[str]) -> None:
    """Storing a verified key under a digest clears its negative mark."""
    cache.put_negative("d1")
    cache.put("d1", "kg_A", "value")
    assert not cache.is_negative("d1")
    assert cache.get("d1") == "value"


def test_negative_entries_are_bounded(clock: FakeClock) -> None:
    """Negative entries never exceed max_entries; the oldest goes first."""
    cache = make(clock, max_entries=3)
    for n in range(5):
        cache.put_negative(f"bad{n}")
    assert [cache.is_negative(f"bad{n}") for n in range(5)] == [False, False, True, True, True]


@pytest.mark.parametrize(
    ("elapsed", "stale"), [(0, True), (30, True), (329.999, True), (330, False), (1000, False)]
)

def test_stale_if_error_window(cache: KeyCache[str], clock: FakeClock, elapsed: float, stale: bool) -> None:
    """get_stale returns an entry until ttl + stale_if_error seconds after it was stored."""
    cache.put("d1", "kg_A", "value")
    clock.advance(elapsed)
    assert cache.get_stale("d1") == ("value" if stale else None)


def test_stale_entry_is_not_fresh(cache: KeyCache[str], clock: FakeClock) -> None:
    """Inside the stale window only get_stale answers; get still reports a miss."""
    cache.put("d1", "kg_A", "value")
    clock.advance(100)
    assert cache.get("d1") is None
    assert cache.get_stale("d1") == "value"


def test_stale_if_error_zero_serves_nothing_past_ttl(clock: FakeClock) -> None:
    """With stale_if_error 0 an expired entry is not served even while the store is down."""
    cache = make(clock, stale_if_error=0)
    cache.put("d1", "kg_A", "value")
    clock.advance(29)
    assert cache.get_stale("d1") == "value"
    clock.advance(1)
    assert cache.get_stale("d1") is None


def test_bounded_size_evicts_oldest(clock: FakeClock) -> None:
    """Past max_entries the entry stored longest ago is dropped first."""
    cache = make(clock, max_entries=3)
    for n in range(4):
        cache.put(f"d{n}", f"kg_{n}", f"v{n}")
        clock.advance(1)
    assert len(cache) == 3
    assert [cache.get(f"d{n}") for n in range(4)] == [None, "v1", "v2", "v3"]


def test_restored_entry_counts_as_newest(clock: FakeClock) -> None:
    """An entry stored again moves to the back of the eviction order."""
    cache = make(clock, max_entries=2)
    cache.put("d0", "kg_0", "v0")
    cache.put("d1", "kg_1", "v1")
    cache.put("d0", "kg_0", "v0b")
    cache.put("d2", "kg_2", "v2")
    assert [cache.get(d) for d in ("d0", "d1", "d2")] == ["v0b", None, "v2"]


def test_evicted_entry_is_gone_from_its_key_index(clock: FakeClock) -> None:
    """After eviction, invalidating the evicted key's id leaves the other entries alone."""
    cache = make(clock, max_entries=1)
    cache.put("d0", "kg_0", "v0")
    cache.put("d1", "kg_1", "v1")
    cache.invalidate_key("kg_0")
    assert cache.get("d1") == "v1"


def test_invalidate_key_drops_every_entry_of_that_id_only(cache: KeyCache[str]) -> None:
    """A change notice for one key drops all its entries, fresh or stale, and leaves other keys cached."""
    cache.put("d1", "kg_A", "a1")
    cache.put("d2", "kg_A", "a2")
    cache.put("d3", "kg_B", "b")
    cache.invalidate_key("kg_A")
    assert cache.get("d1") is None and cache.get("d2") is None
    assert cache.get_stale("d1") is None and cache.get_stale("d2") is None
    assert cache.get("d3") == "b"
    assert len(cache) == 1


def test_invalidate_unknown_key_is_harmless(cache: KeyCache[str]) -> None:
    """Invalidating an id with no entries changes nothing."""
    cache.put("d1", "kg_A", "a")
    cache.invalidate_key("kg_Z")
    assert cache.get("d1") == "a"


def test_entry_moved_to_another_id_follows_it(cache: KeyCache[str]) -> None:
    """A digest stored again under another id is invalidated with the new id, not the old one."""
    cache.put("d1", "kg_A", "a")
    cache.put("d1", "kg_B", "b")
    cache.invalidate_key("kg_A")
    assert cache.get("d1") == "b"
    cache.invalidate_key("kg_B")
    assert cache.get("d1") is None


def test_clear_drops_everything(cache: KeyCache[str]) -> None:
    """clear forgets positive, stale and negative entries alike."""
    cache.put("d1", "kg_A", "a")
    cache.put_negative("bad")
    cache.clear()
    assert len(cache) == 0
    assert cache.get("d1") is None and cache.get_stale("d1") is None
    assert not cache.is_negative("bad")


def test_fill_started_before_an_invalidation_is_not_kept() -> None:
    """A value read before an invalidation (a revoke racing a cache miss) is not cached."""
    cache: KeyCache[str] = KeyCache(ttl=30, negative_ttl=5, stale_if_error=0, max_entries=10)
    generation = cache.generation
    cache.invalidate_key("kg_other000000")
    cache.put("digest", "kg_AAAAAAAAAAAA", "stale", generation=generation)
    assert cache.get("digest") is None
    cache.put("digest", "kg_AAAAAAAAAAAA", "fresh", generation=cache.generation)
    assert cache.get("digest") == "fresh"


def test_probe_counts_hits_but_not_misses(cache: KeyCache[str], clock: FakeClock) -> None:
    """The hot path's probe: a fresh entry is a hit; an absent or stale one is None and no miss (lookup counts it)."""
    cache.put("d1", "kg_A", "value")
    assert cache.probe("d1") == "value"
    assert cache.probe("nope") is None
    clock.advance(30)
    assert cache.probe("d1") is None
    assert (cache.hits, cache.misses) == (1, 0)
