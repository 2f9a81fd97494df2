"""Row seals: the red team's store tampering (session 3, a01-a12) on real store files and
PostgreSQL rows is refused with StoreIntegrityError before anything is written, and an honest
store keeps working across restarts, an upgrade from an unsealed file, and key rotation.

Each attack writes the store the way someone with the file (or the database) but without the
private key would: plain SQL between two runs of the runtime. "Writes nothing" is checked on
every table's rows (outside_claims aside: a claim is the store's own short write)."""

from __future__ import annotations

import hmac
import importlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from autonomic.generated import FLOWS, MODULES
from autonomic.runtime.demo import _Bindings, _Payments, refund_due
from autonomic.runtime.errors import IdempotencyConflict, StoreIntegrityError
from autonomic.runtime.flows import FlowRunner, StepFailed
from autonomic.runtime.keys import generate_keypair, load_signer
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.resilience.deadlines import DeadlineTracker
from autonomic.runtime.resilience.proration import prorate_upgrade
from autonomic.runtime.results import derive_event_id
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.locate import open_store
from autonomic.runtime.store.row_seals import SEALED_TABLES, RowSeals, _message, seal_row
from autonomic.runtime.store.sqlite_schema import RUNTIME_SCHEMA_SQL, UPGRADES
from autonomic.runtime.timers import VirtualClock
from conftest import Stores

START = 1_767_225_600_000
HOUR = 3_600_000
# Every table the runtime writes but outside_claims (the claim's own short write),
# timer_retries and outbox_retries (when a failed firing or an unanswered delivery is tried
# again: a hint, like a lease).
TABLES = (
    "instances",
    "timers",
    "outbox",
    "processed_events",
    "idempotency_keys",
    "flows",
    "deadlines",
    "breakers",
    "ledger",
    "snapshots",
    "instance_data",
)
CHARGE = {"customer_id": "cust", "invoice_id": "i-1", "amount": "30.00", "idempotency_key": "i-1"}


class World:
    """The marketplace (seven generated governors with the demo's bindings, the five flows)
    on one store, signed in sign-each mode, on a virtual clock; reopened like a new process."""

    def __init__(self, location: str, keys: Path, rows: Any = None) -> None:
        self.location = location
        self.keys = keys
        self.clock = VirtualClock(START)
        self.payments = _Payments()
        self.bindings = _Bindings(self.payments)
        self._rows = rows
        self.runtime: Runtime | None = None
        self.open()

    def open(
        self, before_step: Any = None, signer_keys: Path | None = None, adopt: bool = False
    ) -> Runtime:
        store = open_store(self.location)
        try:
            signer = load_signer(signer_keys or self.keys)
            runtime = Runtime(
                store,
                clock=self.clock,
                sealer=LedgerSealer(signer, "sign-each"),
                # The ledger's root is the first key, also after a rotation to another.
                trusted_root=load_signer(self.keys).public_info(),
                adopt_unsealed_rows=adopt,
            )
        except BaseException:
            store.close()
            raise
        self.runtime = runtime
        for module in MODULES:
            spec = importlib.import_module(f"autonomic.generated.{module}").MACHINE
            runtime.load(spec, *self.bindings.of(spec))
        flows = [importlib.import_module(f"autonomic.generated.{m}").FLOW for m in FLOWS]
        self.runner = FlowRunner(
            runtime,
            flows,
            functions={"refund_due": refund_due, "prorate_upgrade": prorate_upgrade},
            before_step=before_step,
        )
        return runtime

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None

    def gov(self, name: str) -> Any:
        assert self.runtime is not None
        return self.runtime.governor(name)

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        """Tamper, or look, with plain SQL and no key."""
        if self._rows is not None:
            return list(self._rows(statement))
        with sqlite3.connect(self.location) as db:
            return db.execute(statement).fetchall()

    def dump(self) -> dict[str, list[str]]:
        """Every row of every table (of a sealed one, its sealed columns: a PostgreSQL
        worker's lease on a timer or message is its own write, made before it reads)."""
        return {t: sorted(map(repr, self.sql(f"SELECT {_columns(t)} FROM {t}"))) for t in TABLES}


def _columns(table: str) -> str:
    sealed = SEALED_TABLES.get(table)
    return "*" if sealed is None else ", ".join((*sealed, "seal"))


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    generate_keypair(folder, valid_from_ms=START - HOUR)
    return folder


@pytest.fixture
def world(tmp_path: Path, keys: Path) -> Any:
    made = World(str(tmp_path / "store.db"), keys)
    yield made
    made.close()


def refused(world: World, call: Any) -> StoreIntegrityError:
    """Run `call` on the reopened world: it must raise StoreIntegrityError and write nothing."""
    before = world.dump()
    with pytest.raises(StoreIntegrityError) as caught:
        call()
    after = world.dump()
    assert after == before
    return caught.value


# -- a01: timers ------------------------------------------------------------------------------


def test_a01_a_timer_row_rewritten_to_be_due_now_is_refused(world: World) -> None:
    world.gov("Entitlement").create("ent-1")
    world.gov("Billing").create("cust")
    world.gov("Billing").dispatch("cust", "ChargeRequested", CHARGE, idempotency_key="i-1")
    world.close()
    world.sql(f"UPDATE timers SET due_ms = {START} WHERE instance = 'ent-1'")
    world.sql("UPDATE timers SET due_ms = 0 WHERE machine = 'Billing'")
    world.open()
    world.clock.advance(60_000)
    assert world.runtime is not None
    failure = refused(world, world.runtime.fire_due)
    assert "timers row" in str(failure) and "row seal" in str(failure)
    assert world.payments.retries == 0
    assert world.gov("Entitlement").get("ent-1").state == "PendingApproval"


def test_a01_a_timer_armed_after_the_instance_row_put_back_does_not_fire(world: World) -> None:
    """The anchor: a genuine older instance row (sealed) put back under a timer armed by a
    later move: the timer names a version the instance has not reached."""
    world.gov("Billing").create("cust")
    older = world.sql("SELECT * FROM instances WHERE machine = 'Billing' AND instance = 'cust'")
    world.gov("Billing").dispatch("cust", "ChargeRequested", CHARGE, idempotency_key="i-1")
    world.close()
    world.sql("DELETE FROM instances WHERE machine = 'Billing' AND instance = 'cust'")
    marks = ", ".join("?" * len(older[0]))
    with sqlite3.connect(world.location) as db:
        db.execute(f"INSERT INTO instances VALUES ({marks})", older[0])
    world.open()
    world.clock.advance(30 * 24 * HOUR)
    assert world.runtime is not None
    failure = refused(world, world.runtime.fire_due)
    assert "names version" in str(failure)
    assert world.payments.retries == 0


# -- a02: outbox ------------------------------------------------------------------------------


def _emit_pending(world: World) -> None:
    world.gov("Billing").create("alice")
    world.gov("Billing").create("bob")
    world.gov("Billing").dispatch(
        "alice", "ChargeRequested", {**CHARGE, "customer_id": "alice"}, idempotency_key="a"
    )
    world.gov("Billing").dispatch(
        "alice",
        "PaymentFailed",
        {"customer_id": "alice", "invoice_id": "i-1", "reason": "card", "idempotency_key": "a"},
    )


def test_a02_an_outbox_row_sent_to_another_instance_is_refused(world: World) -> None:
    account, entitlement = world.gov("CustomerAccount"), world.gov("Entitlement")
    for c in ("alice", "bob"):
        account.create(c)
        account.dispatch(
            c,
            "CreateProfile",
            {
                "customer_id": c,
                "email": f"{c}@example.com",
                "country": "DE",
                "product_id": "p1",
                "tier": "starter",
            },
        )
    entitlement.create("alice")
    assert world.runtime is not None
    world.runtime.deliver_outbox()
    entitlement.dispatch("alice", "Approve", {"approver": "vendor-admin"})
    assert world.sql("SELECT count(*) FROM outbox WHERE status = 'pending'")[0][0] > 0
    world.close()
    world.sql(
        "UPDATE outbox SET target_instance = 'bob' WHERE status = 'pending' AND instance = 'alice'"
    )
    world.open()
    bob = world.gov("CustomerAccount").get("bob").version
    assert world.runtime is not None
    refused(world, world.runtime.deliver_outbox)
    assert world.gov("CustomerAccount").get("bob").version == bob


def test_a02_an_inserted_outbox_row_is_refused(world: World) -> None:
    world.gov("Billing").create("carol")
    world.gov("Entitlement").create("carol")
    world.close()
    world.sql(
        "INSERT INTO outbox (kind, machine, instance, version, target_machine, target_instance, "
        "event, event_id, body, created_ms, status) VALUES ('event', 'Billing', 'carol', 1, "
        "'Entitlement', 'carol', 'Suspend', 'forged-1', '{}', 0, 'pending')"
    )
    world.open()
    assert world.runtime is not None
    failure = refused(world, world.runtime.deliver_outbox)
    assert "missing row seal" in str(failure)


# -- a03: processed_events --------------------------------------------------------------------


def _forged_result(machine: str, event: str, event_id: str, a: str, b: str) -> str:
    return json.dumps(
        {
            "machine": machine,
            "instance": "cust",
            "event": event,
            "from_state": a,
            "to_state": b,
            "version": 99,
            "seq": 0,
            "event_id": event_id,
            "emitted": [],
            "notifications": [],
            "action_results": {},
            "armed": [],
        }
    )


def test_a03_planted_dedup_rows_do_not_skip_a_sagas_compensations(world: World) -> None:
    def fail_archive(ctx: Any) -> None:
        if ctx.step == "archive_subscription" and ctx.phase == "do":
            raise StepFailed("archive service down")

    for machine in ("Entitlement", "Billing", "Subscription"):
        world.gov(machine).create("cust")
    world.gov("Entitlement").dispatch("cust", "Approve", {"approver": "vendor-admin"})
    inputs = {"customer_id": "cust", "request_id": "r-1", "reason": "too expensive"}
    flow_id = world.runner.flow_id("SubscriptionCancellation", "cust", inputs)
    world.close()
    for machine, step, event, a, b in (
        (
            "Entitlement",
            "suspend_entitlements",
            "RestoreEntitlements",
            "CancellationHold",
            "Active",
        ),
        ("Billing", "issue_refund", "ReverseRefund", "CancellationRefunding", "Current"),
    ):
        event_id = derive_event_id("flow", flow_id, step, "undo")
        text = _forged_result(machine, event, event_id, a, b).replace("'", "''")
        world.sql(
            "INSERT INTO processed_events (machine, event_id, instance, result, created_ms) "
            f"VALUES ('{machine}', '{event_id}', 'cust', '{text}', {START})"
        )
    world.open(before_step=fail_archive)
    # The saga runs its steps until it meets a planted row: refused there, the unit of work
    # that read it writes nothing, and no compensation is answered from it.
    with pytest.raises(StoreIntegrityError):
        world.runner.start("SubscriptionCancellation", "cust", inputs)
    assert world.sql("SELECT status FROM flows") != [("compensated",)]
    # Resumed, the run records its own progress, but the compensation that met the planted
    # row is refused again: neither receiver moves, nothing is signed for it.
    before = world.dump()
    with pytest.raises(StoreIntegrityError):
        world.runner.resume_all()
    after = world.dump()
    assert {t: r for t, r in after.items() if t != "flows"} == {
        t: r for t, r in before.items() if t != "flows"
    }
    assert world.sql("SELECT status FROM flows") != [("compensated",)]


def test_a03_a_planted_result_is_not_returned_by_a_dispatch(world: World) -> None:
    world.gov("Entitlement").create("cust")
    world.close()
    text = _forged_result("Entitlement", "Revoke", "webhook-42", "Active", "Revoked")
    world.sql(
        "INSERT INTO processed_events (machine, event_id, instance, result, created_ms) "
        f"VALUES ('Entitlement', 'webhook-42', 'cust', '{text}', {START})"
    )
    world.open()
    refused(
        world,
        lambda: world.gov("Entitlement").dispatch(
            "cust", "Revoke", {"reason": "fraud"}, event_id="webhook-42"
        ),
    )


def test_a03_an_event_id_of_another_instance_is_not_answered_with_its_result(
    world: World,
) -> None:
    """The anchor: a genuine stored result names its instance; another instance's request
    with the same event id is a conflict, not a duplicate answered with alice's result."""
    world.gov("Entitlement").create("alice")
    world.gov("Entitlement").create("bob")
    approve = {"approver": "vendor-admin"}
    world.gov("Entitlement").dispatch("alice", "Approve", approve, event_id="e-1")
    with pytest.raises(IdempotencyConflict):
        world.gov("Entitlement").dispatch("bob", "Approve", approve, event_id="e-1")
    assert world.gov("Entitlement").get("bob").state == "PendingApproval"


# -- a05: flows -------------------------------------------------------------------------------


class Crash(Exception):
    pass


def _crashed_sagas(world: World, customers: tuple[str, ...]) -> None:
    def crash_at_suspend(ctx: Any) -> None:
        if ctx.step == "suspend_entitlements" and ctx.phase == "do":
            raise Crash("process killed")

    world.close()
    world.open(before_step=crash_at_suspend)
    for c in (*customers, "bob"):
        for machine in ("Entitlement", "Billing", "Subscription"):
            world.gov(machine).create(c)
        world.gov("Entitlement").dispatch(c, "Approve", {"approver": "vendor-admin"})
    for c in customers:
        with pytest.raises(Crash):
            world.runner.start(
                "SubscriptionCancellation",
                c,
                {"customer_id": c, "request_id": f"r-{c}", "reason": "moving"},
            )
    world.close()


def test_a05_a_flow_row_moved_to_another_customer_is_refused(world: World) -> None:
    _crashed_sagas(world, ("alice",))
    world.sql("UPDATE flows SET instance = 'bob' WHERE instance = 'alice'")
    world.open()
    refused(world, world.runner.resume_all)
    assert world.gov("Entitlement").get("bob").state == "Active"


def test_a05_a_step_marked_succeeded_in_flow_data_is_refused(world: World) -> None:
    _crashed_sagas(world, ("carol",))
    flow_id, text = world.sql("SELECT flow_id, data FROM flows WHERE instance = 'carol'")[0]
    data = json.loads(text)
    data["steps"]["suspend_entitlements"] = {"status": "succeeded", "result": {"state": "x"}}
    data["order"].append("suspend_entitlements")
    forged = json.dumps(data).replace("'", "''")
    world.sql(f"UPDATE flows SET data = '{forged}' WHERE flow_id = '{flow_id}'")
    world.open()
    refused(world, world.runner.resume_all)


# -- a06: outside_claims ----------------------------------------------------------------------


def test_a06_a_claim_lease_longer_than_the_runtimes_does_not_hold_a_charge(world: World) -> None:
    world.gov("Billing").create("cust")
    world.close()
    world.sql(
        f"INSERT INTO outside_claims VALUES ('Billing', 'key', 'inv-9', 'attacker:1:dead', {2**62})"
    )
    world.open()
    done: list[object] = []

    def charge() -> None:
        try:
            done.append(
                world.gov("Billing").dispatch(
                    "cust",
                    "ChargeRequested",
                    {**CHARGE, "invoice_id": "i-9", "idempotency_key": "inv-9"},
                    idempotency_key="inv-9",
                )
            )
        except Exception as exc:  # reported by the assertion below
            done.append(exc)

    worker = threading.Thread(target=charge, daemon=True)
    worker.start()
    worker.join(20)
    assert done, "the charge still waits on a claim lease no runtime granted"
    assert not isinstance(done[0], Exception), done[0]
    assert world.payments.submitted == ["inv-9"]


# -- a07: rows that do not decode -------------------------------------------------------------


def test_a07_rows_that_do_not_decode_are_refused_with_a_diagnostic(world: World) -> None:
    def crash(ctx: Any) -> None:
        if ctx.step == "suspend_entitlements":
            raise Crash()

    world.close()
    world.open(before_step=crash)
    for c in ("f1", "f2"):
        for m in ("Entitlement", "Billing", "Subscription"):
            world.gov(m).create(c)
        with pytest.raises(Crash):
            world.runner.start(
                "SubscriptionCancellation", c, {"customer_id": c, "request_id": c, "reason": "x"}
            )
    world.gov("Entitlement").create("v1")
    assert world.runtime is not None
    DeadlineTracker(world.runtime).track(
        "d1", name="sla", governor="QuotaSla", due_ms=START, action="page"
    )
    world.close()
    world.sql("UPDATE flows SET data = '{not json' WHERE instance = 'f1'")
    world.sql("UPDATE flows SET data = '{}' WHERE instance = 'f2'")
    for event_id, text in (("e-notjson", "<<"), ("e-empty", "{}")):
        world.sql(
            "INSERT INTO processed_events (machine, event_id, instance, result, created_ms) "
            f"VALUES ('Entitlement', '{event_id}', 'v1', '{text}', 0)"
        )
    world.sql(
        "UPDATE instances SET version = 'x' WHERE machine = 'Entitlement' AND instance = 'v1'"
    )
    world.sql("UPDATE deadlines SET level = 'x'")
    world.open()
    assert world.runtime is not None
    runtime = world.runtime
    ent = world.gov("Entitlement")
    flows = [row[0] for row in world.sql("SELECT flow_id FROM flows ORDER BY instance")]
    for call in (
        lambda: world.runner.resume(flows[0]),
        lambda: world.runner.resume(flows[1]),
        lambda: ent.dispatch("v1", "Revoke", {}, event_id="e-notjson"),
        lambda: ent.dispatch("v1", "Revoke", {}, event_id="e-empty"),
        lambda: ent.dispatch("v1", "Revoke", {}),
        lambda: DeadlineTracker(runtime).check(),
    ):
        refused(world, call)
    world.close()
    world.sql(
        "INSERT INTO breakers (machine, name, state, failures, opened_ms, updated_ms) "
        "VALUES ('Billing', 'PaymentProcessor', 'bogus', 0, 0, 0)"
    )
    with pytest.raises(StoreIntegrityError):
        world.open()


def test_a07_flow_data_that_is_not_a_runs_is_refused_without_a_key_too(tmp_path: Path) -> None:
    """Without a key nothing is sealed, yet a flow row whose data does not decode, or is not
    a run's, is a diagnostic (R021), not a JSONDecodeError or KeyError."""
    path = tmp_path / "plain.db"

    def open_plain() -> tuple[Runtime, FlowRunner]:
        runtime = Runtime(open_store(path), clock=VirtualClock(START))
        bindings = _Bindings(_Payments())
        for module in MODULES:
            spec = importlib.import_module(f"autonomic.generated.{module}").MACHINE
            runtime.load(spec, *bindings.of(spec))
        flows = [importlib.import_module(f"autonomic.generated.{m}").FLOW for m in FLOWS]
        runner = FlowRunner(
            runtime,
            flows,
            functions={"refund_due": refund_due, "prorate_upgrade": prorate_upgrade},
            before_step=crash,
        )
        return runtime, runner

    def crash(ctx: Any) -> None:
        if ctx.step == "suspend_entitlements":
            raise Crash()

    runtime, runner = open_plain()
    for c in ("f1", "f2"):
        for m in ("Entitlement", "Billing", "Subscription"):
            runtime.governor(m).create(c)
        with pytest.raises(Crash):
            runner.start(
                "SubscriptionCancellation", c, {"customer_id": c, "request_id": c, "reason": "x"}
            )
    runtime.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE flows SET data = '{not json' WHERE instance = 'f1'")
        db.execute("UPDATE flows SET data = '{}' WHERE instance = 'f2'")
        ids = [row[0] for row in db.execute("SELECT flow_id FROM flows ORDER BY instance")]
    runtime, runner = open_plain()
    for flow_id in ids:
        with pytest.raises(StoreIntegrityError, match="not a flow run's"):
            runner.resume(flow_id)
    runtime.close()


def test_a07_a_text_version_is_refused_without_a_key_too(tmp_path: Path) -> None:
    """The typed decoding is the store's, sealed or not: a runtime without a ledger gets a
    diagnostic for a row of the wrong type, not a TypeError."""
    from autonomic.generated.entitlement import MACHINE

    path = tmp_path / "plain.db"
    runtime = Runtime(open_store(path), clock=VirtualClock(START))
    runtime.load(MACHINE, *_Bindings(_Payments()).of(MACHINE))
    runtime.governor("Entitlement").create("v1")
    runtime.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE instances SET version = 'x'")
    runtime = Runtime(open_store(path), clock=VirtualClock(START))
    runtime.load(MACHINE, *_Bindings(_Payments()).of(MACHINE))
    with pytest.raises(StoreIntegrityError, match="holds str 'x' in its version column"):
        runtime.governor("Entitlement").dispatch("v1", "Revoke", {})
    runtime.close()


# -- a08, a10: the instance row ---------------------------------------------------------------


def test_a08_a_rolled_back_version_is_refused(world: World) -> None:
    world.gov("Billing").create("cust")
    world.gov("Billing").dispatch("cust", "ChargeRequested", CHARGE, idempotency_key="i-1")
    world.close()
    world.sql("UPDATE instances SET version = version - 1 WHERE machine = 'Billing'")
    world.open()
    refused(
        world,
        lambda: world.gov("Billing").dispatch(
            "cust",
            "PaymentSucceeded",
            {
                "customer_id": "cust",
                "transaction_id": "t",
                "amount": "30.00",
                "idempotency_key": "i-1",
            },
        ),
    )


def test_a10_a_forged_state_is_refused(world: World) -> None:
    world.gov("Entitlement").create("cust")
    world.close()
    world.sql("UPDATE instances SET state = 'Active' WHERE machine = 'Entitlement'")
    world.open()
    failure = refused(
        world, lambda: world.gov("Entitlement").dispatch("cust", "Revoke", {"reason": "x"})
    )
    assert "machine='Entitlement', instance='cust'" in str(failure)
    assert failure.code == "R021"


# -- a09: deadlines ---------------------------------------------------------------------------


def test_a09_rewritten_and_invented_deadlines_are_refused(world: World) -> None:
    assert world.runtime is not None
    DeadlineTracker(world.runtime).track(
        "sla-7", name="sla", governor="QuotaSla", due_ms=START + 24 * HOUR, action="page-oncall"
    )
    world.close()
    world.sql("UPDATE deadlines SET due_ms = 0, level = 4, action = 'refund' WHERE id = 'sla-7'")
    world.open()
    world.clock.advance(60_000)
    runtime = world.runtime
    refused(world, lambda: DeadlineTracker(runtime).check())
    world.close()
    world.sql("DELETE FROM deadlines")
    world.sql(
        "INSERT INTO deadlines (id, name, governor, due_ms, level, action) "
        "VALUES ('sla-99', 'sla', 'Billing', 0, 0, 'write-off-balance')"
    )
    world.open()
    runtime = world.runtime
    refused(world, lambda: DeadlineTracker(runtime).check())


# -- a12: breakers ----------------------------------------------------------------------------


def test_a12_a_breaker_row_forged_open_is_refused(world: World) -> None:
    world.gov("Billing").create("cust")
    world.close()
    world.sql(
        "INSERT INTO breakers (machine, name, state, failures, opened_ms, updated_ms) "
        f"VALUES ('Billing', 'PaymentProcessor', 'open', 11, {START}, {START})"
    )
    with pytest.raises(StoreIntegrityError, match="breakers row"):
        world.open()
    assert world.payments.backup_charges == 0


# -- an honest store --------------------------------------------------------------------------


def _day_of_business(world: World, customer: str) -> None:
    world.gov("Billing").create(customer)
    world.gov("Entitlement").create(customer)
    world.gov("Subscription").create(customer)
    world.gov("Billing").dispatch(
        customer, "ChargeRequested", {**CHARGE, "customer_id": customer}, idempotency_key=customer
    )
    world.gov("Subscription").dispatch(
        customer,
        "CreateTrialSubscription",
        {"customer_id": customer, "product_id": "p1", "tier": "starter"},
    )
    assert world.runtime is not None
    world.runtime.deliver_outbox()
    DeadlineTracker(world.runtime).track(
        f"sla-{customer}", name="sla", governor="QuotaSla", due_ms=START + HOUR, action="page"
    )


def _carry_on(world: World, customer: str) -> None:
    """Everything that reads the sealed rows: timers, outbox, deadlines, dedup, flows."""
    assert world.runtime is not None
    world.clock.advance(10 * 24 * HOUR)
    world.runtime.fire_due()
    world.runtime.deliver_outbox()
    DeadlineTracker(world.runtime).check()
    again = world.gov("Billing").dispatch(
        customer, "ChargeRequested", {**CHARGE, "customer_id": customer}, idempotency_key=customer
    )
    assert again.duplicate
    result = world.runner.start(
        "SubscriptionCancellation",
        customer,
        {"customer_id": customer, "request_id": f"r-{customer}", "reason": "moving"},
    )
    assert result.status in ("completed", "compensated", "failed")


def test_an_honest_store_works_after_a_restart(world: World) -> None:
    _day_of_business(world, "alice")
    world.close()
    world.open()
    _carry_on(world, "alice")
    world.close()
    assert world.sql("SELECT count(*) FROM timers WHERE seal IS NULL")[0][0] == 0
    assert world.sql("SELECT count(*) FROM outbox WHERE seal IS NULL")[0][0] == 0


def _unseal(path: str) -> None:
    """Rewrite a store file into the form the runtime wrote before rows were sealed: the
    sealed tables with their old declarations (and indexes), no seal column, no mark."""
    indexes = [s for s in RUNTIME_SCHEMA_SQL.split(";") if "CREATE INDEX" in s]
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("BEGIN")
        for old, upgrade in UPGRADES:
            if "seal" not in upgrade:
                continue
            table = upgrade.split()[2]
            columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
            kept = ", ".join(c for c in columns if c != "seal")
            db.execute(f"ALTER TABLE {table} RENAME TO sealed_{table}")
            db.execute(old)
            db.execute(f"INSERT INTO {table} ({kept}) SELECT {kept} FROM sealed_{table}")
            db.execute(f"DROP TABLE sealed_{table}")
            for statement in indexes:
                if f" ON {table} " in statement:
                    db.execute(statement)
        db.execute("DELETE FROM runtime_meta WHERE key = 'row_seals'")
        db.execute("COMMIT")


def test_a_store_written_before_row_seals_is_upgraded_and_sealed(world: World) -> None:
    _day_of_business(world, "alice")
    world.close()
    _unseal(world.location)
    with sqlite3.connect(world.location) as db:
        assert "seal" not in {row[1] for row in db.execute("PRAGMA table_info(instances)")}
    # Its rows are sealed as found only when the operator says so (see the next test).
    with pytest.raises(StoreIntegrityError, match="carry no row seals"):
        world.open()
    world.open(adopt=True)
    _carry_on(world, "alice")
    world.close()
    for table in ("instances", "timers", "outbox", "processed_events", "flows", "deadlines"):
        assert world.sql(f"SELECT count(*) FROM {table} WHERE seal IS NULL")[0][0] == 0
    # Sealed and marked: a seal nulled now is refused, it does not downgrade the store.
    world.sql("UPDATE instances SET seal = NULL WHERE machine = 'Entitlement'")
    world.open()
    with pytest.raises(StoreIntegrityError, match="missing row seal"):
        world.gov("Entitlement").dispatch("alice", "Revoke", {"reason": "x"})


def test_rows_stripped_of_their_seals_are_not_sealed_as_found(world: World) -> None:
    """Someone without the key rewrites a sealed store into the form written before rows were
    sealed (no seal column, no mark) and forges a row: the runtime refuses the store rather
    than seal the forgery, and changes no row."""
    _day_of_business(world, "alice")
    world.close()
    _unseal(world.location)
    world.sql("UPDATE instances SET state = 'Active' WHERE machine = 'Entitlement'")
    state = "SELECT machine, instance, state, version FROM instances ORDER BY 1, 2"
    before = world.sql(state)
    with pytest.raises(StoreIntegrityError, match="instances rows carry no row seals"):
        world.open()
    # The open gave the tables their seal column back (empty): no row was sealed or changed.
    assert world.sql(state) == before
    for table in ("instances", "timers", "outbox", "processed_events", "flows"):
        assert world.sql(f"SELECT count(*) FROM {table} WHERE seal IS NOT NULL") == [(0,)]


def test_key_rotation_reseals_the_rows_under_the_new_key(world: World, tmp_path: Path) -> None:
    _day_of_business(world, "alice")
    generate_keypair(tmp_path / "next", valid_from_ms=START - HOUR)
    assert world.runtime is not None
    before = world.sql("SELECT seal FROM instances ORDER BY machine, instance")
    world.runtime.rotate_key(load_signer(tmp_path / "next"))
    after = world.sql("SELECT seal FROM instances ORDER BY machine, instance")
    assert all(a != b for a, b in zip(before, after, strict=True))
    world.gov("Billing").dispatch(
        "alice",
        "PaymentSucceeded",
        {
            "customer_id": "alice",
            "transaction_id": "t",
            "amount": "30.00",
            "idempotency_key": "alice",
        },
    )
    world.close()
    world.open(signer_keys=tmp_path / "next")
    _carry_on(world, "alice")
    world.close()
    world.sql("UPDATE instances SET state = 'Active' WHERE machine = 'Entitlement'")
    world.open(signer_keys=tmp_path / "next")
    with pytest.raises(StoreIntegrityError):
        world.gov("Entitlement").dispatch("alice", "Revoke", {"reason": "x"})


# -- PostgreSQL: the same refusals on real rows ------------------------------------------------


def test_tampered_rows_are_refused_on_postgresql_too(postgres_stores: Stores, keys: Path) -> None:
    made = World(postgres_stores.location(), keys, lambda sql: postgres_stores.rows("s", sql))
    try:
        _day_of_business(made, "alice")
        made.gov("Entitlement").create("ent-1")
        made.close()
        made.open()
        assert made.gov("Entitlement").get("ent-1").state == "PendingApproval"
        made.close()
        made.sql("UPDATE instances SET state = 'Active' WHERE instance = 'ent-1'")
        made.sql(f"UPDATE timers SET due_ms = {START} WHERE instance = 'alice'")
        made.sql(
            "INSERT INTO deadlines (id, name, governor, due_ms, level, action) "
            "VALUES ('sla-99', 'sla', 'Billing', 0, 0, 'write-off-balance')"
        )
        made.open()
        refused(made, lambda: made.gov("Entitlement").dispatch("ent-1", "Revoke", {"reason": "x"}))
        assert made.runtime is not None
        runtime = made.runtime
        made.clock.advance(60_000)
        refused(made, runtime.fire_due)
        refused(made, lambda: DeadlineTracker(runtime).check())
    finally:
        made.close()


def test_outbox_and_flow_rows_tampered_on_postgresql_are_refused(
    postgres_stores: Stores, keys: Path
) -> None:
    """A fleet worker's paths: claim_outbox leases, then decodes and checks; a flow run's row
    is checked when a worker resumes it."""
    made = World(postgres_stores.location(), keys, lambda sql: postgres_stores.rows("s", sql))
    try:
        _crashed_sagas(made, ("alice",))
        made.open()
        assert made.runtime is not None
        made.runtime.deliver_outbox()  # the honest ones: only the one tampered with is left
        made.gov("Entitlement").create("carol")
        made.gov("Entitlement").dispatch("carol", "Approve", {"approver": "vendor-admin"})
        made.close()
        made.sql("UPDATE flows SET instance = 'bob' WHERE instance = 'alice'")
        made.sql(
            "UPDATE outbox SET target_instance = 'bob' WHERE status = 'pending' "
            "AND instance = 'carol'"
        )
        made.open()
        assert made.runtime is not None
        refused(made, made.runner.resume_all)
        refused(made, made.runtime.deliver_outbox)
    finally:
        made.close()


@pytest.mark.parametrize("key", [b"", bytes(range(32)), b"k" * 64, b"long" * 40])
def test_a_row_seal_is_hmac_sha256_over_the_row_under_the_key(key: bytes) -> None:
    """RowSeals keeps the key's padded blocks hashed once; its seals and checks must be the
    plain HMAC-SHA256 of the row's message, whatever the key's length."""
    seals = RowSeals("store")
    seals.key = key
    for table, row in (
        ("instances", ("Billing", "c1", "Current", 4)),
        ("flows", ("flw_1", "Saga", "c1", "running", 2, "é" * 300, 17, None)),
    ):
        expected = hmac.digest(key, _message(table, row), "sha256")
        assert seals.seal(table, row) == expected == seal_row(key, table, row)
        seals.check(table, row, expected)
        with pytest.raises(StoreIntegrityError):
            seals.check(table, row, bytes(32))
    seals.key = None
    assert seals.seal("instances", ("Billing", "c1", "Current", 4)) is None
