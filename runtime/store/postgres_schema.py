"""The exact PostgreSQL schema a store must have before anything of it is read or trusted.

The SQLite store compares every declaration of a file with the SQL the runtime gives it
(store/sqlite_schema.py); this is the same for a PostgreSQL store, read from the server's own
catalogs. Every object of the store's schema is described from pg_catalog, one line each, as
the server itself prints it (pg_get_indexdef, pg_get_constraintdef, format_type, ...): tables
and sequences with their kind, persistence (an UNLOGGED ledger loses acknowledged entries in a
crash) and row security; every column with its position, type, NOT NULL, default, collation
(a key re-declared `COLLATE "C"`/nondeterministic answers for other ids), identity and
generation; constraints, indexes (with their predicates and validity), triggers, rules and
row-security policies; the tables inheriting from or partitioning ours, wherever they live
(their rows are read as ours); and functions, operators, types and collations declared in the
schema. The description must equal, line for line, that of the schema the store's own
migrations 1..N create (N: the version its autonomic_meta records), built in the server's
temporary schema inside a transaction that is rolled back, so nothing is written. Anything
else is refused with a diagnostic before a row is read (but the version mark itself).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, cast

import psycopg

__all__ = ["describe", "expected_schema", "schema_problem"]

# One line per object, each as the server prints it, with search_path set to the schema
# described (so that names in it are printed unqualified): `%(ns)s` is its oid.
_DESCRIBE = """
WITH ours AS (
    SELECT c.oid, c.relname, c.relkind FROM pg_class c WHERE c.relnamespace = %(ns)s
)
SELECT 'relation ' || c.relname || ' kind=' || c.relkind::text
    || ' persistence=' || CASE c.relpersistence WHEN 't' THEN 'p' ELSE c.relpersistence::text END
    || ' rls=' || c.relrowsecurity || '/' || c.relforcerowsecurity
    || ' partition=' || c.relispartition
    || ' options=' || coalesce(array_to_string(c.reloptions, ','), '')
    || ' partkey=' || coalesce(pg_get_partkeydef(c.oid), '')
    || ' bound=' || coalesce(pg_get_expr(c.relpartbound, c.oid), '')
    || ' am=' || coalesce((SELECT amname FROM pg_am WHERE oid = c.relam), '')
FROM pg_class c WHERE c.relnamespace = %(ns)s AND c.relkind NOT IN ('i', 'I')
UNION ALL
SELECT 'sequence ' || c.relname || ' ' || format_type(s.seqtypid, NULL) || ' start='
    || s.seqstart || ' by=' || s.seqincrement || ' min=' || s.seqmin || ' max=' || s.seqmax
    || ' cycle=' || s.seqcycle
FROM pg_sequence s JOIN ours c ON c.oid = s.seqrelid
UNION ALL
SELECT 'column ' || c.relname || '.' || a.attname
    || ' #' || row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum)
    || ' ' || format_type(a.atttypid, a.atttypmod)
    || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
    || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
    || ' collation=' || coalesce((
        SELECT n.nspname || '.' || l.collname FROM pg_collation l
        JOIN pg_namespace n ON n.oid = l.collnamespace WHERE l.oid = a.attcollation), '')
    || ' identity=' || a.attidentity::text || ' generated=' || a.attgenerated::text
FROM pg_attribute a JOIN ours c ON c.oid = a.attrelid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind NOT IN ('i', 'I', 'S')
UNION ALL
SELECT 'constraint ' || c.relname || '.' || k.conname || ' ' || pg_get_constraintdef(k.oid)
    || ' validated=' || k.convalidated
FROM pg_constraint k JOIN ours c ON c.oid = k.conrelid
UNION ALL
SELECT 'index ' || pg_get_indexdef(x.indexrelid) || ' valid=' || x.indisvalid
    || ' ready=' || x.indisready || ' live=' || x.indislive
    || ' clustered=' || x.indisclustered || ' replident=' || x.indisreplident
FROM pg_index x JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_class i ON i.oid = x.indexrelid
WHERE t.relnamespace = %(ns)s OR i.relnamespace = %(ns)s
UNION ALL
SELECT 'trigger ' || c.relname || '.' || t.tgname || ' ' || pg_get_triggerdef(t.oid)
    || ' enabled=' || t.tgenabled::text
FROM pg_trigger t JOIN ours c ON c.oid = t.tgrelid WHERE NOT t.tgisinternal
UNION ALL
SELECT 'rule ' || c.relname || '.' || r.rulename || ' ' || pg_get_ruledef(r.oid)
FROM pg_rewrite r JOIN ours c ON c.oid = r.ev_class
UNION ALL
SELECT 'policy ' || c.relname || '.' || p.polname || ' ' || p.polcmd::text || ' '
    || p.polpermissive || ' ' || coalesce(pg_get_expr(p.polqual, p.polrelid), '') || ' '
    || coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '')
FROM pg_policy p JOIN ours c ON c.oid = p.polrelid
UNION ALL
SELECT 'inherits ' || h.inhrelid::regclass::text || ' from ' || h.inhparent::regclass::text
FROM pg_inherits h WHERE h.inhparent IN (SELECT oid FROM ours)
    OR h.inhrelid IN (SELECT oid FROM ours)
UNION ALL
SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = %(ns)s
UNION ALL
SELECT 'operator ' || o.oid::regoperator::text FROM pg_operator o
WHERE o.oprnamespace = %(ns)s
UNION ALL
SELECT 'type ' || t.typname || ' ' || t.typtype::text FROM pg_type t
WHERE t.typnamespace = %(ns)s AND t.typrelid = 0 AND t.typelem = 0
UNION ALL
SELECT 'collation ' || l.collname FROM pg_collation l WHERE l.collnamespace = %(ns)s
UNION ALL
SELECT 'conversion ' || v.conname FROM pg_conversion v WHERE v.connamespace = %(ns)s
UNION ALL
SELECT 'text search ' || f.cfgname FROM pg_ts_config f WHERE f.cfgnamespace = %(ns)s
UNION ALL
SELECT 'statistics ' || s.stxname FROM pg_statistic_ext s WHERE s.stxnamespace = %(ns)s
"""

_lock = threading.Lock()
_expected: dict[tuple[int, int], tuple[str, ...]] = {}


def describe(
    cursor: psycopg.Cursor[Any], namespace: int, prefix: str | None = None
) -> tuple[str, ...]:
    """Every object of the schema with oid `namespace`, one line each, sorted; the caller has
    set search_path to that schema (names in it are printed unqualified). `prefix`: how the
    schema qualifies a name where the server always does (pg_get_indexdef), default its name."""
    row = cursor.execute(
        "SELECT quote_ident(nspname) || '.' FROM pg_namespace WHERE oid = %s", (namespace,)
    ).fetchone()
    assert row is not None
    # pg_get_indexdef names the table with its schema whatever the search_path: drop it.
    prefix = prefix or str(row[0])
    rows = cursor.execute(cast(Any, _DESCRIBE), {"ns": namespace}).fetchall()
    return tuple(sorted(str(line).replace(prefix, "") for (line,) in rows))


def expected_schema(
    connection: psycopg.Connection[Any], version: int, migrations: Sequence[str]
) -> tuple[str, ...]:
    """The description of the schema `migrations` (the SQL of migrations 1..version) create,
    built in this session's temporary schema and rolled back; once per server and version."""
    server = connection.info.server_version
    with _lock:
        known = _expected.get((server, version))
    if known is not None:
        return known
    with connection.transaction(force_rollback=True):
        cursor = connection.cursor()
        cursor.execute("SET LOCAL search_path = pg_temp")
        for sql in migrations:
            cursor.execute(cast(Any, sql))
        row = cursor.execute("SELECT pg_my_temp_schema()::oid").fetchone()
        assert row is not None
        # The server prints the temporary schema as pg_temp where it qualifies a name.
        made = describe(cursor, int(row[0]), "pg_temp.")
    with _lock:
        _expected[(server, version)] = made
    return made


def schema_problem(
    connection: psycopg.Connection[Any], schema: str, version: int, migrations: Sequence[str]
) -> str | None:
    """Why the store schema `schema` (at migration `version`) is not exactly the one the
    runtime's migrations create, or None. Only reads (and rolls back its reference)."""
    expected = expected_schema(connection, version, migrations)
    with connection.transaction(force_rollback=True):
        cursor = connection.cursor()
        cursor.execute("SELECT set_config('search_path', quote_ident(%s), true)", (schema,))
        row = cursor.execute(
            "SELECT oid FROM pg_namespace WHERE nspname = %s", (schema,)
        ).fetchone()
        assert row is not None
        found = describe(cursor, int(row[0]))
    if found == expected:
        return None
    extra = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    if extra:
        shown = extra[0]
        more = (
            f" (and {len(extra) + len(missing) - 1} more differences)"
            if len(extra) + len(missing) > 1
            else ""
        )
        return f"schema {schema!r} declares what the runtime never creates: {shown}{more}"
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return f"schema {schema!r} lacks what the runtime creates: {missing[0]}{more}"
