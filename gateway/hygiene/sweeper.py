"""The hygiene sweeper: every ``hygiene.sweep_interval``, find keys that fell idle or are about to expire.

Each sweep asks the store for candidates (:meth:`idle_keys`,
:meth:`expiring_keys`: cheap reads, in batches) and hands each one to the
service (:meth:`KeyService.announce_idle`, :meth:`KeyService.warn_expiring`),
which re-checks it under its row lock and, in one transaction, records the
event (``key.idle``, ``key.expiring``), audits it and queues its webhook.
Every worker of every replica runs a sweeper: the lock and the re-check make
each event happen once, whoever gets there first.

- ``key.idle``: ``keys.idle_after`` set, the key unused that long (canaries
  never count), once per idle spell; with ``keys.idle_action = "expire"`` the
  key's ``expires_at`` becomes that moment too, through the change feed, so
  every gateway refuses it within a second.
- ``key.expiring``: ``keys.expiry_warning`` before ``expires_at``, once per
  expiry (a new expiry warns again), only for keys made to live longer than
  the warning.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import NamedTuple

from ..config.schema import Settings
from ..manage.audit import utcnow
from ..manage.service import KeyService, Notifier
from ..models import KeyRecord
from ..process.tasks import every, stop_task
from ..store import KeyStore, Transaction

ACTOR = "system:hygiene"
BATCH = 200
# Batches per kind per sweep at most: the rest waits for the next sweep rather than hold this one.
MAX_BATCHES = 25


class Swept(NamedTuple):
    idle: int
    expiring: int


class HygieneSweeper:
    """Runs :meth:`sweep` every ``hygiene.sweep_interval`` seconds (and once at start)."""

    def __init__(
        self, store: KeyStore, settings: Settings, *, clock: Callable[[], datetime] = utcnow,
        notifier: Notifier | None = None, logger: logging.Logger | None = None, batch: int = BATCH,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.interval = settings.hygiene.sweep_interval
        self.batch = batch
        self._service = KeyService(store, settings, actor=ACTOR, clock=clock, notifier=notifier)
        self._log = logger or logging.getLogger("keygate.hygiene")
        self._task: asyncio.Task[None] | None = None
        self.announced_idle = 0
        self.warned_expiring = 0

    @property
    def enabled(self) -> bool:
        k = self.settings.keys
        return k.idle_after > 0 or k.expiry_warning > 0

    async def sweep(self) -> Swept:
        """One look at every key; returns how many events this sweeper sent (others may have sent more)."""
        k = self.settings.keys
        idle = expiring = 0
        if k.idle_after > 0:
            idle = await self._each(
                lambda tx, now: tx.idle_keys(now=now, idle_after=k.idle_after, limit=self.batch),
                self._service.announce_idle)
        if k.expiry_warning > 0:
            expiring = await self._each(
                lambda tx, now: tx.expiring_keys(now=now, warning=k.expiry_warning, limit=self.batch),
                self._service.warn_expiring)
        self.announced_idle += idle
        self.warned_expiring += expiring
        if idle or expiring:
            self._log.info(json.dumps({"event": "hygiene_swept", "idle": idle, "expiring": expiring}))
        return Swept(idle, expiring)

    async def _each(
        self, candidates: Callable[[Transaction, datetime], Awaitable[list[str]]],
        act: Callable[[str], Awaitable[KeyRecord | None]],
    ) -> int:
        done = 0
        for _ in range(MAX_BATCHES):
            async with self.store.read() as tx:
                found = await candidates(tx, self.clock())
            for key_id in found:
                if await act(key_id) is not None:
                    done += 1
            if len(found) < self.batch:
                break
            await asyncio.sleep(0)  # let requests in between batches
        return done

    async def start(self) -> None:
        if self._task is None and self.enabled:
            self._task = asyncio.create_task(self._run(), name="keygate-hygiene-sweeper")

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _run(self) -> None:
        await every(self.interval, self.sweep, self._log, "hygiene_sweep")
