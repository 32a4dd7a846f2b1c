from __future__ import annotations
"""Keygate: an authenticating reverse proxy for API keys."""

__version__ = "0.1.0"
