"""The exact SQLite schema a store file must have before anything of it is read or trusted.

Every table, index and trigger of a store file must be one the runtime itself creates, declared
with the very SQL the runtime gives it (as SQLite stores that SQL, compared byte for byte). A
file whose schema was rewritten reads differently from the store the runtime wrote: a table
renamed `INSTANCES` is still `instances` to SQL yet not to a set of names; a key column
re-declared `COLLATE NOCASE` makes `instance = 'case-1'` find the row of 'CASE-1'; a table
rebuilt `WITHOUT ROWID` with a covering index makes one query read the index and another the
table, which then disagree. Each of those let forged rows pass `audit verify` or reach the
runtime, so both refuse any schema but their own. Objects may be missing (a store written
before a table was added); nothing may be added or declared otherwise.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from functools import cache

from ..ledger import SCHEMA_SQL

__all__ = [
    "RUNTIME_SCHEMA_SQL",
    "SEALED_TABLE_NAMES",
    "UPGRADES",
    "expected_schema",
    "schema_problem",
]

# The runtime's own tables (the ledger's are ledger.SCHEMA_SQL); SQLiteStore creates both.
RUNTIME_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS instances (
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    state TEXT NOT NULL,
    version INTEGER NOT NULL,
    seal BLOB,
    PRIMARY KEY (machine, instance)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS processed_events (
    machine TEXT NOT NULL,
    event_id TEXT NOT NULL,
    instance TEXT NOT NULL,
    result TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    seal BLOB,
    PRIMARY KEY (machine, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS processed_events_age ON processed_events (created_ms);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    machine TEXT NOT NULL,
    key TEXT NOT NULL,
    request_sha256 BLOB NOT NULL,
    result TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    seal BLOB,
    PRIMARY KEY (machine, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_keys_age ON idempotency_keys (created_ms);
CREATE TABLE IF NOT EXISTS timers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    timer_id TEXT NOT NULL,
    state TEXT NOT NULL,
    due_ms INTEGER NOT NULL,
    armed_version INTEGER NOT NULL,
    seal BLOB,
    UNIQUE (machine, instance, timer_id)
);
CREATE INDEX IF NOT EXISTS timers_due ON timers (due_ms, id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    version INTEGER NOT NULL,
    target_machine TEXT NOT NULL,
    target_instance TEXT NOT NULL,
    event TEXT NOT NULL,
    event_id TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    seal BLOB
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (status, kind, id);
CREATE TABLE IF NOT EXISTS outbox_retries (
    id INTEGER PRIMARY KEY,
    attempts INTEGER NOT NULL,
    retry_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    ledger_seq INTEGER NOT NULL,
    entry_hash BLOB NOT NULL,
    kept_seq INTEGER NOT NULL DEFAULT -1,
    PRIMARY KEY (machine, instance)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_by_instance ON ledger (machine, instance, seq);
CREATE INDEX IF NOT EXISTS ledger_by_event ON ledger (machine, event_id) WHERE event_id <> '';
CREATE TABLE IF NOT EXISTS flows (
    flow_id TEXT PRIMARY KEY,
    flow TEXT NOT NULL,
    instance TEXT NOT NULL,
    status TEXT NOT NULL,
    version INTEGER NOT NULL,
    data TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    wake_ms INTEGER,
    seal BLOB
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS flows_unfinished ON flows (status, updated_ms);
CREATE TABLE IF NOT EXISTS breakers (
    machine TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    failures INTEGER NOT NULL,
    opened_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    seal BLOB,
    PRIMARY KEY (machine, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS instance_data (
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (machine, instance)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deadlines (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    governor TEXT NOT NULL,
    due_ms INTEGER NOT NULL,
    level INTEGER NOT NULL,
    action TEXT NOT NULL,
    seal BLOB
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deadlines_due ON deadlines (due_ms, id);
CREATE TABLE IF NOT EXISTS outside_claims (
    machine TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    holder TEXT NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (machine, kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS timer_retries (
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    timer_id TEXT NOT NULL,
    armed_version INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    retry_at_ms INTEGER NOT NULL,
    error TEXT NOT NULL,
    PRIMARY KEY (machine, instance, timer_id, armed_version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runtime_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

Object = tuple[str, str, str, str | None]  # (type, name, tbl_name, sql) of sqlite_master

# Tables as an earlier release declared them, each with the statements that upgrade it in place
# when the runtime opens the file: the old declaration is accepted (a store not yet opened by
# this release), and so is the one the upgrade leaves (SQLite rewrites the stored SQL).
UPGRADES: tuple[tuple[str, str], ...] = (
    # Snapshots before they named the instance's newest kept entry (SQLiteStore adds it).
    (
        """CREATE TABLE snapshots (
    machine TEXT NOT NULL,
    instance TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    ledger_seq INTEGER NOT NULL,
    entry_hash BLOB NOT NULL,
    PRIMARY KEY (machine, instance)
) WITHOUT ROWID""",
        "ALTER TABLE snapshots ADD COLUMN kept_seq INTEGER NOT NULL DEFAULT -1",
    ),
    # The operational tables before their rows carried a seal (runtime/store/row_seals.py):
    # SQLiteStore adds the column, and the runtime seals the rows when it opens the file with
    # its key.
    *(
        (
            statement.replace("    seal BLOB,\n", "").replace(",\n    seal BLOB\n", "\n"),
            f"ALTER TABLE {name} ADD COLUMN seal BLOB",
        )
        for statement, name in (
            (_statement, _statement.split()[5])
            for _statement in RUNTIME_SCHEMA_SQL.split(";")
            if "seal BLOB" in _statement
        )
    ),
)
SEALED_TABLE_NAMES: tuple[str, ...] = tuple(
    statement.split()[5] for statement, _ in UPGRADES if "seal" in _
)


def _objects(execute: Callable[[str], sqlite3.Cursor]) -> set[Object]:
    return {
        (row[0], row[1], row[2], row[3])
        for row in execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
    }


def _created(*scripts: str) -> set[Object]:
    connection = sqlite3.connect(":memory:")
    try:
        for script in scripts:
            connection.executescript(script)
        return _objects(connection.execute)
    finally:
        connection.close()


@cache
def expected_schema() -> frozenset[Object]:
    """Every schema object a store file may hold, as this SQLite library stores it."""
    accepted = _created(SCHEMA_SQL + RUNTIME_SCHEMA_SQL)
    for old, upgrade in UPGRADES:
        accepted |= _created(old) | _created(old, upgrade)
    return frozenset(accepted)


def schema_problem(execute: Callable[[str], sqlite3.Cursor]) -> str | None:
    """What in the file's schema is not the runtime's own (None: nothing), read through
    `execute` (a connection's). sqlite3.Error propagates (not a database, locked)."""
    expected = expected_schema()
    names = {name for _, name, _, _ in expected}
    for kind, name, table, sql in sorted(
        _objects(execute), key=lambda o: tuple(str(part) for part in o)
    ):
        if (kind, name, table, sql) in expected:
            continue
        if type(name) is str and name in names:
            return f"its {kind} {name!r} is declared otherwise than autonomic declares it"
        return f"it holds a {kind} {str(name)!r} that autonomic never creates"
    return None
