"""Start-up checks of the wiring."""

from __future__ import annotations

import logging

import pytest

from gateway.app import warn_if_exposed
from gateway.config import Settings


@pytest.mark.parametrize(
    ("proxy", "warned"),
    [
        ({"listen": "0.0.0.0:8000"}, True),
        ({"listen": "[::]:8000"}, True),
        ({"listen": "0.0.0.0:8000", "trusted_proxies": ["10.0.0.0/8"]}, False),
        ({"listen": "127.0.0.1:8000"}, False),
        ({"listen": "[::1]:8000"}, False),
    ],
)
def test_warns_when_exposed_without_trusted_proxies(
    caplog: pytest.LogCaptureFixture, proxy: dict[str, object], warned: bool
) -> None:
    """A listener beyond loopback with no trusted proxies logs a warning at start."""
    with caplog.at_level(logging.WARNING, logger="keygate"):
        warn_if_exposed(Settings.model_validate({"proxy": proxy}))
    assert ("no_trusted_proxies" in caplog.text) is warned
