"""Key stores: SQLite (embedded default) and PostgreSQL, one interface."""

from __future__ import annotations

from .base import Conflict, KeyStore, StoreError, StoreUnavailable, Transaction, Transactions

__all__ = ["Conflict", "KeyStore", "StoreError", "StoreUnavailable", "Transaction", "Transactions", "create_store"]


def create_store(url: str, **options: float | int) -> KeyStore:
    """The store for ``url`` (``sqlite:///PATH`` or ``postgresql://...``), not yet opened."""
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStore

        return SqliteStore(url)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unsupported store url scheme: {url.split(':', 1)[0]!r}")
