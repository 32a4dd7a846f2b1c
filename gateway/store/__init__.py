"""Key stores: SQLite (embedded default) and PostgreSQL, one interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Conflict, KeyStore, StoreError, StoreRefused, StoreUnavailable, Transaction, Transactions

if TYPE_CHECKING:
    from ..config.schema import StoreSettings

__all__ = [
    "Conflict", "KeyStore", "StoreError", "StoreRefused", "StoreUnavailable", "Transaction", "Transactions", "configured_store",
    "create_store",
]


def create_store(url: str, **options: float | int) -> KeyStore:
    """The store for ``url`` (``sqlite:///PATH`` or ``postgresql://...``), not yet opened."""
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStore

        return SqliteStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unsupported store url scheme: {url.split(':', 1)[0]!r}")


def configured_store(settings: StoreSettings) -> KeyStore:
    """The store the ``store`` settings name, not yet opened (the pool settings are PostgreSQL's)."""
    if settings.url.startswith("sqlite:"):
        return create_store(settings.url)
    return create_store(settings.url, min_size=settings.pool_min_size, max_size=settings.pool_max_size,
                        connect_timeout=settings.connect_timeout)
