"""Keygate: an authenticating reverse proxy for API keys."""

from __future__ import annotations

__version__ = "0.1.0"
