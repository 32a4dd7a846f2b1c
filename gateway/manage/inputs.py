"""Validation of the values users give for a key, a role or a member.

Each function checks one value and returns it normalised, or raises
:class:`InvalidField` with a message that names the field, the value and what
is allowed. The service layer (:mod:`gateway.manage.service`) is their one
caller: the CLI and the admin API show its messages as they are.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, date, datetime, time, timedelta

from ..config.ratelimit_spec import InvalidRateLimit, parse_rate_limit


class InvalidField(ValueError):
    """A user-supplied value is not allowed."""


_OPERATION = re.compile(r"[a-z0-9*][a-z0-9:_.*-]{0,63}")
_SERVER = re.compile(r"\*|[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}")
# The names' rule as a JSON Schema pattern, for the admin API's path parameters.
IDENTIFIER_PATTERN = f"^{_IDENT.pattern}$"
_RELATIVE = re.compile(r"(\d{1,5})([hdwy])")
_RELATIVE_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1), "y": timedelta(days=365)}

EXPIRY_FORMS = '"7d", "30d", "90d", "1y" (any N followed by h, d, w or y), "never", or an ISO 8601 date or date-time'


def parse_expiry(text: str, now: datetime) -> datetime | None:
    """The expiry instant for ``text``; ``None`` means never.

    A bare date means midnight UTC at the start of that day; a date-time
    without an offset is UTC.
    """
    value = text.strip()
    if value.lower() == "never":
        return None
    relative = _RELATIVE.fullmatch(value.lower())
    if relative:
        amount = int(relative[1])
        if amount < 1:
            raise InvalidField(f"expires {text!r}: the duration must be at least 1")
        try:
            return now + amount * _RELATIVE_UNITS[relative[2]]
        except OverflowError:
            raise InvalidField(f"expires {text!r}: too far in the future") from None
    try:
        if len(value) == 10:
            at = datetime.combine(date.fromisoformat(value), time(), UTC)
        else:
            at = datetime.fromisoformat(value.replace("z", "Z"))
            at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    except ValueError:
        raise InvalidField(f"expires {text!r}: use {EXPIRY_FORMS}") from None
    except OverflowError:
        raise InvalidField(f"expires {text!r}: too far in the future") from None
    if at <= now:
        raise InvalidField(f"expires {text!r}: that time is already past")
    return at


def operation(text: str) -> str:
    if not isinstance(text, str) or _OPERATION.fullmatch(text) is None:
        raise InvalidField(
            f"operation {text!r}: use lowercase letters, digits and ':_.-', "
            "with '*' as a wildcard (e.g. deploy, servers:read, servers:*, *:read, *)"
        )
    return text


def server(text: str) -> str:
    if not isinstance(text, str) or _SERVER.fullmatch(text) is None:
        raise InvalidField(f"server {text!r}: use '*' or a name of letters, digits and '._-'")
    return text


def cidr(text: str) -> str:
    """A normalised network: ``10.1.2.3/8`` becomes ``10.0.0.0/8``, a bare address a /32 or /128."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except (ValueError, TypeError, AttributeError):
        raise InvalidField(
            f"allow-ip {text!r}: use an IPv4 or IPv6 address or CIDR (e.g. 10.0.0.0/8, 2001:db8::/32)"
        ) from None
    return str(network)


def rate_limit(text: str | None) -> str | None:
    """The canonical spec text, or ``None`` for the configured default."""
    if text is None or text == "":
        return None
    try:
        return str(parse_rate_limit(text))
    except InvalidRateLimit as exc:
        raise InvalidField(f"rate-limit: {exc}") from None


def identifier(field: str, text: str) -> str:
    """A name for an org, user or role."""
    if not isinstance(text, str) or _IDENT.fullmatch(text) is None:
        raise InvalidField(
            f"{field} {text!r}: use 1-128 letters, digits and '._@:+-', starting with a letter or digit"
        )
    return text


def org(text: str) -> str:
    return identifier("org", text)


def user(text: str) -> str:
    return identifier("user", text)


def role(text: str) -> str:
    return identifier("role", text)


def key_name(text: str) -> str:
    value = text.strip() if isinstance(text, str) else ""
    if not value or len(value) > 200 or not value.isprintable():
        raise InvalidField(f"name {text!r}: use 1-200 printable characters")
    return value
