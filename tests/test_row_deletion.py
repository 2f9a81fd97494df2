"""What row seals alone do not stop (red team session 3, a04 and the residuals listed in
docs/runtime.md, "What the runtime trusts"): rows DELETED, older genuine rows PUT BACK, a
store EMPTIED. Each attack is made as the red team made it: the real API on a real store
file (or PostgreSQL rows), plain SQL without the key between two runs, then the runtime run
again. Each test says what the runtime now does: refuses (R021, nothing written), or shows
why the attack is harmless."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from autonomic.runtime.errors import StoreIntegrityError
from autonomic.runtime.resilience.deadlines import DeadlineTracker
from conftest import Stores
from test_row_seals import CHARGE, HOUR, START, TABLES, World, _crashed_sagas, keys, refused

__all__ = ["keys"]  # the fixture, imported for pytest

DAY = 24 * HOUR
OTHER = {**CHARGE, "customer_id": "other", "invoice_id": "i-2", "idempotency_key": "i-2"}


@pytest.fixture
def world(tmp_path: Path, keys: Path) -> Any:
    made = World(str(tmp_path / "store.db"), keys)
    yield made
    made.close()


def _charged(world: World, **ids: str) -> None:
    """Billing 'cust' charged (submit_charge called), then paid: back in Current."""
    billing = world.gov("Billing")
    billing.create("cust")
    billing.dispatch("cust", "ChargeRequested", CHARGE, **ids)
    billing.dispatch(
        "cust",
        "PaymentSucceeded",
        {
            "customer_id": "cust",
            "transaction_id": "tx-1",
            "amount": "30.00",
            "idempotency_key": "i-1",
        },
    )
    assert world.payments.submitted.count("i-1") == 1


# -- a04: a dedup row deleted inside its retention ------------------------------------------


def test_a04_a_deleted_idempotency_row_does_not_charge_twice(world: World) -> None:
    _charged(world, idempotency_key="i-1")
    world.close()
    world.sql("DELETE FROM idempotency_keys WHERE key = 'i-1'")
    world.open()
    billing = world.gov("Billing")
    failure = refused(
        world, lambda: billing.dispatch("cust", "ChargeRequested", CHARGE, idempotency_key="i-1")
    )
    assert "idempotency_keys row ('Billing', 'i-1') is missing" in str(failure)
    assert failure.code == "R021"
    assert world.payments.submitted.count("i-1") == 1


def test_a04_a_deleted_processed_event_row_does_not_run_the_event_again(world: World) -> None:
    _charged(world, event_id="charge-1")
    world.close()
    world.sql("DELETE FROM processed_events WHERE event_id = 'charge-1'")
    world.open()
    billing = world.gov("Billing")
    failure = refused(
        world, lambda: billing.dispatch("cust", "ChargeRequested", CHARGE, event_id="charge-1")
    )
    assert "processed_events row ('Billing', 'charge-1') is missing" in str(failure)
    assert world.payments.submitted.count("i-1") == 1


def test_a04_a_retry_after_the_retention_purge_runs_again(world: World) -> None:
    """The honest case: rows purged with their retention are not missed; nor after a key
    rotation, which carries the purge horizon over to the new key."""
    _charged(world, idempotency_key="i-1")
    assert world.runtime is not None
    world.clock.advance(8 * DAY)
    assert world.runtime.purge_expired() == (0, 1)
    again = world.gov("Billing").dispatch("cust", "ChargeRequested", CHARGE, idempotency_key="i-1")
    assert not again.duplicate and world.payments.submitted.count("i-1") == 2


def test_a04_a_forged_purge_horizon_only_makes_the_check_stricter(world: World) -> None:
    _charged(world, idempotency_key="i-1")
    assert world.runtime is not None
    world.clock.advance(8 * DAY)
    world.runtime.purge_expired()
    world.close()
    world.sql(  # a purge horizon in the future, with a seal made up without the key
        "UPDATE runtime_meta SET value = '99999999999999:00' WHERE key = 'dedup_purged_before'"
    )
    world.open()
    billing = world.gov("Billing")
    refused(
        world, lambda: billing.dispatch("cust", "ChargeRequested", CHARGE, idempotency_key="i-1")
    )
    assert world.payments.submitted.count("i-1") == 1


def test_a04_is_refused_on_postgresql_too(postgres_stores: Stores, keys: Path) -> None:
    made = World(postgres_stores.location(), keys, lambda sql: postgres_stores.rows("s", sql))
    try:
        _charged(made, idempotency_key="i-1")
        made.gov("Billing").create("other")
        made.gov("Billing").dispatch("other", "ChargeRequested", OTHER, event_id="charge-2")
        made.close()
        made.sql("DELETE FROM idempotency_keys WHERE key = 'i-1'")
        made.sql("DELETE FROM processed_events WHERE event_id = 'charge-2'")
        made.open()
        billing = made.gov("Billing")
        refused(
            made, lambda: billing.dispatch("cust", "ChargeRequested", CHARGE, idempotency_key="i-1")
        )
        refused(
            made,
            lambda: billing.dispatch("other", "ChargeRequested", OTHER, event_id="charge-2"),
        )
        # The committed-state reads a dispatch makes before its outside calls check too.
        assert made.runtime is not None
        with pytest.raises(StoreIntegrityError):
            made.runtime._store.idempotency("Billing", "i-1")
        with pytest.raises(StoreIntegrityError):
            made.runtime._store.processed("Billing", "charge-2")
        assert made.payments.submitted.count("i-1") == 1
        made.runtime.purge_expired(made.clock.now_ms() + 8 * DAY)
        assert made.runtime._store.idempotency("Billing", "i-1") is None
    finally:
        made.close()


# -- an emptied store --------------------------------------------------------------------------


def test_a_store_emptied_of_its_rows_and_mark_is_not_sealed_as_new(world: World) -> None:
    world.gov("Billing").create("cust")
    world.gov("Billing").dispatch("cust", "ChargeRequested", CHARGE, idempotency_key="i-1")
    world.close()
    for table in TABLES:  # every operational row, not the ledger (emptied too, it is new)
        if table != "ledger":
            world.sql(f"DELETE FROM {table}")
    world.sql("DELETE FROM runtime_meta WHERE key IN ('row_seals', 'dedup_purged_before')")
    with pytest.raises(StoreIntegrityError, match="its ledger records moves, yet the store"):
        world.open()
    assert world.sql("SELECT count(*) FROM runtime_meta WHERE key = 'row_seals'") == [(0,)]
    # The operator's call, as for a store written before seals: adopted, it opens.
    world.open(adopt=True)
    assert world.gov("Billing").get("cust") is None


# -- timers: one that fired, put back --------------------------------------------------------


def _row(world: World, table: str, where: str) -> tuple[Any, ...]:
    (row,) = world.sql(f"SELECT * FROM {table} WHERE {where}")
    return row


def _put_back(world: World, table: str, where: str, row: tuple[Any, ...]) -> None:
    """Replace the rows `where` selects by `row` (an older genuine row, seal and all)."""
    world.sql(f"DELETE FROM {table} WHERE {where}")
    marks = ", ".join("?" * len(row))
    with sqlite3.connect(world.location) as db:
        db.execute(f"INSERT INTO {table} VALUES ({marks})", row)


def _literal(value: Any) -> str:
    """A PostgreSQL literal of a column value read back (text, integer, bytes or NULL)."""
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"'\\x{value.hex()}'::bytea"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(int(value))


def _notified(world: World) -> int:
    return len(world.sql("SELECT 1 FROM outbox WHERE kind = 'notification'"))


def test_a_fired_timer_put_back_does_not_fire_again(world: World) -> None:
    """Entitlement's 24h step notifies the manager and stays in PendingApproval (the 48h and
    72h steps armed with it, at the same version): the fired row put back is older than the
    instance yet of the same stay, so the armed-version anchor lets it through; the ledger
    records its firing."""
    world.gov("Entitlement").create("ent-1")
    where = "instance = 'ent-1' AND timer_id = 'PendingApproval/ApprovalLadder/1'"
    fired = _row(world, "timers", where)
    assert world.runtime is not None
    world.clock.advance(25 * HOUR)
    assert len(world.runtime.fire_due()) == 1
    assert _notified(world) == 1
    world.close()
    _put_back(world, "timers", "id = -1", fired)
    world.open()
    assert world.runtime is not None
    failure = refused(world, world.runtime.fire_due)
    assert "already fired" in str(failure)
    assert _notified(world) == 1
    assert world.gov("Entitlement").get("ent-1").state == "PendingApproval"


# -- breakers and deadlines: an older row put back -------------------------------------------


def _charge(world: World, customer: str) -> None:
    world.gov("Billing").create(customer)
    charge = {
        **CHARGE,
        "customer_id": customer,
        "invoice_id": customer,
        "idempotency_key": customer,
    }
    world.gov("Billing").dispatch(customer, "ChargeRequested", charge, idempotency_key=customer)


def test_an_open_breaker_row_put_back_after_it_closed_is_refused(world: World) -> None:
    world.payments.down = True
    for index in range(12):
        _charge(world, f"shop{index}")
    where = "machine = 'Billing' AND name = 'PaymentProcessor'"
    opened = _row(world, "breakers", where)
    assert opened[2] == "open"
    world.payments.down = False
    world.clock.advance(31_000)
    _charge(world, "shop12")
    assert _row(world, "breakers", where)[2] == "closed"
    backup = world.payments.backup_charges
    world.close()
    _put_back(world, "breakers", where, opened)
    with pytest.raises(StoreIntegrityError, match=r"ledger entry [0-9]+ moved it to 'closed'"):
        world.open()
    world.sql(f"DELETE FROM breakers WHERE {where}")  # deleted: it would read as closed
    world.open()  # ... which is what the ledger says: nothing to refuse
    _charge(world, "shop13")
    assert world.payments.backup_charges == backup


def test_a_deleted_open_breaker_row_is_refused(world: World) -> None:
    world.payments.down = True
    for index in range(12):
        _charge(world, f"shop{index}")
    world.close()
    world.sql("DELETE FROM breakers WHERE name = 'PaymentProcessor'")
    with pytest.raises(StoreIntegrityError, match="is missing, yet ledger entry"):
        world.open()


def test_a_deadline_row_put_back_a_level_does_not_escalate_twice(world: World) -> None:
    assert world.runtime is not None
    tracker = DeadlineTracker(world.runtime)
    tracker.track("sla-1", name="sla", governor="QuotaSla", due_ms=START + HOUR, action="page")
    world.clock.advance(2 * HOUR)
    assert [e.level for e in tracker.check()] == [1]
    first = _row(world, "deadlines", "id = 'sla-1'")
    world.clock.advance(25 * HOUR)
    assert [e.level for e in tracker.check()] == [2]
    world.close()
    _put_back(world, "deadlines", "id = 'sla-1'", first)
    world.open()
    assert world.runtime is not None
    runtime = world.runtime
    failure = refused(world, lambda: DeadlineTracker(runtime).check())
    assert "at level 1, yet its newest escalation" in str(failure)
    escalations = world.sql("SELECT to_state FROM ledger WHERE kind = 'escalation'")
    assert escalations == [("level1",), ("level2",)]


def test_rows_put_back_are_refused_on_postgresql_too(postgres_stores: Stores, keys: Path) -> None:
    """The same anchors through PostgresStore's own reads (a fleet worker claims due timers)."""
    made = World(postgres_stores.location(), keys, lambda sql: postgres_stores.rows("s", sql))

    kept: dict[str, tuple[Any, ...]] = {}

    def keep(table: str, where: str) -> None:  # an older genuine row, kept aside
        (kept[table],) = made.sql(f"SELECT * FROM {table} WHERE {where}")

    def put_back(table: str, where: str) -> None:
        made.sql(f"DELETE FROM {table} WHERE {where}")
        made.sql(f"INSERT INTO {table} VALUES ({', '.join(map(_literal, kept[table]))})")

    try:
        assert made.runtime is not None
        made.gov("Entitlement").create("ent-1")
        ladder = "instance = 'ent-1' AND timer_id = 'PendingApproval/ApprovalLadder/1'"
        keep("timers", ladder)
        tracker = DeadlineTracker(made.runtime)
        tracker.track("sla-1", name="sla", governor="QuotaSla", due_ms=START + HOUR, action="page")
        made.clock.advance(2 * HOUR)
        tracker.check()
        keep("deadlines", "id = 'sla-1'")
        made.clock.advance(25 * HOUR)
        assert [e.level for e in tracker.check()] == [2]
        assert len(made.runtime.fire_due()) == 1  # the 24h step
        made.payments.down = True
        for index in range(12):
            _charge(made, f"shop{index}")
        breaker = "machine = 'Billing' AND name = 'PaymentProcessor'"
        keep("breakers", breaker)
        made.payments.down = False
        made.clock.advance(31_000)
        _charge(made, "shop12")
        made.close()
        put_back("timers", ladder)
        put_back("deadlines", "id = 'sla-1'")
        made.open()
        assert made.runtime is not None
        runtime = made.runtime
        assert "already fired" in str(refused(made, runtime.fire_due))
        assert "at level 1" in str(refused(made, lambda: DeadlineTracker(runtime).check()))
        made.close()
        put_back("breakers", breaker)
        with pytest.raises(StoreIntegrityError, match="moved it to 'closed'"):
            made.open()
    finally:
        made.close()


# -- outbox: a delivered message put back at pending ------------------------------------------


def test_a_delivered_message_put_back_at_pending_is_deduplicated_by_its_receiver(
    world: World,
) -> None:
    """Harmless: the receiver answers a message's event id from its processed_events row (the
    outbox delivers at least once by design: a crash between a delivery and its mark does the
    same). With that row deleted too, the dedup anchor refuses the delivery."""
    world.gov("CustomerAccount").create("alice")
    profile = {"customer_id": "alice", "email": "a@example.com", "country": "DE"}
    profile |= {"product_id": "p1", "tier": "starter"}
    world.gov("CustomerAccount").dispatch("alice", "CreateProfile", profile)
    world.gov("Entitlement").create("alice")
    assert world.runtime is not None
    world.runtime.deliver_outbox()
    world.gov("Entitlement").dispatch("alice", "Approve", {"approver": "vendor-admin"})
    pending = world.sql("SELECT * FROM outbox WHERE status = 'pending' AND kind = 'event'")
    assert pending
    delivered = world.runtime.deliver_outbox()
    assert [d.status for d in delivered] == ["delivered"] * len(pending)
    before = world.sql("SELECT machine, instance, state, version FROM instances ORDER BY 1, 2")
    entries = world.sql("SELECT count(*) FROM ledger")
    world.close()
    for row in pending:
        _put_back(world, "outbox", f"id = {row[0]}", row)
    world.open()
    assert world.runtime is not None
    again = world.runtime.deliver_outbox()
    assert [(d.status, d.result.duplicate) for d in again if d.result] == [
        ("delivered", True)
    ] * len(pending)
    assert world.sql("SELECT machine, instance, state, version FROM instances ORDER BY 1, 2") == (
        before
    )
    assert world.sql("SELECT count(*) FROM ledger") == entries
    world.close()
    for row in pending:
        _put_back(world, "outbox", f"id = {row[0]}", row)
    world.sql(f"DELETE FROM processed_events WHERE event_id = '{pending[0][8]}'")
    world.open()
    assert world.runtime is not None
    failure = refused(world, world.runtime.deliver_outbox)
    assert "processed_events row" in str(failure) and "is missing" in str(failure)


# -- flows: an older run row put back -----------------------------------------------------------


def test_an_older_flow_row_put_back_reruns_its_steps_without_a_second_effect(
    world: World,
) -> None:
    """Not refused (a run's writes do not each leave a ledger entry to hold its row to):
    shown harmless. The run goes on from the older row and dispatches its steps again under
    the same derived event ids: every receiver answers from its processed_events row, so no
    governor moves again and no outside call repeats; the run ends as before, its flow
    entries written a second time (the audit shows the re-run)."""
    _crashed_sagas(world, ("alice",))
    (older,) = world.sql("SELECT * FROM flows WHERE instance = 'alice'")
    world.open()
    (first,) = world.runner.resume_all()
    moves = world.sql("SELECT count(*) FROM ledger WHERE kind <> 'flow'")
    rows = world.sql("SELECT machine, instance, state, version FROM instances ORDER BY 1, 2")
    calls = list(world.payments.submitted), world.payments.retries
    (flow_entries,) = world.sql("SELECT count(*) FROM ledger WHERE kind = 'flow'")
    world.close()
    _put_back(world, "flows", f"flow_id = '{older[0]}'", older)
    world.open()
    (again,) = world.runner.resume_all()
    assert (again.status, again.flow_id) == (first.status, first.flow_id)
    assert world.sql("SELECT count(*) FROM ledger WHERE kind <> 'flow'") == moves
    assert world.sql("SELECT machine, instance, state, version FROM instances ORDER BY 1, 2") == (
        rows
    )
    assert (list(world.payments.submitted), world.payments.retries) == calls
    (rerun,) = world.sql("SELECT count(*) FROM ledger WHERE kind = 'flow'")
    assert rerun[0] > flow_entries[0]  # it did run again
