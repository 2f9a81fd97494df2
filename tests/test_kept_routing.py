"""The runtime does not route by kept data the ledger does not commit to: a dispute case's
customer id changed in the store (and a kept entry forged to match, or deleted) is refused
with StoreIntegrityError before the outcome is sent, and nothing is written, from a row and
from a timer, on the memory store, SQLite and PostgreSQL. Snapshots name the kept entry, and
replay checks the stored data against it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from autonomic.runtime.errors import StoreIntegrityError
from autonomic.runtime.keys import Signer
from autonomic.runtime.ledger import KEPT, entry_hash, kept_digest
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.memory import MemoryStore
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.timers import VirtualClock
from conftest import Stores
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flow_world import START_MS, marketplace
from test_emit_routing import DAY_MS, decide, disputed

CASE, CUSTOMER, OTHER = "case-1", "cust-1", "cust-2"
FORGED = json.dumps({"customer_id": OTHER})


def two_disputes(runtime: Runtime) -> None:
    """Two customers with disputed charges; CASE investigates CUSTOMER's."""
    disputed(runtime, CUSTOMER, CASE)
    disputed(runtime, OTHER, "case-2")


def assert_nothing_written(runtime: Runtime, entries: int) -> None:
    assert runtime.governor("Compliance").get(CASE).state != "Resolved"  # type: ignore[union-attr]
    assert sum(1 for _ in runtime.store.ledger_entries()) == entries
    assert not [m for m in runtime.store.outbox(status=None) if m.instance == CASE]
    assert runtime.governor("Billing").get(OTHER).state == "Disputed"  # type: ignore[union-attr]


def forge_kept_entry(stores: Stores) -> None:
    """What someone with write access to the store and no key can do: make the kept entry
    commit to the forged data, its hash recomputed, its signature left as it was."""
    columns = "seq, ts_ms, kind, machine, instance, from_state, to_state, event, actor, event_id"
    row = stores.rows(
        "m",
        f"SELECT {columns}, prev_hash FROM ledger WHERE kind = '{KEPT}' AND instance = '{CASE}'",
    )[0]
    digest = kept_digest(FORGED)
    new_hash = entry_hash(row[0], row[1], tuple(row[2:10]), digest, bytes(row[10]))
    stores.rows(
        "m",
        f"UPDATE ledger SET payload_sha256 = {literal(stores, digest)}, "
        f"entry_hash = {literal(stores, new_hash)} WHERE kind = '{KEPT}' AND instance = '{CASE}'",
    )


def literal(stores: Stores, data: bytes) -> str:
    return f"x'{data.hex()}'" if stores.kind == "sqlite" else f"'\\x{data.hex()}'::bytea"


def change_data(stores: Stores) -> None:
    stores.rows("m", f"UPDATE instance_data SET data = '{FORGED}' WHERE instance = '{CASE}'")


def change_data_forge_entry(stores: Stores) -> None:
    change_data(stores)
    forge_kept_entry(stores)


def change_data_delete_entry(stores: Stores) -> None:
    change_data(stores)
    stores.rows("m", f"DELETE FROM ledger WHERE kind = '{KEPT}' AND instance = '{CASE}'")


TAMPERS: dict[str, Callable[[Stores], None]] = {
    "data changed": change_data,
    "data changed, kept entry forged": change_data_forge_entry,
    "data changed, kept entry deleted": change_data_delete_entry,
}
REASONS = {
    "data changed": "the kept data of Compliance 'case-1' is not what ledger entry",
    "data changed, kept entry forged": "the kept entry of Compliance 'case-1', has a bad signature",
    # The hole right after the move that kept is found first (instance_data.py).
    "data changed, kept entry deleted": "right after entry 4 of Compliance 'case-1', is missing",
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_a_row_does_not_route_by_tampered_data(stores: Stores, tamper: str) -> None:
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime, _, _ = marketplace(stores.open("m"), signer=signer)
    two_disputes(runtime)
    runtime.close()
    TAMPERS[tamper](stores)
    runtime, _, _ = marketplace(stores.open("m"), signer=signer)
    with runtime:
        entries = sum(1 for _ in runtime.store.ledger_entries())
        compliance = runtime.governor("Compliance")
        evidence = {"evidence_ref": "ev-1", "submitted_at": "2026-01-02T00:00:00+00:00"}
        compliance.dispatch(CASE, "EvidenceSubmitted", evidence)  # reads no kept data
        entries += 1
        with pytest.raises(StoreIntegrityError, match="case-1") as refused:
            compliance.dispatch(CASE, "DisputeDecided", {"outcome": "customer"})
        assert REASONS[tamper] in str(refused.value)
        assert_nothing_written(runtime, entries)


def test_the_memory_store_is_held_to_its_ledger_too() -> None:
    store = MemoryStore()
    runtime, _, _ = marketplace(store)
    with runtime:
        two_disputes(runtime)
        entries = sum(1 for _ in store.ledger_entries())
        genuine = store._data[("Compliance", CASE)]
        store._data[("Compliance", CASE)] = FORGED
        with pytest.raises(StoreIntegrityError, match="is not what ledger entry"):
            runtime.governor("Compliance").dispatch(CASE, "DisputeWithdrawn", {})
        assert_nothing_written(runtime, entries)
        store._data[("Compliance", CASE)] = genuine
        decide(runtime, CASE)  # the genuine data routes as before
        assert runtime.governor("Compliance").get(CASE).state == "Resolved"  # type: ignore[union-attr]


def test_a_timer_does_not_route_by_tampered_data(tmp_path: Path) -> None:
    """The 7-day concession has no payload: it reads the kept id, and is refused (and stays
    armed) when the store's id is not the ledger's."""
    path = tmp_path / "m.db"
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    clock = VirtualClock(START_MS)
    runtime, _, _ = marketplace(SQLiteStore(path), signer=signer, clock=clock)
    two_disputes(runtime)
    runtime.close()
    Stores("sqlite", tmp_path, None).rows(
        "m", f"UPDATE instance_data SET data = '{FORGED}' WHERE instance = '{CASE}'"
    )
    runtime, _, _ = marketplace(SQLiteStore(path), signer=signer, clock=clock)
    with runtime:
        clock.advance(7 * DAY_MS)
        with pytest.raises(StoreIntegrityError, match="is not what ledger entry"):
            runtime.fire_due()
        concession = [t for t in runtime.store.armed_timers("Compliance", CASE)]
        assert [t.due_ms for t in concession] == [START_MS + 7 * DAY_MS]
        assert runtime.governor("Compliance").get(CASE).state == "Investigating"  # type: ignore[union-attr]
        emitted = runtime.store.outbox(kind="event", status=None)
        assert not [m for m in emitted if m.instance == CASE]


def test_snapshots_carry_the_kept_entry_and_replay_checks_the_data(stores: Stores) -> None:
    """A snapshot every 3 versions: the one after EvidenceSubmitted (version 3, which keeps
    nothing) names the kept entry of InvestigateDispute (version 2)."""
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime, _, _ = marketplace(stores.open("m"), signer=signer, snapshot_every=3)
    two_disputes(runtime)
    evidence = {"evidence_ref": "ev-1", "submitted_at": "2026-01-02T00:00:00+00:00"}
    runtime.governor("Compliance").dispatch(CASE, "EvidenceSubmitted", evidence)
    kept_seq = [e.seq for e in runtime.store.ledger_entries(instance=CASE) if e.kind == KEPT]
    snapshot = runtime.store.latest_snapshot("Compliance", CASE)
    assert snapshot is not None and snapshot.version == 3 and [snapshot.kept_seq] == kept_seq
    genuine = runtime.store.get_instance_data("Compliance", CASE)
    fast = runtime.replay("Compliance", CASE)
    assert fast.snapshot_version == 3 and fast.replayed == 0 and fast.data == genuine
    assert runtime.replay("Compliance", CASE, use_snapshot=False).data == genuine
    runtime.close()
    stores.rows("m", f"UPDATE instance_data SET data = '{FORGED}' WHERE instance = '{CASE}'")
    runtime, _, _ = marketplace(stores.open("m"), signer=signer, snapshot_every=3)
    with runtime:
        for use_snapshot in (True, False):
            with pytest.raises(StoreIntegrityError, match="is not what ledger entry"):
                runtime.replay("Compliance", CASE, use_snapshot=use_snapshot)
    stores.rows("m", f"UPDATE instance_data SET data = '{genuine}' WHERE instance = '{CASE}'")
    stores.rows("m", f"UPDATE snapshots SET kept_seq = {snapshot.ledger_seq}")
    runtime, _, _ = marketplace(stores.open("m"), signer=signer, snapshot_every=3)
    with runtime:
        with pytest.raises(StoreIntegrityError, match="as its kept entry, which it is not"):
            runtime.replay("Compliance", CASE)
        assert runtime.replay("Compliance", CASE, use_snapshot=False).data == genuine


def test_a_store_written_before_snapshots_named_kept_entries_gets_the_column(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    SQLiteStore(path).close()
    Stores("sqlite", tmp_path, None).rows("old", "ALTER TABLE snapshots DROP COLUMN kept_seq")
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime, _, _ = marketplace(SQLiteStore(path), signer=signer, snapshot_every=2)
    with runtime:
        two_disputes(runtime)
        snapshot = runtime.store.latest_snapshot("Compliance", CASE)
        assert snapshot is not None and snapshot.kept_seq == snapshot.ledger_seq + 1
        assert runtime.replay("Compliance", CASE).data is not None


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_the_decision_notice_carries_the_kept_customer_id(kind: str, tmp_path: Path) -> None:
    """`NotifyCustomer(customer_id = $data.customer_id) to customer_id`: the case's own id is
    not the customer's, and the notice carries the id the case kept, from a row and from the
    7-day concession timer alike."""
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "m.db")
    clock = VirtualClock(START_MS)
    runtime, _, _ = marketplace(store, clock=clock)
    with runtime:
        two_disputes(runtime)
        decide(runtime, CASE)
        clock.advance(7 * DAY_MS)
        runtime.fire_due()  # case-2 concedes
        notices = {
            (m.instance, m.target_machine, m.target_instance, json.loads(m.body)["customer_id"])
            for m in runtime.store.outbox(kind="event", status=None)
            if m.event == "NotifyCustomer"
        }
        assert notices == {
            (CASE, "CustomerAccount", CUSTOMER, CUSTOMER),
            ("case-2", "CustomerAccount", OTHER, OTHER),
        }
