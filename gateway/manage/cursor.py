"""Opaque page cursors: a few values, as URL-safe text.

Clients pass a cursor back as it was given and must not parse it, so its
form can change. It carries positions only (times, ids, names), never
anything secret, so it needs no signature.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import UTC, datetime

INVALID = "cursor: not a cursor this API returned (pass next_cursor back unchanged)"


def encode_cursor(values: Sequence[str | int]) -> str:
    raw = json.dumps(list(values), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, types: Sequence[type]) -> list[str | int]:
    """The values of ``cursor``, which must be one of ``types`` each; ValueError otherwise."""
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise ValueError(INVALID) from None
    if not isinstance(values, list) or len(values) != len(types) or not all(
        type(value) is wanted for value, wanted in zip(values, types)
    ):
        raise ValueError(INVALID)
    return values


def cursor_time(text: str | int) -> datetime:
    """A time a cursor carries, in UTC; ValueError if it is not one this API wrote."""
    try:
        at = datetime.fromisoformat(str(text))
        if at.tzinfo is None:
            raise ValueError(text)
        return at.astimezone(UTC)  # OverflowError for year 1 or 9999 with an offset
    except (ValueError, OverflowError):
        raise ValueError(INVALID) from None
