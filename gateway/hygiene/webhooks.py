"""Webhook delivery: the store's outbox POSTed to the configured webhooks, signed, retried, at least once.

Every serve worker runs one :class:`WebhookDeliverer`. It claims due rows of
the outbox in batches (:mod:`.events` wrote them in the transaction of the
change they announce) with a lease, so two workers or replicas never send the
same row at the same time, and a process that dies mid-delivery leaves its
rows to be claimed again when the lease runs out. Each row is POSTed as it was
stored, with an HMAC-SHA256 of those exact bytes under the webhook's secret.
A 2xx answer delivers it; anything else (another status, a redirect, a
timeout, a refused connection) is retried with exponential backoff (1 s, 2 s,
4 s, ... up to ``hygiene.webhook_max_backoff``, with jitter) until
``hygiene.webhook_retry_for`` after the event, then given up (the row stays in
the store, counted as abandoned). Delivery is at least once: a receiver drops
repeats by the event id (``X-Keygate-Delivery``).

Nothing here runs on a request: the admin API and the CLI only write the
outbox row.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import aiohttp

from .. import __version__
from ..config.schema import WebhookSettings
from ..models import WebhookDelivery
from ..process.tasks import stop_task
from ..store import KeyStore, StoreError

# Seconds between looks at the outbox: an event reaches its webhook within about this long.
POLL_INTERVAL = 0.5
# Without any webhook configured, rows can only be leftovers of an earlier config (abandoned when found).
IDLE_POLL_INTERVAL = 30.0
# Rows claimed (and sent concurrently) at once.
BATCH = 20
# Seconds between counts of the undelivered rows (the backlog gauge).
BACKLOG_INTERVAL = 5.0
# A delivery's retry waits between (1 - JITTER) and 1 times its step of the schedule, so deliveries that
# failed together (a receiver's outage) do not all come back at the same instant.
JITTER = 0.25
# Seconds a shutdown waits for attempts in flight before it cancels them (their lease then makes them due again).
DRAIN_TIMEOUT = 5.0
# Characters of an error kept in the outbox row and the log.
MAX_ERROR = 300

USER_AGENT = f"keygate/{__version__}"


def signature(secret: str, body: bytes) -> str:
    """The ``X-Keygate-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of ``body`` under ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff(attempts: int, max_backoff: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: 1, 2, 4, ... capped at ``max_backoff``,
    each shortened by up to :data:`JITTER` of itself."""
    step = min(max_backoff, 2.0 ** min(max(attempts - 1, 0), 62))
    return step * (1.0 - JITTER * rand())


def event_id(body: str, delivery_id: int) -> str:
    """The event's id from its body (the same for every webhook the event goes to)."""
    try:
        found = json.loads(body).get("id")
    except (ValueError, AttributeError):
        found = None
    return found if isinstance(found, str) and found else f"outbox-{delivery_id}"


def headers_for(hook: WebhookSettings, delivery: WebhookDelivery, body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Keygate-Event": delivery.event,
        "X-Keygate-Delivery": event_id(delivery.body, delivery.id),
        "X-Keygate-Signature": signature(hook.secret, body),
    }


def origin(url: str) -> str:
    """What logs say of a webhook's URL: its scheme, host and port only.

    SECURITY: many receivers (chat and incident tools) take their token in the path or query,
    so the whole URL is a secret; the outbox row keeps it, the log does not.
    """
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" + ("/..." if parts.path not in ("", "/") or parts.query else "/")


def lease_for(webhooks: Sequence[WebhookSettings]) -> float:
    """How long a claim holds its rows: twice the longest attempt, so a live deliverer finishes well within it."""
    return 2.0 * max((hook.timeout for hook in webhooks), default=10.0)


class WebhookDeliverer:
    """Delivers the outbox to ``webhooks`` in the background (one per serve worker)."""

    def __init__(
        self, store: KeyStore, webhooks: Sequence[WebhookSettings], *, retry_for: float, max_backoff: float,
        clock: Callable[[], datetime], sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rand: Callable[[], float] = random.random, batch: int = BATCH, poll_interval: float | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        if retry_for <= 0 or max_backoff <= 0 or batch < 1:
            raise ValueError("retry_for > 0, max_backoff > 0 and batch >= 1 are required")
        self.store = store
        self.webhooks = list(webhooks)
        self.retry_for = timedelta(seconds=retry_for)
        self.max_backoff = max_backoff
        self.batch = batch
        self.poll_interval = poll_interval if poll_interval is not None else (
            POLL_INTERVAL if self.webhooks else IDLE_POLL_INTERVAL)
        self.lease = timedelta(seconds=lease_for(self.webhooks))
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self._log = logger or logging.getLogger("keygate.webhooks")
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._busy = False  # a batch is in flight (else the task waits for the next poll)
        self._backlog_at: datetime | None = None
        self._outage: str | None = None  # the error the outbox last failed with, while it does
        # (event, result) -> attempts; result is delivered, failed (retried later) or abandoned (given up).
        self.results: dict[tuple[str, str], int] = {}
        # Rows neither delivered nor given up, store-wide, as of the last count.
        self.backlog = 0

    def hook_for(self, delivery: WebhookDelivery) -> WebhookSettings | None:
        """The configured webhook of the row's URL (the one that asked for its event, if several share it)."""
        same_url = [hook for hook in self.webhooks if hook.url == delivery.url]
        return next((hook for hook in same_url if delivery.event in hook.events), same_url[0] if same_url else None)

    # -- one round -----------------------------------------------------------

    async def run_once(self) -> int:
        """Claim the due rows (one batch) and attempt each, concurrently; returns how many were claimed."""
        now = self._clock()
        async with self.store.transaction() as tx:
            due = await tx.claim_webhooks(now=now, lease_until=now + self.lease, limit=self.batch)
        if due:
            await asyncio.gather(*(self._attempt(delivery) for delivery in due))
        if due or self._backlog_at is None or (now - self._backlog_at).total_seconds() >= BACKLOG_INTERVAL:
            await self.count_backlog()
        return len(due)

    async def count_backlog(self) -> int:
        async with self.store.read() as tx:
            self.backlog = await tx.webhook_backlog()
        self._backlog_at = self._clock()
        return self.backlog

    async def _attempt(self, delivery: WebhookDelivery) -> None:
        try:
            await self._attempt_once(delivery)
        except StoreError as exc:
            # The outcome could not be written: the lease makes the row due again (sent again if it was sent).
            self._log.warning(json.dumps({"event": "webhook_outcome_unsaved", "delivery": delivery.id,
                                          "error": str(exc)}))

    async def _attempt_once(self, delivery: WebhookDelivery) -> None:
        attempts = delivery.attempts + 1
        hook = self.hook_for(delivery)
        if hook is None:
            # Nobody to sign for or send to: retrying cannot help. Kept in the store for the record.
            error = "its URL is no longer a configured webhook (not in [[webhooks]]): not sent"
            await self._failed(delivery, attempts, error, give_up=True)
            return
        error = await self._post(hook, delivery)
        if error is None:
            async with self.store.transaction() as tx:
                await tx.webhook_delivered(delivery.id, at=self._clock(), attempts=attempts)
            self._count(delivery.event, "delivered")
            self._log.info(json.dumps({
                "event": "webhook_delivered", "webhook_event": delivery.event, "key_id": delivery.key_id,
                "url": origin(delivery.url), "delivery": delivery.id, "attempts": attempts,
            }))
            return
        await self._failed(delivery, attempts, error, give_up=False)

    async def _post(self, hook: WebhookSettings, delivery: WebhookDelivery) -> str | None:
        """One POST; None when the webhook took it (2xx), else why not."""
        body = delivery.body.encode()
        try:
            async with self._client().post(
                hook.url, data=body, headers=headers_for(hook, delivery, body),
                # SECURITY: a redirect is a failure, never followed: the signed body goes only where configured.
                allow_redirects=False, timeout=aiohttp.ClientTimeout(total=hook.timeout),
            ) as response:
                if 200 <= response.status < 300:
                    return None
                if 300 <= response.status < 400:
                    return f"HTTP {response.status} (redirects are not followed)"
                return f"HTTP {response.status}"
        except TimeoutError:
            return f"no answer within {hook.timeout:g} s (the webhook's timeout)"
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}"[:MAX_ERROR]

    async def _failed(self, delivery: WebhookDelivery, attempts: int, error: str, *, give_up: bool) -> None:
        now = self._clock()
        deadline = delivery.created_at + self.retry_for
        retry_at: datetime | None = None
        if not give_up and now < deadline:
            # The last attempt is made at the deadline at the latest.
            retry_at = min(now + timedelta(seconds=backoff(attempts, self.max_backoff, self._rand)), deadline)
        async with self.store.transaction() as tx:
            await tx.webhook_failed(delivery.id, attempts=attempts, error=error[:MAX_ERROR], retry_at=retry_at, at=now)
        result = "failed" if retry_at is not None else "abandoned"
        self._count(delivery.event, result)
        fields = {
            "event": f"webhook_{result}", "webhook_event": delivery.event, "key_id": delivery.key_id,
            "url": origin(delivery.url), "delivery": delivery.id, "attempts": attempts, "error": error[:MAX_ERROR],
        }
        if retry_at is not None:
            fields["retry_in"] = round((retry_at - now).total_seconds(), 3)
            self._log.warning(json.dumps(fields))
        else:
            self._log.error(json.dumps(fields))

    def _count(self, event: str, result: str) -> None:
        self.results[(event, result)] = self.results.get((event, result), 0) + 1

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # trust_env stays off: no proxy settings from the environment reroute signed events.
            self._session = aiohttp.ClientSession()
        return self._session

    def _trouble(self, error: str, *, unexpected: bool = False) -> None:
        """Log the outbox as unreachable once per outage (or new error), not once per poll."""
        if error == self._outage:
            return
        self._outage = error
        fields = json.dumps({"event": "webhook_outbox_unavailable", "error": error})
        if unexpected:
            self._log.exception(fields)
        else:
            self._log.warning(fields)

    # -- lifetime ------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="keygate-webhooks")

    def stop_claiming(self) -> None:
        """No new batch from now on (SIGTERM); a batch in flight goes on until :meth:`close`."""
        self._stopping = True
        if self._task is not None and not self._busy:
            self._task.cancel()  # it was only waiting for the next poll

    async def close(self) -> None:
        """Stop: attempts in flight get :data:`DRAIN_TIMEOUT` seconds, then are cancelled (their rows are
        claimed again when the lease ends, by this process's successor or another)."""
        self.stop_claiming()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=DRAIN_TIMEOUT)
            await stop_task(self._task)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while not self._stopping:
            claimed = 0
            self._busy = True
            try:
                claimed = await self.run_once()
            except StoreError as exc:
                self._trouble(str(exc))
            except Exception as exc:  # the deliverer must outlive any surprise
                self._trouble(f"{type(exc).__name__}: {exc}", unexpected=True)
            else:
                if self._outage is not None:
                    self._log.info(json.dumps({"event": "webhook_outbox_available"}))
                    self._outage = None
            finally:
                self._busy = False
            # A full batch means more may be due: go on at once.
            if claimed < self.batch and not self._stopping:
                await self._sleep(self.poll_interval)
