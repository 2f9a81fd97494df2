"""The SQLite store: pragmas, one transaction per dispatch, a verified head, group commit."""

from __future__ import annotations

import contextlib
import multiprocessing
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from autonomic.runtime.dispatch import Governor
from autonomic.runtime.errors import (
    RuntimeFailure,
    StoreConfigError,
    StoreIntegrityError,
)
from autonomic.runtime.inputs import InputLimits
from autonomic.runtime.keys import generate_keypair, load_signer
from autonomic.runtime.ledger import LedgerEntry, LedgerMode, LedgerSealer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import InstanceRecord, OutboxMessage, SQLiteStore
from autonomic.runtime.timers import VirtualClock
from runtime_machines import Bindings, billing_spec, entitlement_spec


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder)
    return folder


def open_runtime(
    path: Path, key_dir: Path, mode: LedgerMode = "checkpoint", **options: object
) -> Runtime:
    sealer = LedgerSealer(load_signer(key_dir), mode)
    return Runtime(SQLiteStore(path), clock=VirtualClock(), sealer=sealer, **options)  # type: ignore[arg-type]


def load_entitlement(rt: Runtime) -> Governor:
    spec = entitlement_spec()
    return rt.load(spec, *Bindings().for_spec(spec))


def counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        tables = [
            "instances",
            "ledger",
            "ledger_checkpoints",
            "timers",
            "outbox",
            "processed_events",
            "idempotency_keys",
        ]
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}


def test_pragmas(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "full.db")
    pragma = store._connection.execute
    assert pragma("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert pragma("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert pragma("PRAGMA busy_timeout").fetchone()[0] == 30_000
    store.close()
    normal = SQLiteStore(tmp_path / "normal.db", synchronous="NORMAL", busy_timeout_ms=500)
    assert normal._connection.execute("PRAGMA synchronous").fetchone()[0] == 1
    assert normal._connection.execute("PRAGMA busy_timeout").fetchone()[0] == 500
    normal.close()


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello, this is not SQLite\n" * 100)
    with pytest.raises(StoreConfigError, match="not a usable SQLite store"):
        SQLiteStore(bogus)
    assert bogus.read_text().startswith("hello")


def test_rejected_input_leaves_the_file_bytes_unchanged(tmp_path: Path, key_dir: Path) -> None:
    path = tmp_path / "s.db"
    rt = open_runtime(path, key_dir)
    spec = billing_spec()
    bil = rt.load(spec, *Bindings().for_spec(spec))
    bil.create("b1")
    bil.dispatch("b1", "StartBilling")

    def snapshot() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (path, path.with_name("s.db-wal"))}

    before = snapshot()
    bad = [
        ("Charge", {"amount": "a lot", "currency": "USD"}),  # not a decimal
        ("Charge", {"amount": "1.00"}),  # currency missing
        ("Charge", {"amount": "1.00", "currency": "USD", "card": "4111"}),  # unknown field
        ("StartBilling", None),  # no transition from AwaitingPayment
        ("Nonsense", None),  # no such event
    ]
    for event, payload in bad:
        with pytest.raises(RuntimeFailure):
            bil.dispatch("b1", event, payload, "shop", event_id=f"bad-{event}")
    assert snapshot() == before
    rt.close()


# ---------------------------------------------------------------------------------------------
# Opening: a new or empty file is initialised, a store is reopened, anything else is refused
# with its bytes as they were and no -wal, -shm or -journal file beside it.


def sidecars(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def assert_refused_untouched(path: Path, match: str) -> None:
    before, beside = path.read_bytes(), sidecars(path)
    with pytest.raises(StoreConfigError, match=match) as raised:
        SQLiteStore(path)
    assert raised.value.code == "R022" and raised.value.hint
    assert path.read_bytes() == before
    assert sidecars(path) == beside


def make_database(path: Path, *statements: str, wal: bool = False) -> None:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        if wal:
            connection.execute("PRAGMA journal_mode = WAL")
        for statement in statements:
            connection.execute(statement)
        connection.commit()


def store_marks(path: Path) -> tuple[int, dict[str, str]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        return application_id, dict(db.execute("SELECT key, value FROM runtime_meta"))


@pytest.mark.parametrize("wal", [False, True], ids=["rollback-journal", "wal"])
def test_another_programs_database_is_refused_untouched(tmp_path: Path, wal: bool) -> None:
    foreign = tmp_path / "folder" / "app.db"
    foreign.parent.mkdir()
    make_database(foreign, "CREATE TABLE invoices (id INTEGER PRIMARY KEY, total TEXT)", wal=wal)
    assert sidecars(foreign) == []  # closed cleanly: the -wal was checkpointed and removed
    assert_refused_untouched(foreign, r"app\.db is an SQLite database of something else")
    with contextlib.closing(sqlite3.connect(foreign)) as db:
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert mode == ("wal" if wal else "delete") and tables == {"invoices"}


def test_a_database_open_in_its_program_is_refused_untouched(tmp_path: Path) -> None:
    foreign = tmp_path / "folder" / "app.db"
    foreign.parent.mkdir()
    with contextlib.closing(sqlite3.connect(foreign)) as owner:
        owner.execute("PRAGMA journal_mode = WAL")
        owner.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
        owner.execute("INSERT INTO invoices VALUES (1)")
        owner.commit()
        assert sidecars(foreign) == ["app.db-shm", "app.db-wal"]
        wal_before = foreign.with_name("app.db-wal").read_bytes()
        assert_refused_untouched(foreign, "something else")
        assert foreign.with_name("app.db-wal").read_bytes() == wal_before
        assert owner.execute("SELECT id FROM invoices").fetchall() == [(1,)]


@pytest.mark.parametrize(
    ("statements", "match"),
    [
        # Another program's marks on a database with no tables yet.
        (["PRAGMA application_id = 1234"], "marked by another program"),
        (["PRAGMA user_version = 7"], "marked by another program"),
        # Tables named like the store's, without the marks written at its creation.
        (
            [
                "CREATE TABLE runtime_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
                "CREATE TABLE ledger_meta (key TEXT PRIMARY KEY, value TEXT)",
            ],
            "not the autonomic store's marks",
        ),
        # The same names, unrelated columns: reading the marks fails.
        (
            ["CREATE TABLE runtime_meta (a)", "CREATE TABLE ledger_meta (b)"],
            "not a usable SQLite store",
        ),
        # Only a view (no table): still something of someone's.
        (["CREATE VIEW answer AS SELECT 42"], "something else"),
    ],
)
def test_lookalikes_are_refused_untouched(
    tmp_path: Path, statements: list[str], match: str
) -> None:
    path = tmp_path / "d" / "x.db"
    path.parent.mkdir()
    make_database(path, *statements)
    assert_refused_untouched(path, match)


def test_a_store_of_another_schema_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "d" / "s.db"
    path.parent.mkdir()
    SQLiteStore(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE runtime_meta SET value = '99' WHERE key = 'schema'")
        db.commit()
    assert_refused_untouched(path, "schema version 99 is not 1")


@pytest.mark.parametrize("content", [b"\x00" * 4096, b"SQLite format 3\x00" + b"\xff" * 84, b"x"])
def test_files_that_are_not_sqlite_are_refused_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "d" / "blob.db"
    path.parent.mkdir()
    path.write_bytes(content)
    assert_refused_untouched(path, "not a usable SQLite store")


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="not a regular file"):
        SQLiteStore(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["missing", "zero bytes", "sqlite, nothing in it"])
def test_new_and_empty_files_become_stores_that_reopen(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "s.db"
    if kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "sqlite, nothing in it":
        make_database(path, "CREATE TABLE scratch (x)", "DROP TABLE scratch")
        assert path.stat().st_size > 0
    store = SQLiteStore(path)
    store.run([lambda txn: txn.insert_instance(InstanceRecord("M", "a", "A", 1))])
    store.close()
    application_id, meta = store_marks(path)
    assert application_id == int.from_bytes(b"AuTo", "big")
    assert meta == {"format": "autonomic-store", "schema": "1"}
    reopened = SQLiteStore(path)  # recognised by those marks
    assert [r.instance for r in reopened.instances("M")] == ["a"]
    reopened.close()
    assert store_marks(path) == (application_id, meta)


def test_many_openers_of_one_new_file_agree(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    start = threading.Barrier(6)
    opened: list[SQLiteStore] = []
    errors: list[BaseException] = []

    def open_it() -> None:
        start.wait()
        try:
            opened.append(SQLiteStore(path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == [] and len(opened) == 6
    for store in opened:
        store.close()
    assert store_marks(path)[1] == {"format": "autonomic-store", "schema": "1"}


def _open_at_the_signal(path: str, go: Any, answers: Any) -> None:
    go.wait()
    try:
        SQLiteStore(Path(path)).close()
        answers.put("ok")
    except BaseException as exc:  # the parent shows what went wrong
        answers.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_one_new_file_at_once_all_get_the_store(tmp_path: Path) -> None:
    """Eight processes open the same new file at the same moment, twenty times. SQLite
    answers the switch to WAL, and a read while another process creates the file, with
    "locked" at once (no busy wait): each opener waits its turn instead of refusing the file,
    and none takes a store being created for another program's file."""
    context = multiprocessing.get_context("fork")
    failures = []
    for trial in range(20):
        go, answers = context.Event(), context.Queue()
        path = str(tmp_path / f"s{trial}.db")
        workers = [
            context.Process(target=_open_at_the_signal, args=(path, go, answers)) for _ in range(8)
        ]
        for worker in workers:
            worker.start()
        go.set()
        failures += [a for a in (answers.get(timeout=60) for _ in workers) if a != "ok"]
        for worker in workers:
            worker.join(timeout=60)
        assert store_marks(Path(path))[1] == {"format": "autonomic-store", "schema": "1"}
    assert failures == []


# One case per input rule (runtime/inputs.py and the strict payload models): each is refused
# with a runtime error code, and the store file's bytes stay exactly as they were.
REFUSED: list[tuple[str, Callable[[Governor], object], str]] = [
    ("lone surrogate instance id", lambda g: g.create("b\udc00"), "R031"),
    ("control character instance id", lambda g: g.create("b1\n"), "R031"),
    ("bidi control instance id", lambda g: g.create("b\u202e1"), "R031"),
    ("empty instance id", lambda g: g.create(""), "R031"),
    ("instance id of 257 characters", lambda g: g.create("b" * 257), "R031"),
    ("instance id not a string", lambda g: g.create(7), "R031"),  # type: ignore[arg-type]
    ("lone surrogate actor", lambda g: g.dispatch("b1", "PaymentFailed", None, "\udc00"), "R031"),
    ("escape in the actor", lambda g: g.dispatch("b1", "PaymentFailed", None, "e\x1b[2J"), "R031"),
    (
        "lone surrogate event id",
        lambda g: g.dispatch("b1", "PaymentFailed", event_id="e\udc00"),
        "R031",
    ),
    (
        "lone surrogate idempotency key",
        lambda g: g.dispatch("b1", "PaymentFailed", idempotency_key="k\udc00"),
        "R031",
    ),
    (
        "a float for a decimal",
        lambda g: g.dispatch("b1", "Charge", {"amount": 12.5, "currency": "USD"}),
        "R005",
    ),
    (
        "true for a decimal",
        lambda g: g.dispatch("b1", "Charge", {"amount": True, "currency": "USD"}),
        "R005",
    ),
    (
        "a payload over the size limit",
        lambda g: g.dispatch("b1", "PaymentFailed", {"reason": "x" * 600}),
        "R031",
    ),
    (
        "a payload nested too deeply",
        lambda g: g.dispatch("b1", "PaymentFailed", {"reason": [[[["deep"]]]]}),
        "R031",
    ),
]


@pytest.mark.parametrize(("rule", "call", "code"), REFUSED, ids=[case[0] for case in REFUSED])
def test_each_input_rule_leaves_the_file_bytes_unchanged(
    tmp_path: Path, key_dir: Path, rule: str, call: Callable[[Governor], object], code: str
) -> None:
    path = tmp_path / "s.db"
    rt = open_runtime(path, key_dir, limits=InputLimits(max_payload_bytes=512, max_depth=3))
    spec = billing_spec()
    bil = rt.load(spec, *Bindings().for_spec(spec))
    bil.create("b1")
    bil.dispatch("b1", "StartBilling")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeFailure) as caught:
        call(bil)
    assert caught.value.code == code, caught.value
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, rule
    rt.close()


def test_a_runtime_that_cannot_be_built_closes_the_store_it_was_given(tmp_path: Path) -> None:
    """The runtime owns its store (its `close` closes it); a constructor that raises leaves
    no runtime to close, so it closes the store itself, and the file opens again."""
    store = SQLiteStore(tmp_path / "s.db")
    with pytest.raises(ValueError, match="checkpoint_every"):
        Runtime(store, checkpoint_every=0)
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        store._connection.execute("SELECT 1")
    with Runtime(SQLiteStore(tmp_path / "s.db")) as runtime:
        assert runtime.store is not None


def test_outbox_rows_of_one_unit_take_the_ids_sqlite_gives_each_sealed(tmp_path: Path) -> None:
    """add_outbox writes the first message with the id SQLite gives and the others with the
    ids after it, each with its seal (which covers the id): read back and checked, in order,
    with the ids SQLite would have given them one by one."""
    store = SQLiteStore(tmp_path / "s.db")
    store.seal_rows(bytes(range(32)))

    def message(n: int) -> OutboxMessage:
        return OutboxMessage(None, "event", "M", "i", 1, "T", "t", "E", f"e{n}", "{}", 5)

    def emit(*numbers: int) -> Callable[[Any], None]:
        return lambda txn: txn.add_outbox([message(n) for n in numbers])

    def fail(txn: Any) -> None:
        txn.add_outbox([message(9)])
        raise RuntimeError("rolled back")

    outcomes = store.run([emit(0), emit(1, 2, 3), fail, emit(4, 5)])
    assert [o.error is None for o in outcomes] == [True, True, False, True]
    store.run([lambda txn: txn.mark_outbox(6, "delivered", None)])  # reads and checks row 6
    ids = [(m.id, m.event_id, m.status) for m in store.outbox(status=None)]
    # The rolled-back message's id is free again, as SQLite's own rollback leaves it.
    assert ids == [
        (1, "e0", "pending"),
        (2, "e1", "pending"),
        (3, "e2", "pending"),
        (4, "e3", "pending"),
        (5, "e4", "pending"),
        (6, "e5", "delivered"),
    ]
    store.close()


def test_a_transaction_reads_again_what_another_connection_committed(tmp_path: Path) -> None:
    """Rows the store's connection read or wrote are not read again inside its next
    transaction while no other connection committed; once another connection commits (here
    between a look outside any transaction and the transaction, as a dispatch's preflight
    and its unit), the transaction reads them again: the ledger head, an instance row, a
    dedup miss, a claim, the next outbox id."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    entry = LedgerEntry(
        0, 5, "genesis", "", "", "", "", "", "", "", b"", b"\0" * 32, b"\1" * 32, "k", b""
    )
    store.run([lambda txn: txn.insert_instance(InstanceRecord("M", "i", "A", 1))])
    store.run([lambda txn: txn.append_ledger(entry)])

    def emit(event_id: str) -> Callable[[Any], None]:
        message = OutboxMessage(None, "event", "M", "i", 1, "T", "t", "E", event_id, "{}", 5)
        return lambda txn: txn.add_outbox([message])

    store.run([emit("e0")])
    keys = [("M", "event", "e1")]
    assert store.claim_outside(keys, "me", 60_000)
    sql: list[str] = []
    store._connection.set_trace_callback(sql.append)

    def look(txn: Any) -> tuple[Any, ...]:
        return (
            txn.ledger_head(),
            txn.instance("M", "i"),
            txn.processed("M", "e1"),
            txn.holds_outside(keys, "me"),
        )

    # Read before the transaction (as preflight reads), then inside it: nothing read twice.
    assert store.get_instance("M", "i") == InstanceRecord("M", "i", "A", 1)
    assert store.processed("M", "e1") is None
    sql.clear()
    [known] = store.run([look])
    assert known.value == (entry, InstanceRecord("M", "i", "A", 1), None, True)
    assert [s for s in sql if s.startswith("SELECT")] == []
    assert store.run([emit("e1")])[0].error is None
    assert not any(s.startswith("UPDATE outbox") for s in sql)  # its id known: sealed at once

    # Another connection commits between the look and the transaction.
    assert store.get_instance("M", "i") == InstanceRecord("M", "i", "A", 1)
    with sqlite3.connect(path) as other:
        other.execute("UPDATE instances SET state = 'B', version = 2")
        other.execute(
            "INSERT INTO ledger VALUES (1, 6, 'x', '', '', '', '', '', '', '', "
            "x'', x'01', x'02', 'k', x'')"
        )
        other.execute("INSERT INTO processed_events VALUES ('M', 'e1', 'i', '{}', 5, NULL)")
        other.execute("UPDATE outside_claims SET holder = 'them'")
        other.execute(
            "INSERT INTO outbox (kind, machine, instance, version, target_machine, "
            "target_instance, event, event_id, body, created_ms, status) "
            "VALUES ('event', 'M', 'i', 1, 'T', 't', 'E', 'x', '{}', 5, 'pending')"
        )
    other.close()
    sql.clear()
    [seen] = store.run([look])
    assert seen.value == (
        (1, 6, "x", "", "", "", "", "", "", "", b"", b"\1", b"\2", "k", b""),
        InstanceRecord("M", "i", "B", 2),
        "{}",
        False,
    )
    assert sum(s.startswith("SELECT") for s in sql) >= 4
    # The outbox id the other connection took is not given again.
    assert store.run([emit("e2")])[0].error is None
    assert [m.event_id for m in store.outbox(status=None)] == ["e0", "e1", "x", "e2"]
    store.close()


def test_a_units_ledger_entries_go_in_together_and_every_read_of_the_ledger_sees_them(
    tmp_path: Path,
) -> None:
    """A unit's entries are inserted in one executemany at its end, yet a read of the ledger
    inside the unit finds those appended before it: the dedup probe of a missing processed
    row finds its dispatch's entry (the row was deleted: refused); a unit that fails takes
    its entries with it, and the next unit's go in after the last one committed."""
    store = SQLiteStore(tmp_path / "s.db")
    store.seal_rows(bytes(range(32)))

    def entry(seq: int, kind: str, event_id: str) -> LedgerEntry:
        return LedgerEntry(
            seq, 5, kind, "M", "i", "A", "B", "E", "a", event_id, b"", b"", b"", "k", b""
        )

    sql: list[str] = []
    store._connection.set_trace_callback(sql.append)

    def appends(*entries: LedgerEntry) -> Callable[[Any], None]:
        def work(txn: Any) -> None:
            for e in entries:
                txn.append_ledger(e)

        return work

    def probe(txn: Any) -> object:
        txn.append_ledger(entry(3, "flow", "e1"))  # not its dispatch's: no insert before the probe
        first = txn.processed("M", "e1")
        txn.append_ledger(entry(4, "transition", "e1"))
        return first, txn.processed("M", "e1")

    def fail(txn: Any) -> None:
        txn.append_ledger(entry(3, "transition", "e9"))
        raise RuntimeError("rolled back")

    outcomes = store.run([appends(entry(0, "genesis", ""), entry(1, "flow", "")), fail])
    assert [o.error is None for o in outcomes] == [True, False]
    assert sum(s.startswith("INSERT INTO ledger") for s in sql) == 2  # one executemany: 2 rows
    store.run([appends(entry(2, "flow", ""))])
    [probed] = store.run([probe])
    assert isinstance(probed.error, StoreIntegrityError)  # the entry of e1 found, its row gone
    assert "missing" in str(probed.error)
    assert [e.seq for e in store.ledger_entries()] == [0, 1, 2]  # nothing of the failed units
    store.close()


def test_the_rows_a_store_keeps_stay_bounded(tmp_path: Path) -> None:
    """A long run keeps no row of every instance and event it saw: past a bound, the next
    transaction starts from nothing known."""
    store = SQLiteStore(tmp_path / "s.db")
    for n in range(5000):
        assert store.processed("M", f"e{n}") is None  # each miss kept
    assert len(store._txn._seen) == 5000
    store.run([lambda txn: txn.instance("M", "i")])
    assert len(store._txn._seen) == 0
    store.close()
