"""Stage 3, first check — canary: a decoy key is refused exactly as an unknown key is, and its use raises the alarm.

A canary key looks like any key and is stored like one, but it never
authorizes. It is checked right after the lookup, before status, allowlist,
scope and rate limit: any of those could answer differently (403, 429) and
so tell its holder that the key exists. The refusal is ``invalid_token``,
held like every other (:meth:`KeyLookup.delay_refusal`), so its status,
headers, body and timing are an unknown key's.

The alarm (the use: who, from where, what) goes to the recorder's buffer
and is written off the request path with its audit event and webhook
(:mod:`gateway.hygiene.canary`). A revoked or expired canary still raises
it: nobody has a reason to hold a decoy, whatever its state.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

from multidict import CIMultiDictProxy

from ..keys import KeyParser
from ..models import CanaryUse
from ..process.log_format import REQUEST_ID
from .outcomes import Denied, Outcome
from .prepared import PreparedKey

# The most of a path or user agent kept with an alarm: enough to read, not a way to fill the store.
MAX_TEXT: Final = 512

CanaryAlarm = Callable[[CanaryUse], None]


def canary_use(
    key: PreparedKey, parser: KeyParser, client: str | None, method: str, path: str,
    headers: CIMultiDictProxy[str], now: float,
) -> CanaryUse:
    """The use of ``key`` (a canary) by this request, redacted and bounded for the audit trail."""
    agent = headers.get("User-Agent")
    return CanaryUse(
        datetime.fromtimestamp(now, UTC), key.record, client or None, method[:32],
        # SECURITY: a key pasted into the path or the user agent is kept as its id only.
        parser.redact(path)[:MAX_TEXT], _printable(parser.redact(agent[:4 * MAX_TEXT]))[:MAX_TEXT]
        if agent is not None else None,
        REQUEST_ID.get(),  # the alarm is written later, off the request: it names the request itself
    )


def _printable(text: str) -> str:
    # The client chose these characters: every store must hold them (PostgreSQL's jsonb no NUL or lone surrogate).
    return "".join(c if c.isprintable() else "?" for c in text)


def refuse_canary(use: CanaryUse, alarm: CanaryAlarm | None) -> Denied:
    """Raise the alarm (an O(1) append, never a write) and return the refusal: an unknown key's."""
    if alarm is not None:
        alarm(use)
    return Denied(Outcome.INVALID_TOKEN, "canary key used")
