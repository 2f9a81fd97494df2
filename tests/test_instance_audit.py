"""Kept data and instance rows held to the ledger by `autonomic audit verify`: a move that keeps
data writes a signed "kept" entry in its transaction, and the audit names the instance whose
row or kept data the ledger contradicts (changed, rolled back, deleted, added), on SQLite and
PostgreSQL, in either ledger mode; the parallel range verifier agrees with the sequential one.
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from autonomic.compiler import cli
from autonomic.runtime.errors import StoreConfigError, StoreIntegrityError
from autonomic.runtime.keys import PublicKeyInfo, generate_keypair, load_signer
from autonomic.runtime.ledger import (
    KEPT,
    LedgerMode,
    VerifyReport,
    kept_digest,
    read_ledger,
    verify_ledger,
)
from autonomic.runtime.ledger_ranges import verify_in_ranges
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.store.sqlite_schema import UPGRADES
from conftest import Stores
from flow_world import START_MS, marketplace
from test_emit_routing import decide, disputed

CASE, CUSTOMER = "case-1", "cust-1"


def keys(tmp_path: Path) -> Path:
    """A key directory whose key is valid from the virtual clock's start; its public file."""
    folder = tmp_path / "keys"
    info = generate_keypair(folder, valid_from_ms=START_MS - 1)
    return folder / f"{info.key_id}.public.json"


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


def audit(stores: Stores, public: Path) -> tuple[int, str]:
    location = stores.location("m")
    if stores.kind == "sqlite":
        return run_cli("audit", "verify", location, "--public-key", str(public))
    return run_cli("audit", "verify", "--store", location, "--public-key", str(public))


def open_case(stores: Stores, public: Path, mode: LedgerMode = "sign-each") -> Runtime:
    """A dispute case that kept its customer's id, and a second, decided one (PostgreSQL: in
    a ledger of four partitions)."""
    signer = load_signer(public.parent)
    store = stores.open("m", partitions=4 if stores.kind == "postgres" else None)
    runtime, _, _ = marketplace(store, signer=signer, mode=mode)
    disputed(runtime, CUSTOMER, CASE)
    disputed(runtime, "cust-2", "case-2")
    decide(runtime, "case-2")
    runtime.deliver_outbox()
    return runtime


@pytest.mark.parametrize("mode", ["sign-each", "checkpoint"])
def test_a_keep_is_committed_by_a_signed_entry_in_its_transaction(
    stores: Stores, tmp_path: Path, mode: LedgerMode
) -> None:
    public = keys(tmp_path)
    runtime = open_case(stores, public, mode)
    runtime.close()
    kept = stores.rows(
        "m",
        "SELECT seq, from_state, to_state, event, key_id, payload_sha256 FROM ledger "
        f"WHERE kind = '{KEPT}' AND instance = '{CASE}'",
    )
    (seq, from_state, to_state, event, key_id, digest), *more = kept
    assert not more and key_id == public.name.split(".")[0]  # signed, in checkpoint mode too
    text = stores.rows("m", f"SELECT data FROM instance_data WHERE instance = '{CASE}'")[0][0]
    assert json.loads(text) == {"customer_id": CUSTOMER}
    assert bytes(digest) == kept_digest(text)
    # Right after the move that kept it, in the same transaction (the next seq).
    move = stores.rows(
        "m", f"SELECT kind, to_state FROM ledger WHERE instance = '{CASE}' AND seq = {seq - 1}"
    )
    assert move == [("transition", to_state)] and from_state == to_state
    assert event == "InvestigateDispute"
    code, out = audit(stores, public)
    assert code == 0, out
    assert "checked 4 instances against the ledger (state and version; 2 with kept data)" in out


TAMPERS = {
    "kept data changed": (
        f'UPDATE instance_data SET data = \'{{"customer_id": "cust-2"}}\' '
        f"WHERE instance = '{CASE}'",
        f"Compliance '{CASE}': the kept data differs from what the newest kept entry commits to",
    ),
    "kept data deleted": (
        f"DELETE FROM instance_data WHERE instance = '{CASE}'",
        f"Compliance '{CASE}': the ledger's kept entry commits to data the store no longer holds",
    ),
    "kept data added": (
        "INSERT INTO instance_data (machine, instance, data) "
        f"VALUES ('Billing', '{CUSTOMER}', '{{}}')",
        f"Billing '{CUSTOMER}': the store holds kept data for this instance that no kept "
        "ledger entry commits to",
    ),
    "state changed": (
        f"UPDATE instances SET state = 'Resolved' WHERE instance = '{CASE}'",
        f"Compliance '{CASE}': the row holds state 'Resolved' at version 2, but the ledger "
        "records 2 change(s), the newest into 'Investigating'",
    ),
    "version rolled back": (
        f"UPDATE instances SET version = 1 WHERE instance = '{CASE}'",
        f"Compliance '{CASE}': the row holds state 'Investigating' at version 1",
    ),
    "row deleted": (
        f"DELETE FROM instances WHERE instance = '{CASE}'",
        f"Compliance '{CASE}': the ledger records 2 change(s) of this instance, but the store "
        "holds no row for it (deleted?)",
    ),
    "row added": (
        "INSERT INTO instances (machine, instance, state, version) "
        "VALUES ('Billing', 'ghost', 'Current', 1)",
        "Billing 'ghost': the row (state 'Current', version 1) has no ledger entry",
    ),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_audit_verify_names_the_instance_the_ledger_contradicts(
    stores: Stores, tmp_path: Path, tamper: str
) -> None:
    public = keys(tmp_path)
    open_case(stores, public).close()
    sql, diagnostic = TAMPERS[tamper]
    stores.rows("m", sql)
    code, out = audit(stores, public)
    assert code == 1 and diagnostic in out, out


def _ranges(path: Path, root: PublicKeyInfo) -> VerifyReport | None:
    """The ranges' report (None: they do not accept the ledger)."""
    with read_ledger(path) as source:
        return verify_in_ranges(source, root, processes=2, range_size=16, min_entries=1)


def test_a_kept_entry_without_its_signature_fails_in_checkpoint_mode_in_ranges_too(
    tmp_path: Path,
) -> None:
    """The ranges and the sequential verifier give the same verdict: a kept entry is always
    signed, so one stripped of its signature fails even where checkpoints cover the rest."""
    public = keys(tmp_path)
    path = tmp_path / "m.db"
    runtime, _, _ = marketplace(
        SQLiteStore(path), signer=load_signer(public.parent), mode="checkpoint"
    )
    disputed(runtime, CUSTOMER, CASE)
    for index in range(40):  # enough entries for several ranges of 16
        runtime.governor("Billing").create(f"filler-{index}")
    runtime.close()
    signer = load_signer(public.parent)
    root = signer.public_info()
    whole = verify_ledger(path, root)
    assert whole.ok
    assert _ranges(path, root) == whole
    with SQLiteStore(path) as store:
        (seq,) = [e.seq for e in store.ledger_entries() if e.kind == KEPT]
    stores = Stores("sqlite", tmp_path, None)
    stores.rows("m", f"UPDATE ledger SET key_id = '', signature = x'' WHERE seq = {seq}")
    whole = verify_ledger(path, root)
    assert not whole.ok and whole.index == seq and whole.problem == "missing_signature"
    # The ranges refuse it themselves (None: not accepted), and the verdict is the same.
    assert _ranges(path, root) is None
    assert verify_ledger(path, root, processes=2, range_size=16, min_entries=1) == whole


def test_a_state_changed_behind_the_runtime_fails_the_audit_and_the_runtime_refuses_it(
    stores: Stores, tmp_path: Path
) -> None:
    """A row rewritten (its version kept) fails the audit; the runtime refuses to move from
    it (its row seal no longer matches, runtime/store/row_seals.py), so no signed entry ever
    starts where no entry ended, and the audit still names the row."""
    public = keys(tmp_path)
    open_case(stores, public).close()
    stores.rows("m", f"UPDATE instances SET state = 'Current' WHERE instance = '{CUSTOMER}'")
    code, out = audit(stores, public)
    assert code == 1 and "the row holds state 'Current' at version 2" in out, out
    runtime, _, _ = marketplace(
        stores.open("m", partitions=4 if stores.kind == "postgres" else None),
        signer=load_signer(public.parent),
    )
    charge = {
        "customer_id": CUSTOMER,
        "invoice_id": "inv-9",
        "amount": "9.00",
        "idempotency_key": "k-9",
    }
    entries = len(list(runtime.ledger()))
    with pytest.raises(StoreIntegrityError, match="instances row"):
        runtime.governor("Billing").dispatch(CUSTOMER, "ChargeRequested", charge)
    assert len(list(runtime.ledger())) == entries
    runtime.close()
    code, out = audit(stores, public)
    assert code == 1 and "the row holds state 'Current' at version 2" in out, out


def _rebuild(connection: sqlite3.Connection, table: str, change: Callable[[str], str]) -> None:
    """Rebuild `table`, its rows kept, with its declaration changed by `change`."""
    (sql,) = connection.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    connection.execute(f"ALTER TABLE {table} RENAME TO rebuilt")
    connection.execute(change(sql))
    connection.execute(f"INSERT INTO {table} SELECT * FROM rebuilt")
    connection.execute("DROP TABLE rebuilt")


def _without_rowid(connection: sqlite3.Connection) -> None:
    connection.execute("DROP INDEX ledger_by_instance")
    _rebuild(connection, "ledger", lambda sql: sql + " WITHOUT ROWID")
    connection.execute("CREATE INDEX ledger_by_instance ON ledger (machine, instance, seq)")


ALTERED: dict[str, Callable[[sqlite3.Connection], object]] = {
    # The instances table renamed in another case: SQL still finds it, a set of names not.
    "renamed": lambda c: c.executescript(
        "ALTER TABLE instances RENAME TO moved; ALTER TABLE moved RENAME TO INSTANCES"
    ),
    # A key column compared without case: 'CASE-1' answers for 'case-1'.
    "nocase key": lambda c: _rebuild(
        c, "instance_data", lambda sql: sql.replace("instance TEXT", "instance TEXT COLLATE NOCASE")
    ),
    # A covering index the planner may read instead of the table.
    "covering index": lambda c: c.execute(
        "CREATE INDEX cover ON instances (machine, instance, state, version)"
    ),
    # The ledger without its rowid, read through an index of its own.
    "ledger without rowid": _without_rowid,
    "a trigger": lambda c: c.execute(
        "CREATE TRIGGER t AFTER INSERT ON instances BEGIN SELECT 1; END"
    ),
}


@pytest.mark.parametrize("alteration", sorted(ALTERED))
def test_a_store_whose_schema_was_altered_is_refused_by_the_audit_and_the_runtime(
    tmp_path: Path, alteration: str
) -> None:
    """Any declaration but the runtime's own makes reads find other rows than it wrote (the
    red team's attacks, store/sqlite_schema.py): `audit verify` and the store both refuse it,
    before a row is read, and leave the file as it was."""
    public = keys(tmp_path)
    stores = Stores("sqlite", tmp_path, None)
    open_case(stores, public).close()
    path = Path(stores.location("m"))
    connection = sqlite3.connect(path, isolation_level=None)
    ALTERED[alteration](connection)
    connection.close()
    before = path.read_bytes()
    code, out = audit(stores, public)
    assert code == 1 and "schema was altered" in out, out
    with pytest.raises(StoreConfigError, match="whose schema was altered"):
        SQLiteStore(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("sql", "diagnostic"),
    [
        (
            # A row of a partition the store does not have: no chain verifies it, so it must
            # not count as an instance having moved since its chain was verified.
            "INSERT INTO ledger SELECT 99, 1000000, ts_ms, kind, machine, instance, from_state, "
            "to_state, event, actor, event_id, payload_sha256, prev_hash, entry_hash, key_id, "
            f"signature FROM ledger WHERE instance = '{CUSTOMER}' ORDER BY seq DESC LIMIT 1",
            "the ledger holds rows in partition 99, which is none of the store's 4",
        ),
        # The schema check (store/postgres_schema.py) refuses it before a row is read.
        ("DROP TABLE instance_data", "lacks what the runtime creates: column instance_data"),
    ],
)
def test_a_postgres_store_with_rows_outside_its_partitions_or_a_table_dropped_fails_the_audit(
    stores: Stores, tmp_path: Path, sql: str, diagnostic: str
) -> None:
    if stores.kind != "postgres":
        pytest.skip("partitions are PostgreSQL's")
    public = keys(tmp_path)
    open_case(stores, public).close()
    stores.rows("m", sql)
    code, out = audit(stores, public)
    assert code == 1 and diagnostic in out, out
    assert "internal error" not in out


def test_a_store_written_before_snapshots_named_their_kept_entry_is_its_own_schema(
    tmp_path: Path,
) -> None:
    """The one declaration an earlier release gave otherwise (store/sqlite_schema.py UPGRADES)
    is accepted before and after the store upgrades it, by the store and by `audit verify`."""
    public = keys(tmp_path)
    stores = Stores("sqlite", tmp_path, None)
    open_case(stores, public).close()
    path = Path(stores.location("m"))
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("ALTER TABLE snapshots RENAME TO newer")
    connection.execute(UPGRADES[0][0])
    connection.execute(
        "INSERT INTO snapshots SELECT machine, instance, version, state, ledger_seq, entry_hash "
        "FROM newer"
    )
    connection.execute("DROP TABLE newer")
    connection.close()
    for _ in range(2):  # as written, then as upgraded
        code, out = audit(stores, public)
        assert code == 0, out
        SQLiteStore(path).close()
    columns = stores.rows("m", "SELECT name FROM pragma_table_info('snapshots')")
    assert ("kept_seq",) in columns
