"""Parsers for the sizes, durations and listen addresses people write in settings.

Each returns the value in base units (bytes, seconds, ``(host, port)``) or
raises :class:`ValueError` with a message that says what is allowed.
"""

from __future__ import annotations

import ipaddress
import math
import re

SIZE_FORMS = (
    "use a byte count (e.g. 1048576) or a whole number with a unit: "
    "KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000); 0 = unlimited"
)
DURATION_FORMS = "use a number of seconds (e.g. 30, 1.5) or a number with a unit: ms, s, m, h, d, w or y (e.g. 30s, 5m, 1h, 1d, 1w)"
LISTEN_FORMS = (
    "use HOST:PORT with an IPv4 address, a bracketed IPv6 address or a host name, "
    "and a port 0-65535 (e.g. 127.0.0.1:8000, [::1]:8000, 0.0.0.0:8000, localhost:8000)"
)

_SIZE = re.compile(r"([0-9]+)\s*([kmgt]i?b|b)?", re.IGNORECASE)
_BYTES = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h|d|w|y)?", re.IGNORECASE)
_SECONDS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, "y": 31536000.0}

# Longer durations overflow date arithmetic and mean nothing for keys or timeouts.
MAX_DURATION = 100 * 31536000.0

_PORT = re.compile(r"[0-9]{1,5}")
_HOST_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")


def parse_size(value: str | int) -> int:
    """Bytes for ``"100MiB"``, ``"10MB"``, ``"123"`` or ``123``; ``0`` means unlimited."""
    # bool is an int subclass, but `true` is never a size.
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative; {SIZE_FORMS}")
        return value
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"invalid size {value!r}: {SIZE_FORMS}")
    return int(match[1]) * _BYTES[(match[2] or "b").lower()]


def parse_duration(value: str | int | float) -> float:
    """Seconds for ``30``, ``1.5``, ``"30s"``, ``"5m"``, ``"1h"`` or ``"1d"``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
        if match is None:
            raise ValueError(f"invalid duration {value!r}: {DURATION_FORMS}")
        unit = match[2].lower() if match[2] else None
        seconds = float(match[1]) * _SECONDS[unit]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must be a finite number of seconds, 0 or more")
    if seconds > MAX_DURATION:
        raise ValueError(f"invalid duration {value!r}: at most 100 years")
    return seconds


def parse_listen(value: str) -> tuple[str, int]:
    """``(host, port)`` for ``"127.0.0.1:8000"``, ``"[::1]:8000"`` or ``"localhost:0"``.

    The host is required: listening on every interface should be a visible
    choice (``0.0.0.0``), never what an omitted host silently means. Port 0
    asks the OS for a free port, which tests rely on.
    """
    if not isinstance(value, str):
        raise ValueError(f"invalid listen address {value!r}: {LISTEN_FORMS}")
    host, colon, port = value.strip().rpartition(":")
    if not colon or _PORT.fullmatch(port) is None or int(port) > 65535:
        raise ValueError(f"invalid listen address {value!r}: {LISTEN_FORMS}")
    if not host:
        raise ValueError(
            f"invalid listen address {value!r}: the host is required "
            f"(use 0.0.0.0:{port} to listen on every interface, 127.0.0.1:{port} for this machine only)"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid listen address {value!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"invalid listen address {value!r}: put an IPv6 address in brackets, e.g. [::1]:{port}")
    elif not _is_ipv4(host) and (_HOSTNAME.fullmatch(host) is None or host.replace(".", "").isdigit()):
        raise ValueError(f"invalid listen address {value!r}: {host!r} is not an IP address or host name")
    return host, int(port)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True
