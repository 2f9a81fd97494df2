"""The PostgreSQL store: one fleet of workers on many hosts sharing governors, timers, outbox
and a partitioned audit ledger, with psycopg 3 and its connection pool.

Schema: versioned migration files (`migrations/NNNN_name.sql`) applied by `migrate` (the
`autonomic db migrate` command) in one transaction under an advisory lock. A database (more
exactly, the first schema on its search_path) is opened only if it is empty, which `migrate`
initialises, or carries the store's marks (`autonomic_meta` format row); a newer schema is
refused by an older binary, an older one until it is migrated; anything else is refused
untouched.

Ledger partitions: the ledger is `partitions` hash chains, fixed when the store is created.
An instance's entries all go to partition `partition_of(instance)`, so per instance they stay
totally ordered; across partitions there is no order but each entry's timestamp. Every batch
(`run(..., partition=p)`) first locks its partition's `ledger_heads` row: writers of one
partition queue there, and because every unit of the batch touches instances of that partition
only, state rows are never locked in two orders (no deadlocks between workers).

Workers: `claim_due_timers` and `claim_outbox` lease rows with `SELECT ... FOR UPDATE SKIP
LOCKED` in a short transaction of their own, so workers on many hosts share the due work
without waiting on each other. Only the earliest due timer (or oldest pending message) of an
instance is claimable, so one instance's timers and deliveries stay in order across the fleet.
A lease lasts `lease_ms` on the database clock; a worker killed mid-fire leaves its timer to
the next claimer after that. Firing deletes the timer in the transaction that changes the
state, so a timer fires exactly once even when a lease runs out while its first claimer is
still working: the second DELETE finds nothing and that firing is abandoned.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.resources
import os
import re
import socket
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import (
    ConcurrentUpdateDetected,
    InstanceExists,
    StoreConfigError,
    StoreIntegrityError,
)
from ..ledger import (
    CHECKPOINT_COLUMNS,
    KEPT,
    LEDGER_COLUMNS,
    META_MODE_KEY,
    MODES,
    Checkpoint,
    LedgerEntry,
    LedgerMode,
)
from ..partitions import SignedRoot, decode_heads, encode_heads, partition_of
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
    processed_then_instance,
    with_retry,
)
from .postgres_schema import schema_problem
from .row_seals import (
    OUTBOX_WITH_RETRY,
    SEALED_MARK,
    SEALED_SELECT,
    Fetched,
    LedgerAnchor,
    RowSeals,
    outbox_values,
    refuse_unsealed_rows,
    seal_every_row,
)
from .urls import redact

__all__ = [
    "LATEST_SCHEMA",
    "Migration",
    "PostgresStore",
    "PostgresTransaction",
    "migrate",
    "migrations",
    "redact",
]

T = TypeVar("T")

STORE_FORMAT = "autonomic-store"
STORE_HINT = "pass the URL of an empty database (or schema) or of an autonomic store"
_MIGRATION_LOCK = 0x4175546F  # pg_advisory_xact_lock key: "AuTo"
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_PAGE = 1000
_ENTRY_COLUMNS = ", ".join(LEDGER_COLUMNS)
_TIMER_COLUMNS = "machine, instance, timer_id, state, due_ms, armed_version"
_OUTBOX_COLUMNS = (
    "id, kind, machine, instance, version, target_machine, target_instance, event, event_id, "
    "body, created_ms, status, error"
)
_CHECKPOINT_COLUMNS = ", ".join(CHECKPOINT_COLUMNS)
_TIMER_READ = SEALED_SELECT["timers"]
# A timer (alias {t}) whose failed firing is tried again after the first parameter; a retry
# time past the second (now + RETRY_LATER_CAP_MS) was written by no backoff: it holds nothing.
_RETRYING = (
    "EXISTS (SELECT 1 FROM timer_retries r WHERE r.machine = {t}.machine "
    "AND r.instance = {t}.instance AND r.timer_id = {t}.timer_id "
    "AND r.armed_version = {t}.armed_version AND r.retry_at_ms > %s AND r.retry_at_ms <= %s)"
)
_CLAIM_RETRYING = (
    _RETRYING.format(t="c").replace("> %s", "> %(now)s").replace("<= %s", "<= %(cap)s")
)
_TIMER_RETRY_KEY = "machine = %s AND instance = %s AND timer_id = %s AND armed_version = %s"


_OUTBOX_READ = SEALED_SELECT["outbox"]
# A message (alias `{m}`) not to deliver at `%(due)s`: it, or an earlier pending message to
# the same target instance, waits for a retry after it (one more than RETRY_LATER_CAP_MS
# ahead is no backoff's, a forged row, and is ignored: the retry is not sealed).
_OUTBOX_HELD_BACK = (
    "EXISTS (SELECT 1 FROM outbox_retries w JOIN outbox e ON e.id = w.id "
    "WHERE w.id <= {m}.id AND w.retry_at_ms > %(due)s "
    f"AND w.retry_at_ms <= %(due)s + {RETRY_LATER_CAP_MS} AND e.status = 'pending' "
    "AND e.target_machine = {m}.target_machine AND e.target_instance = {m}.target_instance)"
)
_FLOW_READ = SEALED_SELECT["flows"]
_BREAKER_READ = SEALED_SELECT["breakers"]
_DEADLINE_READ = SEALED_SELECT["deadlines"]
_SAVE_MARK = (
    "INSERT INTO autonomic_meta (key, value) VALUES (%s, %s) "
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
)
# Milliseconds since the epoch on the database's clock: leases compare against one clock
# for the whole fleet, whatever the hosts' clocks say.
_DB_NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
_new_entry = cast(Callable[[type[LedgerEntry], tuple[Any, ...]], LedgerEntry], tuple.__new__)


# ---------------------------------------------------------------------------------------------
# Migrations: package data files, applied in version order, each recorded with its digest.


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations() -> list[Migration]:
    """The migration files shipped with this version of autonomic, in version order."""
    folder = importlib.resources.files(__package__ or "autonomic.runtime.store") / "migrations"
    found: list[Migration] = []
    for item in folder.iterdir():
        match = _MIGRATION_NAME.match(item.name)
        if match:
            found.append(Migration(int(match[1]), match[2], item.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError("migration files must be numbered 0001, 0002, ... without gaps")
    return found


LATEST_SCHEMA = len(migrations())


@dataclass(frozen=True, slots=True)
class _Found:
    """What a database holds: nothing, or an autonomic store of `version` with `partitions`."""

    empty: bool
    version: int = 0
    partitions: int = 0
    schema: str = ""


def _inspect(cursor: psycopg.Cursor[Any], where: str) -> _Found:
    """Decide, only reading, whether the current schema is empty or ours; refuse otherwise."""
    row = cursor.execute("SELECT current_schema()").fetchone()
    schema = None if row is None else row[0]
    if schema is None:
        raise StoreConfigError(
            f"{where}: no schema on the search_path exists", hint="create the schema first"
        )
    tables = sorted(
        r[0]
        for r in cursor.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
            (schema,),
        )
    )
    if not tables:
        return _Found(True)
    if "autonomic_meta" not in tables:
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise StoreConfigError(
            f"{where}: schema {schema!r} holds tables of something else ({shown}); "
            "it was left untouched",
            hint=STORE_HINT,
        )
    marks = dict(cursor.execute("SELECT key, value FROM autonomic_meta").fetchall())
    if marks.get("format") != STORE_FORMAT:
        raise StoreConfigError(
            f"{where}: schema {schema!r} has an autonomic_meta table but not the autonomic "
            "store's marks; it was left untouched",
            hint=STORE_HINT,
        )
    try:
        return _Found(False, int(marks["schema"]), int(marks["partitions"]), schema)
    except (KeyError, ValueError):
        raise StoreConfigError(
            f"{where}: the store's schema version or partition count is unreadable; "
            "it was left untouched",
            hint="restore the autonomic_meta table from a backup",
        ) from None


def _refuse_altered(connection: psycopg.Connection[Any], found: _Found, where: str) -> None:
    """StoreConfigError unless the store's schema is exactly the one its migrations (1 to the
    version it records) create: other declarations make the runtime's reads find other rows
    than it wrote (store/postgres_schema.py). Reads only; before any row but the marks."""
    sqls = [migration.sql for migration in migrations()[: found.version]]
    problem = schema_problem(connection, found.schema, found.version, sqls)
    if problem is not None:
        raise StoreConfigError(
            f"{where}: the store's schema was altered: {problem}; it was left untouched",
            hint="a store is opened (and verified) only with the schema its migrations "
            "create; restore it from a backup",
        )


def _newer(where: str, version: int) -> StoreConfigError:
    return StoreConfigError(
        f"{where}: store schema version {version} is newer than this autonomic knows "
        f"({LATEST_SCHEMA}); it was left untouched",
        hint="upgrade autonomic to the version that migrated this store",
    )


def migrate(url: str, *, partitions: int | None = None) -> tuple[int, int]:
    """Bring the store at `url` to the latest schema (creating it in an empty database with
    `partitions` ledger chains, default 1); returns (version before, version after).

    One transaction under an advisory lock: concurrent migrators wait, then find the work done.
    """
    if partitions is not None and not 1 <= partitions <= 4096:
        raise StoreConfigError(
            f"{partitions} ledger partitions: the count must be 1..4096",
            hint="8 to 64 partitions suit most fleets; see docs/scaling.md",
        )
    where = redact(url)
    with _connect(url) as connection, connection.transaction():
        cursor = connection.cursor()
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        found = _inspect(cursor, where)
        if not found.empty and found.version > LATEST_SCHEMA:
            raise _newer(where, found.version)
        if not found.empty and partitions is not None and partitions != found.partitions:
            raise StoreConfigError(
                f"{where}: the ledger has {found.partitions} partitions; the count is fixed "
                "when the store is created",
                hint="migrate a new database with --partitions and move the fleet to it",
            )
        if not found.empty:
            _refuse_altered(connection, found, where)
        start = 0 if found.empty else found.version
        for migration in migrations()[start:]:
            cursor.execute(cast(Any, migration.sql))
            cursor.execute(
                "INSERT INTO schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.sha256),
            )
        if found.empty:
            count = 1 if partitions is None else partitions
            cursor.execute(
                "INSERT INTO autonomic_meta (key, value) VALUES "
                "('format', %s), ('schema', %s), ('partitions', %s)",
                (STORE_FORMAT, str(LATEST_SCHEMA), str(count)),
            )
            cursor.executemany(
                "INSERT INTO ledger_heads (part) VALUES (%s)", [(p,) for p in range(count)]
            )
        else:
            cursor.execute(
                "UPDATE autonomic_meta SET value = %s WHERE key = 'schema'", (str(LATEST_SCHEMA),)
            )
    return start, LATEST_SCHEMA


def _connect(url: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise StoreConfigError(
            f"{redact(url)}: cannot connect to PostgreSQL: {' '.join(str(exc).split())}",
            hint="check the URL, that the server runs, and the credentials",
        ) from None


# ---------------------------------------------------------------------------------------------
# Units of work.


_PROCESSED_SQL = (
    f"SELECT {SEALED_SELECT['processed_events']} FROM processed_events "
    "WHERE machine = %s AND event_id = %s"
)
_IDEMPOTENCY_SQL = (
    f"SELECT {SEALED_SELECT['idempotency_keys']} FROM idempotency_keys "
    "WHERE machine = %s AND key = %s"
)


def _anchor(seals: RowSeals) -> LedgerAnchor:
    # Seqs count per partition: the newest by time (the few entries of one event id).
    return LedgerAnchor(seals, "%s", "autonomic_meta", _SAVE_MARK, "ts_ms DESC")


class PostgresTransaction:
    """The statements of one batch, on one pooled connection inside its transaction, for the
    ledger partition the batch has locked."""

    __slots__ = ("_anchor", "_execute", "_seals", "partition")

    def __init__(self, cursor: psycopg.Cursor[Any], partition: int | None, seals: RowSeals) -> None:
        self._execute = cursor.execute
        self.partition = partition
        # Every row of a sealed table is sealed as written and checked as read (row_seals.py).
        self._seals = seals
        # A missing dedup row is checked against the ledger (row_seals.LedgerAnchor).
        self._anchor = _anchor(seals)

    def _part(self) -> int:
        if self.partition is None:
            raise RuntimeError("a unit of work outside any ledger partition touched the ledger")
        return self.partition

    def instance(self, machine: str, instance: str) -> InstanceRecord | None:
        row = self._execute(
            "SELECT machine, instance, state, version, seal FROM instances "
            "WHERE machine = %s AND instance = %s",
            (machine, instance),
        ).fetchone()
        return None if row is None else self._seals.instance(row)

    def insert_instance(self, record: InstanceRecord) -> None:
        # ON CONFLICT rather than catching the unique violation: an error would abort the
        # transaction, and the caller may carry on after InstanceExists.
        row = (record.machine, record.instance, record.state, record.version)
        cursor = self._execute(
            "INSERT INTO instances (machine, instance, state, version, seal) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (*row, self._seals.seal("instances", row)),
        )
        if cursor.rowcount != 1:
            raise InstanceExists(record.machine, record.instance)

    def update_instance(
        self, machine: str, instance: str, state: str, version: int, expected_version: int
    ) -> None:
        seal = self._seals.seal("instances", (machine, instance, state, version))
        cursor = self._execute(
            "UPDATE instances SET state = %s, version = %s, seal = %s "
            "WHERE machine = %s AND instance = %s AND version = %s",
            (state, version, seal, machine, instance, expected_version),
        )
        if cursor.rowcount != 1:
            row = self._execute(
                "SELECT version FROM instances WHERE machine = %s AND instance = %s",
                (machine, instance),
            ).fetchone()
            actual = -1 if row is None else int(row[0])
            raise ConcurrentUpdateDetected(machine, instance, expected_version, actual)

    def ledger_head(self) -> LedgerEntry | None:
        row = self._execute(
            f"SELECT {_ENTRY_COLUMNS} FROM ledger WHERE part = %s ORDER BY seq DESC LIMIT 1",
            (self._part(),),
        ).fetchone()
        return None if row is None else _new_entry(LedgerEntry, row)

    def last_checkpoint(self) -> Checkpoint | None:
        row = self._execute(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM ledger_checkpoints WHERE part = %s "
            "ORDER BY size DESC LIMIT 1",
            (self._part(),),
        ).fetchone()
        return None if row is None else Checkpoint(*row)

    def append_ledger(self, entry: LedgerEntry) -> None:
        self._execute(_INSERT_ENTRY_SQL, (self._part(), *entry))

    def add_checkpoint(self, checkpoint: Checkpoint) -> None:
        self._execute(_INSERT_CHECKPOINT_SQL, (self._part(), *checkpoint.as_row()))

    def processed(self, machine: str, event_id: str) -> str | None:
        row = self._anchor.dedup_row(
            self._execute, _PROCESSED_SQL, "processed_events", machine, event_id, event_id
        )
        if row is None:
            return None
        return str(self._seals.stored_result("processed_events", row)[3])

    def processed_and_instance(
        self, machine: str, event_id: str, instance: str
    ) -> tuple[str | None, InstanceRecord | None]:
        return processed_then_instance(self.processed, self.instance, machine, event_id, instance)

    def record_processed(
        self, machine: str, event_id: str, instance: str, result: str, now_ms: int
    ) -> None:
        row = (machine, event_id, instance, result, now_ms)
        self._execute(
            "INSERT INTO processed_events (machine, event_id, instance, result, created_ms, "
            "seal) VALUES (%s, %s, %s, %s, %s, %s)",
            (*row, self._seals.seal("processed_events", row)),
        )

    def idempotency(self, machine: str, key: str) -> tuple[bytes, str] | None:
        event_id = idempotency_event_id(machine, key)
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
        self._execute(
            "INSERT INTO idempotency_keys (machine, key, request_sha256, result, created_ms, "
            "seal) VALUES (%s, %s, %s, %s, %s, %s)",
            (*row, self._seals.seal("idempotency_keys", row)),
        )

    def _seal_inserted(self, table: str, row_id: int, values: Sequence[object]) -> None:
        """Seal a row just inserted with a store-assigned id (the seal covers the id)."""
        seal = self._seals.seal(table, (row_id, *values))
        if seal is not None:
            self._execute(f"UPDATE {table} SET seal = %s WHERE id = %s", (seal, row_id))

    def _outbox_row(self, message_id: int) -> OutboxMessage | None:
        row = self._execute(
            f"SELECT {_OUTBOX_READ} FROM outbox WHERE id = %s", (message_id,)
        ).fetchone()
        return None if row is None else self._seals.message(row)

    def _rewrite_outbox(self, message: OutboxMessage, lease: str = "") -> None:
        seal = self._seals.seal("outbox", outbox_values(message))
        self._execute(
            f"UPDATE outbox SET body = %s, status = %s, error = %s, seal = %s{lease} WHERE id = %s",
            (message.body, message.status, message.error, seal, message.id),
        )

    def cancel_timers(
        self, machine: str, instance: str, keep: Collection[str] = frozenset()
    ) -> None:
        if not keep:
            self._execute(
                "DELETE FROM timers WHERE machine = %s AND instance = %s", (machine, instance)
            )
            return
        self._execute(
            "DELETE FROM timers WHERE machine = %s AND instance = %s AND NOT timer_id = ANY(%s)",
            (machine, instance, sorted(keep)),
        )

    def arm_timers(self, timers: Sequence[ArmedTimer]) -> None:
        for timer in timers:
            values = timer.row()
            row = self._execute(
                f"INSERT INTO timers ({_TIMER_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s) "
                "RETURNING id",
                values,
            ).fetchone()
            assert row is not None
            self._seal_inserted("timers", row[0], values)

    def timer_armed(self, timer: ArmedTimer) -> bool:
        row = self._execute(
            f"SELECT {_TIMER_READ} FROM timers WHERE machine = %s AND instance = %s "
            "AND timer_id = %s AND state = %s AND due_ms = %s AND armed_version = %s",
            timer.row(),
        ).fetchone()
        if row is None or self._seals.timer(row) != timer:
            return False
        return self._anchor.timer(self._execute, timer)

    def take_timer(self, timer: ArmedTimer) -> bool:
        cursor = self._execute(
            "DELETE FROM timers WHERE machine = %s AND instance = %s AND timer_id = %s "
            "AND state = %s AND due_ms = %s AND armed_version = %s",
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
            "INSERT INTO timer_retries (machine, instance, timer_id, armed_version, attempts, "
            "retry_at_ms, error) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (machine, instance, timer_id, armed_version) DO UPDATE SET "
            "attempts = EXCLUDED.attempts, retry_at_ms = EXCLUDED.retry_at_ms, "
            "error = EXCLUDED.error",
            (*timer.arming(), attempts, retry_at_ms, error),
        )
        # A fleet worker's lease let go: any worker takes the timer once its retry is due.
        self._execute(
            f"UPDATE timers SET lease_owner = NULL, lease_until_ms = NULL WHERE {_TIMER_RETRY_KEY}",
            timer.arming(),
        )

    def forget_timer_retry(self, timer: ArmedTimer) -> None:
        self._execute(f"DELETE FROM timer_retries WHERE {_TIMER_RETRY_KEY}", timer.arming())

    def add_outbox(self, messages: Sequence[OutboxMessage]) -> None:
        self.add_outbox_rows([outbox_row(m) for m in messages])

    def add_outbox_rows(self, rows: Sequence[OutboxRow]) -> None:
        for values in rows:
            row = self._execute(
                "INSERT INTO outbox (kind, machine, instance, version, target_machine, "
                "target_instance, event, event_id, body, created_ms, status, error) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                values,
            ).fetchone()
            assert row is not None
            self._seal_inserted("outbox", row[0], values)

    def outbox_message(self, event_id: str) -> OutboxMessage | None:
        row = self._execute(
            f"SELECT {_OUTBOX_READ} FROM outbox WHERE event_id = %s", (event_id,)
        ).fetchone()
        return None if row is None else self._seals.message(row)

    def mark_outbox(self, message_id: int, status: OutboxStatus, error: str | None) -> None:
        message = self._outbox_row(message_id)
        if message is not None:
            self._rewrite_outbox(
                replace(message, status=status, error=error),
                ", lease_owner = NULL, lease_until_ms = NULL",
            )

    def retry_outbox(self, message_id: int, attempts: int, retry_at_ms: int, error: str) -> None:
        message = self._outbox_row(message_id)
        if message is not None:
            # The lease let go: any worker of the fleet takes it once it is due.
            self._rewrite_outbox(
                replace(message, error=error), ", lease_owner = NULL, lease_until_ms = NULL"
            )
            self._execute(
                "INSERT INTO outbox_retries (id, attempts, retry_at_ms) VALUES (%s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET attempts = EXCLUDED.attempts, "
                "retry_at_ms = EXCLUDED.retry_at_ms",
                (message_id, attempts, retry_at_ms),
            )

    def forget_outbox_retry(self, message_id: int) -> None:
        self._execute("DELETE FROM outbox_retries WHERE id = %s", (message_id,))

    def set_outbox_body(self, message_id: int, body: str) -> None:
        message = self._outbox_row(message_id)
        if message is not None:
            self._rewrite_outbox(replace(message, body=body))

    def holds_outside(self, keys: Sequence[ClaimKey], holder: str) -> bool:
        # FOR SHARE: a claimer taking a key over (claim_outside's upsert) waits for this
        # transaction, then finds the result committed.
        execute = self._execute
        for machine, kind, key in keys:
            row = execute(
                "SELECT holder FROM outside_claims WHERE machine = %s AND kind = %s AND key = %s "
                "FOR SHARE",
                (machine, kind, key),
            ).fetchone()
            if row is None or row[0] != holder:
                return False
        return True

    def release_outside(self, keys: Sequence[ClaimKey], holder: str) -> None:
        if keys:
            self._execute(*_release_claims(keys, holder))

    def lease_outbox(self, message_id: int, owner: str, lease_ms: int) -> None:
        self._execute(
            f"UPDATE outbox SET lease_owner = %s, lease_until_ms = {_DB_NOW_MS} + %s WHERE id = %s",
            (owner, lease_ms, message_id),
        )

    def save_snapshot(self, snapshot: Snapshot) -> None:
        self._execute(
            "INSERT INTO snapshots "
            "(machine, instance, version, state, ledger_seq, entry_hash, kept_seq) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (machine, instance) DO UPDATE SET "
            "version = EXCLUDED.version, state = EXCLUDED.state, "
            "ledger_seq = EXCLUDED.ledger_seq, entry_hash = EXCLUDED.entry_hash, "
            "kept_seq = EXCLUDED.kept_seq",
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
        events = self._execute("DELETE FROM processed_events WHERE created_ms < %s", (before_ms,))
        keys = self._execute("DELETE FROM idempotency_keys WHERE created_ms < %s", (before_ms,))
        self._anchor.advance(self._execute, before_ms)
        return events.rowcount, keys.rowcount

    def flow(self, flow_id: str) -> FlowRecord | None:
        row = self._execute(
            f"SELECT {_FLOW_READ} FROM flows WHERE flow_id = %s", (flow_id,)
        ).fetchone()
        return None if row is None else self._seals.flow(row)

    def save_flow(self, record: FlowRecord, expected_version: int) -> None:
        values = (
            record.flow,
            record.instance,
            record.status,
            record.version,
            record.data,
            record.updated_ms,
            record.wake_ms,
        )
        seal = self._seals.seal("flows", (record.flow_id, *values))
        if expected_version == 0:
            cursor = self._execute(
                f"INSERT INTO flows ({_FLOW_COLUMNS}, seal) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (record.flow_id, *values, seal),
            )
            if cursor.rowcount != 1:
                raise ConcurrentUpdateDetected(record.flow, record.flow_id, 0, -1)
            return
        cursor = self._execute(
            "UPDATE flows SET flow = %s, instance = %s, status = %s, version = %s, data = %s, "
            "updated_ms = %s, wake_ms = %s, seal = %s WHERE flow_id = %s AND version = %s",
            (*values, seal, record.flow_id, expected_version),
        )
        if cursor.rowcount != 1:
            raise ConcurrentUpdateDetected(record.flow, record.flow_id, expected_version, -1)

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
            f"INSERT INTO breakers ({_BREAKER_COLUMNS}, seal) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (machine, name) DO UPDATE SET state = EXCLUDED.state, "
            "failures = EXCLUDED.failures, opened_ms = EXCLUDED.opened_ms, "
            "updated_ms = EXCLUDED.updated_ms, seal = EXCLUDED.seal",
            (*values, self._seals.seal("breakers", values)),
        )

    def instance_data(self, machine: str, instance: str) -> str | None:
        row = self._execute(
            "SELECT data FROM instance_data WHERE machine = %s AND instance = %s",
            (machine, instance),
        ).fetchone()
        return None if row is None else str(row[0])

    def save_instance_data(self, machine: str, instance: str, data: str) -> None:
        self._execute(
            "INSERT INTO instance_data (machine, instance, data) VALUES (%s, %s, %s) "
            "ON CONFLICT (machine, instance) DO UPDATE SET data = EXCLUDED.data",
            (machine, instance, data),
        )

    def kept_entry(self, machine: str, instance: str) -> LedgerEntry | None:
        row = self._execute(
            f"SELECT {_ENTRY_COLUMNS} FROM ledger WHERE machine = %s AND instance = %s "
            f"AND part = %s AND kind = '{KEPT}' ORDER BY seq DESC LIMIT 1",
            (machine, instance, self._part()),
        ).fetchone()
        return None if row is None else _new_entry(LedgerEntry, row)

    def deadline(self, id: str) -> DeadlineRecord | None:
        # FOR UPDATE, as due_deadlines: a worker escalating it meanwhile is waited for.
        row = self._execute(
            f"SELECT {_DEADLINE_READ} FROM deadlines WHERE id = %s FOR UPDATE", (id,)
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
            f"INSERT INTO deadlines ({_DEADLINE_COLUMNS}, seal) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, "
            "governor = EXCLUDED.governor, due_ms = EXCLUDED.due_ms, level = EXCLUDED.level, "
            "action = EXCLUDED.action, seal = EXCLUDED.seal",
            (*values, self._seals.seal("deadlines", values)),
        )

    def delete_deadline(self, id: str) -> bool:
        return self._execute("DELETE FROM deadlines WHERE id = %s", (id,)).rowcount == 1

    def due_deadlines(self, now_ms: int, limit: int) -> list[DeadlineRecord]:
        # FOR UPDATE: a second worker checking at the same time waits for this transaction,
        # then finds the deadline re-armed (not due), so one miss escalates once.
        rows = self._execute(
            f"SELECT {_DEADLINE_READ} FROM deadlines WHERE due_ms <= %s "
            "ORDER BY due_ms, id LIMIT %s FOR UPDATE",
            (now_ms, limit),
        ).fetchall()
        records = [self._seals.deadline(row) for row in rows]
        for record in records:
            self._anchor.deadline(self._execute, record)
        return records

    def reseal_rows(self, key: bytes) -> None:
        # Every row is checked under the outgoing key first: a forged row is not laundered.
        horizon = self._anchor.horizon(self._execute)
        seal_every_row(self._execute, self._seals, key, check=True, mark=_SAVE_MARK)
        self._anchor.keep(self._execute, horizon)


_FLOW_COLUMNS = "flow_id, flow, instance, status, version, data, updated_ms, wake_ms"
_BREAKER_COLUMNS = "machine, name, state, failures, opened_ms, updated_ms"
_DEADLINE_COLUMNS = "id, name, governor, due_ms, level, action"
_INSERT_ENTRY_SQL = (
    f"INSERT INTO ledger (part, {_ENTRY_COLUMNS}) "
    f"VALUES ({', '.join('%s' for _ in range(len(LEDGER_COLUMNS) + 1))})"
)
_INSERT_CHECKPOINT_SQL = (
    f"INSERT INTO ledger_checkpoints (part, {_CHECKPOINT_COLUMNS}) "
    f"VALUES ({', '.join('%s' for _ in range(len(CHECKPOINT_COLUMNS) + 1))})"
)


def _release_claims(keys: Sequence[ClaimKey], holder: str) -> tuple[str, list[str]]:
    """The statement that drops `holder`'s claims on `keys`, and its parameters."""
    marks = ", ".join("(%s, %s, %s)" for _ in keys)
    return (
        "DELETE FROM outside_claims WHERE holder = %s "
        f"AND (machine, kind, key) IN (VALUES {marks})",
        [holder, *(part for key in keys for part in key)],
    )


class _Busy(Exception):
    """A claimed key is held by another: rolls the claim's transaction back."""


class PostgresStore:
    """A Store on a PostgreSQL database (see the module docstring for schema, partitions and
    leases). `url` is a libpq URL; the store lives in the first schema of its search_path
    (`?options=-csearch_path%3Dname` keeps several stores in one database).

    `pool_size` bounds the connections this process holds: one per concurrently committing
    partition plus readers. `create` initialises an empty database; without it an empty one
    is refused (a mistyped URL then creates nothing).
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int | None = None,
        create: bool = True,
        partitions: int | None = None,
        lease_ms: int = 30_000,
    ) -> None:
        self.url = url
        self.where = redact(url)
        self.lease_ms = lease_ms
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        with _connect(url) as connection:
            found = _inspect(connection.cursor(), self.where)
        if found.empty:
            if not create:
                raise StoreConfigError(
                    f"{self.where}: the database holds no autonomic store",
                    hint="create one with `autonomic db migrate --store URL`",
                )
            migrate(url, partitions=partitions)
            with _connect(url) as connection:
                found = _inspect(connection.cursor(), self.where)
        if found.version > LATEST_SCHEMA:
            raise _newer(self.where, found.version)
        if found.version < LATEST_SCHEMA:
            raise StoreConfigError(
                f"{self.where}: store schema version {found.version} is older than this "
                f"autonomic's ({LATEST_SCHEMA}); it was left untouched",
                hint="run `autonomic db migrate --store URL` first",
            )
        if partitions is not None and partitions != found.partitions:
            raise StoreConfigError(
                f"{self.where}: the ledger has {found.partitions} partitions, not {partitions}",
                hint="the count is fixed when the store is created",
            )
        with _connect(url) as connection:
            _refuse_altered(connection, found, self.where)
        self.partitions = found.partitions
        size = pool_size if pool_size is not None else min(self.partitions, 16) + 2
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max(size, 2),
            kwargs={"autocommit": True},
            open=True,
            name="autonomic",
        )
        self._closed = threading.Event()
        self._view: int | None = None  # see in_partition
        # Shared with the partition views (in_partition copies the store, not this).
        self._seals = RowSeals(self.where)

    # -- Store -------------------------------------------------------------------------------

    def run(
        self,
        works: Sequence[Callable[[Transaction], T]],
        before_commit: Callable[[Transaction], None] | None = None,
        *,
        partition: int | None = 0,
    ) -> list[WorkOutcome[T]]:
        """As `Store.run`, in ledger partition `partition` (whose head is locked first), or
        None for work that writes no ledger entry and so locks no head."""
        if partition is not None and not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} of {self.partitions}")
        outcomes: list[WorkOutcome[T]] = []
        with self._connection() as connection:
            cursor = connection.cursor()
            execute = cursor.execute
            txn = PostgresTransaction(cursor, partition, self._seals)
            execute("BEGIN")
            try:
                if partition is not None:
                    execute(
                        "SELECT part FROM ledger_heads WHERE part = %s FOR UPDATE", (partition,)
                    )
                single = len(works) == 1
                for work in works:
                    if single:
                        try:
                            outcomes.append(WorkOutcome(work(txn), None))
                        except Exception as exc:
                            execute("ROLLBACK")
                            return [WorkOutcome(None, exc)]
                        continue
                    execute("SAVEPOINT unit")
                    try:
                        value = work(txn)
                    except Exception as exc:
                        execute("ROLLBACK TO SAVEPOINT unit")
                        outcomes.append(WorkOutcome(None, exc))
                    else:
                        outcomes.append(WorkOutcome(value, None))
                if before_commit is not None:
                    before_commit(txn)
                execute("COMMIT")
            except BaseException:
                if not connection.closed and connection.info.transaction_status != 0:
                    connection.rollback()
                raise
        return outcomes

    def run_in_every_partition(self, work: Callable[[Callable[[int], Transaction]], T]) -> T:
        """Run `work` in one transaction holding the head lock of every ledger partition;
        `work` gets each partition's Transaction from the function it is passed. For writes
        that go into every chain at once (a key rotation). The heads are locked in partition
        order and a batch holds one head only, so this never deadlocks with batches."""
        with self._connection() as connection:
            cursor = connection.cursor()
            execute = cursor.execute
            execute("BEGIN")
            try:
                execute("SELECT part FROM ledger_heads ORDER BY part FOR UPDATE")
                value = work(lambda partition: PostgresTransaction(cursor, partition, self._seals))
                execute("COMMIT")
            except BaseException:
                if not connection.closed and connection.info.transaction_status != 0:
                    connection.rollback()
                raise
        return value

    def _connection(self) -> Any:
        try:
            return self._pool.connection(timeout=60)
        except PoolTimeout:
            raise StoreConfigError(
                f"{self.where}: no PostgreSQL connection available within 60 s",
                hint="raise pool_size or the server's max_connections",
            ) from None

    @contextlib.contextmanager
    def snapshot_cursors(self, count: int) -> Iterator[list[psycopg.ServerCursor[Any]]]:
        """`count` server-side cursors in one read-only REPEATABLE READ transaction: several
        tables read as of one moment and streamed, not fetched whole (the instance audit,
        runtime/instance_audit.py)."""
        with self._connection() as connection:
            connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                with contextlib.ExitStack() as cursors:
                    yield [
                        cursors.enter_context(connection.cursor(name=f"autonomic_audit_{index}"))
                        for index in range(count)
                    ]
            finally:
                connection.rollback()

    def _query(
        self, sql: str, parameters: Sequence[object] | Mapping[str, object] = ()
    ) -> list[tuple[Any, ...]]:
        with self._connection() as connection:
            rows: list[tuple[Any, ...]] = connection.execute(cast(Any, sql), parameters).fetchall()
        return rows

    def seal_rows(self, key: bytes | None, *, adopt: bool = False) -> None:
        if key is None:
            self._seals.key = None
            return
        with self._connection() as connection:
            cursor = connection.cursor()
            try:
                with connection.transaction():
                    # Processes opening one unsealed store at once seal it once.
                    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                    found = cursor.execute(
                        "SELECT value FROM autonomic_meta WHERE key = %s", (SEALED_MARK,)
                    ).fetchone()
                    if found is None:
                        # Never sealed: new (nothing to seal), or rows are adopted as found,
                        # once; from now on a row without its seal is refused.
                        if not adopt:
                            refuse_unsealed_rows(cursor.execute, self.where)
                        seal_every_row(
                            cursor.execute, self._seals, key, check=False, mark=_SAVE_MARK
                        )
                    elif found[0] != self._seals.mark(key):
                        raise StoreIntegrityError(
                            f"{self.where}: its rows are sealed under another key than this "
                            "runtime's signing key",
                            hint="open the store with the key that signs its ledger now "
                            "(after `rotate_key`, the new one)",
                        )
                    else:
                        self._seals.key = key
            except BaseException:
                self._seals.key = None
                raise

    def ledger_mode(self) -> LedgerMode | None:
        rows = self._query("SELECT value FROM ledger_meta WHERE key = %s", (META_MODE_KEY,))
        if not rows:
            return None
        if rows[0][0] not in MODES:
            raise StoreConfigError(f"{self.where}: ledger_meta holds unknown mode {rows[0][0]!r}")
        return cast(LedgerMode, rows[0][0])

    def set_ledger_mode(self, mode: LedgerMode) -> None:
        with self._connection() as connection:
            connection.execute(
                "INSERT INTO ledger_meta (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (META_MODE_KEY, mode),
            )

    def get_instance(self, machine: str, instance: str) -> InstanceRecord | None:
        rows = self._query(
            "SELECT machine, instance, state, version, seal FROM instances "
            "WHERE machine = %s AND instance = %s",
            (machine, instance),
        )
        return self._seals.instance(rows[0]) if rows else None

    def instances(self, machine: str) -> list[InstanceRecord]:
        rows = self._query(
            "SELECT machine, instance, state, version, seal FROM instances WHERE machine = %s "
            'ORDER BY instance COLLATE "C"',
            (machine,),
        )
        return [self._seals.instance(row) for row in rows]

    def partition_of(self, instance: str) -> int:
        """The ledger partition holding `instance`'s entries."""
        return partition_of(instance, self.partitions)

    def in_partition(self, partition: int) -> PostgresStore:
        """This store (same pool) with `partition` as the ledger its reads default to: what the
        runtime's checks of one chain (keys, checkpoints' Merkle tree) read through `Store`."""
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} of {self.partitions}")
        view = copy.copy(self)
        view._view = partition
        return view

    def ledger_entries(
        self,
        *,
        machine: str | None = None,
        instance: str | None = None,
        after_seq: int = -1,
        partition: int | None = None,
    ) -> Iterator[LedgerEntry]:
        """Entries of one partition in seq order: the instance's when `instance` is given,
        else `partition` (default 0, the whole ledger when there is one partition)."""
        if partition is None:
            partition = self._view
        if partition is None:
            partition = 0 if instance is None else self.partition_of(instance)
        where = ["part = %s", "seq > %s"]
        fixed: list[object] = []
        if machine is not None:
            where.append("machine = %s")
            fixed.append(machine)
        if instance is not None:
            where.append("instance = %s")
            fixed.append(instance)
        sql = (
            f"SELECT {_ENTRY_COLUMNS} FROM ledger WHERE {' AND '.join(where)} "
            f"ORDER BY seq LIMIT {_PAGE}"
        )
        last = after_seq
        while True:
            rows = self._query(sql, [partition, last, *fixed])
            for row in rows:
                yield _new_entry(LedgerEntry, row)
            if len(rows) < _PAGE:
                return
            last = rows[-1][0]

    def ledger_entry(self, seq: int, *, partition: int | None = None) -> LedgerEntry | None:
        if partition is None:
            partition = self._view or 0
        rows = self._query(
            f"SELECT {_ENTRY_COLUMNS} FROM ledger WHERE part = %s AND seq = %s", (partition, seq)
        )
        return _new_entry(LedgerEntry, rows[0]) if rows else None

    def checkpoints(self, *, partition: int | None = None) -> list[Checkpoint]:
        if partition is None:
            partition = self._view or 0
        rows = self._query(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM ledger_checkpoints WHERE part = %s ORDER BY size",
            (partition,),
        )
        return [Checkpoint(*row) for row in rows]

    def newest_ts(self) -> int | None:
        """The newest ledger timestamp in any partition (None: no entries)."""
        rows = self._query("SELECT max(ts_ms) FROM ledger")
        return None if rows[0][0] is None else int(rows[0][0])

    def partition_heads(self) -> list[tuple[int, bytes]]:
        """(size, head hash) of every partition as committed now, in partition order; one
        statement, so one consistent snapshot of all heads."""
        rows = self._query(
            "SELECT h.part, l.seq, l.entry_hash FROM ledger_heads h LEFT JOIN LATERAL "
            "(SELECT seq, entry_hash FROM ledger WHERE part = h.part ORDER BY seq DESC LIMIT 1)"
            " l ON true ORDER BY h.part"
        )
        return [(0, bytes(32)) if seq is None else (seq + 1, bytes(h)) for _, seq, h in rows]

    def add_root(self, root: SignedRoot) -> None:
        with self._connection() as connection:
            connection.execute(
                "INSERT INTO ledger_roots (ts_ms, partitions, heads, root, key_id, signature) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    root.ts_ms,
                    len(root.heads),
                    encode_heads(root.heads),
                    root.root,
                    root.key_id,
                    root.signature,
                ),
            )

    def roots(self) -> list[SignedRoot | str]:
        """Every stored root, oldest first; a string says why a row is not a readable root
        (nothing read from the store is trusted: the caller verifies each root)."""
        rows = self._query(
            "SELECT id, ts_ms, partitions, heads, root, key_id, signature FROM ledger_roots "
            "ORDER BY id"
        )
        found: list[SignedRoot | str] = []
        for row_id, ts_ms, partitions, heads, root, key_id, signature in rows:
            decoded = decode_heads(bytes(heads))
            if decoded is None or len(decoded) != partitions:
                found.append(f"root {row_id}: its heads do not hold {partitions} partitions")
                continue
            signed = SignedRoot(ts_ms, tuple(decoded), key_id, bytes(signature))
            if signed.root != bytes(root):
                found.append(f"root {row_id}: the stored Merkle root does not match its heads")
                continue
            found.append(signed)
        return found

    def partition_entries(self, partition: int) -> Iterator[LedgerEntry]:
        return self.ledger_entries(partition=partition)

    def partition_checkpoints(self, partition: int) -> list[Checkpoint]:
        return self.checkpoints(partition=partition)

    def latest_snapshot(self, machine: str, instance: str) -> Snapshot | None:
        rows = self._query(
            "SELECT version, state, ledger_seq, entry_hash, kept_seq FROM snapshots "
            "WHERE machine = %s AND instance = %s",
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
            where.append("machine = %s")
            parameters.append(machine)
        if instance is not None:
            where.append("instance = %s")
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
        rows = self._query(
            f"SELECT {_TIMER_READ} FROM timers t WHERE due_ms <= %s AND machine = ANY(%s) "
            f"AND NOT {_RETRYING.format(t='t')} ORDER BY due_ms, id LIMIT %s",
            (now_ms, list(machines), now_ms, now_ms + RETRY_LATER_CAP_MS, limit),
        )
        return self._fired([self._seals.timer(row) for row in rows])

    def _fired(self, timers: list[ArmedTimer]) -> list[ArmedTimer]:
        """`timers` about to fire but those fired meanwhile; refused if one whose firing the
        ledger records is still there (put back: LedgerAnchor)."""
        if not timers or self._seals.key is None:
            return timers
        with self._connection() as connection:
            anchor = _anchor(self._seals)
            return [t for t in timers if anchor.timer(connection.execute, t)]

    def claim_due_timers(
        self, now_ms: int, machines: Sequence[str], limit: int
    ) -> list[ArmedTimer]:
        """Lease up to `limit` due timers of `machines` to this store's owner for `lease_ms`:
        each the earliest armed timer of its instance, not leased by anyone else, skipping
        rows another worker is claiming right now. Earliest first."""
        if not machines:
            return []
        with self._connection() as connection:
            rows = connection.execute(
                f"UPDATE timers t SET lease_owner = %(owner)s, "
                f"lease_until_ms = {_DB_NOW_MS} + %(lease)s "
                "FROM (SELECT id FROM timers c WHERE c.due_ms <= %(now)s "
                "AND c.machine = ANY(%(machines)s) "
                f"AND (c.lease_until_ms IS NULL OR c.lease_until_ms <= {_DB_NOW_MS} "
                # A lease longer than this store's own was granted by no worker of it.
                f"OR c.lease_until_ms > {_DB_NOW_MS} + %(lease)s) "
                f"AND NOT {_CLAIM_RETRYING} "
                "AND NOT EXISTS (SELECT 1 FROM timers e WHERE e.machine = c.machine "
                "AND e.instance = c.instance AND (e.due_ms, e.id) < (c.due_ms, c.id)) "
                "ORDER BY c.due_ms, c.id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) claimed "
                "WHERE t.id = claimed.id RETURNING "
                + ", ".join(f"t.{c.strip()}" for c in _TIMER_READ.split(",")),
                {
                    "owner": self.owner,
                    "lease": self.lease_ms,
                    "now": now_ms,
                    "machines": list(machines),
                    "limit": limit,
                    "cap": now_ms + RETRY_LATER_CAP_MS,
                },
            ).fetchall()
        timers = [(row[5], row[0], self._seals.timer(row)) for row in rows]
        timers.sort(key=lambda found: found[:2])
        return self._fired([timer for _, _, timer in timers])

    def claim_outbox(
        self, *, kind: OutboxKind, limit: int, due_ms: int | None = None
    ) -> list[OutboxMessage]:
        """Lease up to `limit` pending messages of `kind` for `lease_ms`: each the oldest
        pending message to its target instance, not leased by anyone else, and (with
        `due_ms`) not waiting for a retry after `due_ms` (Transaction.retry_outbox). Oldest
        first, each with its retry."""
        due = "" if due_ms is None else f"AND NOT {_OUTBOX_HELD_BACK.format(m='c')} "
        with self._connection() as connection:
            rows = connection.execute(
                f"WITH claimed AS (UPDATE outbox o SET lease_owner = %(owner)s, "
                f"lease_until_ms = {_DB_NOW_MS} + %(lease)s "
                "FROM (SELECT id FROM outbox c WHERE c.status = 'pending' AND c.kind = %(kind)s "
                f"AND (c.lease_until_ms IS NULL OR c.lease_until_ms <= {_DB_NOW_MS} "
                # A lease longer than this store's own was granted by no worker of it.
                f"OR c.lease_until_ms > {_DB_NOW_MS} + %(lease)s) "
                "AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.status = 'pending' "
                "AND e.target_machine = c.target_machine "
                f"AND e.target_instance = c.target_instance AND e.id < c.id) {due}"
                "ORDER BY c.id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) picked "
                "WHERE o.id = picked.id RETURNING o.*) SELECT "
                + OUTBOX_WITH_RETRY.replace("FROM outbox o", "FROM claimed o"),
                {
                    "owner": self.owner,
                    "lease": self.lease_ms,
                    "kind": kind,
                    "limit": limit,
                    "due": due_ms,
                },
            ).fetchall()
        rows.sort(key=lambda row: row[0])
        return [with_retry(self._seals.message(row), row) for row in rows]

    def lease_in(self, txn: Transaction, message_id: int) -> None:
        """Lease a message to this store's owner for `lease_ms`, in `txn` (a unit of work of
        this store): a refusal notice this worker releases and delivers next, which no other
        worker claims meanwhile, and which returns to the fleet if this one dies."""
        cast(PostgresTransaction, txn).lease_outbox(message_id, self.owner, self.lease_ms)

    def outbox(
        self,
        *,
        kind: OutboxKind | None = None,
        status: OutboxStatus | None = "pending",
        limit: int = 1000,
        due_ms: int | None = None,
    ) -> list[OutboxMessage]:
        where: list[str] = []
        parameters: dict[str, object] = {"limit": limit, "due": due_ms}
        if status is not None:
            where.append("o.status = %(status)s")
            parameters["status"] = status
        if kind is not None:
            where.append("o.kind = %(kind)s")
            parameters["kind"] = kind
        if due_ms is not None:
            where.append(f"NOT {_OUTBOX_HELD_BACK.format(m='o')}")
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self._query(
            f"SELECT {OUTBOX_WITH_RETRY} {clause}ORDER BY o.id LIMIT %(limit)s", parameters
        )
        return [with_retry(self._seals.message(row), row) for row in rows]

    def get_flow(self, flow_id: str) -> FlowRecord | None:
        rows = self._query(f"SELECT {_FLOW_READ} FROM flows WHERE flow_id = %s", (flow_id,))
        return self._seals.flow(rows[0]) if rows else None

    def unfinished_flows(self, limit: int = 1000) -> list[FlowRecord]:
        rows = self._query(
            f"SELECT {_FLOW_READ} FROM flows "
            "WHERE status NOT IN ('completed', 'compensated', 'failed') "
            "ORDER BY updated_ms, flow_id LIMIT %s",
            (limit,),
        )
        return [self._seals.flow(row) for row in rows]

    def processed(self, machine: str, event_id: str) -> str | None:
        rows = self._query(_PROCESSED_SQL, (machine, event_id))
        if not rows:
            rows = self._missed(_PROCESSED_SQL, "processed_events", machine, event_id, event_id)
            if not rows:
                return None
        return str(self._seals.stored_result("processed_events", rows[0])[3])

    def get_processed_and_instance(
        self, machine: str, event_id: str, instance: str
    ) -> tuple[str | None, InstanceRecord | None]:
        return processed_then_instance(
            self.processed, self.get_instance, machine, event_id, instance
        )

    def idempotency(self, machine: str, key: str) -> tuple[bytes, str] | None:
        rows = self._query(_IDEMPOTENCY_SQL, (machine, key))
        if not rows:
            rows = self._missed(
                _IDEMPOTENCY_SQL,
                "idempotency_keys",
                machine,
                key,
                idempotency_event_id(machine, key),
            )
            if not rows:
                return None
        values = self._seals.stored_result("idempotency_keys", rows[0])
        return values[2], values[3]

    def _missed(
        self, sql: str, table: str, machine: str, name: str, event_id: str
    ) -> list[tuple[Any, ...]]:
        """A committed dedup miss, checked against the ledger (row_seals.LedgerAnchor): the
        row, if it was committed since the first read; none if the ledger knows of none."""
        if self._seals.key is None:
            return []
        with self._connection() as connection:
            anchor = _anchor(self._seals)
            seq = anchor.missing(connection.execute, machine, event_id)
            if seq is None:
                return []
            rows: list[tuple[Any, ...]] = connection.execute(
                cast(Any, sql), (machine, name)
            ).fetchall()
        if not rows:
            raise anchor.deleted(table, machine, name, seq)
        return rows

    def get_breaker(self, machine: str, name: str) -> BreakerRecord | None:
        def read() -> BreakerRecord | None:
            rows = self._query(
                f"SELECT {_BREAKER_READ} FROM breakers WHERE machine = %s AND name = %s",
                (machine, name),
            )
            return self._seals.breaker(rows[0]) if rows else None

        def execute(sql: str, parameters: Sequence[object]) -> Fetched:
            return Fetched(self._query(sql, parameters))

        return _anchor(self._seals).breaker(execute, machine, name, read)

    def get_instance_data(self, machine: str, instance: str) -> str | None:
        rows = self._query(
            "SELECT data FROM instance_data WHERE machine = %s AND instance = %s",
            (machine, instance),
        )
        return str(rows[0][0]) if rows else None

    def deadlines(self) -> list[DeadlineRecord]:
        rows = self._query(f"SELECT {_DEADLINE_READ} FROM deadlines ORDER BY due_ms, id")
        return [self._seals.deadline(row) for row in rows]

    def earliest_deadline(self, prefix: str, governors: Sequence[str]) -> int | None:
        rows = self._query(
            "SELECT due_ms FROM deadlines WHERE left(id, %s) = %s AND governor = ANY(%s) "
            "ORDER BY due_ms LIMIT 1",
            (len(prefix), prefix, list(governors)),
        )
        return int(rows[0][0]) if rows else None

    def claim_outside(self, keys: Sequence[ClaimKey], holder: str, lease_ms: int) -> bool:
        # One upsert per key that takes a row only if it is free, its lease ran out (on the
        # database clock, as worker leases) or it is the holder's own; all in one
        # transaction, rolled back unless every key was taken.
        with self._connection() as connection:
            cursor = connection.cursor()
            try:
                with connection.transaction():
                    for machine, kind, key in keys:
                        cursor.execute(
                            "INSERT INTO outside_claims AS c (machine, kind, key, holder, "
                            f"until_ms) VALUES (%s, %s, %s, %s, {_DB_NOW_MS} + %s) "
                            "ON CONFLICT (machine, kind, key) DO UPDATE SET "
                            "holder = EXCLUDED.holder, until_ms = EXCLUDED.until_ms "
                            f"WHERE c.holder = EXCLUDED.holder OR c.until_ms <= {_DB_NOW_MS} "
                            # A lease longer than this runtime's own is not one it granted:
                            # a row written outside it would hold the key for ever.
                            f"OR c.until_ms > {_DB_NOW_MS} + %s "
                            "RETURNING 1",
                            (machine, kind, key, holder, lease_ms, lease_ms),
                        )
                        if cursor.fetchone() is None:
                            raise _Busy()
            except _Busy:
                return False
        return True

    def renew_outside(self, keys: Sequence[ClaimKey], holder: str, lease_ms: int) -> bool:
        renewed = 0
        with self._connection() as connection:
            cursor = connection.cursor()
            with connection.transaction():
                for machine, kind, key in keys:
                    cursor.execute(
                        f"UPDATE outside_claims SET until_ms = {_DB_NOW_MS} + %s "
                        "WHERE machine = %s AND kind = %s AND key = %s AND holder = %s",
                        (lease_ms, machine, kind, key, holder),
                    )
                    renewed += cursor.rowcount
        return renewed == len(keys)

    def release_outside(self, keys: Sequence[ClaimKey], holder: str) -> None:
        if not keys:
            return
        # One statement, so one commit for all the keys (executemany on an autocommit
        # connection committed each key's DELETE on its own).
        with self._connection() as connection:
            connection.execute(*_release_claims(keys, holder))

    def close(self) -> None:
        if self._view is not None:
            return  # a partition's view: the store it came from owns the pool
        if not self._closed.is_set():
            self._closed.set()
            self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
