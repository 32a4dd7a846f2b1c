"""Rate-limit specifications: ``"100/minute"`` or ``"100/minute; burst=150"``.

A spec is parsed once (when a key enters the cache, or when configuration is
loaded) into a :class:`RateLimitSpec`; the token bucket works on its numbers.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

_UNITS = {
    "second": 1.0, "sec": 1.0, "s": 1.0,
    "minute": 60.0, "min": 60.0, "m": 60.0,
    "hour": 3600.0, "h": 3600.0,
    "day": 86400.0, "d": 86400.0,
}

_SPEC = re.compile(
    r"^\s*(?P<limit>\d+)\s*/\s*(?P<unit>[a-z]+)\s*(?:;\s*burst\s*=\s*(?P<burst>\d+)\s*)?$"
)

# A billion per window: far above any real limit, and a bound on the arithmetic of a bucket.
MAX_RATE = 1_000_000_000
_MAX_DIGITS = sys.get_int_max_str_digits() or 1_000_000  # what int() converts (0: no limit)
ALLOWED = '"N/second", "N/minute", "N/hour" or "N/day" with N >= 1, optionally "; burst=M" with M >= N'


class InvalidRateLimit(ValueError):
    """The text is not a rate-limit spec."""


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    """A token bucket: ``capacity`` tokens, refilled at ``limit`` per ``window`` seconds."""

    limit: int
    window: float
    burst: int | None = None
    # Derived once here rather than per request on the hot path.
    capacity: int = field(init=False, compare=False, repr=False)
    # window / limit rather than 1 / refill_per_second, so that "100/minute"
    # is full again in exactly 60 s, not 60.000...1 (61).
    seconds_per_token: float = field(init=False, compare=False, repr=False)
    # The RateLimit-Policy header's value (IETF httpapi draft), the same for every request of a key.
    policy: str = field(init=False, compare=False, repr=False)
    # That header's line as the proxy writes it, encoded once.
    policy_line: bytes = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        capacity = self.burst if self.burst is not None else self.limit
        object.__setattr__(self, "capacity", capacity)
        object.__setattr__(self, "seconds_per_token", self.window / self.limit)
        object.__setattr__(self, "policy", f'"key";q={capacity};w={int(self.window)}')
        object.__setattr__(self, "policy_line", f"RateLimit-Policy: {self.policy}\r\n".encode())

    @property
    def refill_per_second(self) -> float:
        return self.limit / self.window

    def __str__(self) -> str:
        unit = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}[self.window]
        text = f"{self.limit}/{unit}"
        return text if self.burst is None else f"{text}; burst={self.burst}"


def parse_rate_limit(text: str) -> RateLimitSpec:
    """Parse ``text`` or raise :class:`InvalidRateLimit` naming what is allowed."""
    match = _SPEC.match(text.lower()) if isinstance(text, str) else None
    if match is None or match["unit"] not in _UNITS:
        raise InvalidRateLimit(f"invalid rate limit {text!r}: use {ALLOWED}")
    if any(len(n) > _MAX_DIGITS for n in (match["limit"], match["burst"] or "")):
        # int() of that many digits (leading zeros count) is a ValueError of its own: no such limit was stored.
        raise InvalidRateLimit(f"invalid rate limit {text[:40]!r}...: more than {MAX_RATE} a window")
    limit = int(match["limit"])
    burst = int(match["burst"]) if match["burst"] is not None else None
    if limit < 1:
        raise InvalidRateLimit(f"invalid rate limit {text!r}: the limit must be at least 1")
    if burst is not None and burst < limit:
        raise InvalidRateLimit(f"invalid rate limit {text!r}: burst must be at least the limit ({limit})")
    return RateLimitSpec(limit=limit, window=_UNITS[match["unit"]], burst=burst)


def parse_new_rate_limit(text: str) -> RateLimitSpec:
    """:func:`parse_rate_limit` of a limit being set (settings, a key's, a policy's): at most MAX_RATE a window.

    A limit stored before the bound still applies as it is (:func:`parse_rate_limit`).
    """
    spec = parse_rate_limit(text)
    if spec.capacity > MAX_RATE:
        raise InvalidRateLimit(f"invalid rate limit {text!r}: more than {MAX_RATE} a window")
    return spec
