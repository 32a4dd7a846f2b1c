from __future__ import annotations

import pytest

from gateway.config.units import parse_duration, parse_listen, parse_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        ("0", 0),
        (123, 123),
        ("123", 123),
        ("512KiB", 512 * 1024),
        ("100MiB", 100 * 1024**2),
        ("1GiB", 1024**3),
        ("2TiB", 2 * 1024**4),
        ("10MB", 10_000_000),
        ("1KB", 1000),
        ("5GB", 5 * 1000**3),
        ("64B", 64),
        (" 100 MiB ", 100 * 1024**2),
        ("100mib", 100 * 1024**2),
    ],
)
def test_parse_size_accepts(value: str | int, expected: int) -> None:
    """Byte counts, binary (KiB) and SI (KB) units all become bytes."""
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "MiB", "1.5GiB", "-1", -1, "10 XB", "10 MiBs", True, 1.0, None, "1e6"])
def test_parse_size_rejects(value: object) -> None:
    """Anything but a whole, non-negative number with an optional unit is refused, naming the allowed forms."""
    with pytest.raises(ValueError, match="MiB"):
        parse_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (30, 30.0),
        (1.5, 1.5),
        (0, 0.0),
        ("30", 30.0),
        ("1.5", 1.5),
        ("30s", 30.0),
        ("500ms", 0.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        (" 2 M ", 120.0),
    ],
)
def test_parse_duration_accepts(value: str | float, expected: float) -> None:
    """Bare numbers are seconds; ms, s, m, h and d scale them."""
    assert parse_duration(value) == expected


@pytest.mark.parametrize("value", ["", "s", "5x", "101y", "1h30m", "-5", -5, -0.1, float("inf"), float("nan"), True, None])
def test_parse_duration_rejects(value: object) -> None:
    """Unknown units, negative and non-finite durations are refused."""
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:8000", ("::1", 8000)),
        ("[::]:443", ("::", 443)),
        ("localhost:8001", ("localhost", 8001)),
        ("gateway.internal.example:9000", ("gateway.internal.example", 9000)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_parse_listen_accepts(value: str, expected: tuple[str, int]) -> None:
    """IPv4, bracketed IPv6 and host names with a port 0-65535 are accepted."""
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (":8000", "the host is required"),
        ("8000", "use HOST:PORT"),
        ("localhost", "use HOST:PORT"),
        ("localhost:", "use HOST:PORT"),
        ("127.0.0.1:65536", "use HOST:PORT"),
        ("127.0.0.1:-1", "use HOST:PORT"),
        ("127.0.0.1:http", "use HOST:PORT"),
        ("::1:8000", "in brackets"),
        ("[nonsense]:8000", "not an IPv6 address"),
        ("256.1.1.1:80", "not an IP address or host name"),
        ("bad_host:80", "not an IP address or host name"),
        ("-bad.example:80", "not an IP address or host name"),
        (8000, "use HOST:PORT"),
    ],
)
def test_parse_listen_rejects(value: object, message: str) -> None:
    """Missing hosts, bad ports and unbracketed IPv6 are refused with a reason."""
    with pytest.raises(ValueError, match=message):
        parse_listen(value)  # type: ignore[arg-type]
