"""Test-only: write a MemoryLedger into an SQLite file laid out as the runtime's store, and
change such a file through SQL (the tamper, ledger and audit CLI tests share these)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from autonomic.runtime.ledger import (
    INSERT_CHECKPOINT_SQL,
    INSERT_ENTRY_SQL,
    META_MODE_KEY,
    SCHEMA_SQL,
    SET_META_SQL,
    Checkpoint,
    LedgerEntry,
    LedgerMode,
    MemoryLedger,
)


def write_sqlite_ledger(path: Path, ledger: MemoryLedger) -> Path:
    return write_sqlite_rows(path, list(ledger.entries()), list(ledger.checkpoints()), ledger.mode)


def write_sqlite_rows(
    path: Path, entries: Sequence[LedgerEntry], checkpoints: Sequence[Checkpoint], mode: LedgerMode
) -> Path:
    with sqlite3.connect(path) as connection:
        connection.executescript(SCHEMA_SQL)
        connection.executemany(INSERT_ENTRY_SQL, entries)
        connection.executemany(INSERT_CHECKPOINT_SQL, [c.as_row() for c in checkpoints])
        connection.execute(SET_META_SQL, (META_MODE_KEY, mode))
    connection.close()
    return path


def run_sql(path: Path, statement: str, *params: object) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute(statement, params)
    connection.close()
