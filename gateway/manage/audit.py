"""The audit trail: management events and request records as one stream, newest first.

One query serves ``keygate audit`` and ``GET /admin/v1/audit``. Pages are
keyset-paged on (time, type, id), so entries written while someone pages
through do not shift or repeat later pages. :class:`AuditPruner` enforces
``audit.retention_days`` in the background, and forgets exchanged tokens
once they have expired.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from .cursor import INVALID, cursor_time, decode_cursor, encode_cursor
from ..models import AuditEvent, RequestRecord
from ..store import KeyStore, Transaction, Transactions
from ..process.tasks import every, stop_task
from ..config.units import parse_duration

EntryType = Literal["event", "request"]
# At the same instant an event sorts before a request record (newest first).
_RANK: dict[str, int] = {"request": 0, "event": 1}
# Larger than any row id: "every row at this instant".
_ALL_IDS = 2**62


def parse_time(text: str, now: datetime) -> datetime:
    """``30m``/``1h``/``7d`` ago, or an ISO 8601 date or date-time (UTC unless it has an offset)."""
    try:
        return now - timedelta(seconds=parse_duration(text))
    except (ValueError, OverflowError):
        pass
    try:
        at = datetime.fromisoformat(text.strip())
        return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(
            f"{text!r}: use a duration ago (30m, 1h, 7d) or an ISO 8601 date or date-time"
        ) from None


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What to show. ``action`` only matches events and ``decision`` only request records,
    so either one alone selects that type."""

    key: str | None = None
    org: str | None = None  # events about the org's things, and the request records of its keys
    action: str | None = None
    decision: str | None = None
    type: EntryType | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def wants_events(self) -> bool:
        return self.type in (None, "event") and self.decision is None

    @property
    def wants_requests(self) -> bool:
        return self.type in (None, "request") and self.action is None


@dataclass(frozen=True, slots=True)
class Position:
    """Where an entry sits in the stream; the next page starts after it."""

    at: datetime
    type: EntryType
    id: int

    def sort_key(self) -> tuple[datetime, int, int]:
        return (self.at, _RANK[self.type], self.id)

    def encode(self) -> str:
        return encode_cursor([self.at.isoformat(), self.type, self.id])

    @classmethod
    def decode(cls, cursor: str) -> Position:
        at, kind, row_id = decode_cursor(cursor, (str, str, int))
        if kind not in _RANK:
            raise ValueError(INVALID)
        return cls(cursor_time(at), kind, int(row_id))  # type: ignore[arg-type]

    def bound_for(self, kind: EntryType) -> tuple[datetime, int]:
        """The (at, id) bound that selects the rows of ``kind`` after this position."""
        mine, theirs = _RANK[kind], _RANK[self.type]
        if mine < theirs:
            return (self.at, _ALL_IDS)  # rows at this instant sort after the position too
        if mine > theirs:
            return (self.at, 0)  # rows at this instant sort before it
        return (self.at, self.id)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    type: EntryType
    item: AuditEvent | RequestRecord

    @property
    def position(self) -> Position:
        return Position(self.item.at, self.type, self.item.id)

    def public(self) -> dict[str, Any]:
        return {"type": self.type, **self.item.public()}


@dataclass(frozen=True, slots=True)
class AuditPage:
    entries: list[AuditEntry]
    next: Position | None


async def query_audit(
    store: Transactions, wanted: AuditFilter, *, limit: int, after: Position | None = None,
) -> AuditPage:
    """Up to ``limit`` entries matching ``wanted``, newest first, starting after ``after``."""
    events: list[AuditEvent] = []
    requests: list[RequestRecord] = []
    async with store.read() as tx:
        if wanted.wants_events:
            events = await tx.list_audit(
                key=wanted.key, org=wanted.org, action=wanted.action, since=wanted.since, until=wanted.until, limit=limit + 1,
                before=after.bound_for("event") if after else None,
            )
        if wanted.wants_requests:
            requests = await tx.list_requests(
                key_id=wanted.key, org=wanted.org, decision=wanted.decision, since=wanted.since, until=wanted.until,
                limit=limit + 1, before=after.bound_for("request") if after else None,
            )
    entries = [AuditEntry("event", e) for e in events] + [AuditEntry("request", r) for r in requests]
    entries.sort(key=lambda entry: entry.position.sort_key(), reverse=True)
    page = entries[:limit]
    return AuditPage(page, page[-1].position if len(entries) > limit else None)


# How long after its expiry an exchanged token's record is kept: longer than the leeway the
# verifier allows on ``exp`` (60 s), so a token is never accepted once its record has gone.
TOKEN_GRACE = 300.0


def utcnow() -> datetime:
    """The wall clock of the management plane (the service's and the pruner's default)."""
    return datetime.now(UTC)


class AuditPruner:
    """Deletes audit events, request records and finished webhook deliveries older than ``retention_days``,
    and the records of exchanged tokens that have expired, every ``interval``.

    Deletes go in batches, each its own short transaction, so a large backlog
    never holds the store's write lock for long.
    """

    def __init__(
        self, store: KeyStore, *, retention_days: float, interval: float, batch: int = 5000,
        clock: Callable[[], datetime] = utcnow, logger: logging.Logger | None = None,
        token_grace: float = TOKEN_GRACE,
    ) -> None:
        if retention_days < 0 or interval <= 0 or batch < 1 or token_grace < 0:
            raise ValueError("retention_days >= 0, interval > 0, batch >= 1 and token_grace >= 0 are required")
        self.store = store
        self.retention = timedelta(days=retention_days)
        self.interval = interval
        self.batch = batch
        self.token_grace = timedelta(seconds=token_grace)
        self._clock = clock
        self._log = logger or logging.getLogger("keygate.audit")
        self._task: asyncio.Task[None] | None = None
        self.pruned = 0

    @property
    def enabled(self) -> bool:
        """Whether audit entries are pruned (exchanged tokens always are)."""
        return self.retention > timedelta(0)

    async def prune(self) -> int:
        """Delete everything past retention, and every expired exchanged token, now; returns how many rows went."""
        now = self._clock()
        total = 0
        if self.enabled:
            cutoff = now - self.retention
            audit = await self._in_batches(lambda tx: tx.prune_audit(older_than=cutoff, batch=self.batch))
            if audit:
                self._log.info(json.dumps({"event": "audit_pruned", "rows": audit, "before": cutoff.isoformat()}))
            total += audit
            # Webhook deliveries made or given up are kept as long as the audit trail.
            hooks = await self._in_batches(lambda tx: tx.prune_webhooks(older_than=cutoff, batch=self.batch))
            if hooks:
                self._log.info(json.dumps({"event": "webhooks_pruned", "rows": hooks, "before": cutoff.isoformat()}))
            total += hooks
        # A record must outlive the time its token is still accepted (exp plus the verifier's leeway),
        # or the token could be exchanged a second time.
        expired = now - self.token_grace
        tokens = await self._in_batches(lambda tx: tx.prune_exchanged_tokens(before=expired, batch=self.batch))
        if tokens:
            self._log.info(json.dumps({"event": "exchanged_tokens_pruned", "rows": tokens,
                                       "before": expired.isoformat()}))
        return total + tokens

    async def _in_batches(self, delete: Callable[[Transaction], Awaitable[int]]) -> int:
        total = 0
        while True:
            async with self.store.transaction() as tx:
                deleted = await delete(tx)
            total += deleted
            self.pruned += deleted
            if deleted == 0:
                return total
            await asyncio.sleep(0)  # let requests in between batches

    async def start(self) -> None:
        # Even when audit entries are kept forever: exchanged tokens must still go.
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="keygate-audit-pruner")

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _run(self) -> None:
        await every(self.interval, self.prune, self._log, "audit_prune")
