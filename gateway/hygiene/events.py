"""Key events for webhooks: the body each one is sent with, queued in the store's outbox.

An event is queued in the same transaction as the change (and audit record)
it announces, one outbox row per webhook that asked for it, so an event is
never sent for a change that did not commit, and never lost once it did:
the serve process delivers the outbox (:mod:`.webhooks`), across restarts.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from ..config.schema import Settings, WebhookSettings
from ..models import KeyRecord, iso


class Outbox(Protocol):
    async def enqueue_webhook(self, *, url: str, event: str, key_id: str, body: str, at: datetime) -> None: ...


def event_body(event: str, at: datetime, record: KeyRecord, *, idle_after: float = 0, **details: Any) -> str:
    """The JSON body: a unique event id (receivers drop repeats: delivery is at least once), the
    event, its time, the key's id and public record, and the event's details."""
    return json.dumps({
        "id": uuid.uuid4().hex,
        "event": event,
        "time": iso(at),
        "key_id": record.id,
        "key": record.public(at, idle_after),
        "details": details,
    }, sort_keys=True, separators=(",", ":"))


def subscribers(webhooks: Sequence[WebhookSettings], event: str) -> list[str]:
    """The URLs of the webhooks that asked for ``event`` (each once)."""
    return list(dict.fromkeys(hook.url for hook in webhooks if event in hook.events))


async def queue_event(
    outbox: Outbox, settings: Settings, event: str, at: datetime, record: KeyRecord, **details: Any,
) -> None:
    """Queue ``event`` about ``record`` for every webhook that asked for it (nothing when none did)."""
    urls = subscribers(settings.webhooks, event)
    if not urls:
        return
    body = event_body(event, at, record, idle_after=settings.keys.idle_after, **details)
    for url in urls:
        await outbox.enqueue_webhook(url=url, event=event, key_id=record.id, body=body, at=at)
