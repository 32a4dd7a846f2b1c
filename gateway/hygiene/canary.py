"""Canary keys: writing the alarm of each use (audit event ``key.canary_used`` and its webhook).

The pipeline refuses a canary key as an unknown key and hands the use to
the recorder (:mod:`gateway.pipeline.canary`); the recorder's batches come
here. Each batch is one transaction: per use an audit event (actor
``client:<address>``, the key as target, the address, method, path and user
agent as details) and the ``key.canary_used`` webhook event queued beside
it, so neither is written without the other. Each use is logged too, as a
warning: the log is where an on-call engineer looks first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from ..config.schema import Settings
from ..models import CanaryUse
from ..store import Transactions
from .events import queue_event

log = logging.getLogger("keygate.hygiene")

ACTION = "key.canary_used"


class CanaryAlarms:
    """The recorder's sink for canary uses."""

    def __init__(self, store: Transactions, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    async def canary_used(self, uses: Sequence[CanaryUse]) -> None:
        async with self.store.transaction() as tx:
            for use in uses:
                details = use.details()
                # The canary's org's admins read the alarm in their org's audit trail.
                await tx.add_audit(at=use.at, actor=f"client:{use.client_ip or 'unknown'}", action=ACTION,
                                   target=use.record.id, details=details, org=use.record.org)
                await queue_event(tx, self.settings, ACTION, use.at, use.record, **details)
        for use in uses:
            log.warning(json.dumps({"event": "canary_key_used", "key_id": use.record.id, **use.details()}))
