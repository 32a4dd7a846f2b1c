"""Validation of the values users give for a key, a role, a member or a trust policy.

Each function checks one value and returns it normalised, or raises
:class:`InvalidField` with a message that names the field, the value and what
is allowed. The service layer (:mod:`gateway.manage.service`) is their one
caller: the CLI and the admin API show its messages as they are.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from collections.abc import Mapping
from typing import Any
from datetime import UTC, date, datetime, time, timedelta
from urllib.parse import urlsplit

from ..config.ratelimit_spec import InvalidRateLimit, parse_new_rate_limit
from ..config.units import parse_duration


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
        return str(parse_new_rate_limit(text))
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


KEY_NAME_MAX = 200


def key_name(text: str) -> str:
    value = text.strip() if isinstance(text, str) else ""
    if not value or len(value) > KEY_NAME_MAX or not value.isprintable():
        raise InvalidField(f"name {text!r}: use 1-{KEY_NAME_MAX} printable characters")
    return value


# -- trust policies ------------------------------------------------------------
def trust_policy(text: str) -> str:
    """A trust policy's name: the rule of role names."""
    return identifier("trust policy", text)


_LOOPBACK_NAMES = {"localhost"}
ISSUER_FORMS = "use an https:// URL (http:// only for a loopback host: 127.0.0.0/8, ::1, localhost)"


def _loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def issuer(text: str) -> str:
    """An OIDC issuer URL, kept exactly as given: tokens name it in ``iss`` and are compared to it exactly."""
    if not isinstance(text, str) or not text or len(text) > 2048 or not text.isprintable() or " " in text:
        raise InvalidField(f"issuer {text!r}: {ISSUER_FORMS}")
    try:
        url = urlsplit(text)
        url.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError:
        raise InvalidField(f"issuer {text!r}: {ISSUER_FORMS}") from None
    if url.scheme not in ("https", "http") or not url.hostname:
        raise InvalidField(f"issuer {text!r}: {ISSUER_FORMS}")
    # SECURITY: keys fetched over plain http could be swapped on the way; a loopback
    # issuer (a test issuer, a local proxy to the API server) never leaves the host.
    if url.scheme == "http" and not _loopback(url.hostname):
        raise InvalidField(f"issuer {text!r}: http:// only for a loopback host (127.0.0.0/8, ::1, localhost); "
                           "use https://")
    if url.username is not None or url.password is not None:
        raise InvalidField(f"issuer {text!r}: no user:password@ in an issuer URL")
    if "?" in text or "#" in text:
        raise InvalidField(f"issuer {text!r}: no query or fragment (an issuer is a base URL)")
    return text


def audience(text: str) -> str:
    """A token's expected ``aud``, compared exactly, so not trimmed: surrounding spaces are refused."""
    if not isinstance(text, str) or not text or len(text) > 512 or not text.isprintable() or text != text.strip():
        raise InvalidField(f"audience {text!r}: use 1-512 printable characters, without surrounding spaces")
    return text


_CLAIM = re.compile(r"\S{1,128}")
_WILDCARDS = set("*?")
# Claims a policy must constrain: without one, every token of the issuer (any repository,
# any service account) would be trusted.
SUBJECT_CLAIMS = ("sub", "repository")
# GitHub's sub names the repository as repo:OWNER/REPO (its default template and its own).
_GITHUB_SUB = "repo:"


def _pins_subject(claim: str, pattern: str) -> bool:
    """Whether ``pattern`` names whose tokens a policy takes: literal text before its first wildcard,
    holding the whole owner when the claim names a GitHub repository (``OWNER/REPO``).

    SECURITY: a glob's ``*`` matches any characters, so ``acme*`` also matches ``acme-evil/app``,
    a repository anyone can create, and ``*/shop`` or ``*:ref:refs/heads/main`` any owner's.
    """
    literal = pattern[:next((i for i, c in enumerate(pattern) if c in _WILDCARDS), len(pattern))]
    if not literal:
        return False
    if claim == "repository" or literal.startswith(_GITHUB_SUB) or _GITHUB_SUB.startswith(literal):
        return "/" in literal
    return True


def condition(claim: str, pattern: str) -> tuple[str, str]:
    """One claim condition: a claim name and the exact value or glob (``*``, ``?``) it must match."""
    if not isinstance(claim, str) or _CLAIM.fullmatch(claim) is None or not claim.isprintable():
        raise InvalidField(f"claim {claim!r}: use a claim name of 1-128 printable characters without spaces")
    if not isinstance(pattern, str) or not pattern or len(pattern) > 1024 or not pattern.isprintable():
        raise InvalidField(f"claim {claim}: pattern {pattern!r}: use 1-1024 printable characters "
                           "('*' and '?' are wildcards)")
    return claim, pattern


def subject_condition(conditions: Mapping[str, str]) -> None:
    """At least one condition on ``sub`` or ``repository`` that names a subject (see :func:`_pins_subject`)."""
    if not any(isinstance(p := conditions.get(claim), str) and _pins_subject(claim, p) for claim in SUBJECT_CLAIMS):
        raise InvalidField(
            "conditions: at least one condition on sub or repository is required that begins with literal "
            "text, not '*' or '?' (for a GitHub repository: the whole owner, as in acme/* or repo:acme/*), "
            "so that a policy never trusts every token of its issuer"
        )


LIFETIME_MIN, LIFETIME_MAX, LIFETIME_DEFAULT = 60, 3600, 900


def lifetime(value: str | int | None) -> int:
    """Seconds a minted key lives: ``"15m"``, ``"1h"``, ``900``; 1 minute to 1 hour, 15 minutes by default."""
    if value is None or value == "":
        return LIFETIME_DEFAULT
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = -1.0
    if not LIFETIME_MIN <= seconds <= LIFETIME_MAX or not seconds.is_integer():
        raise InvalidField(f"lifetime {value!r}: use whole seconds from 1m to 1h (e.g. 15m, 1h, 900)")
    return int(seconds)


JWKS_FILE_MAX_BYTES = 1024 * 1024


def jwks_file(path: str) -> str:
    """An absolute path to a readable JSON Web Key Set (an object with a non-empty ``keys`` array)."""
    if not isinstance(path, str) or not path or not os.path.isabs(path):
        raise InvalidField(f"jwks-file {path!r}: use an absolute path")
    if "\0" in path:
        raise InvalidField(f"jwks-file {path!r}: a path cannot hold a NUL character")
    try:
        # A regular file, checked before it is opened: a FIFO or a device would block or never end.
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidField(f"jwks-file {path!r}: not a regular file")
        if info.st_size > JWKS_FILE_MAX_BYTES:
            raise InvalidField(f"jwks-file {path!r}: larger than 1 MiB")
        with open(path, "rb") as file:
            data = file.read(JWKS_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise InvalidField(f"jwks-file {path!r}: cannot read it: {exc.strerror}") from None
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InvalidField(f"jwks-file {path!r}: not JSON") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(key, dict) for key in keys):
        raise InvalidField(f"jwks-file {path!r}: not a JSON Web Key Set (an object with a non-empty \"keys\" array)")
    return path


def bounded_int(value: Any, name: str, low: int, high: int) -> int:
    """A whole number from ``low`` to ``high`` (allowlist suggestions' --days and --max)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidField(f"{name} {value!r}: use a whole number from {low} to {high}")
    return value
