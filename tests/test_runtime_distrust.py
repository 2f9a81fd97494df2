"""The runtime trusts nothing it reads from the store: attacks that tamper with the real SQLite
file or PostgreSQL rows (someone with database access and no signing key) are refused with a
StoreIntegrityError naming what is wrong, and nothing is written or lost. Each attack here was
accepted by the runtime before its check existed."""

from __future__ import annotations

import contextlib
import io
import itertools
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from autonomic.compiler import cli
from autonomic.compiler.build import build
from autonomic.runtime.checkpointing import _check_control
from autonomic.runtime.errors import StoreConfigError, StoreIntegrityError
from autonomic.runtime.keychain import ROTATION, KeyChain, RootOfTrust, fingerprint, rotation_body
from autonomic.runtime.keys import (
    Signer,
    generate_keypair,
    load_signer,
    load_trusted_root,
    now_ms,
    write_keypair,
)
from autonomic.runtime.ledger import KEPT, LedgerMode, LedgerSealer, entry_hash
from autonomic.runtime.ledger_ranges import verify_ledger
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.sealing import _Chain
from autonomic.runtime.store.base import Transaction
from autonomic.runtime.store.postgres import PostgresStore, migrate
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.tables import MachineSpec
from autonomic.runtime.timers import VirtualClock
from conftest import Stores
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flow_world import START_MS, marketplace
from runtime_machines import Bindings, counter_spec
from strategies import import_path
from test_emit_routing import disputed
from test_kept_routing import literal

CASE, CUSTOMER = "case-1", "cust-1"
EVIDENCE = {"evidence_ref": "ev-1", "submitted_at": "2026-01-02T00:00:00+00:00"}


def count(stores: Stores, table: str) -> int:
    return int(stores.rows("m", f"SELECT count(*) FROM {table}")[0][0])


@pytest.mark.parametrize("tamper", ["kept_seq -1, data deleted", "kept_seq -1"])
def test_replay_from_a_snapshot_checks_its_kept_entry_against_the_ledger(
    stores: Stores, tamper: str
) -> None:
    """Redteam a10: the snapshot after EvidenceSubmitted names the case's kept entry; set its
    kept_seq to -1 (and delete the kept data), and replay from it must still find the kept
    entry in the ledger and refuse, as replay without it does."""
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime, _, _ = marketplace(stores.open("m"), signer=signer, snapshot_every=1)
    disputed(runtime, CUSTOMER, CASE)
    runtime.governor("Compliance").dispatch(CASE, "EvidenceSubmitted", EVIDENCE)
    runtime.close()
    stores.rows("m", f"UPDATE snapshots SET kept_seq = -1 WHERE instance = '{CASE}'")
    if "deleted" in tamper:
        stores.rows("m", f"DELETE FROM instance_data WHERE instance = '{CASE}'")
    entries = count(stores, "ledger")
    runtime, _, _ = marketplace(stores.open("m"), signer=signer, snapshot_every=1)
    with runtime:
        with pytest.raises(StoreIntegrityError, match="names no kept entry as its kept entry"):
            runtime.replay("Compliance", CASE)
        if "deleted" in tamper:
            with pytest.raises(StoreIntegrityError, match=r"no longer holds|commits to"):
                runtime.replay("Compliance", CASE, use_snapshot=False)
        else:
            assert runtime.replay("Compliance", CASE, use_snapshot=False).data is not None
    assert count(stores, "ledger") == entries


def test_a_chain_rewritten_from_another_root_is_refused(stores: Stores, tmp_path: Path) -> None:
    """Someone without our key writes a whole ledger of their own: their root in the genesis
    entry, then a rotation (signed by their root) that introduces OUR public key. Our key is
    then active in that chain; the runtime pins its own key (or the recorded root) as the root
    and refuses the store before writing, instead of chaining on it."""
    ours = Signer.from_private_key(Ed25519PrivateKey.generate())
    theirs = Signer.from_private_key(Ed25519PrivateKey.generate())
    forger = Runtime(
        stores.open("m"), clock=VirtualClock(START_MS), sealer=LedgerSealer(theirs, "sign-each")
    )
    sealer = forger.sealer
    assert sealer is not None

    def rotate_to_our_public_key(txn: Transaction, chain: _Chain) -> None:
        chain.load(txn)
        body = rotation_body(ours.public_info(), [theirs.key_id])
        entry = sealer.seal_control(chain.next_seq, chain.head, START_MS, ROTATION, body)
        txn.append_ledger(entry)
        chain.advance(entry)

    forger._submit(rotate_to_our_public_key)
    forger.close()
    entries = count(stores, "ledger")
    keys = tmp_path / "keys"
    write_keypair(keys, ours.private_key, valid_from_ms=0)
    # A runtime that cannot be built closes the store it was given: each attempt opens one.
    with pytest.raises(StoreIntegrityError, match="is not the pinned root"):
        marketplace(stores.open("m"), signer=ours)
    with pytest.raises(StoreIntegrityError, match="is not the pinned root"):
        Runtime(
            stores.open("m"),
            sealer=LedgerSealer(load_signer(keys), "sign-each"),
            trusted_root=load_trusted_root(keys),
        )
    store = stores.open("m")
    try:
        # What the runtime followed before: a chain in which our key is active.
        chain = KeyChain(RootOfTrust(fingerprint(theirs.public_info().public_key)))
        for entry in store.ledger_entries(machine="", instance=""):
            _check_control(chain, entry)
    finally:
        store.close()
    assert count(stores, "ledger") == entries
    assert ours.key_id in chain.active


def test_rotated_keys_carry_the_pinned_root_in_their_folder(tmp_path: Path) -> None:
    """`keygen NEW --retire OLD --ledger STORE` records the ledger's root beside the new key,
    and the next rotation carries it on: a runtime with the newest key and the root its folder
    records opens the store, and the ledger verifies from the root."""
    store = tmp_path / "s.db"
    folders = [tmp_path / f"k{n}" for n in range(3)]
    generate_keypair(folders[0], valid_from_ms=now_ms() - 3_600_000)
    runtime = Runtime(SQLiteStore(store), sealer=LedgerSealer(load_signer(folders[0])))
    runtime.load(counter_spec(), *Bindings().for_spec(counter_spec())).create("c0")
    runtime.close()
    root = load_trusted_root(folders[0])
    for old, new in itertools.pairwise(folders):
        (public,) = old.glob("*.public.json")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["keygen", str(new), "--retire", str(public), "--ledger", str(store)])
        assert code == 0, out.getvalue()
        assert load_trusted_root(new) == root and "ledger root (pinned" in out.getvalue()
    runtime = Runtime(
        SQLiteStore(store),
        sealer=LedgerSealer(load_signer(folders[-1])),
        trusted_root=load_trusted_root(folders[-1]),
    )
    runtime.load(counter_spec(), *Bindings().for_spec(counter_spec())).create("c1")
    runtime.close()
    report = verify_ledger(store, root)
    assert report.ok and report.count == 5 and len(report.keys) == 3, report.reason


def rewrite_entry(stores: Stores, seq: int, to_state: str) -> bytes:
    """Change entry `seq`'s to_state and recompute its own hash, as someone without the key
    can; returns the new hash."""
    columns = "seq, ts_ms, kind, machine, instance, from_state, to_state, event, actor, event_id"
    (row,) = stores.rows(
        "m", f"SELECT {columns}, payload_sha256, prev_hash FROM ledger WHERE seq = {seq}"
    )
    strings = (*row[2:6], to_state, *row[7:10])
    new = entry_hash(row[0], row[1], strings, bytes(row[10]), bytes(row[11]))
    stores.rows(
        "m",
        f"UPDATE ledger SET to_state = '{to_state}', entry_hash = {literal(stores, new)} "
        f"WHERE seq = {seq}",
    )
    return new


def ledger_rows(stores: Stores) -> tuple[int, int]:
    return count(stores, "ledger"), count(stores, "ledger_checkpoints")


def counters(stores: Stores, mode: LedgerMode, signer: Signer, **options: Any) -> Runtime:
    runtime = Runtime(
        stores.open("m"),
        clock=VirtualClock(START_MS),
        sealer=LedgerSealer(signer, mode),
        **options,
    )
    runtime.load(counter_spec(), *Bindings().for_spec(counter_spec()))
    return runtime


def tick_is_refused(
    stores: Stores, signer: Signer, mode: LedgerMode, why: str, **options: Any
) -> None:
    """The next write (a Tick) is refused before anything is chained, and nothing is written."""
    before = ledger_rows(stores)
    runtime = counters(stores, mode, signer, **options)
    try:
        with pytest.raises(StoreIntegrityError, match=why):
            runtime.governor("Counter").dispatch("c1", "Tick")
    finally:
        runtime.store.close()
    assert ledger_rows(stores) == before


def test_a_rewritten_head_whose_checkpoint_was_deleted_is_refused(stores: Stores) -> None:
    """Checkpoint mode, the default policy (a checkpoint per commit batch): the head entry is
    rewritten (its hash recomputed) and the checkpoint over it deleted, so no checkpoint
    disagrees with it. The runtime chained on it before; now an uncovered tail longer than
    its policy leaves is refused."""
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime = counters(stores, "checkpoint", signer)
    for name in ("c0", "c1"):
        runtime.governor("Counter").create(name)
    runtime.close()
    (head,) = stores.rows("m", "SELECT max(seq) FROM ledger")[0]
    rewrite_entry(stores, head, "Forged")
    stores.rows("m", f"DELETE FROM ledger_checkpoints WHERE size = {head + 1}")
    tick_is_refused(stores, signer, "checkpoint", "1 entries after its last signed checkpoint")


def test_a_rewritten_head_with_a_forged_checkpoint_is_refused(stores: Stores) -> None:
    """The head rewritten and the checkpoint's head hash changed to match it: the runtime
    compared hashes only; now it checks the checkpoint's signature."""
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime = counters(stores, "checkpoint", signer)
    runtime.governor("Counter").create("c1")
    runtime.close()
    (head,) = stores.rows("m", "SELECT max(seq) FROM ledger")[0]
    new = rewrite_entry(stores, head, "Forged")
    stores.rows(
        "m",
        f"UPDATE ledger_checkpoints SET head_hash = {literal(stores, new)} WHERE size = {head + 1}",
    )
    tick_is_refused(stores, signer, "checkpoint", f"checkpoint at size {head + 1} has a bad sig")


def test_an_uncovered_tail_that_does_not_chain_is_refused(stores: Stores) -> None:
    """checkpoint_every=10: a runtime that stopped without close() leaves its 4 entries (the
    genesis entry and 3 creates) uncovered by any checkpoint. One in the middle is rewritten:
    the entry after it no longer chains on it, which the runtime did not look at before (the
    head's own hash is intact)."""
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    options = {"checkpoint_every": 10, "checkpoint_ms": 10**9}
    runtime = counters(stores, "checkpoint", signer, **options)
    for name in ("c0", "c1", "c2"):
        runtime.governor("Counter").create(name)
    runtime.store.close()  # as if killed: the last 3 entries stay uncovered
    (covered,) = stores.rows("m", "SELECT coalesce(max(size), 0) FROM ledger_checkpoints")[0]
    (head,) = stores.rows("m", "SELECT max(seq) FROM ledger")[0]
    assert head + 1 - covered == 4  # the genesis entry and three creates
    rewrite_entry(stores, head - 1, "Forged")
    tick_is_refused(stores, signer, "checkpoint", f"entry {head}, after the last signed", **options)


def test_a_rewritten_head_is_refused_in_sign_each_mode(stores: Stores) -> None:
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime = counters(stores, "sign-each", signer)
    runtime.governor("Counter").create("c1")
    runtime.close()
    (head,) = stores.rows("m", "SELECT max(seq) FROM ledger")[0]
    rewrite_entry(stores, head, "Forged")
    tick_is_refused(stores, signer, "sign-each", "the ledger head, has a bad signature")


PG_TAMPERS = {
    "a lying partial index": (
        "CREATE INDEX ledger_lie ON ledger (machine, instance, part, seq) WHERE kind <> 'kept'",
        "index CREATE INDEX ledger_lie",
    ),
    "an index dropped": ("DROP INDEX ledger_by_instance", "lacks what the runtime creates"),
    "an unlogged ledger": (
        "ALTER TABLE ledger SET UNLOGGED",
        "relation ledger kind=r persistence=u",
    ),
    "a key column collated": (
        'ALTER TABLE instance_data ALTER COLUMN instance TYPE text COLLATE "C"',
        "column instance_data.instance #2 text not null default= collation=pg_catalog.C",
    ),
    "a default changed": (
        "ALTER TABLE snapshots ALTER COLUMN kept_seq SET DEFAULT 0",
        "column snapshots.kept_seq",
    ),
    "row security hiding kept entries": (
        "ALTER TABLE ledger ENABLE ROW LEVEL SECURITY; ALTER TABLE ledger FORCE ROW LEVEL "
        "SECURITY; CREATE POLICY hide ON ledger USING (kind <> 'kept')",
        "policy ledger.hide",
    ),
    "a rule dropping outbox messages": (
        "CREATE RULE drop_all AS ON INSERT TO outbox DO INSTEAD NOTHING",
        "rule outbox.drop_all",
    ),
    "a trigger": (
        "CREATE FUNCTION keep_none() RETURNS trigger LANGUAGE plpgsql AS "
        "'BEGIN RETURN NULL; END'; CREATE TRIGGER t BEFORE INSERT ON ledger FOR EACH ROW "
        "EXECUTE FUNCTION keep_none()",
        "function keep_none()",
    ),
    "rows inherited from another schema": (
        "CREATE TABLE {other}.forged () INHERITS (ledger)",
        "inherits",
    ),
}


@pytest.mark.parametrize("tamper", sorted(PG_TAMPERS))
def test_an_altered_postgresql_schema_is_refused_before_a_row_is_read(
    postgres_stores: Stores, tamper: str, tmp_path: Path
) -> None:
    """Each declaration the migrations do not make (or one they make, removed) is refused, by
    PostgresStore and by `audit verify`, naming it; the store is left as it was. Before, each
    of these stores opened and verified as if nothing had changed."""
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    keys = tmp_path / "keys"
    write_keypair(keys, signer.private_key, valid_from_ms=0)
    (public,) = keys.glob("*.public.json")
    runtime = counters(postgres_stores, "checkpoint", signer)
    runtime.governor("Counter").create("c1")
    runtime.close()
    other = postgres_stores.location("other").rsplit("%3D", 1)[1]
    sql, shown = PG_TAMPERS[tamper]
    postgres_stores.rows("m", sql.format(other=other))
    before = ledger_rows(postgres_stores)
    url = postgres_stores.location("m")
    with pytest.raises(StoreConfigError, match="the store's schema was altered") as refused:
        PostgresStore(url)
    assert shown in str(refused.value)
    with pytest.raises(StoreConfigError, match="schema was altered"):
        migrate(url)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["audit", "verify", url, "--public-key", str(public)])
    assert code == 1 and "schema was altered" in err.getvalue(), err.getvalue()
    assert "Traceback" not in err.getvalue()
    assert ledger_rows(postgres_stores) == before


CASE_FSM = """
machine Case "A case whose customer can be transferred." {
  event Open { customer_id: str }
  event Transfer { customer_id: str }
  event Note
  event Decide
  data { customer_id: str "whose account the ruling goes to" }
  initial state Opened { on Open -> Investigating keep customer_id }
  state Investigating {
    on Transfer -> Investigating keep customer_id
    on Note -> Investigating
    on Decide -> Done emit Acct.Upheld(case_id = $instance) to customer_id
  }
  final state Done
}
"""
ACCT_FSM = """
machine Acct "An account a ruling credits." {
  event Upheld { case_id: str }
  initial state Waiting { on Upheld -> Credited }
  final state Credited
}
"""


@pytest.fixture(scope="module")
def transfers(tmp_path_factory: pytest.TempPathFactory) -> list[MachineSpec]:
    """A case that keeps its customer's id, and is transferred (kept again) before its ruling."""
    root = tmp_path_factory.mktemp("transfers")
    (root / "machines").mkdir()
    (root / "machines" / "case.fsm").write_text(CASE_FSM)
    (root / "machines" / "acct.fsm").write_text(ACCT_FSM)
    result = build([root / "machines"], root / "out", svg=False, strict=True)
    assert not result.report.diagnostics, result.report.diagnostics
    return [import_path(root / "out" / f"{name}.py").MACHINE for name in ("case", "acct")]


def transferred(stores: Stores, specs: list[MachineSpec], signer: Signer) -> Runtime:
    runtime = Runtime(
        stores.open("m"), clock=VirtualClock(START_MS), sealer=LedgerSealer(signer, "sign-each")
    )
    for spec in specs:
        runtime.load(spec)
    return runtime


def rolled_back_transfer(
    stores: Stores, specs: list[MachineSpec], signer: Signer, notes: int
) -> tuple[int, int]:
    """case-1 kept cust-old, then cust-new (Transfer), then `notes` moves that keep nothing,
    then another account is made (so the case's entries are not the ledger's last). Returns
    the seqs of the two kept entries."""
    runtime = transferred(stores, specs, signer)
    for account in ("cust-old", "cust-new", "other"):
        runtime.governor("Acct").create(account)
    case = runtime.governor("Case")
    case.create("case-1")
    case.dispatch("case-1", "Open", {"customer_id": "cust-old"})
    case.dispatch("case-1", "Transfer", {"customer_id": "cust-new"})
    for _ in range(notes):
        case.dispatch("case-1", "Note", {})
    runtime.governor("Acct").dispatch("other", "Upheld", {"case_id": "x"})
    runtime.close()
    kept = stores.rows("m", "SELECT seq FROM ledger WHERE kind = 'kept' ORDER BY seq")
    stores.rows(
        "m",
        'UPDATE instance_data SET data = \'{"customer_id":"cust-old"}\' '
        "WHERE instance = 'case-1'",
    )
    return kept[0][0], kept[1][0]


def ruling_is_refused(stores: Stores, specs: list[MachineSpec], signer: Signer, why: str) -> None:
    before = ledger_rows(stores), count(stores, "outbox")
    runtime = transferred(stores, specs, signer)
    try:
        with pytest.raises(StoreIntegrityError, match=why):
            runtime.governor("Case").dispatch("case-1", "Decide", {})
        assert runtime.governor("Case").get("case-1").state == "Investigating"  # type: ignore[union-attr]
    finally:
        runtime.store.close()
    assert (ledger_rows(stores), count(stores, "outbox")) == before


@pytest.mark.parametrize("notes", [0, 2])
def test_a_deleted_newer_kept_entry_is_found_before_routing(
    stores: Stores, transfers: list[MachineSpec], notes: int
) -> None:
    """Redteam a11: the transfer's kept entry deleted and the data rolled back to the older,
    validly signed one: the ruling would go to cust-old. The runtime reads the case's entries
    after the kept entry it was given and finds the hole right after the Transfer move (also
    when later moves keep nothing)."""
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    _, newest = rolled_back_transfer(stores, transfers, signer, notes)
    stores.rows("m", f"DELETE FROM ledger WHERE seq = {newest}")
    ruling_is_refused(stores, transfers, signer, f"ledger entry {newest}, right after entry")


def test_a_kept_entry_hidden_by_a_forged_index_is_found_before_routing(
    tmp_path: Path, transfers: list[MachineSpec]
) -> None:
    """ledger_by_instance, declared exactly as the runtime declares it, but built while the
    transfer's kept entry was filed under another instance (redteam a12): the index answers
    the older kept entry, which the rolled-back data matches. The entry right after the
    Transfer move, read by its seq from the table, is the hidden kept entry."""
    stores = Stores("sqlite", tmp_path, None)
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    older, newest = rolled_back_transfer(stores, transfers, signer, 2)
    db = sqlite3.connect(stores.location("m"), isolation_level=None)
    (declared,) = db.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'ledger_by_instance'"
    ).fetchone()
    db.execute("DROP INDEX ledger_by_instance")
    db.execute(f"UPDATE ledger SET instance = 'elsewhere' WHERE seq = {newest}")
    db.execute(declared)  # built over the relabelled row
    (rootpage,) = db.execute(
        "SELECT rootpage FROM sqlite_master WHERE name = 'ledger_by_instance'"
    ).fetchone()
    db.execute("PRAGMA writable_schema = ON")
    db.execute("DELETE FROM sqlite_master WHERE name = 'ledger_by_instance'")
    db.execute("PRAGMA writable_schema = OFF")
    db.close()
    db = sqlite3.connect(stores.location("m"), isolation_level=None)  # the index is detached
    db.execute(f"UPDATE ledger SET instance = 'case-1' WHERE seq = {newest}")
    db.execute("PRAGMA writable_schema = ON")
    db.execute(
        "INSERT INTO sqlite_master (type, name, tbl_name, rootpage, sql) "
        "VALUES ('index', 'ledger_by_instance', 'ledger', ?, ?)",
        (rootpage, declared),
    )
    db.execute("PRAGMA writable_schema = OFF")
    db.close()
    store = SQLiteStore(stores.location("m"))
    try:
        assert [
            e.seq for e in store.ledger_entries(machine="Case", instance="case-1") if e.kind == KEPT
        ] == [older]
    finally:
        store.close()
    ruling_is_refused(stores, transfers, signer, f"ledger entry {newest} is a kept entry of")
