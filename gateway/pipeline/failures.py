"""The failure limiter: failed lookups counted per client, per network and per key id.

Its job is to keep failures from buying argon2 work, without letting one
client's failures refuse another's correct secret (a key's id is public,
and CI runners share NAT addresses). So it never answers "invalid": it only
says whether a request is *suspicious* -- its client address, that
address's network (/24 for IPv4, /56 for IPv6) or the key id it claims has
failed too often within the window -- and, for a suspicious request, whether
one more verification of that key id may run now.

Each key id has two such budgets of ``verify_per_second``: one for requests
from *clean* addresses (address and network within their limits: only the
key id is over its limit) and one for requests from suspicious addresses or
networks. An attacker whose address has turned suspicious then guesses on
the second budget only and never takes the first from the key's owner on a
clean address. A throttled request (429 ``too_many_attempts``) counts as a
failure of its address and network -- though not of the key id: it is no
wrong secret -- so a lone address or small network that keeps guessing
turns suspicious within ``per_client`` (``per_network``) attempts, throttled
or not. What is left: many clean addresses in many networks can still share
the clean budget with the owner of a key no verification has proven.

The lookup does the rest: a key whose text is proven by an earlier
verification needs no argon2 and is let through whatever the suspicion; a
suspicious request with no verification left gets 429 before any store or
argon2 work.

Every table is bounded (``max_subjects``), oldest windows evicted first; an
evicted subject simply starts counting again.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Final

# How much of an address is one network: what one customer, NAT or attacker usually holds.
IPV4_NETWORK: Final = 24
IPV6_NETWORK: Final = 56


@lru_cache(maxsize=4096)
def network_of(client: str) -> str:
    """The /24 (IPv4) or /56 (IPv6) holding ``client``; text that is no address is its own network."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return client
    bits = IPV4_NETWORK if ip.version == 4 else IPV6_NETWORK
    return str(ipaddress.ip_network((ip, bits), strict=False))


class WindowCounter:
    """Counts events per subject in fixed windows of ``window`` seconds."""

    def __init__(self, *, limit: int, window: float, clock: Callable[[], float], max_subjects: int) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max = max_subjects
        # subject -> (window start, count); re-inserted when a window starts, so the
        # first item always has the oldest window and eviction is O(1).
        self._counts: dict[str, tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def count(self, subject: str) -> int:
        """The subject's events in its current window (0 once the window lapsed)."""
        entry = self._counts.get(subject)
        return entry[1] if entry is not None and self._clock() - entry[0] < self.window else 0

    def over(self, subject: str, pending: int = 0) -> float | None:
        """Seconds left in the subject's window once its count (+ ``pending``) reached the limit, else None."""
        now = self._clock()
        start, count = now, pending
        entry = self._counts.get(subject)
        if entry is not None and now - entry[0] < self.window:
            start, count = entry[0], count + entry[1]
        return start + self.window - now if count >= self.limit else None

    def add(self, subject: str) -> None:
        now = self._clock()
        entry = self._counts.get(subject)
        if entry is not None and now - entry[0] < self.window:
            self._counts[subject] = (entry[0], entry[1] + 1)
            return
        self._counts.pop(subject, None)
        self._evict(now)
        self._counts[subject] = (now, 1)

    def _evict(self, now: float) -> None:
        counts = self._counts
        while counts:
            oldest = next(iter(counts))
            if now - counts[oldest][0] < self.window and len(counts) < self._max:
                return
            del counts[oldest]


class VerifyBudget:
    """At most ``per_second`` verifications per key id (no burst): the next one is due ``1 / per_second`` later."""

    def __init__(self, *, per_second: float, clock: Callable[[], float], max_subjects: int) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else math.inf
        self._clock = clock
        self._max = max_subjects
        self._due: dict[str, float] = {}  # key id -> when its next verification may run

    def __len__(self) -> int:
        return len(self._due)

    def take(self, key_id: str) -> float:
        """0.0 when a verification may run now (and it is counted), else the seconds until one may."""
        if self.interval == math.inf:
            return math.inf
        now = self._clock()
        due = self._due.get(key_id)
        if due is not None and due > now:
            return due - now
        self._due.pop(key_id, None)
        # Due times grow with insertion order: the first entries are the first to lapse.
        while self._due and (len(self._due) >= self._max or self._due[next(iter(self._due))] <= now):
            self._due.pop(next(iter(self._due)))
        self._due[key_id] = now + self.interval
        return 0.0


class FailureLimiter:
    """Which lookups are suspicious, and how many verifications a suspicious key id still gets.

    Failures counted: lookups that found no key or a wrong secret, and throttled
    ones (:meth:`failed`, :meth:`throttled`), per client address and network; wrong
    secrets only (:meth:`wrong_secret`), per key id.
    """

    def __init__(
        self, *, per_client: int = 30, per_network: int = 300, per_key: int = 10, window: float = 60.0,
        verify_per_second: float = 1.0, clock: Callable[[], float] = time.monotonic, max_subjects: int = 100_000,
    ) -> None:
        self.window = window
        self.clients = WindowCounter(limit=per_client, window=window, clock=clock, max_subjects=max_subjects)
        self.networks = WindowCounter(limit=per_network, window=window, clock=clock, max_subjects=max_subjects)
        self.keys = WindowCounter(limit=per_key, window=window, clock=clock, max_subjects=max_subjects)
        # SECURITY: two budgets per key id, so guesses from suspicious addresses never spend the
        # verifications left to clean ones (where the key's owner usually is).
        self.clean_budget = VerifyBudget(per_second=verify_per_second, clock=clock, max_subjects=max_subjects)
        self.suspect_budget = VerifyBudget(per_second=verify_per_second, clock=clock, max_subjects=max_subjects)
        # key id -> lookups of it in progress; bounded by the requests in progress.
        self._pending: dict[str, int] = {}

    def suspicion(self, client: str, key_id: str) -> float | None:
        """None when nothing about the request has failed too often; else the seconds until that ends."""
        found = [left for left in (self.clients.over(client), self.networks.over(network_of(client)),
                                   self.keys.over(key_id, self._pending.get(key_id, 0))) if left is not None]
        return max(found) if found else None

    def address_suspicious(self, client: str) -> bool:
        """Whether ``client`` or its network is over its limit (as opposed to only the key id it claims)."""
        return self.clients.over(client) is not None or self.networks.over(network_of(client)) is not None

    def began(self, key_id: str) -> None:
        """A lookup of ``key_id`` that may end in a wrong secret started.

        SECURITY: it counts as a failure until it ends (:meth:`ended`), or a burst of
        concurrent guesses would all pass before the first of them failed: a key id
        never has more than ``per_key`` unsettled guesses.
        """
        self._pending[key_id] = self._pending.get(key_id, 0) + 1

    def ended(self, key_id: str) -> None:
        left = self._pending.get(key_id, 0) - 1
        if left > 0:
            self._pending[key_id] = left
        else:
            self._pending.pop(key_id, None)

    def take_verification(self, key_id: str, suspicion: float, *, clean: bool) -> float:
        """For a suspicious request: 0.0 when one more verification of ``key_id`` may run, else Retry-After.

        ``clean``: the request's address and network are within their limits
        (:meth:`address_suspicious` is false), so it draws on the key id's
        budget for clean addresses; otherwise on the one for suspicious
        addresses. The wait is until that budget's next verification, or until
        the suspicion ends if that comes first.
        """
        wait = (self.clean_budget if clean else self.suspect_budget).take(key_id)
        return 0.0 if wait == 0.0 else min(wait, suspicion)

    def failed(self, client: str) -> None:
        """A lookup from ``client`` found no key or a wrong secret."""
        self.clients.add(client)
        self.networks.add(network_of(client))

    def throttled(self, client: str) -> None:
        """A lookup from ``client`` got 429 too_many_attempts: a failure of the address and its network.

        SECURITY: without it an address that only ever gets 429s would stay
        clean and keep drawing on the clean budget. Not counted against the
        key id: a throttled guess is no wrong secret (argon2 never saw it), and
        counting it would keep the id suspicious on 429s alone.
        """
        self.failed(client)

    def wrong_secret(self, key_id: str) -> None:
        """argon2 refused a secret for ``key_id`` (an unknown id has no key to protect, so it is not counted)."""
        self.keys.add(key_id)
