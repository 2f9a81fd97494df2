"""Row seals: a MAC on every operational row, so the runtime acts on no row it did not write.

The ledger commits to instance moves and kept data; the rows the runtime reads and acts on
next (an instance's state and version, armed timers, the outbox, processed event ids and
idempotency records, flows, deadlines, breakers) are committed to by nothing in it. A runtime
with a signing key therefore seals each such row it writes: HMAC-SHA256, under a row key
derived from the signer's private key (HKDF-SHA256, info `autonomic/row-seal/v1`), over the
table name and every column of the row, its key included, each column tagged with its type
and text prefixed by its length (unambiguous, and the same on every Python). Every read the
runtime acts on checks the seal before anything is decided from the row: a row written,
changed, invented or moved to another key by anyone without the private key is refused with
StoreIntegrityError, and the unit of work writes nothing. The rows are also decoded here,
column by column, into their records: a column of the wrong type is refused the same way,
sealed or not.

What seals cannot do: tell a deleted row from one never written, or an older genuine row put
back from the current one. The runtime checks what anchors it has (a timer's armed version
against the sealed instance row, a stored result's instance against the request, and a
processed event id or idempotency key found missing against the signed ledger: `LedgerAnchor`);
the rest is listed in docs/runtime.md, "What the runtime trusts". Without a key (no ledger) rows are
written unsealed and nothing is checked or claimed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import StoreIntegrityError
from ..timers import ArmedTimer
from .base import (
    BreakerRecord,
    DeadlineRecord,
    FlowRecord,
    InstanceRecord,
    OutboxMessage,
    outbox_row,
)

__all__ = [
    "BREAKER_STATES",
    "DEDUP_HORIZON",
    "ROW_KEY_INFO",
    "SEALED_MARK",
    "SEALED_SELECT",
    "SEALED_TABLES",
    "Fetched",
    "LedgerAnchor",
    "RowSeals",
    "outbox_values",
    "row_key",
    "seal_every_row",
    "seal_row",
]

ROW_KEY_INFO = b"autonomic/row-seal/v1"
# The store's mark that its rows are sealed (runtime_meta / autonomic_meta key): its value is
# the seal of the mark itself, which names the key the rows are sealed under.
SEALED_MARK = "row_seals"

# Every column of each sealed table, in the order the seal covers them; the primary key first.
SEALED_TABLES: dict[str, tuple[str, ...]] = {
    "instances": ("machine", "instance", "state", "version"),
    "processed_events": ("machine", "event_id", "instance", "result", "created_ms"),
    "idempotency_keys": ("machine", "key", "request_sha256", "result", "created_ms"),
    "timers": ("id", "machine", "instance", "timer_id", "state", "due_ms", "armed_version"),
    "outbox": (
        "id",
        "kind",
        "machine",
        "instance",
        "version",
        "target_machine",
        "target_instance",
        "event",
        "event_id",
        "body",
        "created_ms",
        "status",
        "error",
    ),
    "flows": ("flow_id", "flow", "instance", "status", "version", "data", "updated_ms", "wake_ms"),
    "deadlines": ("id", "name", "governor", "due_ms", "level", "action"),
    "breakers": ("machine", "name", "state", "failures", "opened_ms", "updated_ms"),
}
# What a read of a sealed table selects: every column the seal covers, then the seal.
SEALED_SELECT: dict[str, str] = {
    table: ", ".join((*columns, "seal")) for table, columns in SEALED_TABLES.items()
}
# An outbox read (alias `o`) with the row's retry (runtime/outbox.py) beside it; the retry
# table is not sealed (a forged row delays a delivery by at most one backoff).
OUTBOX_WITH_RETRY = (
    ", ".join(f"o.{column}" for column in (*SEALED_TABLES["outbox"], "seal"))
    + ", r.attempts, r.retry_at_ms FROM outbox o LEFT JOIN outbox_retries r ON r.id = o.id"
)
# How many leading columns of each table name its row (for diagnostics and updates).
KEY_COLUMNS: dict[str, int] = {
    "instances": 2,
    "processed_events": 2,
    "idempotency_keys": 2,
    "timers": 1,
    "outbox": 1,
    "flows": 1,
    "deadlines": 1,
    "breakers": 2,
}
BREAKER_STATES = frozenset({"closed", "open", "half_open"})
_OUTBOX_KINDS = frozenset({"event", "notification"})
_OUTBOX_STATUSES = frozenset({"pending", "delivered", "failed", "held", "dropped"})
_FLOW_STATUSES = frozenset(
    {"running", "waiting", "compensating", "completed", "compensated", "failed"}
)


# The prefix of a text column of each length up to _PREFIXED, made once: formatting the length
# into it cost a third of a seal's message.
_PREFIXED = 256
_TEXT_PREFIX = tuple(f"s{size}:" for size in range(_PREFIXED))


def _message(table: str, row: Sequence[object]) -> bytes:
    """The bytes a seal covers: the table name, then each column tagged with its type, text
    prefixed by its length (so no column's content can shift a boundary), UTF-8 (with lone
    surrogates kept, so distinct text stays distinct). Cheaper than a JSON encoding: a flow's
    data or a stored result is copied, never escaped character by character."""
    parts = [table]
    for value in row:
        if type(value) is str:
            size = len(value)
            parts.append((_TEXT_PREFIX[size] if size < _PREFIXED else f"s{size}:") + value)
        elif type(value) is int:
            parts.append(f"i{value}")
        elif value is None:
            parts.append("n")
        elif type(value) is bytes:
            parts.append(f"b{value.hex()}")
        elif isinstance(value, str):  # a state enum, say: stored (and read back) as its text
            text = str.__str__(value)
            parts.append(f"s{len(text)}:{text}")
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append(f"i{int(value)}")
        else:
            raise TypeError(f"a row column holds a {type(value).__name__}")
    return "\x00".join(parts).encode("utf-8", "surrogatepass")


_digest = hmac.digest
_same = hmac.compare_digest
_MARK = b"autonomic/row-seal/v1 mark"
# The store's meta key (runtime_meta / autonomic_meta) holding how far dedup rows were purged:
# "<before_ms>:<seal>", the seal a MAC of the value under the row key (see LedgerAnchor).
DEDUP_HORIZON = "dedup_purged_before"
_HORIZON = b"autonomic/row-seal/v1 dedup horizon\x00"


def outbox_values(m: OutboxMessage) -> tuple[object, ...]:
    """An outbox message's columns, in SEALED_TABLES order: its id, the row `add_outbox`
    writes of it (`outbox_row`, which ends with no error), and its error."""
    return (m.id, *outbox_row(m)[:-1], m.error)


def seal_row(key: bytes, table: str, row: Sequence[object]) -> bytes:
    """The seal of `row` (every column of `table`, in SEALED_TABLES order) under `key`."""
    return _digest(key, _message(table, row), "sha256")


def row_key(private_key: Ed25519PrivateKey) -> bytes:
    """The row key of a signer's private key: HKDF-SHA256 of its 32-byte seed."""
    seed = private_key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=ROW_KEY_INFO).derive(seed)


class _Mac:
    """HMAC-SHA256 under one key (RFC 2104), the same bytes as `hmac.digest`, with the padded
    key's two hash blocks hashed once: a seal then costs two hash copies and the message's
    own blocks (0.8 us against hmac.digest's 2.0 us, which pads and hashes the key again for
    every row)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        block = (hashlib.sha256(key).digest() if len(key) > 64 else key).ljust(64, b"\x00")
        self._inner = hashlib.sha256(bytes(byte ^ 0x36 for byte in block)).copy
        self._outer = hashlib.sha256(bytes(byte ^ 0x5C for byte in block)).copy

    def __call__(self, message: bytes) -> bytes:
        inner = self._inner()
        inner.update(message)
        outer = self._outer()
        outer.update(inner.digest())
        return outer.digest()


class RowSeals:
    """A store's row key (None: rows are written unsealed and not checked) and the words
    that name the store in a refusal (its path or database)."""

    __slots__ = ("_key", "_mac", "where")

    def __init__(self, where: str) -> None:
        self._key: bytes | None = None
        self._mac: _Mac | None = None
        self.where = where

    @property
    def key(self) -> bytes | None:
        return self._key

    @key.setter
    def key(self, key: bytes | None) -> None:
        self._key = key
        self._mac = None if key is None else _Mac(key)

    def seal(self, table: str, row: Sequence[object]) -> bytes | None:
        """The seal of `row` (every column of `table`, in SEALED_TABLES order), or None."""
        mac = self._mac
        if mac is None:
            return None
        return mac(_message(table, row))

    def blob(self, table: str, row: Sequence[object]) -> bytearray | None:
        """`seal`, in a bytearray: sqlite3 binds one as it is, where for bytes it looks for an
        adapter first (4 thousand instructions a row). The same blob is stored."""
        mac = self._mac
        if mac is None:
            return None
        return bytearray(mac(_message(table, row)))

    def mark(self, key: bytes | None = None) -> str:
        """The value of the store's SEALED_MARK under `key` (default: this store's)."""
        used = self.key if key is None else key
        assert used is not None
        return _digest(used, _MARK, "sha256").hex()

    def check(self, table: str, row: Sequence[object], seal: object) -> None:
        """Refuse `row` unless `seal` is its seal under this store's key (no key: accept)."""
        mac = self._mac
        if mac is None:
            return
        if type(seal) is not bytes or not _same(seal, mac(_message(table, row))):
            raise self.refusal(table, row, "missing" if seal is None else "wrong")

    def refusal(self, table: str, row: Sequence[object], what: str) -> StoreIntegrityError:
        """The StoreIntegrityError for a row of `table` that is not as the runtime wrote it."""
        named = ", ".join(
            f"{column}={value!r}"
            for column, value in zip(SEALED_TABLES[table], row[: KEY_COLUMNS[table]], strict=False)
        )
        if what in ("missing", "wrong"):
            why = (
                f"has a {what} row seal: it was written or changed by something other than "
                "this runtime (its key seals every row it writes)"
            )
        else:
            why = what
        return StoreIntegrityError(
            f"{self.where}: the {table} row ({named}) {why}; nothing was written",
            hint="the store file was changed outside autonomic: restore it from a backup and "
            "run `autonomic audit verify` on it (docs/runtime.md, 'What the runtime trusts')",
        )

    def horizon_value(self, before_ms: int) -> str | None:
        """The DEDUP_HORIZON value recording that dedup rows before `before_ms` were purged,
        sealed under this store's key (None without a key: nothing is checked then)."""
        key = self.key
        if key is None:
            return None
        text = str(before_ms)
        return f"{text}:{_digest(key, _HORIZON + text.encode(), 'sha256').hex()}"

    def horizon(self, value: object) -> int:
        """The purge horizon a stored DEDUP_HORIZON value seals; 0 (nothing purged: every
        anchor counts) when it is absent or its seal is not this key's, so a forged or
        deleted horizon only makes the check stricter."""
        key = self.key
        if key is None or type(value) is not str:
            return 0
        text, _, seal = value.partition(":")
        if not text.isdigit() or not _same(
            seal, _digest(key, _HORIZON + text.encode(), "sha256").hex()
        ):
            return 0
        return int(text)

    # -- typed decoding: each column checked before a record is built -------------------------

    def _typed(self, table: str, row: Sequence[Any], types: tuple[type, ...]) -> None:
        for column, value, kind in zip(SEALED_TABLES[table], row, types, strict=True):
            if not _fits(value, kind):
                raise self.refusal(
                    table, row, f"holds {type(value).__name__} {value!r} in its {column} column"
                )

    def instance(self, row: Sequence[Any]) -> InstanceRecord:
        """(machine, instance, state, version, seal) -> InstanceRecord."""
        machine, instance, state, version, seal = row
        if type(state) is not str or type(version) is not int:
            self._typed("instances", row[:4], (str, str, str, int))
        self.check("instances", (machine, instance, state, version), seal)
        return InstanceRecord(machine, instance, state, version)

    def stored_result(self, table: str, row: Sequence[Any]) -> tuple[Any, ...]:
        """A processed_events or idempotency_keys row (every column, then the seal), checked:
        the row's columns without the seal."""
        values = tuple(row[:-1])
        if table == "processed_events":
            self._typed(table, values, (str, str, str, str, int))
        else:
            self._typed(table, values, (str, str, bytes, str, int))
        self.check(table, values, row[-1])
        return values

    def timer(self, row: Sequence[Any]) -> ArmedTimer:
        """(id, machine, instance, timer_id, state, due_ms, armed_version, seal) -> ArmedTimer."""
        values = tuple(row[:7])
        self._typed("timers", values, (int, str, str, str, str, int, int))
        self.check("timers", values, row[7])
        return ArmedTimer(*values[1:])

    def message(self, row: Sequence[Any]) -> OutboxMessage:
        """Every outbox column, then the seal -> OutboxMessage."""
        values = tuple(row[:13])
        self._typed(
            "outbox",
            values,
            (int, str, str, str, int, str, str, str, str, str, int, str, _OptionalStr),
        )
        if values[1] not in _OUTBOX_KINDS or values[11] not in _OUTBOX_STATUSES:
            raise self.refusal("outbox", values, "holds an unknown kind or status")
        self.check("outbox", values, row[13])
        return OutboxMessage(*values)

    def flow(self, row: Sequence[Any]) -> FlowRecord:
        """Every flows column, then the seal -> FlowRecord."""
        values = tuple(row[:8])
        self._typed("flows", values, (str, str, str, str, int, str, int, _OptionalInt))
        if values[3] not in _FLOW_STATUSES:
            raise self.refusal("flows", values, f"holds an unknown status {values[3]!r}")
        self.check("flows", values, row[8])
        return FlowRecord(*values)

    def deadline(self, row: Sequence[Any]) -> DeadlineRecord:
        """Every deadlines column, then the seal -> DeadlineRecord."""
        values = tuple(row[:6])
        self._typed("deadlines", values, (str, str, str, int, int, str))
        self.check("deadlines", values, row[6])
        return DeadlineRecord(*values)

    def breaker(self, row: Sequence[Any]) -> BreakerRecord:
        """Every breakers column, then the seal -> BreakerRecord."""
        values = tuple(row[:6])
        self._typed("breakers", values, (str, str, str, int, int, int))
        if values[2] not in BREAKER_STATES:
            raise self.refusal("breakers", values, f"holds an unknown state {values[2]!r}")
        self.check("breakers", values, row[6])
        return BreakerRecord(*values)


def refuse_unsealed_rows(execute: Callable[..., Any], where: str) -> None:
    """Refuse a store never marked as sealed whose operational tables hold rows: they were
    written before rows were sealed, or their seals and the mark were stripped by someone
    without the key (who may have rewritten them first). Sealing them is the operator's call.
    Likewise one whose ledger records moves (a data entry): its rows were written, so empty
    tables mean they were deleted with the mark, and a store emptied so would read as new."""
    hint = (
        "check the store with `autonomic audit verify`, then seal its rows as they are, "
        "once, with Runtime(..., adopt_unsealed_rows=True)"
    )
    for table in SEALED_TABLES:
        if execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
            raise StoreIntegrityError(
                f"{where}: its {table} rows carry no row seals (written before rows were "
                "sealed, or stripped of their seals by someone without the key)",
                hint=hint,
            )
    if execute(_DATA_ENTRY_SQL).fetchone() is not None:
        raise StoreIntegrityError(
            f"{where}: its ledger records moves, yet the store is not marked as sealed: its "
            "rows and the mark were deleted (or it was written before rows were sealed, "
            "and emptied since)",
            hint=hint,
        )


# A ledger entry other than a control entry (genesis, rotation, retirement): some unit wrote.
_DATA_ENTRY_SQL = (
    "SELECT 1 FROM ledger WHERE kind NOT IN ('genesis', 'key_rotation', 'key_retirement') LIMIT 1"
)


def seal_every_row(
    execute: Callable[..., Any], seals: RowSeals, key: bytes, *, check: bool, mark: str
) -> None:
    """Seal every row of every sealed table under `key` (in the caller's transaction, through
    its `execute`; SQL placeholders in `mark`'s style), make `key` the store's, and record
    the store's mark with `mark` (key, value). With `check`, every row must first carry its
    seal under the store's current key (a rotation launders no forged row)."""
    placeholder = "?" if "?" in mark else "%s"
    for table, columns in SEALED_TABLES.items():
        keys = KEY_COLUMNS[table]
        where = " AND ".join(f"{column} = {placeholder}" for column in columns[:keys])
        rows = execute(f"SELECT {', '.join(columns)}, seal FROM {table}").fetchall()
        updates = []
        for row in rows:
            values = tuple(row[:-1])
            if check:
                seals.check(table, values, row[-1])
            updates.append((seal_row(key, table, values), *values[:keys]))
        for update in updates:
            execute(f"UPDATE {table} SET seal = {placeholder} WHERE {where}", update)
    seals.key = key
    execute(mark, (SEALED_MARK, seals.mark()))


class LedgerAnchor:
    """Rows checked against the signed ledger, where a seal cannot tell a deleted row or an
    older genuine one put back (with a row key only; each probe uses a ledger index).

    Timers: a timer row whose firing the ledger records (its "timer" or "escalation" entry
    names the firing's event id, derived from the timer and its arming) already fired: put
    back. Breakers: the row's state must be the one the breaker's newest "breaker" entry moved
    it to (closed if none; no row reads as closed). Deadlines: a row escalated to level n
    must be the one the deadline's newest "escalation" entry took to level n.

    Dedup rows: a processed event id or idempotency key found missing is checked against the
    ledger.

    Every "transition" entry with an event id was written in the unit that recorded that
    event id in processed_events (an idempotency key without an event id: the entry's event
    id is `idempotency_event_id` of the key, the key in idempotency_keys), both stamped
    with the same time. Such an entry at or after the purge horizon (DEDUP_HORIZON, which
    `purge_dedup` advances) whose row is gone means the row was deleted: refused, since a
    retry would otherwise run again (a charge submitted twice). One probe of the partial
    index ledger_by_event per miss; the horizon is read only when an entry is found.

    `execute(sql, parameters)` is the caller's (a cursor's or connection's: it returns
    something with `fetchone`); `mark` is its placeholder, `meta` its meta table."""

    __slots__ = (
        "_entry_sql",
        "_fired_sql",
        "_horizon_sql",
        "_newest_sql",
        "_save_sql",
        "_seals",
        "_timer_sql",
    )

    def __init__(self, seals: RowSeals, mark: str, meta: str, save_sql: str, newest: str) -> None:
        self._seals = seals
        # `event_id <> ''` spelled out: what lets SQLite and PostgreSQL use the partial index.
        # The newest entry (`newest`: an ORDER BY) is the one whose row must be there: an
        # event id dispatched again after a purge has a row from that dispatch only.
        self._entry_sql = (
            f"SELECT seq, ts_ms FROM ledger WHERE machine = {mark} AND event_id = {mark} "
            f"AND event_id <> '' AND kind = 'transition' ORDER BY {newest} LIMIT 1"
        )
        self._horizon_sql = f"SELECT value FROM {meta} WHERE key = {mark}"
        self._save_sql = save_sql
        self._timer_sql = (
            f"SELECT 1 FROM timers WHERE machine = {mark} AND instance = {mark} AND "
            f"timer_id = {mark} AND state = {mark} AND due_ms = {mark} AND armed_version = {mark}"
        )
        self._fired_sql = (
            f"SELECT seq FROM ledger WHERE machine = {mark} AND event_id = {mark} "
            "AND event_id <> '' AND kind IN ('timer', 'escalation') LIMIT 1"
        )
        # By the (machine, instance, ...) index; one instance's entries share a partition.
        self._newest_sql = (
            f"SELECT seq, to_state FROM ledger WHERE machine = {mark} AND instance = {mark} "
            f"AND kind = {mark} ORDER BY seq DESC LIMIT 1"
        )

    def dedup_row(
        self,
        execute: Callable[..., Any],
        row_sql: str,
        table: str,
        machine: str,
        key: str,
        event_id: str,
    ) -> Any:
        """The dedup row of (machine, key) read by `row_sql`, or None if it never was; a row
        the ledger records (`event_id`) and is gone is StoreIntegrityError (deleted). Read
        again after the probe: another process may have committed it since."""
        row = execute(row_sql, (machine, key)).fetchone()
        if row is None:
            seq = self.missing(execute, machine, event_id)
            if seq is None:
                return None
            row = execute(row_sql, (machine, key)).fetchone()
            if row is None:
                raise self.deleted(table, machine, key, seq)
        return row

    def horizon(self, execute: Callable[..., Any]) -> int:
        """The store's purge horizon (0 if none is sealed under this key)."""
        stored = execute(self._horizon_sql, (DEDUP_HORIZON,)).fetchone()
        return self._seals.horizon(None if stored is None else stored[0])

    def advance(self, execute: Callable[..., Any], before_ms: int) -> None:
        """Record (sealed) that dedup rows stamped before `before_ms` were purged."""
        if self._seals.key is not None and before_ms > self.horizon(execute):
            execute(self._save_sql, (DEDUP_HORIZON, self._seals.horizon_value(before_ms)))

    def keep(self, execute: Callable[..., Any], old: int) -> None:
        """After a rotation: the horizon `old` (read under the outgoing key) under the new."""
        if old > 0:
            execute(self._save_sql, (DEDUP_HORIZON, self._seals.horizon_value(old)))

    def timer(self, execute: Callable[..., Any], timer: ArmedTimer) -> bool:
        """Whether `timer` (its row read and checked) may fire: False if it fired meanwhile
        (the ledger records its firing and the row is gone: another process fired it after
        the row was read); StoreIntegrityError if its row is there yet its firing recorded:
        the row was put back (a firing deletes the row in the unit that writes its entry)."""
        if self._seals.key is None:
            return True
        from ..results import derive_event_id  # the runtime's ids: loaded by now

        fired = derive_event_id(
            "timer", timer.machine, timer.instance, timer.timer_id, timer.armed_version
        )
        found = execute(self._fired_sql, (timer.machine, fired)).fetchone()
        if found is None:
            return True
        if execute(self._timer_sql, timer.row()).fetchone() is None:
            return False
        raise StoreIntegrityError(
            f"{self._seals.where}: the timers row of {timer.machine} '{timer.instance}' timer "
            f"{timer.timer_id}, armed at version {timer.armed_version}, already fired (ledger "
            f"entry {found[0]} records the firing): it was put back; nothing was written",
            hint=_TAMPERED_HINT,
        )

    def breaker(
        self,
        execute: Callable[..., Any],
        machine: str,
        name: str,
        read: Callable[[], BreakerRecord | None],
    ) -> BreakerRecord | None:
        """The breaker's row (`read`), refused if it (or its absence) is not in the state the
        breaker's newest ledger move took it to (closed if none). Read between two reads of
        that move: the same move both times, no move committed meanwhile (a row and its
        move commit together), so the row must be in its state."""
        record = read()
        if self._seals.key is None:
            return record
        instance = f"policy:{name}"
        found = execute(self._newest_sql, (machine, instance, "breaker")).fetchone()
        for _ in range(3):
            record = read()
            after = execute(self._newest_sql, (machine, instance, "breaker")).fetchone()
            if after != found:  # a move committed meanwhile: read again
                found = after
                continue
            expected = "closed" if found is None else found[1]
            state = "closed" if record is None else record.state
            if state == expected:
                return record
            what = "is missing" if record is None else f"says {state!r}"
            raise StoreIntegrityError(
                f"{self._seals.where}: the breakers row ({machine!r}, {name!r}) {what}, yet "
                + (
                    "the ledger records no move of it"
                    if found is None
                    else f"ledger entry {found[0]} moved it to {expected!r}"
                )
                + ": the row was deleted or an older one put back; nothing was written",
                hint=_TAMPERED_HINT,
            )
        return record  # moving all the while: nothing to hold it to

    def deadline(self, execute: Callable[..., Any], record: DeadlineRecord) -> None:
        """Refuse a deadline row at level n >= 1 unless the deadline's newest escalation
        entry took it to level n (at level 0 it may have been tracked again: no entry).
        Only for a row the caller holds (the write lock, or FOR UPDATE): no escalation of
        it commits meanwhile."""
        if self._seals.key is None or record.level < 1:
            return
        found = execute(
            self._newest_sql, (record.governor, f"deadline:{record.id}", "escalation")
        ).fetchone()
        if found is None or found[1] != f"level{record.level}":
            raise self._seals.refusal(
                "deadlines",
                (record.id,),
                f"is at level {record.level}, yet "
                + (
                    "the ledger records no escalation of it"
                    if found is None
                    else f"its newest escalation, ledger entry {found[0]}, went to {found[1]}"
                )
                + ": an older row was put back",
            )

    def missing(self, execute: Callable[..., Any], machine: str, event_id: str) -> int | None:
        """For a dedup row found missing: the seq of the ledger entry that says it was
        written (a "transition" entry of `event_id` from after the purge horizon), or None.
        The caller reads the row again: written with that entry, it is there unless deleted
        (a concurrent dispatch may have committed both between the caller's read and this)."""
        if self._seals.key is None:
            return None
        found = execute(self._entry_sql, (machine, event_id)).fetchone()
        if found is None or found[1] < self.horizon(execute):
            return None  # never dispatched, or purged with its retention
        return int(found[0])

    def deleted(self, table: str, machine: str, name: str, seq: int) -> StoreIntegrityError:
        """The refusal of a dedup row `missing` found written and a second read still lacks."""
        return StoreIntegrityError(
            f"{self._seals.where}: the {table} row ({machine!r}, {name!r}) is missing, yet "
            f"ledger entry {seq} records its dispatch and no purge has reached it: the row was "
            "deleted, and a repeat would run again; nothing was written",
            hint=_TAMPERED_HINT,
        )


class Fetched:
    """Rows already fetched, read like a cursor's (`fetchone`): what a store's `execute` for
    LedgerAnchor returns when its statements run under a lock the anchor must not hold."""

    __slots__ = ("_rows",)

    def __init__(self, rows: Sequence[tuple[Any, ...]]) -> None:
        self._rows = rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None


_TAMPERED_HINT = (
    "the store was changed outside autonomic: restore it from a backup and run "
    "`autonomic audit verify` on it (docs/runtime.md, 'What the runtime trusts')"
)


class _OptionalInt:
    """Marks a column that holds an integer or NULL."""


class _OptionalStr:
    """Marks a column that holds text or NULL."""


def _fits(value: object, kind: type) -> bool:
    if kind is _OptionalInt:
        return value is None or type(value) is int
    if kind is _OptionalStr:
        return value is None or type(value) is str
    return type(value) is kind
