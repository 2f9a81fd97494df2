"""`audit verify --private-key`: every sealed row of a store checked against its seal.

A row seal is an HMAC under the row key, which only the holder of the runtime's private
signing key can derive (store/row_seals.py): the public key that verifies the ledger cannot
check a seal. An operator who holds the private key checks the rows offline here exactly as
the runtime checks each row before it acts on it: the store's mark must be the mark of this
key (else the rows are sealed under another key, or not at all), then each row of each sealed
table must carry the seal of its table and every column. A row changed, invented or moved to
another key by someone without the key fails; so does the sealed dedup purge horizon. What no
seal shows, a deleted row or an older genuine row put back, is not found here either (the
runtime checks those against the ledger as it reads them; docs/runtime.md).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import StoreIntegrityError
from .store.row_seals import (
    DEDUP_HORIZON,
    KEY_COLUMNS,
    SEALED_MARK,
    SEALED_SELECT,
    SEALED_TABLES,
    RowSeals,
)

ROW_HINT = (
    "the row was changed outside autonomic (the runtime refuses to act on it): restore the "
    "store from a backup"
)
KEY_HINT = (
    "pass the private key of the runtime that writes this store (after a key rotation, the "
    "newest: rows are resealed under it)"
)


@dataclass(frozen=True, slots=True)
class SealProblem:
    """One row (or the purge horizon) whose seal is not the one the key gives."""

    table: str
    row: str  # its key columns, `machine='Billing', instance='acme-1'`
    why: str

    def failure(self) -> StoreIntegrityError:
        return StoreIntegrityError(f"the {self.table} row ({self.row}) {self.why}")


@dataclass(frozen=True, slots=True)
class SealReport:
    rows: int  # rows checked
    problems: tuple[SealProblem, ...]


Execute = Callable[[str, Sequence[object]], Iterable[Sequence[Any]]]


def check_row_seals(
    execute: Execute, key: bytes, *, meta_table: str = "runtime_meta", mark: str = "?"
) -> SealReport:
    """Every row of every sealed table of a store, read through `execute` (an SQLite
    connection's, or a psycopg one's with `autonomic_meta` and `%s` placeholders), checked
    under `key`. Raises StoreIntegrityError when the store is not sealed under `key` at all."""
    seals = RowSeals("the store")
    seals.key = key
    meta = {
        row[0]: row[1]
        for row in execute(
            f"SELECT key, value FROM {meta_table} WHERE key IN ({mark}, {mark})",
            (SEALED_MARK, DEDUP_HORIZON),
        )
    }
    sealed = meta.get(SEALED_MARK)
    if sealed is None:
        raise StoreIntegrityError(
            "the store is not marked as sealed: its rows carry no seals to check "
            "(written without a signing key, or before rows were sealed, or stripped of the mark)",
            hint="open it once with the runtime and Runtime(..., adopt_unsealed_rows=True) "
            "after checking it, so that its rows are sealed",
        )
    if type(sealed) is not str or not hmac.compare_digest(sealed, seals.mark()):
        raise StoreIntegrityError(
            "the store's rows are sealed under another key than this one",
            hint=KEY_HINT,
        )
    problems = list(_horizon_problems(seals, meta.get(DEDUP_HORIZON)))
    count = 0
    for table, columns in SEALED_TABLES.items():
        order = ", ".join(columns[: KEY_COLUMNS[table]])
        for row in execute(f"SELECT {SEALED_SELECT[table]} FROM {table} ORDER BY {order}", ()):
            count += 1
            values, seal = tuple(row[:-1]), row[-1]
            why = _wrong(seals, table, values, seal)
            if why is not None:
                named = ", ".join(
                    f"{column}={value!r}"
                    for column, value in zip(columns, values[: KEY_COLUMNS[table]], strict=False)
                )
                problems.append(SealProblem(table, named, why))
    return SealReport(count, tuple(problems))


def _wrong(seals: RowSeals, table: str, values: tuple[object, ...], seal: object) -> str | None:
    """Why the row's seal is not its seal under the key, or None if it is."""
    if seal is None:
        return "has no seal: it was written by something other than the runtime"
    try:
        expected = seals.seal(table, values)
    except TypeError:
        kinds = ", ".join(sorted({type(v).__name__ for v in values}))
        return f"holds a column of a type the runtime never writes ({kinds})"
    if type(seal) is not bytes or expected is None or not hmac.compare_digest(seal, expected):
        return (
            "has a wrong seal: a column was changed, or the row invented or copied from "
            "another, by someone without the key"
        )
    return None


def _horizon_problems(seals: RowSeals, value: object) -> Iterator[SealProblem]:
    if value is None:
        return
    text = value.partition(":")[0] if type(value) is str else ""
    if seals.horizon(value) == 0 and text != "0":
        yield SealProblem(
            "runtime_meta",
            f"key={DEDUP_HORIZON!r}",
            "has a wrong seal: the dedup purge horizon was changed by someone without the key",
        )
