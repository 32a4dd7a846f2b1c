"""A key's use over time: its request records counted per UTC hour and decision (the web page's chart)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..models import iso

MAX_HOURS = 24 * 31  # a month of hours: the window the audit trail usually still holds


@dataclass(frozen=True, slots=True)
class Usage:
    """The hours ``since`` (the first hour's start) to ``until`` (the end of the current hour) and the
    requests recorded in each, by decision; an hour missing from ``counts`` had none."""

    key_id: str
    hours: int
    since: datetime
    until: datetime
    counts: tuple[tuple[datetime, str, int], ...]

    def public(self) -> dict[str, Any]:
        totals: dict[str, int] = {}
        for _hour, decision, n in self.counts:
            totals[decision] = totals.get(decision, 0) + n
        return {
            "key_id": self.key_id, "hours": self.hours, "since": iso(self.since), "until": iso(self.until),
            "total": sum(totals.values()), "by_decision": dict(sorted(totals.items())),
            "buckets": [{"hour": iso(hour), "decision": decision, "requests": n} for hour, decision, n in self.counts],
        }


def window(now: datetime, hours: int) -> tuple[datetime, datetime]:
    """The last ``hours`` whole UTC hours, the current one included: (start, end)."""
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    return end - timedelta(hours=hours), end

