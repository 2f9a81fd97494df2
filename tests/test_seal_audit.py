"""`audit verify --private-key`: the rows of a real store (the demo's, on SQLite and on
PostgreSQL) checked against their seals, and every row tampered with plain SQL, by someone
without the key, caught and named as a diagnostic (exit 1); `audit verify` without the
option is unchanged."""

from __future__ import annotations

import contextlib
import io
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from autonomic.compiler import cli
from autonomic.runtime.store.row_seals import DEDUP_HORIZON, SEALED_TABLES
from conftest import Stores

ROOT = Path(__file__).resolve().parents[1]
DIAGNOSTIC = "R021 [error] the "


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The demo's store (every governor and flow, rows sealed), its public and private key."""
    folder = tmp_path_factory.mktemp("demo")
    db, keys = folder / "demo.db", folder / "keys"
    done = subprocess.run(
        [sys.executable, "-m", "autonomic", "demo", "--db", str(db), "--keys", str(keys)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    [public] = keys.glob("*.public.json")
    [private] = keys.glob("*.private.pem")
    return db, public, private


@pytest.fixture
def store(demo_store: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    """A copy of the demo's store to tamper with."""
    copy = tmp_path / "store.db"
    shutil.copy(demo_store[0], copy)
    return copy


def verify(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["audit", "verify", *map(str, argv)])
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return code, out.getvalue(), err.getvalue()


def sql(path: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        for statement in statements:
            connection.execute(statement)


def test_an_honest_store_verifies_every_row(demo_store: tuple[Path, Path, Path]) -> None:
    db, public, private = demo_store
    with contextlib.closing(sqlite3.connect(db)) as connection:
        rows = sum(
            connection.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in SEALED_TABLES
        )
    assert rows > 100
    code, out, err = verify(db, "--public-key", public, "--private-key", private)
    assert (code, err) == (0, "")
    assert f"row seals: {rows} rows checked, each sealed under the row key of {private}" in out
    plain_code, plain_out, _ = verify(db, "--public-key", public)
    assert plain_code == 0 and "row seals" not in plain_out
    assert plain_out.splitlines() == [line for line in out.splitlines() if "row seals" not in line]


OUTBOX = "(SELECT min(id) FROM outbox)"
EVENT = "(SELECT min(event_id) FROM processed_events)"
TAMPERS: dict[str, tuple[tuple[str, ...], str]] = {
    # Each: SQL by someone with the file but not the key, and the row the diagnostic names.
    "a changed column": (
        (f"UPDATE outbox SET body = '{{}}' WHERE id = {OUTBOX}",),
        "the outbox row (id=1) has a wrong seal",
    ),
    "a changed stored result": (
        (f"UPDATE processed_events SET result = 'done' WHERE event_id = {EVENT}",),
        "the processed_events row (machine=",
    ),
    "a seal copied from another row": (
        (f"UPDATE outbox SET seal = (SELECT seal FROM outbox WHERE id = 2) WHERE id = {OUTBOX}",),
        "the outbox row (id=1) has a wrong seal",
    ),
    "an invented row": (
        (
            "INSERT INTO breakers (machine, name, state, failures, opened_ms, updated_ms, seal) "
            "VALUES ('Billing', 'forged', 'open', 9, 0, 0, zeroblob(32))",
        ),
        "the breakers row (machine='Billing', name='forged') has a wrong seal",
    ),
    "a row without its seal": (
        (f"UPDATE outbox SET seal = NULL WHERE id = {OUTBOX}",),
        "the outbox row (id=1) has no seal",
    ),
    "a column of another type": (
        (f"UPDATE outbox SET created_ms = 1.5 WHERE id = {OUTBOX}",),
        "the outbox row (id=1) holds a column of a type the runtime never writes",
    ),
    "a forged purge horizon": (
        (
            "INSERT OR REPLACE INTO runtime_meta (key, value) "
            f"VALUES ('{DEDUP_HORIZON}', '99999999999999:{'0' * 64}')",
        ),
        f"the runtime_meta row (key='{DEDUP_HORIZON}') has a wrong seal",
    ),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_tampered_row_is_named_and_fails(
    tamper: str, store: Path, demo_store: tuple[Path, Path, Path]
) -> None:
    _, public, private = demo_store
    statements, named = TAMPERS[tamper]
    sql(store, *statements)
    code, out, err = verify(store, "--public-key", public, "--private-key", private)
    assert code == 1, (out, err)
    assert f"{store}:1:1: {DIAGNOSTIC}" in err and named in err, err
    assert "  = hint: the row was changed outside autonomic" in err
    assert err.count(DIAGNOSTIC) == 1
    assert "row seals:" not in out
    # Without the option, verify does what it always did: the ledger and the instance rows.
    plain, _, _ = verify(store, "--public-key", public)
    assert plain == 0


def test_every_tampered_row_is_counted(store: Path, demo_store: tuple[Path, Path, Path]) -> None:
    _, public, private = demo_store
    sql(store, "UPDATE outbox SET error = 'forged'")
    with contextlib.closing(sqlite3.connect(store)) as connection:
        (count,) = connection.execute("SELECT count(*) FROM outbox").fetchone()
    code, _, err = verify(store, "--public-key", public, "--private-key", private)
    assert code == 1 and count > 20
    assert err.count(DIAGNOSTIC) == 20
    assert f"... and {count - 20} more rows with wrong seals" in err


Setup = Callable[[Path, Path], list[object]]


def _other_key(store: Path, folder: Path) -> list[object]:
    assert cli.main(["keygen", str(folder / "other")]) == 0
    return ["--private-key", next((folder / "other").glob("*.private.pem"))]


def _unmarked(store: Path, folder: Path) -> list[object]:
    sql(store, "DELETE FROM runtime_meta WHERE key = 'row_seals'")
    return []


def _export(store: Path, folder: Path) -> list[object]:
    export = folder / "ledger.jsonl"
    assert cli.main(["audit", "export", str(store), "--out", str(export)]) == 0
    return [export]


def _missing_key(store: Path, folder: Path) -> list[object]:
    return ["--private-key", folder / "nowhere.private.pem"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (_other_key, "R021 [error] the store's rows are sealed under another key than this one"),
        (_unmarked, "R021 [error] the store is not marked as sealed"),
        (_export, "A002 [error]"),
        (_missing_key, "does not exist"),
    ],
    ids=["another key", "unmarked store", "a ledger export", "no key file"],
)
def test_what_cannot_be_checked_is_a_diagnostic(
    setup: Setup, message: str, store: Path, demo_store: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, public, private = demo_store
    arguments = setup(store, tmp_path)
    target = next((a for a in arguments if isinstance(a, Path) and a.suffix == ".jsonl"), store)
    key = arguments if "--private-key" in arguments else ["--private-key", private]
    code, out, err = verify(target, "--public-key", public, *key)
    assert code == 1, (out, err)
    assert message in err and "  = hint: " in err, err


def test_a_postgresql_stores_rows_are_checked_the_same(
    postgres_stores: Stores, tmp_path: Path
) -> None:
    url, keys = postgres_stores.location(), tmp_path / "keys"
    done = subprocess.run(
        [sys.executable, "-m", "autonomic", "demo", "--store", url, "--keys", str(keys)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    [public] = keys.glob("*.public.json")
    [private] = keys.glob("*.private.pem")
    rows = sum(postgres_stores.rows("s", f"SELECT count(*) FROM {t}")[0][0] for t in SEALED_TABLES)
    code, out, err = verify("--store", url, "--public-key", public, "--private-key", private)
    assert (code, err) == (0, "")
    assert f"row seals: {rows} rows checked, each sealed under the row key of {private}" in out
    postgres_stores.rows(
        "s", "UPDATE outbox SET error = 'forged' WHERE id = (SELECT min(id) FROM outbox)"
    )
    code, out, err = verify("--store", url, "--public-key", public, "--private-key", private)
    assert code == 1 and err.count(DIAGNOSTIC) == 1, (out, err)
    assert "the outbox row (id=1) has a wrong seal" in err
    assert verify("--store", url, "--public-key", public)[0] == 0
