"""Stored ledgers read without trusting them (the runtime's SQLite store, a JSON Lines export),
the export written, and timestamps shown.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal, cast

from .errors import (
    CheckpointFileError,
    LedgerFormatError,
    LedgerReadError,
    LedgerVerificationError,
)
from .instance_tally import InstanceTallies
from .ledger import (
    _ENTRY_FETCH,
    CHECKPOINT_COLUMNS,
    FORMAT_VERSION,
    JSONL_FORMAT,
    LEDGER_COLUMNS,
    META_MODE_KEY,
    MODES,
    SMALLEST_DATABASE,
    SQLITE_MAGIC,
    Checkpoint,
    LedgerEntry,
    LedgerMode,
    RootLike,
    _b64,
    _new_entry,
    _unb64,
    _unhex32,
)
from .store.sqlite_schema import schema_problem
from .verify import (
    MalformedRecord,
    VerifyReport,
    _checkpoint_shape_problem,
    _shape_problem,
    verify_batches,
)

__all__ = [
    "LedgerSource",
    "checkpoint_from_row",
    "checkpoint_query",
    "entry_query",
    "entry_to_json",
    "format_timestamp",
    "read_ledger",
    "sqlite_checkpoints",
    "sqlite_entry_batches",
    "sqlite_entry_rows",
    "write_jsonl",
]

_ENTRY_JSON_KEYS = frozenset(LEDGER_COLUMNS)

# Every read of entries and checkpoints goes through the table itself, never through an index:
# the store is not trusted, and an index it holds may disagree with its table (a partial index
# that leaves rows out, say), so two readers of one file must not take different paths to it.
TABLE_ONLY = "NOT INDEXED"
_SELECT_ENTRIES = f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger {TABLE_ONLY}"
_SELECT_CHECKPOINTS = f"SELECT {', '.join(CHECKPOINT_COLUMNS)} FROM ledger_checkpoints {TABLE_ONLY}"
_CHECKPOINT_LINE_PREFIX = b'{"checkpoint":'


def entry_to_json(entry: LedgerEntry) -> dict[str, Any]:
    """One JSON Lines object: hashes as hex, the signature as base64."""
    doc: dict[str, Any] = entry._asdict()
    doc["payload_sha256"] = entry.payload_sha256.hex()
    doc["prev_hash"] = entry.prev_hash.hex()
    doc["entry_hash"] = entry.entry_hash.hex()
    doc["signature"] = _b64(entry.signature)
    return doc


def _entry_from_json(doc: object) -> LedgerEntry | str:
    """The entry a JSON Lines object describes, or why it describes none."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    if doc.keys() != _ENTRY_JSON_KEYS:
        missing = sorted(_ENTRY_JSON_KEYS - doc.keys())
        extra = sorted(doc.keys() - _ENTRY_JSON_KEYS)
        return f"entry fields: missing {missing}, unexpected {extra}"
    values = [doc[name] for name in LEDGER_COLUMNS]
    for index, name in ((10, "payload_sha256"), (11, "prev_hash"), (12, "entry_hash")):
        digest = _unhex32(values[index])
        if digest is None:
            return f"{name} must be 64 hex digits"
        values[index] = digest
    signature = _unb64(values[14])
    if signature is None:
        return "signature must be base64"
    values[14] = signature
    return _new_entry(LedgerEntry, tuple(values))


def checkpoint_from_row(row: tuple[Any, ...]) -> Checkpoint | MalformedRecord:
    """A `ledger_checkpoints` row as a Checkpoint, or why it is none (never trusted)."""
    if len(row) != len(CHECKPOINT_COLUMNS):
        return MalformedRecord(f"checkpoint row has {len(row)} columns")
    checkpoint = Checkpoint(*row)
    problem = _checkpoint_shape_problem(checkpoint)
    if problem is not None:
        return MalformedRecord(f"checkpoint row (size {row[0]!r}): {problem}")
    return checkpoint


def _unreadable_tail(record: MalformedRecord) -> LedgerVerificationError:
    return LedgerVerificationError(
        f"the ledger's last record cannot be read: {record.reason}",
        hint="run `autonomic audit verify` to find the first bad entry",
    )


class LedgerSource:
    """A stored ledger opened for reading: its mode, and streams of entries and checkpoints."""

    def __init__(
        self,
        path: Path,
        kind: Literal["sqlite", "jsonl"],
        mode: LedgerMode | None,
        mode_problem: str | None,
        connection: sqlite3.Connection | None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.mode = mode
        self.mode_problem = mode_problem
        self._connection = connection

    def __enter__(self) -> LedgerSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    @property
    def connection(self) -> sqlite3.Connection | None:
        """The open read transaction on an SQLite store (None for a JSON Lines export)."""
        return self._connection

    def entries(self) -> Iterator[LedgerEntry | MalformedRecord]:
        if self._connection is not None:
            new, entry_type = _new_entry, LedgerEntry
            return (
                row if isinstance(row, MalformedRecord) else new(entry_type, row)
                for row in sqlite_entry_rows(self._connection)
            )
        return self._jsonl_entries()

    def checkpoints(self) -> Iterator[Checkpoint | MalformedRecord]:
        if self._connection is not None:
            return sqlite_checkpoints(self._connection)
        return self._jsonl_checkpoints()

    def verify(
        self,
        root: RootLike,
        *,
        external_checkpoint: Checkpoint | None = None,
        external_label: str = "external checkpoint",
        tallies: InstanceTallies | None = None,
    ) -> VerifyReport:
        if self.mode_problem is not None:
            return VerifyReport(0, False, 0, self.mode_problem, "mode_mismatch")
        batches: Iterable[Iterable[LedgerEntry | MalformedRecord | tuple[Any, ...]]]
        if self._connection is not None:
            batches = sqlite_entry_batches(self._connection)
        else:
            batches = (self._jsonl_entries(),)
        return verify_batches(
            batches,
            root,
            checkpoints=self.checkpoints(),
            external_checkpoint=external_checkpoint,
            mode=self.mode,
            external_label=external_label,
            tallies=tallies,
        )

    def last_entry(self) -> LedgerEntry | MalformedRecord | None:
        if self._connection is not None:
            return self._sqlite_last_entry(self._connection)
        last: LedgerEntry | MalformedRecord | None = None
        for last in self._jsonl_entries():  # noqa: B007 - keep only the final item
            pass
        return last

    def latest_signed_checkpoint(self) -> Checkpoint:
        """The newest signed statement about the ledger's head: its last checkpoint, or in
        sign-each mode its last entry (whose signature covers its hash, which covers its seq).
        Not verified here: verify the ledger, or the checkpoint against it, before relying on it.
        """
        last = self.last_entry()
        stored = self.last_checkpoint()
        if isinstance(last, MalformedRecord):
            raise _unreadable_tail(last)
        if isinstance(stored, MalformedRecord):
            raise _unreadable_tail(stored)
        problem = None if last is None else _shape_problem(last)
        if problem is not None:
            raise _unreadable_tail(MalformedRecord(problem))
        if last is not None and last.signature and (stored is None or stored.size <= last.seq):
            return Checkpoint(
                last.seq + 1, last.entry_hash, last.ts_ms, last.key_id, last.signature, kind="entry"
            )
        if stored is None:
            raise LedgerVerificationError(
                "the ledger holds no signed checkpoint and no signed entry",
                hint="a checkpoint-mode store signs a checkpoint with every commit",
            )
        return stored

    def last_checkpoint(self) -> Checkpoint | MalformedRecord | None:
        if self._connection is not None:
            try:
                sql = f"{_SELECT_CHECKPOINTS} ORDER BY size DESC LIMIT 1"
                row = self._connection.execute(sql).fetchone()
            except sqlite3.Error as exc:
                return MalformedRecord(f"checkpoint row cannot be read: {exc}")
            return None if row is None else checkpoint_from_row(row)
        last: Checkpoint | MalformedRecord | None = None
        for last in self._jsonl_checkpoints():  # noqa: B007 - keep only the final item
            pass
        return last

    @staticmethod
    def _sqlite_last_entry(connection: sqlite3.Connection) -> LedgerEntry | MalformedRecord | None:
        try:
            row = connection.execute(f"{_SELECT_ENTRIES} ORDER BY seq DESC LIMIT 1").fetchone()
        except sqlite3.Error as exc:
            return MalformedRecord(f"row cannot be read: {exc}")
        return None if row is None else _new_entry(LedgerEntry, row)

    def _jsonl_lines(self) -> Iterator[tuple[int, bytes]]:
        try:
            with self.path.open("rb") as handle:
                yield from enumerate(handle, start=1)
        except OSError as exc:
            raise LedgerReadError(f"{self.path}: {exc.strerror}") from None

    def _jsonl_entries(self) -> Iterator[LedgerEntry | MalformedRecord]:
        for number, line in self._jsonl_lines():
            if line.startswith(_CHECKPOINT_LINE_PREFIX) or not line.strip():
                continue
            try:
                doc = json.loads(line)
            except (ValueError, RecursionError):
                yield MalformedRecord(f"line {number}: not valid JSON")
                continue
            if number == 1 and isinstance(doc, dict) and "format" in doc:
                continue  # the header, checked by read_ledger
            parsed = _entry_from_json(doc)
            if isinstance(parsed, str):
                yield MalformedRecord(f"line {number}: {parsed}")
            else:
                yield parsed

    def _jsonl_checkpoints(self) -> Iterator[Checkpoint | MalformedRecord]:
        for number, line in self._jsonl_lines():
            if not line.startswith(_CHECKPOINT_LINE_PREFIX):
                continue
            try:
                doc = json.loads(line)
                if not isinstance(doc, dict) or doc.keys() != {"checkpoint"}:
                    raise CheckpointFileError("a checkpoint line holds only a 'checkpoint' object")
                yield Checkpoint.from_dict(doc["checkpoint"])
            except (ValueError, RecursionError):
                yield MalformedRecord(f"line {number}: not valid JSON")
            except CheckpointFileError as exc:
                yield MalformedRecord(f"line {number}: {exc.message}")


def _bounds(column: str, low: str, high: str, values: tuple[int | None, int | None]) -> str:
    """The SQL condition on `column` for the bounds in `values` that are not None."""
    conditions = [
        f"{column} {operator} ?"
        for operator, value in ((low, values[0]), (high, values[1]))
        if value is not None
    ]
    return " AND ".join(conditions) or "1"


def _bound_values(values: tuple[int | None, int | None]) -> tuple[int, ...]:
    return tuple(value for value in values if value is not None)


def entry_query(low: int | None = None, high: int | None = None) -> tuple[str, tuple[int, ...]]:
    """The SQL and its parameters that read the `ledger` rows with low <= seq < high (None:
    unbounded) in seq order, in LEDGER_COLUMNS order: the table itself, sought by its rowid."""
    where = _bounds("seq", ">=", "<", (low, high))
    return f"{_SELECT_ENTRIES} WHERE {where} ORDER BY seq", _bound_values((low, high))


def checkpoint_query(
    low: int | None = None, high: int | None = None
) -> tuple[str, tuple[int, ...]]:
    """The same for the `ledger_checkpoints` rows with low < size <= high, by size."""
    where = _bounds("size", ">", "<=", (low, high))
    return f"{_SELECT_CHECKPOINTS} WHERE {where} ORDER BY size", _bound_values((low, high))


def sqlite_entry_batches(
    connection: sqlite3.Connection, low: int | None = None, high: int | None = None
) -> Iterator[list[tuple[Any, ...] | MalformedRecord]]:
    """The `ledger` rows with low <= seq < high (None: unbounded) in seq order, as raw rows in
    LEDGER_COLUMNS order, fetched many at a time. After a row that cannot be read, the rows
    come one at a time (see sqlite_entry_rows), ending with a MalformedRecord."""
    last_seq: Any = None
    try:
        cursor = connection.execute(*entry_query(low, high))
        while batch := cursor.fetchmany(_ENTRY_FETCH):
            last_seq = batch[-1][0]
            yield batch
    except sqlite3.Error:
        # Start again one row at a time after the last whole batch: the row that cannot be
        # read is then reported where it stands, as a row-by-row reader reports it.
        for row in sqlite_entry_rows(connection, low, high, after=last_seq):
            yield [row]


def sqlite_entry_rows(
    connection: sqlite3.Connection,
    low: int | None = None,
    high: int | None = None,
    *,
    after: Any = None,
) -> Iterator[tuple[Any, ...] | MalformedRecord]:
    """The rows of sqlite_entry_batches one at a time (`after`: a seq to start after).
    A row the database cannot hand out (not UTF-8, a corrupt record) becomes a MalformedRecord
    where it was expected, not a crash."""
    where = _bounds("seq", ">=", "<", (low, high))
    select = f"{_SELECT_ENTRIES} WHERE {where}"
    last_seq: Any = after
    try:
        if last_seq is not None:
            rows = connection.execute(
                f"{select} AND seq > ? ORDER BY seq", (*_bound_values((low, high)), last_seq)
            )
        else:
            rows = connection.execute(f"{select} ORDER BY seq", _bound_values((low, high)))
        for row in rows:
            last_seq = row[0]
            yield row
    except sqlite3.Error as exc:
        # Python's cursor reads one row ahead, so an error raised while handing out row k may
        # come from row k + 1: read row k alone (LIMIT 1 never steps past it) to tell which.
        try:
            if last_seq is None:
                row = connection.execute(
                    f"{select} ORDER BY seq LIMIT 1", _bound_values((low, high))
                ).fetchone()
            else:
                row = connection.execute(
                    f"{select} AND seq > ? ORDER BY seq LIMIT 1",
                    (*_bound_values((low, high)), last_seq),
                ).fetchone()
        except sqlite3.Error as again:
            yield MalformedRecord(f"row cannot be read: {again}")
            return
        if row is not None:
            yield row
        yield MalformedRecord(f"row cannot be read: {exc}")


def sqlite_checkpoints(
    connection: sqlite3.Connection, low: int | None = None, high: int | None = None
) -> Iterator[Checkpoint | MalformedRecord]:
    """The `ledger_checkpoints` rows with low < size <= high (None: unbounded), by size."""
    where = _bounds("size", ">", "<=", (low, high))
    select = f"{_SELECT_CHECKPOINTS} WHERE {where}"
    bounds = _bound_values((low, high))
    last_size: int | None = None
    try:
        for row in connection.execute(*checkpoint_query(low, high)):
            last_size = row[0]
            yield checkpoint_from_row(row)
    except sqlite3.Error as exc:
        # As for entries: the cursor reads one row ahead, so the error may belong to the
        # row after the one it was handing out. Read that row alone to tell which, and
        # the unreadable row's size (an integer, readable when its text is not), so the
        # failure is reported where that checkpoint stands.
        error: sqlite3.Error = exc
        after = -1 if last_size is None else last_size
        try:
            row = connection.execute(
                f"{select} AND size > ? ORDER BY size LIMIT 1", (*bounds, after)
            ).fetchone()
        except sqlite3.Error as again:
            error = again
        else:
            if row is not None:
                yield checkpoint_from_row(row)
                after = row[0]
        try:
            found = connection.execute(
                f"SELECT size FROM ledger_checkpoints {TABLE_ONLY} WHERE {where} AND size > ? "
                "ORDER BY size LIMIT 1",
                (*bounds, after),
            ).fetchone()
        except sqlite3.Error:
            found = None
        size = found[0] if found is not None and type(found[0]) is int else None
        where_text = "" if size is None else f" (size {size})"
        yield MalformedRecord(f"checkpoint row{where_text} cannot be read: {error}", size)


def refuse_altered_schema(connection: sqlite3.Connection, path: str | os.PathLike[str]) -> None:
    """LedgerFormatError unless the store file's schema is the runtime's own: declarations other
    than the runtime's make queries read other rows than it wrote, or read them otherwise
    (store/sqlite_schema.py)."""
    altered = schema_problem(connection.execute)
    if altered is not None:
        raise LedgerFormatError(
            f"{path}: the store's schema was altered: {altered}",
            hint="a store is verified only with the schema the runtime gave it",
        )


def _open_sqlite(path: Path) -> LedgerSource | None:
    """The ledger of an SQLite store; None if the file is not an SQLite database."""
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        connection = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise LedgerReadError(f"{path}: cannot open SQLite database: {exc}") from None
    try:
        # One read transaction: the schema, mode, entries and checkpoints all come from the
        # same snapshot, even while the runtime keeps writing.
        connection.execute("BEGIN")
        tables = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        missing = {"ledger", "ledger_checkpoints"} - tables
        if not missing:
            refuse_altered_schema(connection, path)
        if missing:
            raise LedgerFormatError(
                f"{path} is an SQLite database without the {', '.join(sorted(missing))} table",
                hint="pass the runtime's store file (or a JSON Lines export of it)",
            )
        mode: LedgerMode | None = None
        mode_problem: str | None = None
        if "ledger_meta" in tables:
            row = connection.execute(
                "SELECT value FROM ledger_meta WHERE key = ?", (META_MODE_KEY,)
            ).fetchone()
            if row is not None:
                if row[0] in MODES:
                    mode = cast(LedgerMode, row[0])
                else:
                    mode_problem = f"ledger_meta holds unknown mode {row[0]!r}"
        if mode is None and mode_problem is None:
            mode_problem = (
                "the store's ledger_meta table holds no mode row, which every store that keeps a "
                "ledger writes with its genesis entry (was it deleted?)"
            )
        connection.execute("SELECT 1 FROM ledger LIMIT 1").fetchall()
    except sqlite3.OperationalError as exc:  # locked, busy, cannot open
        connection.close()
        raise LedgerReadError(f"{path}: cannot read the database: {exc}") from None
    except sqlite3.Error as exc:  # not a database, corrupt
        connection.close()
        if exc.sqlite_errorcode == sqlite3.SQLITE_NOTADB:
            return None  # read_ledger reads it as JSON Lines, or names it
        raise LedgerFormatError(f"{path}: not a readable ledger database: {exc}") from None
    except LedgerFormatError:
        connection.close()
        raise
    return LedgerSource(path, "sqlite", mode, mode_problem, connection)


def _open_jsonl(path: Path, first_line: bytes) -> LedgerSource:
    not_a_ledger = LedgerFormatError(
        f"{path} is neither an SQLite ledger nor a JSON Lines ledger export",
        hint="pass the runtime's store file or a file written by `autonomic audit export`",
    )
    try:
        doc = json.loads(first_line)
    except (ValueError, RecursionError):
        raise not_a_ledger from None
    if not isinstance(doc, dict):
        raise not_a_ledger
    if "format" not in doc:
        if "seq" in doc or "checkpoint" in doc:
            return LedgerSource(path, "jsonl", None, None, None)  # an export without header
        raise not_a_ledger
    if doc.get("format") != JSONL_FORMAT or doc.get("version") != FORMAT_VERSION:
        raise LedgerFormatError(
            f"{path}: unsupported ledger format {doc.get('format')!r} "
            f"version {doc.get('version')!r}",
            hint=f"this tool reads {JSONL_FORMAT} version {FORMAT_VERSION}",
        )
    mode = doc.get("mode")
    if mode is None or mode in MODES:
        return LedgerSource(path, "jsonl", cast(LedgerMode | None, mode), None, None)
    return LedgerSource(path, "jsonl", None, f"header holds unknown mode {mode!r}", None)


def read_ledger(path: str | os.PathLike[str]) -> LedgerSource:
    """Open a stored ledger: an SQLite store file (as SQLite reads it) or a JSON Lines export.

    A file that may be a database is read through SQLite before anything else: closing a
    descriptor of our own would drop the POSIX locks that a store of this process holds on
    it (see store/sqlite.py), and the store's next commits could be lost."""
    file = Path(path)
    try:
        info = file.stat()
    except FileNotFoundError:
        raise LedgerReadError(
            f"{file}: no such file", hint="pass the runtime's store file or an export"
        ) from None
    except OSError as exc:
        raise LedgerReadError(f"{file}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise LedgerReadError(f"{file} is a directory, not a ledger file")
    if info.st_size >= SMALLEST_DATABASE:
        source = _open_sqlite(file)
        if source is not None:
            return source
    try:
        with file.open("rb") as handle:
            first_line = handle.readline(1 << 20)
    except OSError as exc:
        raise LedgerReadError(f"{file}: {exc.strerror}") from None
    if first_line.startswith(SQLITE_MAGIC):
        raise LedgerFormatError(f"{file}: not a readable ledger database: file is not a database")
    if not first_line.strip():
        raise LedgerFormatError(
            f"{file} is empty or does not start with a ledger record",
            hint="an export always starts with its header line",
        )
    return _open_jsonl(file, first_line)


def write_jsonl(
    entries: Iterable[LedgerEntry | MalformedRecord],
    checkpoints: Iterable[Checkpoint | MalformedRecord],
    out: IO[str],
    *,
    mode: LedgerMode | None,
) -> int:
    """Write the JSON Lines export: a header, then entries, each checkpoint after the entry
    that completes its size. Returns the number of entries; raises on a malformed record."""
    header = {"format": JSONL_FORMAT, "version": FORMAT_VERSION, "mode": mode}
    out.write(json.dumps(header, separators=(",", ":")) + "\n")
    pending = iter(checkpoints)

    def next_checkpoint() -> Checkpoint | None:
        item = next(pending, None)
        if isinstance(item, MalformedRecord):
            raise LedgerVerificationError(f"cannot export a checkpoint: {item.reason}")
        return item

    def write_checkpoint(checkpoint: Checkpoint) -> None:
        doc = {"checkpoint": checkpoint.to_dict()}
        out.write(json.dumps(doc, separators=(",", ":")) + "\n")

    checkpoint = next_checkpoint()
    count = 0
    while checkpoint is not None and checkpoint.size == 0:
        write_checkpoint(checkpoint)
        checkpoint = next_checkpoint()
    for entry in entries:
        if isinstance(entry, MalformedRecord):
            raise LedgerVerificationError(f"seq {count}: {entry.reason}")
        shape = _shape_problem(entry)
        if shape is not None:
            raise LedgerVerificationError(f"seq {count}: {shape}")
        out.write(json.dumps(entry_to_json(entry), separators=(",", ":")) + "\n")
        count += 1
        while checkpoint is not None and checkpoint.size <= count:
            write_checkpoint(checkpoint)
            checkpoint = next_checkpoint()
    while checkpoint is not None:
        write_checkpoint(checkpoint)
        checkpoint = next_checkpoint()
    return count


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def format_timestamp(ts_ms: int) -> str:
    """ISO 8601 UTC with milliseconds, or the raw value when it is no representable time."""
    try:
        moment = _EPOCH + timedelta(milliseconds=ts_ms)
    except (OverflowError, TypeError):  # stored values are never trusted to be sane
        return f"{ts_ms!r}ms"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
