"""argon2 isolation and refusal pacing: bounded threads and queue, and where an invalid_token refusal is held."""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import threading
from collections.abc import Iterator

import pytest

from gateway.cache.local import KeyCache
from gateway.keys import SecretHasher
from gateway.pipeline.lookup import MAX_REFUSAL_DELAY, THROTTLED_HOLD, KeyLookup
from gateway.pipeline.prepared import PreparedKey
from gateway.pipeline.outcomes import Denied, Outcome
from gateway.pipeline.verify import THREAD_NICENESS, SecretVerifier, default_concurrency
from gateway.config.ratelimit_spec import parse_rate_limit

from ...clocks import FakeClock

HASHER = SecretHasher(time_cost=1, memory_cost=1024, parallelism=1)


@pytest.mark.parametrize(("cpus", "threads"), [(1, 1), (2, 1), (4, 3), (16, 15)])
def test_default_concurrency_leaves_a_core_to_the_event_loop(cpus: int, threads: int) -> None:
    """concurrency = 0 means one thread per CPU but one, and at least one."""
    assert default_concurrency(cpus) == threads


def test_admission_is_bounded_by_concurrency_and_queue() -> None:
    """concurrency + queue misses are admitted; the next is shed with verification_busy, and places come back."""
    verifier = SecretVerifier(HASHER, concurrency=2, queue=1)
    try:
        with verifier.admit(), verifier.admit(), verifier.admit():
            with pytest.raises(Denied) as denied:
                with verifier.admit():
                    pass
            assert denied.value.outcome is Outcome.VERIFICATION_BUSY and verifier.shed == 1
        assert verifier.admitted == 0
        with verifier.admit():
            assert verifier.admitted == 1
    finally:
        verifier.close()


async def test_verify_answers_on_its_own_threads() -> None:
    """The verifier tells a matching secret from another one."""
    verifier = SecretVerifier(HASHER, concurrency=1, queue=0)
    try:
        secret_hash = HASHER.hash("right")
        assert await verifier.verify(secret_hash, "right") is True
        assert await verifier.verify(secret_hash, "wrong") is False
        assert await verifier.calibrate() > 0
    finally:
        verifier.close()


@pytest.fixture
def now() -> FakeClock:
    return FakeClock()


@pytest.fixture
def lookup(now: FakeClock) -> Iterator[KeyLookup]:
    """A lookup whose store is never read: only its refusal pacing is used."""
    cache: KeyCache[PreparedKey] = KeyCache(ttl=30, negative_ttl=5, stale_if_error=0, max_entries=10)
    instance = KeyLookup(None, pepper=b"pepper", hasher=HASHER, cache=cache,  # type: ignore[arg-type]
                         default_rate_limit=parse_rate_limit("100/minute"), clock=now)
    yield instance
    instance.close()


@pytest.mark.parametrize(("pace", "elapsed", "wait"), [(0.010, 0.002, 0.008), (5.0, 0.0, MAX_REFUSAL_DELAY),
                                                       (0.010, 0.020, 0.0), (0.0, 0.0, 0.0)],
                         ids=["held", "bounded", "already-late", "uncalibrated"])
def test_invalid_token_is_held_until_a_verification_would_end(
    lookup: KeyLookup, now: FakeClock, pace: float, elapsed: float, wait: float,
) -> None:
    """An invalid_token refusal waits until start + the verification pace (at most 1 s), never longer."""
    started = now.now
    now.now += elapsed
    lookup.pace = pace
    assert lookup.refusal_delay(Denied(Outcome.INVALID_TOKEN, "unknown key or wrong secret"), started) == \
        pytest.approx(wait)


@pytest.mark.parametrize(("durations", "pace"), [
    ([0.010], 0.030),  # one measurement (the calibration): its deviation taken as half of it
    ([0.010] * 60, 0.010),  # steady: the deviations die away
    ([0.010, 0.020], 0.010 + 0.00125 + 4 * (0.005 * 0.75 + 0.010 * 0.25)),
    ([0.010, 0.500], 0.010 + 0.030 / 8 + 4 * (0.005 * 0.75 + 0.030 * 0.25)),  # a stall counts as 4 x the mean
], ids=["first", "steady", "one-more", "stalled"])
def test_the_hold_is_the_mean_verification_plus_four_deviations(
    lookup: KeyLookup, durations: list[float], pace: float,
) -> None:
    """The invalid_token hold follows verifications as TCP's retransmission timer follows round trips (RFC 6298)."""
    for seconds in durations:
        lookup._observe(seconds)
    assert lookup.pace == pytest.approx(pace, abs=1e-6)


def test_one_stalled_verification_does_not_hold_refusals_for_long(lookup: KeyLookup) -> None:
    """After a 500 ms stall among 7 ms verifications the hold stays near theirs, and is back within ten."""
    for _ in range(40):
        lookup._observe(0.007)
    lookup._observe(0.500)
    assert lookup.pace < 0.050
    for _ in range(10):
        lookup._observe(0.007)
    assert lookup.pace < 0.015


def test_a_lasting_slowdown_raises_the_hold_within_a_few_verifications(lookup: KeyLookup) -> None:
    """From 8 ms verifications to 250 ms ones (a machine gone busy): the hold outlasts them within fifteen."""
    for _ in range(40):
        lookup._observe(0.008)
    for _ in range(15):
        lookup._observe(0.250)
    assert lookup.pace > 0.250


def test_the_hold_outlasts_nearly_every_verification_on_a_busy_machine(lookup: KeyLookup) -> None:
    """Where verifications vary (a busy machine), few outlast the hold, so wrong secrets are not answered later.

    A wrong secret is answered at max(hold, its verification) and an unknown id at the hold: a hold
    only as long as the average verification was outlasted by about half of them, and on CI's busy
    machine the median wrong secret came 2.6 ms after the median unknown id (at 33 ms each).
    """
    durations = [0.007 * (1 + 3 * abs(math.sin(i * 1.7)) ** 3) for i in range(2000)]  # 7 to 28 ms, skewed
    outlasted = 0
    for seconds in durations:
        outlasted += seconds > lookup.pace > 0
        lookup._observe(seconds)
    assert outlasted / len(durations) < 0.05
    assert lookup.pace < 3 * statistics.mean(durations)  # yet refusals are not held for ever


@pytest.mark.parametrize(("retry_after", "elapsed", "wait"), [(0.4, 0.1, 0.9), (10.0, 0.0, THROTTLED_HOLD),
                                                               (0.4, 1.5, 0.0), (None, 0.0, THROTTLED_HOLD)],
                         ids=["held", "longer-retry", "already-late", "no-retry-after"])
def test_a_throttled_guess_is_held_one_second(
    lookup: KeyLookup, now: FakeClock, retry_after: float | None, elapsed: float, wait: float,
) -> None:
    """too_many_attempts is answered 1 s after it began, whatever its Retry-After or the verification pace."""
    started = now.now
    now.now += elapsed
    lookup.pace = 0.005
    denied = Denied(Outcome.TOO_MANY_ATTEMPTS, "too many failed attempts", retry_after=retry_after)
    assert lookup.refusal_delay(denied, started) == pytest.approx(wait)


@pytest.mark.parametrize("outcome", [o for o in Outcome
                                     if o not in (Outcome.INVALID_TOKEN, Outcome.TOO_MANY_ATTEMPTS)])
def test_other_refusals_are_not_held(lookup: KeyLookup, now: FakeClock, outcome: Outcome) -> None:
    """Refusals that tell nothing about an id, and that no flood is made of, are answered at once."""
    lookup.pace = 0.5
    assert lookup.refusal_delay(Denied(outcome, retry_after=3.0), now.now) == 0.0


async def test_verification_threads_yield_the_cpu_to_the_event_loop() -> None:
    """The verification threads run at a lower CPU priority (nice) than the thread of the event loop."""
    verifier = SecretVerifier(HASHER, concurrency=1, queue=0)
    try:
        loop = asyncio.get_running_loop()
        niceness = await loop.run_in_executor(
            verifier._executor, lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert niceness == min(19, base + THREAD_NICENESS)  # 19 is the lowest priority there is
    finally:
        verifier.close()
