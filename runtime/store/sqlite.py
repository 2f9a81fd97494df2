"""The SQLite store: the embedded default, one file, safe for several threads and processes.

Durability: WAL journal with `synchronous=FULL` by default, so a commit is on disk before
`run` returns (and before any dispatch is acknowledged). `synchronous="NORMAL"` skips the
fsync of each commit: a process crash (kill -9) still loses nothing, but a power loss or OS
crash can lose the last commits (the file stays consistent). Choose it only when the events
can be replayed from their source.

Concurrency: every batch runs in `BEGIN IMMEDIATE`, which takes the database's write lock
(waiting up to `busy_timeout_ms`), so processes on one file serialize their writes; the state
row is still written with `UPDATE ... WHERE version = ?`, so a lost update cannot happen even
if a caller bypassed the lock. Within a process a lock serializes use of the connection.

Opening: the file is first inspected read-only. A missing or empty file is initialised and
marked as a store (a `runtime_meta` format row and schema version, and SQLite's
`application_id`); a store so marked is reopened; anything else is refused, unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from ..errors import (
    ConcurrentUpdateDetected,
    InstanceExists,
    NestedDispatch,
    StoreConfigError,
    StoreIntegrityError,
)
from ..ledger import (
    INSERT_CHECKPOINT_SQL,
    INSERT_ENTRY_SQL,
    KEPT,
    LEDGER_COLUMNS,
    META_MODE_KEY,
    MODES,
    SCHEMA_SQL,
    SELECT_CHECKPOINTS_SQL,
    SET_META_SQL,
    SMALLEST_DATABASE,
    Checkpoint,
    LedgerEntry,
    LedgerMode,
)
from ..resilience.backoff import RETRY_LATER_CAP_MS
from ..timers import ArmedTimer
from .base import (
    BreakerRecord,
    ClaimKey,
    DeadlineRecord,
    FlowRecord,
    InstanceRecord,
    OutboxKind,
    OutboxMessage,
    OutboxRow,
    OutboxStatus,
    Snapshot,
    Transaction,
    WorkOutcome,
    idempotency_event_id,
    outbox_row,
    with_retry,
)
from .row_seals import (
    OUTBOX_WITH_RETRY,
    SEALED_MARK,
    SEALED_SELECT,
    SEALED_TABLES,
    Fetched,
    LedgerAnchor,
    RowSeals,
    outbox_values,
    refuse_unsealed_rows,
    seal_every_row,
)
from .sqlite_schema import RUNTIME_SCHEMA_SQL, SEALED_TABLE_NAMES, schema_problem

__all__ = ["RUNTIME_SCHEMA_SQL", "SQLiteStore", "Synchronous"]

T = TypeVar("T")
Synchronous = Literal["FULL", "NORMAL"]

SCHEMA_VERSION = "1"

_ENTRY_COLUMNS = ", ".join(LEDGER_COLUMNS)


def _inserts(table: str) -> tuple[str, str, str]:
    """A table's INSERT of a row without its id and seal, INSERT of a row with both, and the
    UPDATE that seals a row by its id."""
    columns = SEALED_TABLES[table][1:]  # after the id
    marks = ", ".join("?" for _ in columns)
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
        f"INSERT INTO {table} (id, {', '.join(columns)}, seal) VALUES (?, {marks}, ?)",
        f"UPDATE {table} SET seal = ? WHERE id = ?",
    )


_INSERTS = {table: _inserts(table) for table in ("outbox", "timers")}
# The outbox insert with the id, of rows without an error: its NULL in the statement.
_OUTBOX_WITHOUT_ERROR = (
    f"INSERT INTO outbox ({', '.join(SEALED_TABLES['outbox'])}, seal) "
    f"VALUES ({', '.join('?' * (len(SEALED_TABLES['outbox']) - 1))}, NULL, ?)"
)
_TIMER_READ = SEALED_SELECT["timers"]
# A timer (alias t) whose failed firing is tried again after the first parameter; a retry time
# past the second (now + RETRY_LATER_CAP_MS) was written by no backoff, and holds nothing back.
_RETRYING = (
    "EXISTS (SELECT 1 FROM timer_retries r WHERE r.machine = t.machine "
    "AND r.instance = t.instance AND r.timer_id = t.timer_id "
    "AND r.armed_version = t.armed_version AND r.retry_at_ms > ? AND r.retry_at_ms <= ?)"
)
_TIMER_RETRY_KEY = "machine = ? AND instance = ? AND timer_id = ? AND armed_version = ?"


_SAVE_MARK = "INSERT OR REPLACE INTO runtime_meta (key, value) VALUES (?, ?)"
_OUTBOX_READ = SEALED_SELECT["outbox"]
# A message not to deliver at `due` (the parameter, twice): it, or an earlier pending message
# to the same target instance, waits for a retry after it. The retry is not sealed: one more
# than RETRY_LATER_CAP_MS ahead is no backoff's (a forged row) and is ignored.
_OUTBOX_HELD_BACK = (
    "EXISTS (SELECT 1 FROM outbox_retries w JOIN outbox e ON e.id = w.id "
    "WHERE w.id <= o.id AND w.retry_at_ms > ? AND w.retry_at_ms <= ? + "
    f"{RETRY_LATER_CAP_MS} AND e.status = 'pending' "
    "AND e.target_machine = o.target_machine AND e.target_instance = o.target_instance)"
)
_PROCESSED_SQL = (
    f"SELECT {SEALED_SELECT['processed_events']} FROM processed_events "
    "WHERE machine = ? AND event_id = ?"
)
# The processed row and, in the same statement, the probe of a missing one: the newest
# "transition" entry of the event id (row_seals.LedgerAnchor), one read, not two.
_PROCESSED_OR_ENTRY_SQL = (
    f"SELECT 0, {SEALED_SELECT['processed_events']} FROM processed_events "
    "WHERE machine = ?1 AND event_id = ?2 UNION ALL "
    "SELECT 1, seq, ts_ms, NULL, NULL, NULL, NULL FROM (SELECT seq, ts_ms FROM ledger "
    "WHERE machine = ?1 AND event_id = ?2 AND event_id <> '' AND kind = 'transition' "
    "ORDER BY seq DESC LIMIT 1)"
)
# A dispatch's first read, in one statement: the above (without a row key, the processed row
# alone) and the instance's row, tagged 2 (SQLiteTransaction.processed_and_instance).
_INSTANCE_BESIDE = (
    " UNION ALL SELECT 2, machine, instance, state, version, seal, NULL FROM instances "
    "WHERE machine = ?1 AND instance = ?3"
)
_PROCESSED_OR_ENTRY_AND_INSTANCE_SQL = _PROCESSED_OR_ENTRY_SQL + _INSTANCE_BESIDE
_PROCESSED_AND_INSTANCE_SQL = (
    f"SELECT 0, {SEALED_SELECT['processed_events']} FROM processed_events "
    "WHERE machine = ?1 AND event_id = ?2" + _INSTANCE_BESIDE
)
_IDEMPOTENCY_SQL = (
    f"SELECT {SEALED_SELECT['idempotency_keys']} FROM idempotency_keys "
    "WHERE machine = ? AND key = ?"
)
_FLOW_READ = SEALED_SELECT["flows"]
_BREAKER_READ = SEALED_SELECT["breakers"]
_DEADLINE_READ = SEALED_SELECT["deadlines"]
_PAGE = 1000
_new_entry = cast(Callable[[type[LedgerEntry], tuple[Any, ...]], LedgerEntry], tuple.__new__)


# A unit's outcome, its slots set directly: `run` builds one per unit of every commit, and
# the frozen dataclass __init__ (an object.__setattr__ call per field) costs twice as much.
_set_outcome_value = getattr(WorkOutcome, "value").__set__  # noqa: B009
_set_outcome_error = getattr(WorkOutcome, "error").__set__  # noqa: B009


def _succeeded(value: T) -> WorkOutcome[T]:
    """WorkOutcome(value, None)."""
    outcome: WorkOutcome[T] = object.__new__(WorkOutcome)
    _set_outcome_value(outcome, value)
    _set_outcome_error(outcome, None)
    return outcome


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    return _new_entry(LedgerEntry, row)


# Taking a claim's row: free, its lease run out, the holder's own, or a lease no runtime
# granted (beyond this runtime's lease, or not an integer): a row written outside it, until
# 2**62 say, would hold the key for ever.
_CLAIM_SQL = (
    "INSERT INTO outside_claims (machine, kind, key, holder, until_ms) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (machine, kind, key) DO UPDATE SET holder = excluded.holder, "
    "until_ms = excluded.until_ms WHERE outside_claims.holder = excluded.holder "
    "OR typeof(outside_claims.until_ms) <> 'integer' "
    "OR NOT (outside_claims.until_ms > ? AND outside_claims.until_ms <= ?)"
)


_RELEASE_ONE_SQL = (
    "DELETE FROM outside_claims WHERE holder = ? AND machine = ? AND kind = ? AND key = ?"
)


def _release_claims(
    keys: Sequence[ClaimKey], holder: str
) -> tuple[str, tuple[str, ...] | list[str]]:
    """The statement that drops `holder`'s claims on `keys`, and its parameters."""
    if len(keys) == 1:  # a dispatch's one key: by the primary key, no list of keys to build
        return _RELEASE_ONE_SQL, (holder, *keys[0])
    marks = ", ".join("(?, ?, ?)" for _ in keys)
    return (
        f"DELETE FROM outside_claims WHERE holder = ? AND (machine, kind, key) IN (VALUES {marks})",
        [holder, *(part for key in keys for part in key)],
    )


# ---------------------------------------------------------------------------------------------
# Recognising a store before anything is written: a file is initialised only if it holds
# nothing, and opened only if it carries the marks written at its creation.

STORE_FORMAT = "autonomic-store"  # runtime_meta 'format', beside 'schema' (SCHEMA_VERSION)
# PRAGMA application_id, "AuTo" in ASCII: the header field SQLite reserves for naming the
# program a database belongs to (`file` prints it).
APPLICATION_ID = 0x4175546F
STORE_HINT = "pass a new file, or a store written by the autonomic runtime"


def _not_ours(path: Path, why: str) -> StoreConfigError:
    return StoreConfigError(f"{path} {why}; it was left untouched", hint=STORE_HINT)


def _empty_or_ours(execute: Callable[..., sqlite3.Cursor], path: Path) -> bool:
    """True for a database with nothing in it (to be initialised), False for an autonomic
    store of this schema version; StoreConfigError for anything else. Only reads."""
    objects = execute("SELECT type, name FROM sqlite_master").fetchall()
    application_id = int(execute("PRAGMA application_id").fetchone()[0])
    user_version = int(execute("PRAGMA user_version").fetchone()[0])
    if not objects:
        if application_id or user_version:
            raise _not_ours(
                path,
                "is an empty SQLite database marked by another program "
                f"(application_id {application_id}, user_version {user_version})",
            )
        return True
    tables = sorted(name for kind, name in objects if kind == "table")
    if not {"runtime_meta", "ledger_meta"} <= set(tables):
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise _not_ours(path, f"is an SQLite database of something else (tables: {shown})")
    marks = dict(execute("SELECT key, value FROM runtime_meta WHERE key IN ('format', 'schema')"))
    if marks.get("format") != STORE_FORMAT or application_id != APPLICATION_ID:
        raise _not_ours(
            path, "has runtime_meta and ledger_meta tables but not the autonomic store's marks"
        )
    if marks.get("schema") != SCHEMA_VERSION:
        raise StoreConfigError(
            f"{path}: store schema version {marks.get('schema')} is not {SCHEMA_VERSION}; "
            "it was left untouched",
            hint="open it with the version of autonomic that wrote it",
        )
    problem = schema_problem(execute)
    if problem is not None:
        # Rewritten declarations make the runtime's reads find other rows (sqlite_schema.py).
        raise _not_ours(path, f"is an autonomic store whose schema was altered: {problem}")
    return False


def _refuse_unless_empty_or_ours(path: Path, busy_timeout_ms: int) -> None:
    """Raise StoreConfigError unless `path` is missing, empty or an autonomic store, deciding
    by reading it read-only: no journal mode switch, no table, no sidecar file.

    The file is read only through SQLite, never through a descriptor of our own: closing any
    descriptor of a file drops every POSIX lock the process holds on it, SQLite's included.
    A connection of this process left without its lock could then have the WAL checkpointed
    and deleted under it by another process closing the database, and its next commits,
    acknowledged, would go to a deleted file (tests/test_crash.py shows it)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreConfigError(f"{path}: cannot be read: {exc.strerror}", hint=STORE_HINT) from None
    if not stat.S_ISREG(info.st_mode):  # SQLite would put its -wal file beside a device
        raise _not_ours(path, "is not a regular file")
    if not info.st_size:
        return
    if info.st_size < SMALLEST_DATABASE:
        # SQLite reads a file shorter than a page as an empty database, and would write over it.
        raise _not_ours(path, "is not a usable SQLite store: it is not an SQLite database")
    sidecars = [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal")]
    # Nobody has it open: read the file as it is, without locks, since even a read-only
    # connection to a WAL database creates the -wal and -shm files and leaves them there.
    quiet = not any(s.exists() for s in sidecars)
    reread = False
    give_up = time.monotonic() + busy_timeout_ms / 1000
    try:
        while True:
            try:
                _inspect(path, busy_timeout_ms, immutable=quiet)
                return
            except (sqlite3.Error, StoreConfigError) as exc:
                if quiet and any(s.exists() for s in sidecars):
                    # Opened meanwhile: the unlocked read of the main file alone may have
                    # met a store being created or checkpointed. Read it again, with locks.
                    quiet = False
                    continue
                if quiet and not reread:
                    # Or it was, and closed again (its -wal and -shm files gone) between that
                    # read and this look: the file is whole now, so one more unlocked read
                    # decides (a foreign file is refused the same way twice, untouched).
                    reread = True
                    continue
                if not isinstance(exc, sqlite3.Error) or not _busy(exc):
                    raise
                if time.monotonic() >= give_up:
                    raise
                # Another process holds the file while it creates or converts it (SQLite
                # answers some of those moments with "locked" at once, whatever the busy
                # timeout): it is in use, so ask again until the timeout.
                time.sleep(0.005)
    except sqlite3.Error as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_NOTADB:
            raise _not_ours(
                path, "is not a usable SQLite store: it is not an SQLite database"
            ) from None
        raise _not_ours(path, f"is not a usable SQLite store: {exc}") from None


def _busy(exc: sqlite3.Error) -> bool:
    """Another connection holds the file (SQLITE_BUSY or SQLITE_LOCKED, any extended code)."""
    return exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _inspect(path: Path, busy_timeout_ms: int, *, immutable: bool) -> None:
    """`_empty_or_ours` on a read-only connection of its own; sqlite3.Error if unreadable."""
    uri = path.resolve().as_uri() + "?mode=ro" + ("&immutable=1" if immutable else "")
    try:
        reader = sqlite3.connect(
            uri, uri=True, isolation_level=None, timeout=busy_timeout_ms / 1000
        )
    except sqlite3.Error as exc:
        raise StoreConfigError(
            f"{path}: cannot open SQLite database: {exc}", hint=STORE_HINT
        ) from None
    try:
        # One read transaction: the tables and the header's marks of one moment. Read one
        # statement at a time, a store another process creates could commit between them,
        # and its marks would come without its tables: "an empty database marked by another
        # program" (tests/test_store_sqlite.py, eight processes opening one new file).
        reader.execute("BEGIN")
        _empty_or_ours(reader.execute, path)
    finally:
        reader.close()


# Keys of SQLiteTransaction._seen: the ledger head; (the table, its row's key) of an instance
# row, a dedup miss, a claim's holder; the next id of outbox and timers.
_HEAD = ("ledger",)
_NEXT_ID = {"outbox": ("next", "outbox"), "timers": ("next", "timers")}
_SEEN_MOST = 4096  # rows kept at most: one per instance or event a long run would keep them all


class SQLiteTransaction:
    """The statements of one unit of work, on the store's connection inside its transaction.

    Rows this connection has read or written are kept (`_seen`) while no other connection
    commits, so that a transaction does not read again what is known: the ledger head a
    batch chains on, an instance row or dedup miss a dispatch's look before its transaction
    read (preflight.py), a claim this runtime wrote, the next outbox and timers ids. Only a
    transaction holding the write lock takes them (`begin`), after SQLite's data_version
    says no other connection committed since the last transaction began (it changes with
    every commit of another connection, never with this one's); reads outside a transaction
    only add to them. Every write here updates or drops what it changes; a rollback, a purge
    or a reseal forgets everything, and so does a transaction that finds more than
    `_SEEN_MOST` rows kept.

    A unit's ledger entries are inserted together, in one executemany at the end of the unit
    (`flush`), or before a statement that reads the ledger: no read misses one."""

    __slots__ = (
        "_anchor",
        "_control",
        "_entries",
        "_execute",
        "_executemany",
        "_inside",
        "_read",
        "_seals",
        "_seen",
        "_version",
        "_write",
        "_write_many",
    )

    def __init__(self, connection: sqlite3.Connection, seals: RowSeals) -> None:
        self._execute = connection.execute
        self._executemany = connection.executemany
        # The transaction's own statements (BEGIN, data_version, savepoints, COMMIT) go
        # through one cursor kept for them: `connection.execute` makes a cursor per statement.
        # They read at most one row, fetched at once, so none is left half-read.
        self._control = connection.cursor().execute
        # So do a unit's writes, which read no row (only a rowcount or lastrowid, at once), and
        # the reads of a row by its key (or of a dispatch's rows), all fetched at once.
        writer = connection.cursor()
        self._write = writer.execute
        self._write_many = writer.executemany
        self._read = connection.cursor().execute
        self._seen: dict[tuple[str, ...], Any] = {}
        self._version: int | None = None  # the data_version `_seen` is current at
        self._inside = False  # in a write transaction, `begin` done
        self._entries: list[LedgerEntry] = []  # appended, not inserted yet
        # Every row of a sealed table is sealed as written and checked as read (row_seals.py).
        self._seals = seals
        # A missing dedup row is checked against the ledger (row_seals.LedgerAnchor).
        # `seq DESC` walks the index backwards (its rowid is the seq): no sort.
        self._anchor = LedgerAnchor(seals, "?", "runtime_meta", _SAVE_MARK, "seq DESC")

    def begin(self) -> None:
        """Just after BEGIN IMMEDIATE (the write lock held): keep what is known unless another
        connection committed since the last transaction began."""
        version = self._control("PRAGMA data_version").fetchone()[0]
        if version != self._version or len(self._seen) > _SEEN_MOST:
            self._seen.clear()
            self._version = version
        self._inside = True

    def end(self, *, committed: bool) -> None:
        """After COMMIT, or ROLLBACK (whose undone writes may be among what is known)."""
        self._inside = False
        if not committed:
            self.discard()

    def forget(self) -> None:
        """Rows changed in bulk (purge, reseal)."""
        self._seen.clear()

    def discard(self) -> None:
        """The unit's writes are rolled back (to its savepoint): its entries not inserted yet
        go with them, and what is known may hold some of them."""
        self._entries = []
        self._seen.clear()

    def flush(self) -> None:
        """Insert the ledger entries appended since the last flush."""
        entries = self._entries
        if entries:
            self._entries = []
            # Plain tuples, the digests and the signature in bytearrays: sqlite3 binds those as
            # they are, where it reads a named tuple's fields through __getitem__ and looks up
            # an adapter for each bytes value first (19 thousand instructions of the 60 a row's
            # insert takes). The same blobs are stored.
            rows = [
                (
                    seq,
                    ts_ms,
                    kind,
                    machine,
                    instance,
                    from_state,
                    to_state,
                    event,
                    actor,
                    event_id,
                    bytearray(payload_sha256),
                    bytearray(prev_hash),
                    bytearray(entry_hash),
                    key_id,
                    bytearray(signature),
                )
                for (
                    seq,
                    ts_ms,
                    kind,
                    machine,
                    instance,
                    from_state,
                    to_state,
                    event,
                    actor,
                    event_id,
                    payload_sha256,
                    prev_hash,
                    entry_hash,
                    key_id,
                    signature,
                ) in entries
            ]
            if len(rows) == 1:
                self._write(INSERT_ENTRY_SQL, rows[0])
            else:
                self._write_many(INSERT_ENTRY_SQL, rows)

    def instance(self, machine: str, instance: str) -> InstanceRecord | None:
        key = ("instances", machine, instance)
        if self._inside:
            known = self._seen.get(key)
            if known is not None:
                return cast(InstanceRecord, known)
        row = self._read(
            "SELECT machine, instance, state, version, seal FROM instances "
            "WHERE machine = ? AND instance = ?",
            (machine, instance),
        ).fetchone()
        if row is None:
            return None
        record = self._seals.instance(row)
        self._seen[key] = record
        return record

    def insert_instance(self, record: InstanceRecord) -> None:
        row = (record.machine, record.instance, record.state, record.version)
        try:
            self._write(
                "INSERT INTO instances (machine, instance, state, version, seal) "
                "VALUES (?, ?, ?, ?, ?)",
                (*row, self._seals.blob("instances", row)),
            )
        except sqlite3.IntegrityError:
            raise InstanceExists(record.machine, record.instance) from None
        self._seen.pop(("instances", record.machine, record.instance), None)

    def update_instance(
        self, machine: str, instance: str, state: str, version: int, expected_version: int
    ) -> None:
        seal = self._seals.blob("instances", (machine, instance, state, version))
        cursor = self._write(
            "UPDATE instances SET state = ?, version = ?, seal = ? "
            "WHERE machine = ? AND instance = ? AND version = ?",
            (state, version, seal, machine, instance, expected_version),
        )
        if cursor.rowcount != 1:
            row = self._execute(
                "SELECT version FROM instances WHERE machine = ? AND instance = ?",
                (machine, instance),
            ).fetchone()
            actual = -1 if row is None else int(row[0])
            raise ConcurrentUpdateDetected(machine, instance, expected_version, actual)
        if type(state) is str and type(version) is int:  # as a read would decode them
            self._seen[("instances", machine, instance)] = InstanceRecord(
                machine, instance, state, version
            )
        else:
            self._seen.pop(("instances", machine, instance), None)

    def ledger_head(self) -> LedgerEntry | None:
        if self._inside:
            known = self._seen.get(_HEAD)
            if known is not None:
                return cast(LedgerEntry, known)
        self.flush()
        row = self._read(
            f"SELECT {_ENTRY_COLUMNS} FROM ledger ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        head = self._seen[_HEAD] = _entry(row)
        return head

    def last_checkpoint(self) -> Checkpoint | None:
        row = self._execute(SELECT_CHECKPOINTS_SQL + " DESC LIMIT 1").fetchone()
        return None if row is None else Checkpoint(*row)

    def append_ledger(self, entry: LedgerEntry) -> None:
        self._entries.append(entry)
        seen = self._seen
        seen[_HEAD] = entry
        if entry.kind == "transition":  # a dispatch's: the miss of its event id is over
            seen.pop(("processed_events", entry.machine, entry.event_id), None)

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        size, head_hash, ts_ms, key_id, signature, root, previous, frontier = checkpoint.as_row()
        # Its hashes, signature and frontier in bytearrays, which sqlite3 binds as they are
        # (for bytes it looks for an adapter first, as for a ledger row: see `flush`).
        row = (
            size,
            bytearray(head_hash),
            ts_ms,
            key_id,
            bytearray(signature),
            bytearray(root),
            bytearray(previous),
            bytearray(frontier),
        )
        self._write(INSERT_CHECKPOINT_SQL, row)

    def processed(self, machine: str, event_id: str) -> str | None:
        key = ("processed_events", machine, event_id)
        if self._inside and key in self._seen:
            return None  # known missing, its ledger probe done
        self._flush_dispatch(event_id)
        if self._seals.key is None:  # no row key: nothing to probe
            row = self._execute(_PROCESSED_SQL, (machine, event_id)).fetchone()
        else:
            found = self._execute(_PROCESSED_OR_ENTRY_SQL, (machine, event_id)).fetchall()
            row = self._processed_row(sorted(found), machine, event_id)
        if row is None:
            self._seen[key] = None
            return None
        return str(self._seals.stored_result("processed_events", row)[3])

    def processed_and_instance(
        self, machine: str, event_id: str, instance: str
    ) -> tuple[str | None, InstanceRecord | None]:
        """`processed` and `instance` in one statement, unless either is known already."""
        key = ("processed_events", machine, event_id)
        at = ("instances", machine, instance)
        seen = self._seen
        if self._inside and (key in seen or at in seen):
            stored = self.processed(machine, event_id)
            if stored is not None:
                return stored, None
            return None, self.instance(machine, instance)
        self._flush_dispatch(event_id)
        sql = (
            _PROCESSED_AND_INSTANCE_SQL
            if self._seals.key is None
            else _PROCESSED_OR_ENTRY_AND_INSTANCE_SQL
        )
        # Tagged 0 (the processed row), 1 (its ledger probe), 2 (the instance): in that order.
        found = sorted(self._read(sql, (machine, event_id, instance)).fetchall())
        last = found.pop() if found and found[-1][0] == 2 else None
        row = self._processed_row(found, machine, event_id)
        if row is not None:
            return str(self._seals.stored_result("processed_events", row)[3]), None
        seen[key] = None
        if last is None:
            return None, None
        record = self._seals.instance(last[1:6])
        seen[at] = record
        return None, record

    def _flush_dispatch(self, event_id: str) -> None:
        """Insert the appended entries if one is this event id's dispatch: only such an
        entry changes what the probe of a miss finds."""
        for entry in self._entries:
            if entry.event_id == event_id and entry.kind == "transition":
                self.flush()
                break

    def _processed_row(self, found: list[Any], machine: str, event_id: str) -> Any:
        """The processed row from `found`, the sorted rows of _PROCESSED_OR_ENTRY_SQL, which
        holds the probe of a missing one (LedgerAnchor.dedup_row's first two reads; without
        a row key, of _PROCESSED_AND_INSTANCE_SQL: no probe); when the ledger records the
        event's dispatch and no row is there, LedgerAnchor's reads decide (the row committed
        meanwhile by another process, or deleted: refused)."""
        if not found:
            return None  # never dispatched
        first = found[0]
        if first[0] == 0:
            return first[1:]
        execute = self._execute
        if first[2] < self._anchor.horizon(execute):
            return None  # purged with its retention
        return self._anchor.dedup_row(
            execute, _PROCESSED_SQL, "processed_events", machine, event_id, event_id
        )

    def record_processed(
        self, machine: str, event_id: str, instance: str, result: str, now_ms: int
    ) -> None:
        row = (machine, event_id, instance, result, now_ms)
        self._write(
            "INSERT INTO processed_events (machine, event_id, instance, result, created_ms, "
            "seal) VALUES (?, ?, ?, ?, ?, ?)",
            (*row, self._seals.blob("processed_events", row)),
        )
        self._seen.pop(("processed_events", machine, event_id), None)

    def idempotency(self, machine: str, key: str) -> tuple[bytes, str] | None:
        event_id = idempotency_event_id(machine, key)
        self.flush()
        row = self._anchor.dedup_row(
            self._execute, _IDEMPOTENCY_SQL, "idempotency_keys", machine, key, event_id
        )
        if row is None:
            return None
        values = self._seals.stored_result("idempotency_keys", row)
        return values[2], values[3]

    def record_idempotency(
        self, machine: str, key: str, request_digest: bytes, result: str, now_ms: int
    ) -> None:
        row = (machine, key, bytes(request_digest), result, now_ms)
        self._write(
            "INSERT INTO idempotency_keys (machine, key, request_sha256, result, created_ms, "
            "seal) VALUES (?, ?, ?, ?, ?, ?)",
            (*row, self._seals.blob("idempotency_keys", row)),
        )

    def _insert_sealed(self, table: str, rows: Sequence[tuple[object, ...]]) -> None:
        """Insert rows of outbox or timers, whose ids are AUTOINCREMENT's, each with its seal,
        which covers the id. Once this connection has inserted into the table, the next id is
        known (`_seen`: no other connection committed since, and the transaction holds the
        write lock), and every row goes in with its id and seal in one executemany. Else the
        first row's id is SQLite's, and its seal is written by an UPDATE after it; the others
        take the ids after it, which are free (AUTOINCREMENT gives an id above every id ever
        given), with their seals in one executemany."""
        insert, insert_with_id, update = _INSERTS[table]
        seal = self._seals.blob
        seen = self._seen
        known = _NEXT_ID[table]
        first = seen.get(known) if self._inside else None
        if first is None:
            first = self._write(insert, rows[0]).lastrowid
            assert first is not None
            sealed = seal(table, (first, *rows[0]))
            if sealed is not None:
                self._write(update, (sealed, first))
            done = 1
        else:
            done = 0
        if len(rows) > done:
            following = [(first + n, *rows[n]) for n in range(done, len(rows))]
            if table == "outbox" and not any(row[-1] is not None for row in following):
                # New messages have no error (outbox_row): its NULL is in the statement, not
                # bound (sqlite3 binds None only after looking for an adapter, as for bytes).
                self._write_many(
                    _OUTBOX_WITHOUT_ERROR, [(*row[:-1], seal(table, row)) for row in following]
                )
            else:
                self._write_many(insert_with_id, [(*row, seal(table, row)) for row in following])
        seen[known] = first + len(rows)

    def _outbox_row(self, message_id: int) -> OutboxMessage | None:
        row = self._execute(
            f"SELECT {_OUTBOX_READ} FROM outbox WHERE id = ?", (message_id,)
        ).fetchone()
        return None if row is None else self._seals.message(row)

    def _rewrite_outbox(self, message: OutboxMessage) -> None:
        seal = self._seals.blob("outbox", outbox_values(message))
        self._execute(
            "UPDATE outbox SET body = ?, status = ?, error = ?, seal = ? WHERE id = ?",
            (message.body, message.status, message.error, seal, message.id),
        )

    def cancel_timers(
        self, machine: str, instance: str, keep: Collection[str] = frozenset()
    ) -> None:
        if not keep:
            self._execute(
                "DELETE FROM timers WHERE machine = ? AND instance = ?", (machine, instance)
            )
            return
        kept = sorted(keep)
        self._execute(
            "DELETE FROM timers WHERE machine = ? AND instance = ? "
            f"AND timer_id NOT IN ({', '.join('?' * len(kept))})",
            (machine, instance, *kept),
        )

    def arm_timers(self, timers: Sequence[ArmedTimer]) -> None:
        if timers:
            self._insert_sealed(
                "timers",
                [t.row() for t in timers],
            )

    def timer_armed(self, timer: ArmedTimer) -> bool:
        row = self._execute(
            f"SELECT {_TIMER_READ} FROM timers WHERE machine = ? AND instance = ? AND timer_id = ? "
            "AND state = ? AND due_ms = ? AND armed_version = ?",
            timer.row(),
        ).fetchone()
        if row is None or self._seals.timer(row) != timer:
            return False
        self.flush()
        return self._anchor.timer(self._execute, timer)

    def take_timer(self, timer: ArmedTimer) -> bool:
        cursor = self._execute(
            "DELETE FROM timers WHERE machine = ? AND instance = ? AND timer_id = ? "
            "AND state = ? AND due_ms = ? AND armed_version = ?",
            timer.row(),
        )
        return cursor.rowcount == 1

    def timer_retry(self, timer: ArmedTimer) -> tuple[int, str] | None:
        row = self._execute(
            f"SELECT attempts, error FROM timer_retries WHERE {_TIMER_RETRY_KEY}",
            timer.arming(),
        ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def retry_timer(self, timer: ArmedTimer, attempts: int, retry_at_ms: int, error: str) -> None:
        self._execute(
            "INSERT OR REPLACE INTO timer_retries (machine, instance, timer_id, armed_version, "
            "attempts, retry_at_ms, error) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*timer.arming(), attempts, retry_at_ms, error),
        )

    def forget_timer_retry(self, timer: ArmedTimer) -> None:
        self._execute(f"DELETE FROM timer_retries WHERE {_TIMER_RETRY_KEY}", timer.arming())

    def add_outbox(self, messages: Sequence[OutboxMessage]) -> None:
        self.add_outbox_rows([outbox_row(m) for m in messages])

    def add_outbox_rows(self, rows: Sequence[OutboxRow]) -> None:
        if rows:
            self._insert_sealed("outbox", rows)

    def outbox_message(self, event_id: str) -> OutboxMessage | None:
        row = self._execute(
            f"SELECT {_OUTBOX_READ} FROM outbox WHERE event_id = ?", (event_id,)
        ).fetchone()
        return None if row is None else self._seals.message(row)

    def mark_outbox(self, message_id: int, status: OutboxStatus, error: str | None) -> None:
        message = self._outbox_row(message_id)
        if message is not None:
            self._rewrite_outbox(replace(message, status=status, error=error))

    def retry_outbox(self, message_id: int, attempts: int, retry_at_ms: int, error: str) -> None:
        message = self._outbox_row(message_id)
        if message is not None:
            self._rewrite_outbox(replace(message, error=error))
            self._execute(
                "INSERT OR REPLACE INTO outbox_retries (id, attempts, retry_at_ms) "
                "VALUES (?, ?, ?)",
                (message_id, attempts, retry_at_ms),
            )

    def forget_outbox_retry(self, message_id: int) -> None:
        self._execute("DELETE FROM outbox_retries WHERE id = ?", (message_id,))

    def set_outbox_body(self, message_id: int, body: str) -> None:
        message = self._outbox_row(message_id)
        if message is not None:
            self._rewrite_outbox(replace(message, body=body))

    def holds_outside(self, keys: Sequence[ClaimKey], holder: str) -> bool:
        # Claims are written under the file's write lock, which this transaction holds: no
        # key can be taken over before it ends.
        execute = self._execute
        seen = self._seen
        for machine, kind, key in keys:
            if self._inside and seen.get(("outside_claims", machine, kind, key)) == holder:
                continue  # this connection's claim, and no other connection committed since
            row = execute(
                "SELECT holder FROM outside_claims WHERE machine = ? AND kind = ? AND key = ?",
                (machine, kind, key),
            ).fetchone()
            if row is None or row[0] != holder:
                return False
        return True

    def claimed(self, keys: Sequence[ClaimKey], holder: str | None) -> None:
        """This connection committed `holder`'s claim on `keys` (None: let go of)."""
        seen = self._seen
        for machine, kind, key in keys:
            if holder is None:
                seen.pop(("outside_claims", machine, kind, key), None)
            else:
                seen[("outside_claims", machine, kind, key)] = holder

    def release_outside(self, keys: Sequence[ClaimKey], holder: str) -> None:
        if keys:
            self._write(*_release_claims(keys, holder))
            self.claimed(keys, None)

    def save_snapshot(self, snapshot: Snapshot) -> None:
        self._execute(
            "INSERT OR REPLACE INTO snapshots "
            "(machine, instance, version, state, ledger_seq, entry_hash, kept_seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                snapshot.machine,
                snapshot.instance,
                snapshot.version,
                snapshot.state,
                snapshot.ledger_seq,
                snapshot.entry_hash,
                snapshot.kept_seq,
            ),
        )

    def purge_dedup(self, before_ms: int) -> tuple[int, int]:
        self.forget()
        self.flush()
        events = self._execute("DELETE FROM processed_events WHERE created_ms < ?", (before_ms,))
        keys = self._execute("DELETE FROM idempotency_keys WHERE created_ms < ?", (before_ms,))
        self._anchor.advance(self._execute, before_ms)
        return events.rowcount, keys.rowcount

    def flow(self, flow_id: str) -> FlowRecord | None:
        row = self._read(f"SELECT {_FLOW_READ} FROM flows WHERE flow_id = ?", (flow_id,)).fetchone()
        return None if row is None else self._seals.flow(row)

    def save_flow(self, record: FlowRecord, expected_version: int) -> None:
        flow_id, wake_ms = record.flow_id, record.wake_ms
        values = (
            record.flow,
            record.instance,
            record.status,
            record.version,
            record.data,
            record.updated_ms,
        )
        blob = self._seals.blob("flows", (flow_id, *values, wake_ms))
        # A flow with no wake time (most writes) has its NULL in the statement, not bound:
        # sqlite3 binds None only after looking for an adapter, as for bytes.
        unwoken = wake_ms is None
        if expected_version == 0:
            try:
                self._write(
                    _FLOW_INSERT[unwoken],
                    (flow_id, *values, blob) if unwoken else (flow_id, *values, wake_ms, blob),
                )
            except sqlite3.IntegrityError:
                raise ConcurrentUpdateDetected(record.flow, flow_id, 0, -1) from None
            return
        cursor = self._write(
            _FLOW_UPDATE[unwoken],
            (*values, blob, flow_id, expected_version)
            if unwoken
            else (*values, wake_ms, blob, flow_id, expected_version),
        )
        if cursor.rowcount != 1:
            raise ConcurrentUpdateDetected(record.flow, flow_id, expected_version, -1)

    def save_breaker(self, record: BreakerRecord) -> None:
        values = (
            record.machine,
            record.name,
            record.state,
            record.failures,
            record.opened_ms,
            record.updated_ms,
        )
        self._execute(
            f"INSERT OR REPLACE INTO breakers ({_BREAKER_COLUMNS}, seal) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*values, self._seals.blob("breakers", values)),
        )

    def instance_data(self, machine: str, instance: str) -> str | None:
        row = self._execute(
            "SELECT data FROM instance_data WHERE machine = ? AND instance = ?",
            (machine, instance),
        ).fetchone()
        return None if row is None else str(row[0])

    def save_instance_data(self, machine: str, instance: str, data: str) -> None:
        self._execute(
            "INSERT OR REPLACE INTO instance_data (machine, instance, data) VALUES (?, ?, ?)",
            (machine, instance, data),
        )

    def kept_entry(self, machine: str, instance: str) -> LedgerEntry | None:
        self.flush()
        row = self._execute(
            f"SELECT {_ENTRY_COLUMNS} FROM ledger WHERE machine = ? AND instance = ? "
            f"AND kind = '{KEPT}' ORDER BY seq DESC LIMIT 1",
            (machine, instance),
        ).fetchone()
        return None if row is None else _entry(row)

    def deadline(self, id: str) -> DeadlineRecord | None:
        self.flush()
        row = self._execute(
            f"SELECT {_DEADLINE_READ} FROM deadlines WHERE id = ?", (id,)
        ).fetchone()
        if row is None:
            return None
        record = self._seals.deadline(row)
        self._anchor.deadline(self._execute, record)
        return record

    def save_deadline(self, record: DeadlineRecord) -> None:
        values = (
            record.id,
            record.name,
            record.governor,
            record.due_ms,
            record.level,
            record.action,
        )
        self._execute(
            f"INSERT OR REPLACE INTO deadlines ({_DEADLINE_COLUMNS}, seal) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*values, self._seals.blob("deadlines", values)),
        )

    def delete_deadline(self, id: str) -> bool:
        return self._execute("DELETE FROM deadlines WHERE id = ?", (id,)).rowcount == 1

    def due_deadlines(self, now_ms: int, limit: int) -> list[DeadlineRecord]:
        self.flush()
        rows = self._execute(
            f"SELECT {_DEADLINE_READ} FROM deadlines WHERE due_ms <= ? ORDER BY due_ms, id LIMIT ?",
            (now_ms, limit),
        ).fetchall()
        records = [self._seals.deadline(row) for row in rows]
        for record in records:
            self._anchor.deadline(self._execute, record)
        return records

    def reseal_rows(self, key: bytes) -> None:
        # Every row is checked under the outgoing key first: a forged row is not laundered.
        self.forget()
        self.flush()
        horizon = self._anchor.horizon(self._execute)
        seal_every_row(self._execute, self._seals, key, check=True, mark=_SAVE_MARK)
        self._anchor.keep(self._execute, horizon)


_FLOW_COLUMNS = "flow_id, flow, instance, status, version, data, updated_ms, wake_ms"
# save_flow's statements, by whether the flow has no wake time (its NULL written in the SQL).
_FLOW_INSERT = (
    f"INSERT INTO flows ({_FLOW_COLUMNS}, seal) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    f"INSERT INTO flows ({_FLOW_COLUMNS}, seal) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?)",
)
_FLOW_UPDATE = tuple(
    "UPDATE flows SET flow = ?, instance = ?, status = ?, version = ?, data = ?, "
    f"updated_ms = ?, wake_ms = {wake}, seal = ? WHERE flow_id = ? AND version = ?"
    for wake in ("?", "NULL")
)
_BREAKER_COLUMNS = "machine, name, state, failures, opened_ms, updated_ms"
_DEADLINE_COLUMNS = "id, name, governor, due_ms, level, action"


class SQLiteStore:
    """A Store on one SQLite file (see the module docstring for durability and locking).

    Only a new or empty file, or an autonomic store, is opened: anything else (another
    program's database, a file that is not SQLite) raises StoreConfigError with its bytes as
    they were, because the file is inspected read-only before the store changes anything.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "FULL",
        busy_timeout_ms: int = 30_000,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be 'FULL' or 'NORMAL'")
        self.path = Path(path)
        self.synchronous = synchronous
        if str(path) != ":memory:":
            _refuse_unless_empty_or_ours(self.path, busy_timeout_ms)
        try:
            self._connection = sqlite3.connect(
                str(path),
                isolation_level=None,
                check_same_thread=False,
                timeout=busy_timeout_ms / 1000,
            )
        except sqlite3.Error as exc:
            raise StoreConfigError(
                f"{path}: cannot open SQLite database: {exc}", hint=STORE_HINT
            ) from None
        self._lock = threading.RLock()
        self._seals = RowSeals(str(self.path))
        self._txn = SQLiteTransaction(self._connection, self._seals)
        self._busy_timeout_ms = busy_timeout_ms
        try:
            self._configure(busy_timeout_ms)
        except sqlite3.DatabaseError as exc:
            self._connection.close()
            raise StoreConfigError(
                f"{path}: not a usable SQLite store: {exc}", hint=STORE_HINT
            ) from None
        except BaseException:
            self._connection.close()
            raise

    def _configure(self, busy_timeout_ms: int) -> None:
        execute = self._connection.execute
        execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        give_up = time.monotonic() + busy_timeout_ms / 1000
        while True:
            try:
                mode = execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                # Several processes opening one new file at once: the switch to WAL needs the
                # file to itself, and SQLite reports "locked" at once rather than waiting.
                if not _busy(exc) or time.monotonic() >= give_up:
                    raise
                time.sleep(0.005)
        if str(mode).lower() != "wal" and str(self.path) != ":memory:":
            raise sqlite3.DatabaseError(f"cannot switch to WAL journal mode (got {mode})")
        execute(f"PRAGMA synchronous = {self.synchronous}")
        # Sub-journals in memory: each statement of a transaction that may abort halfway,
        # and each unit's savepoint, journals the pages it changes (4 KiB each, again for
        # every statement), and past 64 KiB SQLite moves that journal to a temporary file:
        # 11 page writes a sequential saga, 36 a saga in a 200-saga batch, all system CPU.
        # Savepoints are released unit by unit (run), so the journal holds one unit's pages.
        # The instance audit's connection keeps its large sorts in files (instance_audit.py).
        execute("PRAGMA temp_store = MEMORY")
        execute("BEGIN IMMEDIATE")
        try:
            # Decided again under the write lock: another process may have initialised the
            # file since it was inspected.
            empty = _empty_or_ours(execute, self.path)
            for statement in (SCHEMA_SQL + RUNTIME_SCHEMA_SQL).split(";"):
                if statement.strip():
                    execute(statement)
            # A store written before snapshots carried their kept entry gets the column.
            columns = {row[1] for row in execute("PRAGMA table_info(snapshots)")}
            if "kept_seq" not in columns:
                execute("ALTER TABLE snapshots ADD COLUMN kept_seq INTEGER NOT NULL DEFAULT -1")
            # And one written before rows were sealed, the seal column (sealed in seal_rows).
            for table in SEALED_TABLE_NAMES:
                if "seal" not in {row[1] for row in execute(f"PRAGMA table_info({table})")}:
                    execute(f"ALTER TABLE {table} ADD COLUMN seal BLOB")
            if empty:
                execute(f"PRAGMA application_id = {APPLICATION_ID}")
                execute(
                    "INSERT INTO runtime_meta (key, value) VALUES ('format', ?), ('schema', ?)",
                    (STORE_FORMAT, SCHEMA_VERSION),
                )
            execute("COMMIT")
        except BaseException:
            execute("ROLLBACK")
            raise

    # -- Store -------------------------------------------------------------------------------

    def run(
        self,
        works: Sequence[Callable[[Transaction], T]],
        before_commit: Callable[[Transaction], None] | None = None,
    ) -> list[WorkOutcome[T]]:
        txn = self._txn
        execute = txn._control
        outcomes: list[WorkOutcome[T]] = []
        with self._lock:
            execute("BEGIN IMMEDIATE")
            try:
                txn.begin()
                last = len(works) - 1
                for index, work in enumerate(works):
                    if not outcomes:
                        # The first unit needs no savepoint: nothing precedes it in the
                        # transaction, so if it fails, the transaction is rolled back and
                        # the others (none has run yet) go on in a new one.
                        try:
                            value = work(txn)
                        except Exception as exc:
                            execute("ROLLBACK")
                            txn.end(committed=False)
                            outcomes.append(WorkOutcome(None, exc))
                            if len(works) == 1:
                                return outcomes
                            execute("BEGIN IMMEDIATE")
                            txn.begin()
                            continue
                        # Its entries, outside the unit's try: the caller has taken the unit
                        # as done (its chain moved on), so a failed insert fails the batch.
                        txn.flush()
                        outcomes.append(_succeeded(value))
                        continue
                    execute("SAVEPOINT unit")
                    try:
                        value = work(txn)
                    except Exception as exc:
                        execute("ROLLBACK TO unit")
                        execute("RELEASE unit")
                        txn.discard()
                        outcomes.append(WorkOutcome(None, exc))
                    else:
                        txn.flush()
                        outcomes.append(_succeeded(value))
                        if index != last:
                            # Released at once, not left to COMMIT: with savepoints nested
                            # unit in unit, SQLite's sub-journal (the pages a ROLLBACK TO
                            # would restore) grows with the whole batch; with none open it
                            # starts again empty (see _configure). The last unit's is
                            # released by COMMIT.
                            execute("RELEASE unit")
                if before_commit is not None:
                    before_commit(txn)
                execute("COMMIT")
                txn.end(committed=True)
            except BaseException:
                if self._connection.in_transaction:
                    execute("ROLLBACK")
                txn.end(committed=False)
                raise
        return outcomes

    def seal_rows(self, key: bytes | None, *, adopt: bool = False) -> None:
        with self._lock:
            self._txn.forget()  # read and checked under the key (or none) of before
            if key is None:
                self._seals.key = None
                return
            execute = self._connection.execute
            execute("BEGIN IMMEDIATE")
            try:
                found = execute(
                    "SELECT value FROM runtime_meta WHERE key = ?", (SEALED_MARK,)
                ).fetchone()
                if found is None:
                    # Never sealed: new (nothing to seal), or rows are adopted as found, once;
                    # from now on a row without its seal is refused.
                    if not adopt:
                        refuse_unsealed_rows(execute, str(self.path))
                    seal_every_row(execute, self._seals, key, check=False, mark=_SAVE_MARK)
                elif found[0] != self._seals.mark(key):
                    raise StoreIntegrityError(
                        f"{self.path}: its rows are sealed under another key than this "
                        "runtime's signing key",
                        hint="open the store with the key that signs its ledger now (after "
                        "`rotate_key`, the new one)",
                    )
                else:
                    self._seals.key = key
                execute("COMMIT")
            except BaseException:
                if self._connection.in_transaction:
                    execute("ROLLBACK")
                self._seals.key = None
                raise

    def ledger_mode(self) -> LedgerMode | None:
        with self._lock:
            row = self._connection.execute(
                "SELECT value FROM ledger_meta WHERE key = ?", (META_MODE_KEY,)
            ).fetchone()
        if row is None:
            return None
        if row[0] not in MODES:
            raise StoreConfigError(f"{self.path}: ledger_meta holds unknown mode {row[0]!r}")
        return cast(LedgerMode, row[0])

    def set_ledger_mode(self, mode: LedgerMode) -> None:
        with self._lock:
            self._connection.execute(SET_META_SQL, (META_MODE_KEY, mode))

    def _query(self, sql: str, parameters: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            self._txn.flush()  # read inside a unit of work (a chain's checks): its entries
            return self._connection.execute(sql, parameters).fetchall()

    def get_instance(self, machine: str, instance: str) -> InstanceRecord | None:
        with self._lock:
            return self._txn.instance(machine, instance)

    def instances(self, machine: str) -> list[InstanceRecord]:
        rows = self._query(
            "SELECT machine, instance, state, version, seal FROM instances WHERE machine = ? "
            "ORDER BY instance",
            (machine,),
        )
        return [self._seals.instance(row) for row in rows]

    def ledger_entries(
        self, *, machine: str | None = None, instance: str | None = None, after_seq: int = -1
    ) -> Iterator[LedgerEntry]:
        # Pages by seq: flat memory, and the lock is not held while the caller iterates.
        where = ["seq > ?"]
        fixed: list[object] = []
        if machine is not None:
            where.append("machine = ?")
            fixed.append(machine)
        if instance is not None:
            where.append("instance = ?")
            fixed.append(instance)
        sql = (
            f"SELECT {_ENTRY_COLUMNS} FROM ledger WHERE {' AND '.join(where)} "
            f"ORDER BY seq LIMIT {_PAGE}"
        )
        last = after_seq
        while True:
            rows = self._query(sql, [last, *fixed])
            for row in rows:
                yield _entry(row)
            if len(rows) < _PAGE:
                return
            last = rows[-1][0]

    def ledger_entry(self, seq: int) -> LedgerEntry | None:
        rows = self._query(f"SELECT {_ENTRY_COLUMNS} FROM ledger WHERE seq = ?", (seq,))
        return _entry(rows[0]) if rows else None

    def checkpoints(self) -> list[Checkpoint]:
        return [Checkpoint(*row) for row in self._query(SELECT_CHECKPOINTS_SQL)]

    def latest_snapshot(self, machine: str, instance: str) -> Snapshot | None:
        rows = self._query(
            "SELECT version, state, ledger_seq, entry_hash, kept_seq FROM snapshots "
            "WHERE machine = ? AND instance = ?",
            (machine, instance),
        )
        if not rows:
            return None
        version, state, seq, digest, kept_seq = rows[0]
        return Snapshot(machine, instance, version, state, seq, bytes(digest), kept_seq)

    def armed_timers(
        self, machine: str | None = None, instance: str | None = None
    ) -> list[ArmedTimer]:
        where: list[str] = []
        parameters: list[object] = []
        if machine is not None:
            where.append("machine = ?")
            parameters.append(machine)
        if instance is not None:
            where.append("instance = ?")
            parameters.append(instance)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self._query(
            f"SELECT {_TIMER_READ} FROM timers {clause}ORDER BY due_ms, id", parameters
        )
        return [self._seals.timer(row) for row in rows]

    def timer_retries(self) -> dict[tuple[str, str, str, int], int]:
        rows = self._query(
            "SELECT machine, instance, timer_id, armed_version, retry_at_ms FROM timer_retries"
        )
        return {(str(m), str(i), str(t), int(v)): int(at) for m, i, t, v, at in rows}

    def due_timers(self, now_ms: int, machines: Sequence[str], limit: int) -> list[ArmedTimer]:
        if not machines:
            return []
        marks = ", ".join("?" for _ in machines)
        rows = self._query(
            f"SELECT {_TIMER_READ} FROM timers t WHERE due_ms <= ? AND machine IN ({marks}) "
            f"AND NOT {_RETRYING} ORDER BY due_ms, id LIMIT ?",
            [now_ms, *machines, now_ms, now_ms + RETRY_LATER_CAP_MS, limit],
        )
        timers = [self._seals.timer(row) for row in rows]
        with self._lock:  # about to fire: one whose firing is recorded was put back
            execute = self._connection.execute
            return [t for t in timers if self._txn._anchor.timer(execute, t)]

    def outbox(
        self,
        *,
        kind: OutboxKind | None = None,
        status: OutboxStatus | None = "pending",
        limit: int = 1000,
        due_ms: int | None = None,
    ) -> list[OutboxMessage]:
        where: list[str] = []
        parameters: list[object] = []
        if status is not None:
            where.append("o.status = ?")
            parameters.append(status)
        if kind is not None:
            where.append("o.kind = ?")
            parameters.append(kind)
        if due_ms is not None:
            where.append(f"NOT {_OUTBOX_HELD_BACK}")
            parameters += [due_ms, due_ms]
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self._query(
            f"SELECT {OUTBOX_WITH_RETRY} {clause}ORDER BY o.id LIMIT ?",
            [*parameters, limit],
        )
        return [with_retry(self._seals.message(row), row) for row in rows]

    def get_flow(self, flow_id: str) -> FlowRecord | None:
        with self._lock:
            return self._txn.flow(flow_id)

    def unless_busy(self, read: Callable[[], T], busy: T) -> T:
        """`read()` under the store's lock if nobody holds it now, else `busy` at once: an
        event loop reads here only when the read cannot wait for a commit's fsync."""
        if not self._lock.acquire(blocking=False):
            return busy
        try:
            return read()
        finally:
            self._lock.release()

    def unfinished_flows(self, limit: int = 1000) -> list[FlowRecord]:
        rows = self._query(
            f"SELECT {_FLOW_READ} FROM flows "
            "WHERE status NOT IN ('completed', 'compensated', 'failed') "
            "ORDER BY updated_ms, flow_id LIMIT ?",
            (limit,),
        )
        return [self._seals.flow(row) for row in rows]

    def processed(self, machine: str, event_id: str) -> str | None:
        with self._lock:
            return self._txn.processed(machine, event_id)

    def get_processed_and_instance(
        self, machine: str, event_id: str, instance: str
    ) -> tuple[str | None, InstanceRecord | None]:
        with self._lock:
            return self._txn.processed_and_instance(machine, event_id, instance)

    def idempotency(self, machine: str, key: str) -> tuple[bytes, str] | None:
        with self._lock:
            return self._txn.idempotency(machine, key)

    def get_breaker(self, machine: str, name: str) -> BreakerRecord | None:
        def read() -> BreakerRecord | None:
            rows = self._query(
                f"SELECT {_BREAKER_READ} FROM breakers WHERE machine = ? AND name = ?",
                (machine, name),
            )
            return self._seals.breaker(rows[0]) if rows else None

        def execute(sql: str, parameters: Sequence[object]) -> Fetched:
            return Fetched(self._query(sql, parameters))

        return self._txn._anchor.breaker(execute, machine, name, read)

    def get_instance_data(self, machine: str, instance: str) -> str | None:
        with self._lock:
            return self._txn.instance_data(machine, instance)

    def deadlines(self) -> list[DeadlineRecord]:
        rows = self._query(f"SELECT {_DEADLINE_READ} FROM deadlines ORDER BY due_ms, id")
        return [self._seals.deadline(row) for row in rows]

    def earliest_deadline(self, prefix: str, governors: Sequence[str]) -> int | None:
        if not governors:
            return None
        # In due order on the (due_ms, id) index: the first match ends the scan.
        marks = ", ".join("?" * len(governors))
        rows = self._query(
            "SELECT due_ms FROM deadlines WHERE substr(id, 1, ?) = ? "
            f"AND governor IN ({marks}) ORDER BY due_ms LIMIT 1",
            (len(prefix), prefix, *governors),
        )
        return int(rows[0][0]) if rows else None

    def claim_outside(self, keys: Sequence[ClaimKey], holder: str, lease_ms: int) -> bool:
        # Leases on the wall clock, which every process on this file shares. Committed with
        # synchronous=NORMAL (see _lower_sync): no fsync, yet a process crash loses
        # nothing; a power loss may lose a claim, but its holder is gone too.
        now = int(time.time() * 1000)
        until = now + lease_ms
        with self._lock:
            lowered = self._lower_sync()
            execute = self._txn._control
            try:
                if len(keys) == 1:
                    # One key (a dispatch's event id or idempotency key): its upsert alone,
                    # committed as it runs. A write outside a transaction takes the write lock
                    # as BEGIN IMMEDIATE does, waiting for it up to the busy timeout.
                    machine, kind, key = keys[0]
                    taken = execute(_CLAIM_SQL, (machine, kind, key, holder, until, now, until))
                    if taken.rowcount != 1:
                        return False
                else:
                    execute("BEGIN IMMEDIATE")
                    try:
                        for machine, kind, key in keys:
                            # One upsert a key (as on PostgreSQL): it takes the row unless
                            # another holder's live lease is on it, and changes no row then
                            # (rowcount 0).
                            taken = execute(
                                _CLAIM_SQL, (machine, kind, key, holder, until, now, until)
                            )
                            if taken.rowcount != 1:
                                execute("ROLLBACK")
                                return False
                        execute("COMMIT")
                    except BaseException:
                        if self._connection.in_transaction:
                            execute("ROLLBACK")
                        raise
                self._txn.claimed(keys, holder)
            finally:
                if lowered:
                    self._restore_sync()
        return True

    def renew_outside(self, keys: Sequence[ClaimKey], holder: str, lease_ms: int) -> bool:
        until = int(time.time() * 1000) + lease_ms
        with self._claims_connection() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                renewed = connection.executemany(
                    "UPDATE outside_claims SET until_ms = ? "
                    "WHERE machine = ? AND kind = ? AND key = ? AND holder = ?",
                    [(until, *key, holder) for key in keys],
                ).rowcount
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        return renewed == len(keys)

    def release_outside(self, keys: Sequence[ClaimKey], holder: str) -> None:
        if not keys:
            return
        # One statement, so one commit for all the keys (executemany on an autocommit
        # connection committed each key's DELETE on its own).
        with self._claims_connection() as connection:
            connection.execute(*_release_claims(keys, holder))
            self._txn.claimed(keys, None)

    @contextlib.contextmanager
    def _claims_connection(self) -> Iterator[sqlite3.Connection]:
        """The store's own connection, between two of its transactions, committing with
        synchronous=NORMAL (see _lower_sync)."""
        with self._lock:
            lowered = self._lower_sync()
            try:
                yield self._connection
            finally:
                if lowered:
                    self._restore_sync()

    def _lower_sync(self) -> bool:
        """With the lock held, between two of the store's transactions: commit with
        synchronous=NORMAL until `_restore_sync` (whether it was lowered). A claim needs no
        fsync (see claim_outside), and the next commit with synchronous=FULL syncs the log it
        was written to. Not a connection of their own: each commit on another connection
        empties this one's page cache (SQLite sees the file changed), which cost a flow step
        with an outside call 0.1 ms of CPU."""
        if self._connection.in_transaction:
            # Only a guard or action of this thread's unit of work gets here.
            raise NestedDispatch()
        if self.synchronous == "NORMAL":
            return False
        self._txn._control("PRAGMA synchronous = NORMAL")
        return True

    def _restore_sync(self) -> None:
        self._txn._control(f"PRAGMA synchronous = {self.synchronous}")

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
