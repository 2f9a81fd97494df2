"""Auditing a store's live rows against its verified ledger: every instance's state and version,
and every instance's kept data.

The ledger says what each instance should hold: its version is the count of its changes (the
"transition", "timer" and "escalation" entries of (machine, instance); rejections and kept
entries change nothing), its state the `to_state` of the newest one, and its kept data the
value whose `kept_digest` its newest "kept" entry holds (runtime/ledger.py). `autonomic audit
verify` verifies the ledger first, then compares every row of `instances` and `instance_data`
with it, and names the first instance that differs: a row changed, rolled back, deleted or
added behind the runtime's back, or kept data no signed entry commits to.

On SQLite (`verify_sqlite_store`) the ledger side comes from the verifier's own pass: it
tallies every instance as it verifies the entries (instance_tally.py), and the rows are read in
the read transaction the entries were verified in. Memory stays flat whatever the store holds:
past a limit of instances, and on PostgreSQL, the database aggregates the ledger per instance
instead (SQLite sorts through temporary files). Either way the rows and the ledger's side are
merged here as two streams ordered the same way (byte order of machine, then instance). The
aggregates read the ledger table itself, never an index, as the verifier does. A store audited
in a read transaction of its own (`audit_sqlite_instances`, PostgreSQL) may have been written
to since its entries were verified: an instance whose newest entry lies beyond them moved
meanwhile, and is counted as moved rather than checked.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .audit_problem import InstanceProblem
from .errors import LedgerReadError
from .instance_tally import (
    CHANGE_KINDS,
    DEADLINE_ACTOR,
    INSTANCE_KINDS,
    MAX_TALLIED_INSTANCES,
    InstanceTallies,
)
from .keychain import RootOfTrust
from .ledger import KEPT, Checkpoint, RootLike, VerifyReport, kept_digest
from .ledger_io import LedgerSource, refuse_altered_schema
from .ledger_ranges import PARALLEL_MIN_ENTRIES, verify_source

if TYPE_CHECKING:
    from .flow_audit import FlowAudit
    from .store.postgres import PostgresStore

__all__ = [
    "InstanceAudit",
    "InstanceProblem",
    "audit_instances",
    "audit_postgres_instances",
    "audit_sqlite_instances",
    "verify_sqlite_store",
]

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class InstanceAudit:
    """`instances` rows and `kept` data rows checked; `moved`: instances that changed after
    the verified entries (not checked); the first problem, if any; `runs`: `flows` rows
    checked (runtime/flow_audit.py), `runs_moved` those not checked for the same reason."""

    instances: int
    kept: int
    moved: int
    problem: InstanceProblem | None
    runs: int = 0
    runs_moved: int = 0

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        plural = "" if self.instances == 1 else "s"
        text = (
            f"checked {self.instances} instance{plural} against the ledger "
            f"(state and version; {self.kept} with kept data) and {self.runs} flow "
            f"run{'' if self.runs == 1 else 's'} (status, version and inputs)"
        )
        if self.moved or self.runs_moved:
            text += (
                f"; {self.moved + self.runs_moved} moved while the ledger was verified, not checked"
            )
        return text

    def with_flows(self, flows: FlowAudit) -> InstanceAudit:
        """This audit and the flow runs' (whose problem counts when the instances had none)."""
        problem = self.problem if self.problem is not None else flows.problem
        return replace(self, problem=problem, runs=flows.runs, runs_moved=flows.moved)


class _Found(Exception):
    def __init__(self, problem: InstanceProblem) -> None:
        super().__init__(problem.reason)
        self.problem = problem


def _key(row: tuple[Any, ...], what: str) -> Key:
    machine, instance = row[0], row[1]
    if type(machine) is not str or type(instance) is not str:
        raise _Found(
            InstanceProblem(str(machine), str(instance), None, f"the {what} row's key is not text")
        )
    return machine, instance


def _merged(
    left: Iterable[tuple[Any, ...]], right: Iterable[tuple[Any, ...]], what: tuple[str, str]
) -> Iterator[tuple[Key, tuple[Any, ...] | None, tuple[Any, ...] | None]]:
    """A full outer join of two streams ordered by key: (key, left row, right row)."""
    lefts, rights = iter(left), iter(right)
    previous: dict[int, Key] = {}

    def pull(rows: Iterator[tuple[Any, ...]], side: int) -> tuple[Key, tuple[Any, ...]] | None:
        row = next(rows, None)
        if row is None:
            return None
        key = _key(row, what[side])
        last = previous.get(side)
        if last is not None and key <= last:
            # Not ordered as asked: the merge would pair the wrong rows; refuse to guess.
            raise _Found(InstanceProblem(*key, None, f"the {what[side]} rows are not in key order"))
        previous[side] = key
        return key, row

    a, b = pull(lefts, 0), pull(rights, 1)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            assert a is not None
            yield a[0], a[1], None
            a = pull(lefts, 0)
        elif a is None or b[0] < a[0]:
            yield b[0], None, b[1]
            b = pull(rights, 1)
        else:
            yield a[0], a[1], b[1]
            a, b = pull(lefts, 0), pull(rights, 1)


def audit_instances(
    rows: Iterable[tuple[Any, ...]],
    changes: Iterable[tuple[Any, ...]],
    data: Iterable[tuple[Any, ...]],
    kept: Iterable[tuple[Any, ...]],
    verified: Callable[[str, int], bool],
    found: Iterable[InstanceProblem] = (),
) -> InstanceAudit:
    """Compare the store's rows with the ledger's aggregates, each stream ordered by (machine,
    instance) in byte order:

    rows: (machine, instance, state, version) of `instances`;
    changes: (machine, instance, count, newest seq, its to_state) of the change entries;
    data: (machine, instance, JSON text) of `instance_data`;
    kept: (machine, instance, newest seq, its payload_sha256) of the kept entries.

    `verified(instance, seq)`: whether entry `seq` of the instance's chain was verified (a
    newer one means the instance moved during the audit).
    found: problems the database found by itself (`_breaks`, `_strays`); the first is the
    answer, however the rows read."""
    checked = kept_count = moved = 0
    try:
        for problem in found:
            raise _Found(problem)
        for (machine, instance), row, change in _merged(rows, changes, ("instances", "ledger")):
            if change is not None and not verified(instance, change[3]):
                moved += 1
                continue
            if row is None:
                assert change is not None
                raise _Found(
                    InstanceProblem(
                        machine,
                        instance,
                        change[3],
                        f"the ledger records {change[2]} change(s) of this instance, but the "
                        "store holds no row for it (deleted?)",
                    )
                )
            checked += 1
            state, version = row[2], row[3]
            if change is None:
                raise _Found(
                    InstanceProblem(
                        machine,
                        instance,
                        None,
                        f"the row (state '{state}', version {version}) has no ledger entry: "
                        "no change of this instance was ever recorded",
                    )
                )
            count, seq, to_state = change[2], change[3], change[4]
            if version != count or state != to_state:
                raise _Found(
                    InstanceProblem(
                        machine,
                        instance,
                        seq,
                        f"the row holds state '{state}' at version {version}, but the ledger "
                        f"records {count} change(s), the newest into '{to_state}'",
                    )
                )
        for (machine, instance), stored, entry in _merged(data, kept, ("instance_data", "ledger")):
            if entry is not None and not verified(instance, entry[2]):
                continue
            if entry is None:
                raise _Found(
                    InstanceProblem(
                        machine,
                        instance,
                        None,
                        "the store holds kept data for this instance that no kept ledger entry "
                        "commits to",
                    )
                )
            if stored is None:
                raise _Found(
                    InstanceProblem(
                        machine,
                        instance,
                        entry[2],
                        "the ledger's kept entry commits to data the store no longer holds",
                    )
                )
            kept_count += 1
            text = stored[2]
            if type(text) is not str or _digest(text) != entry[3]:
                raise _Found(
                    InstanceProblem(
                        machine,
                        instance,
                        entry[2],
                        "the kept data differs from what the newest kept entry commits to",
                    )
                )
    except _Found as found:
        return InstanceAudit(checked, kept_count, moved, found.problem)
    return InstanceAudit(checked, kept_count, moved, None)


def _digest(text: str) -> bytes | None:
    try:
        return kept_digest(text)
    except UnicodeEncodeError:
        return None


def _breaks(rows: Iterable[tuple[Any, ...]]) -> Iterator[InstanceProblem]:
    """(machine, instance, seq, from_state, the previous entry's to_state or None) of verified
    entries that do not start where the instance's previous entry ended (a first entry not from
    ''): a row rewritten behind the runtime's back, which its next move then signed from."""
    for machine, instance, seq, from_state, previous in rows:
        where = (
            "no earlier entry" if previous is None else f"its previous entry ended in {previous!r}"
        )
        yield InstanceProblem(
            str(machine),
            str(instance),
            seq if type(seq) is int else None,
            f"an entry moves it from {from_state!r}, but {where}: its state was changed outside "
            "the runtime before that move",
        )


def _strays(rows: Iterable[tuple[Any, ...]], partitions: int) -> Iterator[InstanceProblem]:
    """(machine, instance, part, seq) of ledger rows in a partition the store does not have."""
    for machine, instance, part, seq in rows:
        yield InstanceProblem(
            str(machine),
            str(instance),
            seq if type(seq) is int else None,
            f"the ledger holds rows in partition {part}, which is none of the store's "
            f"{partitions}: no chain holds them and nothing verified them",
        )


# ---------------------------------------------------------------------------------------------
# SQLite: one read transaction over the store file.

_ORDER = "machine COLLATE BINARY, instance COLLATE BINARY"
# Grouped by instance first (its values differ sooner: a quarter less sorting), then the groups
# ordered for the merge. With a single max(), SQLite takes the bare column from its row.
_GROUPS = "GROUP BY instance COLLATE BINARY, machine COLLATE BINARY"
_SQLITE_CHANGES = (
    "SELECT machine, instance, n, last, to_state FROM (SELECT machine, instance, "
    "count(*) AS n, max(seq) AS last, to_state FROM ledger NOT INDEXED "
    f"WHERE kind COLLATE BINARY IN {CHANGE_KINDS!r} "
    f"AND NOT (kind COLLATE BINARY = 'escalation' AND actor COLLATE BINARY = '{DEADLINE_ACTOR}') "
    f"{_GROUPS}) ORDER BY {_ORDER}"
)
_SQLITE_KEPT = (
    "SELECT machine, instance, last, digest FROM (SELECT machine, instance, max(seq) AS last, "
    f"payload_sha256 AS digest FROM ledger NOT INDEXED WHERE kind COLLATE BINARY = '{KEPT}' "
    f"{_GROUPS}) ORDER BY {_ORDER}"
)
_SQLITE_ROWS = (
    f"SELECT machine, instance, state, version FROM instances NOT INDEXED ORDER BY {_ORDER}"
)
_SQLITE_DATA = f"SELECT machine, instance, data FROM instance_data NOT INDEXED ORDER BY {_ORDER}"
# Every entry of an instance (its changes, rejections and kept entries) starts in the state the
# one before it ended in, and its first from '' (its creation); the first that does not.
_SQLITE_BREAKS = (
    "SELECT machine, instance, seq, from_state, previous FROM (SELECT machine, instance, seq, "
    "from_state, lag(to_state) OVER (PARTITION BY machine COLLATE BINARY, instance COLLATE "
    "BINARY ORDER BY seq) AS previous FROM ledger NOT INDEXED WHERE seq < ? "
    f"AND kind COLLATE BINARY IN {INSTANCE_KINDS!r} "
    f"AND NOT (kind COLLATE BINARY = 'escalation' AND actor COLLATE BINARY = '{DEADLINE_ACTOR}')) "
    "WHERE CASE WHEN previous IS NULL THEN from_state IS NOT '' "
    "ELSE from_state IS NOT previous END ORDER BY seq LIMIT 1"
)


def audit_sqlite_instances(path: str | Path, verified: int) -> InstanceAudit | None:
    """Audit the store file at `path`, whose first `verified` ledger entries were verified;
    None if it is no SQLite database (a JSON Lines export) or holds no instances table (a
    ledger alone). sqlite3.Error if it cannot be read."""
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    connection = sqlite3.connect(uri, uri=True, isolation_level=None)
    try:
        connection.execute("BEGIN")
        try:
            tables = _tables(connection)
        except sqlite3.DatabaseError as exc:
            if exc.sqlite_errorcode == sqlite3.SQLITE_NOTADB:
                return None
            raise
        # Before any row: the same check the verifier made, in this read transaction.
        refuse_altered_schema(connection, path)
        if not tables & _STORE_TABLES:
            return None  # a ledger alone, not a store
        return _audit_connection(connection, tables, verified, None)
    finally:
        connection.close()


def verify_sqlite_store(
    source: LedgerSource,
    root: RootLike,
    *,
    external_checkpoint: Checkpoint | None = None,
    external_label: str = "external checkpoint",
    processes: int | None = None,
    range_size: int | None = None,
    min_entries: int = PARALLEL_MIN_ENTRIES,
    limit: int = MAX_TALLIED_INSTANCES,
) -> tuple[VerifyReport, InstanceAudit | None]:
    """Verify an open ledger (ledger_ranges.verify_source) and, if it verifies and is a store's,
    audit the store's instances against it in the same read transaction: nothing moves between
    the two. The verifier tallies every instance as it reads the entries (instance_tally.py);
    a store of more than `limit` instances is audited through the database's aggregates
    instead, while worker processes verify a large ledger. None for the audit: no store.
    sqlite3.Error if the instances cannot be read."""
    connection = source.connection
    tables = set() if connection is None else _tables(connection)
    tallies: InstanceTallies | None = None
    early: dict[int, InstanceAudit | sqlite3.Error] = {}

    def meanwhile(count: int) -> None:
        assert connection is not None
        try:
            early[count] = _audit_connection(connection, tables, count, None)
        except sqlite3.Error as exc:
            early[count] = exc

    store = connection is not None and bool(tables & _STORE_TABLES)
    if connection is not None and store:
        rows = 0
        if "instances" in tables:
            rows = connection.execute("SELECT count(*) FROM instances NOT INDEXED").fetchone()[0]
        # The row count only chooses the way; a ledger of more instances than its rows makes
        # the tallies give up, and the aggregates answer after all.
        tallies = InstanceTallies(limit) if rows <= limit else None
    report = verify_source(
        source,
        RootOfTrust.of(root),
        external_checkpoint=external_checkpoint,
        external_label=external_label,
        processes=processes,
        range_size=range_size,
        min_entries=min_entries,
        meanwhile=meanwhile if store and tallies is None else None,
        tallies=tallies,
    )
    if not report.ok or connection is None or not store:
        return report, None
    audit = early.get(report.count)
    if audit is None:
        complete = tallies is not None and tallies.complete
        audit = _audit_connection(connection, tables, report.count, tallies if complete else None)
    if isinstance(audit, sqlite3.Error):
        raise audit
    return report, audit


_STORE_TABLES = {"instances", "runtime_meta"}  # a store's, not a ledger's alone


def _tables(connection: sqlite3.Connection) -> set[str]:
    return {
        row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }


def _audit_connection(
    connection: sqlite3.Connection,
    tables: set[str],
    verified: int,
    tallies: InstanceTallies | None,
) -> InstanceAudit:
    """The audit in the connection's read transaction, whose schema was checked: the ledger
    side from `tallies` of every verified entry, or (None) from the database's aggregates."""
    # Sorting spills to temporary files, not memory (see the module docstring).
    connection.execute("PRAGMA temp_store = FILE")
    # A store without its instances (or data) table holds no rows: every instance the
    # ledger records is then missing.
    rows: Iterable[tuple[Any, ...]] = ()
    if "instances" in tables:
        rows = connection.execute(_SQLITE_ROWS)
    data: Iterable[tuple[Any, ...]] = ()
    if "instance_data" in tables:
        data = connection.cursor().execute(_SQLITE_DATA)
    changes: Iterable[tuple[Any, ...]]
    kept: Iterable[tuple[Any, ...]]
    if tallies is not None:
        changes, kept = tallies.changes(), tallies.kept()
        brk = tallies.first_break
        breaks = _breaks(() if brk is None else [(brk[1], brk[2], brk[0], brk[3], brk[4])])
    else:
        # Each query on a cursor of its own, all in the one read transaction.
        changes = connection.cursor().execute(_SQLITE_CHANGES)
        kept = connection.cursor().execute(_SQLITE_KEPT)
        breaks = _breaks(connection.cursor().execute(_SQLITE_BREAKS, (verified,)))
    audit = audit_instances(rows, changes, data, kept, lambda instance, seq: seq < verified, breaks)
    if "flows" not in tables:
        return audit
    from .flow_audit import FLOW_ENTRIES_SQL, FLOW_ROWS_SQL, SEALED_SQL, audit_flows

    sealed = "runtime_meta" in tables and bool(connection.execute(SEALED_SQL["sqlite"]).fetchone())
    flows = audit_flows(
        connection.cursor().execute(FLOW_ROWS_SQL["sqlite"]),
        connection.cursor().execute(FLOW_ENTRIES_SQL["sqlite"]),
        lambda flow_id, seq: seq < verified,
        sealed=sealed,
    )
    return audit.with_flows(flows)


# ---------------------------------------------------------------------------------------------
# PostgreSQL: the same over every partition, streamed through server-side cursors.

_PG_ORDER = 'machine COLLATE "C", instance COLLATE "C"'
_PG_CHANGES = (
    "SELECT machine, instance, count(*), max(seq), "
    "(array_agg(to_state ORDER BY seq DESC))[1] FROM ledger "
    f"WHERE kind IN {CHANGE_KINDS!r} "
    f"AND NOT (kind = 'escalation' AND actor = '{DEADLINE_ACTOR}') "
    f"GROUP BY machine, instance ORDER BY {_PG_ORDER}"
)
_PG_KEPT = (
    "SELECT machine, instance, max(seq), "
    "(array_agg(payload_sha256 ORDER BY seq DESC))[1] FROM ledger "
    f"WHERE kind = '{KEPT}' GROUP BY machine, instance ORDER BY {_PG_ORDER}"
)
_PG_BREAKS = (
    "SELECT machine, instance, seq, from_state, previous FROM (SELECT part, machine, instance, "
    "seq, from_state, lag(to_state) OVER (PARTITION BY part, machine, instance ORDER BY seq) "
    "AS previous FROM ledger WHERE part >= 0 AND part < cardinality(%(verified)s::bigint[]) "
    "AND seq < (%(verified)s::bigint[])[part + 1] "
    f"AND kind IN {INSTANCE_KINDS!r} "
    f"AND NOT (kind = 'escalation' AND actor = '{DEADLINE_ACTOR}')) AS chained "
    "WHERE CASE WHEN previous IS NULL THEN from_state <> '' ELSE from_state <> previous END "
    "ORDER BY part, seq LIMIT 1"
)
# Rows of a partition that is not one of the store's: no chain holds them, nothing verified them.
_PG_STRAYS = (
    "SELECT machine, instance, part, seq FROM ledger WHERE part < 0 OR part >= %(partitions)s "
    "UNION ALL SELECT '', '', part, size FROM ledger_checkpoints "
    "WHERE part < 0 OR part >= %(partitions)s LIMIT 1"
)
_PG_ROWS = f"SELECT machine, instance, state, version FROM instances ORDER BY {_PG_ORDER}"
_PG_DATA = f"SELECT machine, instance, data FROM instance_data ORDER BY {_PG_ORDER}"


def audit_postgres_instances(store: PostgresStore, verified: list[int]) -> InstanceAudit:
    """Audit a PostgreSQL store whose partition p had its first `verified[p]` entries verified,
    in one REPEATABLE READ transaction."""
    from .partitions import partition_of

    partitions = len(verified)

    def checked(instance: str, seq: int) -> bool:
        return seq < verified[partition_of(instance, partitions)]

    import psycopg

    from .flow_audit import FLOW_ENTRIES_SQL, FLOW_ROWS_SQL, SEALED_SQL, audit_flows

    try:
        with store.snapshot_cursors(9) as cursors:
            rows, changes, data, kept, breaks, strays, runs, entries, meta = cursors
            audit = audit_instances(
                _streamed(rows, _PG_ROWS),
                _streamed(changes, _PG_CHANGES),
                _streamed(data, _PG_DATA),
                _streamed(kept, _PG_KEPT),
                checked,
                itertools.chain(
                    _strays(_streamed(strays, _PG_STRAYS, {"partitions": partitions}), partitions),
                    _breaks(_streamed(breaks, _PG_BREAKS, {"verified": verified})),
                ),
            )
            sealed = any(_streamed(meta, SEALED_SQL["postgres"]))
            flows = audit_flows(
                _streamed(runs, FLOW_ROWS_SQL["postgres"]),
                _streamed(entries, FLOW_ENTRIES_SQL["postgres"]),
                checked,
                sealed=sealed,
            )
            return audit.with_flows(flows)
    except psycopg.Error as exc:
        # A table dropped or altered: a diagnostic, not an internal error.
        raise LedgerReadError(
            f"{store.where}: cannot read the instances: {str(exc).splitlines()[0]}"
        ) from None


def _streamed(
    cursor: Any, sql: str, parameters: dict[str, object] | None = None
) -> Iterator[tuple[Any, ...]]:
    cursor.execute(sql, parameters)
    for row in cursor:
        yield tuple(bytes(value) if isinstance(value, memoryview) else value for value in row)
