"""Opening a store by location: an SQLite file path or a `postgresql://` URL, the one
argument every command takes as `--store` (default: the AUTONOMIC_STORE environment variable).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import StoreConfigError
from .urls import is_postgres_url, redact

if TYPE_CHECKING:
    from .base import Store

__all__ = ["STORE_ENV", "is_postgres_url", "open_store", "redact", "store_location"]

STORE_ENV = "AUTONOMIC_STORE"


def store_location(given: str | os.PathLike[str] | None, default: str | None = None) -> str | None:
    """The store to use: the given one, else $AUTONOMIC_STORE, else `default`."""
    if given is not None and os.fspath(given) != "":
        return os.fspath(given)
    return os.environ.get(STORE_ENV) or default


def open_store(
    location: str | os.PathLike[str],
    *,
    partitions: int | None = None,
    lease_ms: int | None = None,
) -> Store:
    """The SQLite store at a path, or the PostgreSQL store at a URL (which needs the
    `postgres` extra: psycopg and psycopg_pool). `partitions` applies to a new PostgreSQL
    store only; `lease_ms` is how long a PostgreSQL worker's claims last."""
    text = os.fspath(location)
    if is_postgres_url(text):
        try:
            from .postgres import PostgresStore
        except ImportError:
            raise StoreConfigError(
                "a postgresql:// store needs psycopg 3 and psycopg_pool",
                hint="pip install 'autonomic[postgres]'",
            ) from None
        if lease_ms is None:
            return PostgresStore(text, partitions=partitions)
        return PostgresStore(text, partitions=partitions, lease_ms=lease_ms)
    from .sqlite import SQLiteStore

    return SQLiteStore(Path(text))
