"""The failure limiter: failures per client, network and key id in fixed windows, on an injected clock."""

from __future__ import annotations

import math

import pytest

from gateway.pipeline.failures import FailureLimiter, VerifyBudget, WindowCounter, network_of

from ...clocks import FakeClock

KEY = "kg_7Hq2ZrT9xLmP"
OTHER_KEY = "kg_AAAAAAAAAAAA"


@pytest.fixture
def ticks() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(ticks: FakeClock) -> FailureLimiter:
    return FailureLimiter(per_client=3, per_network=5, per_key=2, window=60, verify_per_second=1, clock=ticks)


# --- who is suspicious -------------------------------------------------------------------------


def test_nothing_is_suspicious_at_first(limiter: FailureLimiter) -> None:
    """A client, network and key id without failures are not suspicious."""
    assert limiter.suspicion("192.0.2.1", KEY) is None


def test_a_client_is_suspicious_at_its_limit_until_the_window_ends(limiter: FailureLimiter, ticks: FakeClock) -> None:
    """per_client failures make the address suspicious for the rest of its window, then it starts afresh."""
    for _ in range(2):
        limiter.failed("192.0.2.1")
    assert limiter.suspicion("192.0.2.1", KEY) is None
    limiter.failed("192.0.2.1")
    ticks.now += 20
    assert limiter.suspicion("192.0.2.1", KEY) == pytest.approx(40)
    ticks.now += 40
    assert limiter.suspicion("192.0.2.1", KEY) is None
    limiter.failed("192.0.2.1")
    assert limiter.suspicion("192.0.2.1", KEY) is None  # a new window counts from one


def test_another_clients_failures_do_not_count(limiter: FailureLimiter) -> None:
    """One address's failures never make another address (outside its network) suspicious."""
    for _ in range(10):
        limiter.failed("192.0.2.1")
    assert limiter.suspicion("198.51.100.1", KEY) is None


@pytest.mark.parametrize(
    ("client", "network"),
    [
        ("192.0.2.77", "192.0.2.0/24"),
        ("10.1.2.3", "10.1.2.0/24"),
        ("2001:db8:aa:bb11::1", "2001:db8:aa:bb00::/56"),
        ("2001:db8:aa:ccff:1:2:3:4", "2001:db8:aa:cc00::/56"),
        ("None", "None"),
        ("", ""),
    ],
    ids=["v4", "v4-other", "v6", "v6-low-bits", "unknown-client", "empty"],
)
def test_networks_are_v4_24_and_v6_56(client: str, network: str) -> None:
    """An address's network is its /24 (IPv4) or /56 (IPv6); text that is no address stands alone."""
    assert network_of(client) == network


def test_a_network_is_suspicious_when_its_addresses_fail_together(limiter: FailureLimiter) -> None:
    """Failures spread over one /24 (each address under per_client) make the whole /24 suspicious."""
    for host in range(1, 6):
        limiter.failed(f"203.0.113.{host}")
    assert limiter.suspicion("203.0.113.200", KEY) is not None
    assert limiter.suspicion("203.0.114.1", KEY) is None


def test_only_wrong_secrets_count_for_a_key_id(limiter: FailureLimiter) -> None:
    """Client failures do not count against a key id; per_key wrong secrets make it suspicious from anywhere."""
    for host in range(1, 3):
        limiter.failed(f"10.{host}.0.1")
    assert limiter.suspicion("192.0.2.1", KEY) is None
    for _ in range(2):
        limiter.wrong_secret(KEY)
    assert limiter.suspicion("192.0.2.1", KEY) is not None
    assert limiter.suspicion("192.0.2.1", OTHER_KEY) is None


def test_lookups_in_progress_count_against_their_key_id(limiter: FailureLimiter) -> None:
    """Unsettled lookups of an id count like failures until they end, so a burst cannot outrun per_key."""
    limiter.began(KEY)
    assert limiter.suspicion("192.0.2.1", KEY) is None
    limiter.began(KEY)
    assert limiter.suspicion("192.0.2.1", KEY) is not None
    assert limiter.suspicion("192.0.2.1", OTHER_KEY) is None
    limiter.ended(KEY)
    limiter.ended(KEY)
    assert limiter.suspicion("192.0.2.1", KEY) is None


def test_suspicion_lasts_as_long_as_its_longest_reason(limiter: FailureLimiter, ticks: FakeClock) -> None:
    """Over several limits at once, the wait is the longest window left."""
    for _ in range(2):
        limiter.wrong_secret(KEY)
    ticks.now += 30
    for _ in range(3):
        limiter.failed("192.0.2.1")
    assert limiter.suspicion("192.0.2.1", KEY) == pytest.approx(60)


# --- verifications while suspicious -------------------------------------------------------------


@pytest.mark.parametrize("clean", [True, False], ids=["clean-address", "suspicious-address"])
def test_one_verification_per_key_id_per_second(limiter: FailureLimiter, ticks: FakeClock, clean: bool) -> None:
    """verify_per_second = 1: one verification per key id, the next a second later; ids are independent."""
    assert limiter.take_verification(KEY, 60, clean=clean) == 0.0
    ticks.now += 0.25
    assert limiter.take_verification(KEY, 60, clean=clean) == pytest.approx(0.75)
    assert limiter.take_verification(OTHER_KEY, 60, clean=clean) == 0.0
    ticks.now += 0.75
    assert limiter.take_verification(KEY, 60, clean=clean) == 0.0


def test_clean_and_suspicious_addresses_have_separate_budgets(limiter: FailureLimiter, ticks: FakeClock) -> None:
    """A key id over its limit gets a verification per second for requests from clean addresses and another
    for requests from suspicious ones: guesses from suspicious addresses never spend the clean one."""
    for _ in range(5):  # an attacker's address, suspicious, hammering the id
        limiter.take_verification(KEY, 60, clean=False)
        ticks.now += 0.1
    assert limiter.take_verification(KEY, 60, clean=True) == 0.0  # the owner, from a clean address
    assert limiter.take_verification(KEY, 60, clean=True) == pytest.approx(1.0)
    assert limiter.take_verification(KEY, 60, clean=False) == pytest.approx(0.5)  # nor the other way round
    ticks.now += 1.0
    assert limiter.take_verification(KEY, 60, clean=False) == 0.0
    assert limiter.take_verification(KEY, 60, clean=True) == 0.0


def test_an_address_is_clean_while_it_and_its_network_are_within_limits(limiter: FailureLimiter) -> None:
    """Only the key id over its limit: clean. The address or its network over its limit: not clean."""
    for _ in range(2):
        limiter.wrong_secret(KEY)
    assert limiter.suspicion("192.0.2.1", KEY) is not None
    assert not limiter.address_suspicious("192.0.2.1")
    for _ in range(3):
        limiter.failed("192.0.2.1")
    assert limiter.address_suspicious("192.0.2.1")
    for host in range(2, 4):  # 192.0.2.0/24: 3 + 2 = per_network failures, none of these two at its own limit
        limiter.failed(f"192.0.2.{host}")
    assert limiter.address_suspicious("192.0.2.200")
    assert not limiter.address_suspicious("198.51.100.1")


def test_without_verifications_the_wait_is_the_suspicion(ticks: FakeClock) -> None:
    """verify_per_second = 0: nothing is verified while suspicious, and Retry-After is the suspicion's end."""
    limiter = FailureLimiter(verify_per_second=0, clock=ticks)
    assert limiter.take_verification(KEY, 42.0, clean=True) == 42.0
    assert limiter.take_verification(KEY, 42.0, clean=False) == 42.0


# --- throttled attempts ---------------------------------------------------------------------------


def test_throttled_attempts_count_against_the_address_and_network(limiter: FailureLimiter, ticks: FakeClock) -> None:
    """A 429 too_many_attempts counts as a failure of its client address and network, for the window."""
    for _ in range(2):
        limiter.throttled("192.0.2.1")
    assert not limiter.address_suspicious("192.0.2.1")
    limiter.throttled("192.0.2.1")
    assert limiter.address_suspicious("192.0.2.1")
    assert limiter.suspicion("192.0.2.1", KEY) == pytest.approx(60)
    for host in range(2, 4):
        limiter.throttled(f"192.0.2.{host}")
    assert limiter.address_suspicious("192.0.2.99")  # per_network = 5 reached over the /24
    ticks.now += 60
    assert not limiter.address_suspicious("192.0.2.1")


def test_throttled_attempts_do_not_count_against_the_key_id(limiter: FailureLimiter) -> None:
    """A throttled attempt is no wrong secret: however many, the key id stays unsuspicious to everyone else."""
    for host in range(50):
        limiter.throttled(f"10.{host}.0.1")
    assert len(limiter.keys) == 0
    assert limiter.suspicion("198.51.100.1", KEY) is None


@pytest.mark.parametrize(("per_second", "waits"), [(2.0, [0.0, 0.5]), (0.5, [0.0, 2.0]), (0.0, [math.inf] * 2)])
def test_budget_interval(ticks: FakeClock, per_second: float, waits: list[float]) -> None:
    """The budget's interval is 1 / verify_per_second."""
    budget = VerifyBudget(per_second=per_second, clock=ticks, max_subjects=10)
    assert [budget.take(KEY), budget.take(KEY)] == waits


# --- bounded memory -----------------------------------------------------------------------------


def test_counters_are_bounded_oldest_first(ticks: FakeClock) -> None:
    """Past max_subjects the subject with the oldest window goes; it then simply counts again."""
    counter = WindowCounter(limit=2, window=60, clock=ticks, max_subjects=3)
    for subject in ("a", "a", "b", "c"):
        counter.add(subject)
        ticks.now += 1
    assert counter.over("a") is not None
    counter.add("d")
    assert len(counter) == 3 and counter.over("a") is None
    assert counter.over("b") is None and counter.over("d") is None


def test_lapsed_windows_are_dropped_before_live_ones(ticks: FakeClock) -> None:
    """Adding a subject drops lapsed windows first, so a live one is evicted only when the table is full of them."""
    counter = WindowCounter(limit=1, window=60, clock=ticks, max_subjects=3)
    counter.add("old")
    ticks.now += 61
    counter.add("b")
    counter.add("c")
    assert len(counter) == 2  # "old" went, nothing live did
    counter.add("d")
    assert counter.over("b") is not None and counter.over("c") is not None


def test_a_flood_of_throttled_attempts_keeps_every_table_bounded(ticks: FakeClock) -> None:
    """Throttled attempts and verifications from ever new addresses and ids never grow a table past max_subjects."""
    limiter = FailureLimiter(per_client=3, per_network=5, per_key=2, clock=ticks, max_subjects=4)
    for i in range(100):
        limiter.throttled(f"10.{i}.0.1")
        limiter.take_verification(f"kg_{i:012d}", 60, clean=i % 2 == 0)
        ticks.now += 0.01
    assert max(len(limiter.clients), len(limiter.networks), len(limiter.keys)) <= 4
    assert len(limiter.clean_budget) <= 4 and len(limiter.suspect_budget) <= 4


def test_budget_is_bounded(ticks: FakeClock) -> None:
    """The budget table keeps at most max_subjects ids; lapsed ones go first."""
    budget = VerifyBudget(per_second=1, clock=ticks, max_subjects=2)
    for key in ("a", "b", "c"):
        budget.take(key)
    assert budget.take("a") == 0.0  # evicted, so it starts afresh
    assert budget.take("c") > 0
