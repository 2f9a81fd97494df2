"""The seed's five flows end to end: all seven generated governors on SQLite under a virtual
clock, a failure injected at every step of every saga and parallel flow, compensation in
reverse order, the ledger's flow entries, final states, and nothing charged twice."""

from __future__ import annotations

import asyncio
import importlib
import sqlite3
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from autonomic.runtime.demo import _Payments
from autonomic.runtime.dispatch import Governor
from autonomic.runtime.flows import FlowResult, FlowRunner, NoReply, StepContext, StepFailed
from autonomic.runtime.keys import Keyring, Signer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.memory import MemoryStore
from autonomic.runtime.store.sqlite import SQLiteStore
from conftest import Stores
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flow_world import marketplace


class Injector:
    """Fails one step (or one compensation) of one flow run, on purpose."""

    def __init__(self) -> None:
        self.target: tuple[str, str, str, str] | None = None  # instance, flow, step, phase
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, ctx: StepContext) -> None:
        self.seen.append((ctx.instance, ctx.step, ctx.phase))
        if self.target == (ctx.instance, ctx.flow, ctx.step, ctx.phase):
            raise StepFailed(f"injected failure at {ctx.step}")


@pytest.fixture
def world(stores: Stores) -> Iterator[tuple[Runtime, FlowRunner, Any, Injector]]:
    """The marketplace on SQLite, and on PostgreSQL with four ledger partitions (a flow's
    entries and its governors' entries then land in different chains)."""
    injector = Injector()
    store = stores.open("m", partitions=4)
    runtime, runner, bindings = marketplace(store, before_step=injector)
    with runtime:
        yield runtime, runner, bindings, injector


def flow_entries(runtime: Runtime, result: FlowResult) -> list[tuple[str, str, str]]:
    return [
        (e.event, e.from_state, e.to_state)
        for e in runtime.store.ledger_entries(machine=result.flow, instance=result.flow_id)
    ]


def state(runtime: Runtime, machine: str, instance: str) -> str | None:
    record = runtime.governor(machine).get(instance)
    return None if record is None else record.state


def undone(runtime: Runtime, result: FlowResult) -> list[str]:
    return [step for event, step, _ in flow_entries(runtime, result) if event == "StepCompensated"]


SIGNUP_STEPS = ("profile", "trial", "quota", "identity")


def signup(customer: str) -> dict[str, str]:
    return {
        "customer_id": customer,
        "email": f"ops@{customer}.example",
        "country": "DE",
        "product_id": "analytics",
        "tier": "professional",
    }


def test_signup_runs_every_branch(world: tuple[Runtime, FlowRunner, Any, Injector]) -> None:
    runtime, runner, _, _ = world
    result = runner.start("CustomerSignup", "c0", signup("c0"))
    assert result.status == "completed"
    assert dict(result.steps) == dict.fromkeys(SIGNUP_STEPS, "succeeded")
    assert state(runtime, "CustomerAccount", "c0") == "PendingVerification"
    assert state(runtime, "Subscription", "c0") == "Trial"
    assert state(runtime, "QuotaSla", "c0") == "Allocated"
    assert state(runtime, "Compliance", "c0") == "Verifying"
    events = [event for event, _, _ in flow_entries(runtime, result)]
    assert events == ["FlowStarted", *["StepStarted"] * 4, *["StepSucceeded"] * 4, "FlowCompleted"]
    # Starting the same run again returns it, and changes nothing.
    again = runner.start("CustomerSignup", "c0", signup("c0"))
    assert again == result
    assert len(flow_entries(runtime, again)) == len(events)


@pytest.mark.parametrize("failing", SIGNUP_STEPS)
def test_signup_failure_compensates_the_finished_branches(
    world: tuple[Runtime, FlowRunner, Any, Injector], failing: str
) -> None:
    runtime, runner, _, injector = world
    customer = f"s-{failing}"
    injector.target = (customer, "CustomerSignup", failing, "do")
    result = runner.start("CustomerSignup", customer, signup(customer))
    assert result.status == "compensated"
    assert result.failed_step == failing and "injected" in (result.reason or "")
    others = [s for s in SIGNUP_STEPS if s != failing]
    assert undone(runtime, result) == list(reversed(others))
    assert result.steps[failing] == "failed"
    finals = {
        "profile": ("CustomerAccount", "Closed"),
        "trial": ("Subscription", "Cancelled"),
        "quota": ("QuotaSla", "Released"),
        "identity": ("Compliance", "Rejected"),
    }
    for step in others:
        machine, final = finals[step]
        assert state(runtime, machine, customer) == final, step
    entries = flow_entries(runtime, result)
    assert entries[-1] == ("CompensationCompleted", failing, "compensated")


UPGRADE_STEPS = (
    "approval",
    "calculate_proration",
    "create_order",
    "charge_proration",
    "paid",
    "grant_tier",
    "allocate_quota",
)
# 20 of 30 days left: 30.00 * 20/30 for the new tier less 10.00 * 20/30 for the old one.
PRORATION = "13.33"


def upgrade_inputs(customer: str) -> dict[str, Any]:
    return {
        "customer_id": customer,
        "current_tier": "starter",
        "new_tier": "professional",
        "current_price": "10.00",
        "new_price": "30.00",
        "cycle_day": 10,
        "cycle_length": 30,
        "request_id": f"up-{customer}",
    }


def capture_proration(runtime: Runtime, customer: str, amount: str = PRORATION) -> None:
    """The processor captures the upgrade's charge (its webhook), and Billing tells
    Subscription."""
    paid = {"transaction_id": f"tp-{customer}", "amount": amount, "new_tier": "professional"}
    runtime.governor("Billing").dispatch(
        customer,
        "ProrationPaid",
        {"customer_id": customer, "idempotency_key": f"up-{customer}", **paid},
    )
    runtime.deliver_outbox()


def active_customer(runtime: Runtime, runner: FlowRunner, customer: str) -> None:
    """A signed-up customer whose first period is paid (Subscription Active, Billing
    Current) and whose entitlement is approved."""
    assert runner.start("CustomerSignup", customer, signup(customer)).status == "completed"
    runtime.governor("Billing").create(customer)
    runtime.governor("Entitlement").create(customer)
    runtime.governor("Entitlement").dispatch(customer, "Approve", {"approver": "vendor-admin"})
    convert = {"customer_id": customer, "payment_method_id": "pm", "invoice_id": f"inv-{customer}"}
    runtime.governor("Subscription").dispatch(customer, "ConvertTrial", {**convert, "amount": "30"})
    runtime.deliver_outbox()
    paid = {
        "customer_id": customer,
        "transaction_id": "t1",
        "amount": "30",
        "idempotency_key": f"inv-{customer}",
    }
    runtime.governor("Billing").dispatch(customer, "PaymentSucceeded", paid)
    runtime.deliver_outbox()
    assert state(runtime, "Subscription", customer) == "Active"
    assert state(runtime, "Billing", customer) == "Current"


@pytest.mark.parametrize("failing", [None, *UPGRADE_STEPS])
def test_upgrade_compensates_in_reverse_and_charges_once(
    world: tuple[Runtime, FlowRunner, Any, Injector], failing: str | None
) -> None:
    runtime, runner, bindings, injector = world
    customer = f"u-{failing}"
    active_customer(runtime, runner, customer)
    if failing is not None:
        injector.target = (customer, "SubscriptionUpgrade", failing, "do")
    result = runner.start("SubscriptionUpgrade", customer, upgrade_inputs(customer))
    charges = [k for k in bindings.payments.submitted if k == f"up-{customer}"]
    charged = failing is None or UPGRADE_STEPS.index(failing) > UPGRADE_STEPS.index("paid")
    if result.status == "waiting":  # for the capture: nothing is granted before it
        assert result.steps["charge_proration"] == "succeeded"
        assert state(runtime, "Billing", customer) == "ProrationPending"
        assert bindings.calls["Entitlement.enable_tier_features"] == 0
        if failing != "paid":
            capture_proration(runtime, customer)
        result = runner.resume(result.flow_id)
    if failing is None:
        assert result.status == "completed"
        assert result.values == {"calculate_proration": PRORATION}
        assert charges == [f"up-{customer}"]
        assert state(runtime, "Billing", customer) == "Current"
        runtime.deliver_outbox()  # QuotaSla's TierChangeCompleted
        assert state(runtime, "Subscription", customer) == "Active"
        assert bindings.calls["Entitlement.enable_tier_features"] == 1
        return
    # The waits and the pure step have nothing to undo.
    sends = ("create_order", "charge_proration", "grant_tier", "allocate_quota")
    done = [s for s in UPGRADE_STEPS[: UPGRADE_STEPS.index(failing)] if s in sends]
    # Nothing done before the failed step: the run failed.
    ended = "compensated" if done else "failed"
    assert result.status == ended
    assert undone(runtime, result) == list(reversed(done))
    assert len(charges) == (1 if "charge_proration" in done else 0)
    assert state(runtime, "Subscription", customer) == "Active"
    if "charge_proration" in done:
        assert state(runtime, "Billing", customer) == ("Refunding" if charged else "Current")
    # Money is paid back only if it was taken: a charge still in flight is voided instead.
    assert bindings.calls["Billing.submit_refund"] == (1 if charged else 0)
    assert bindings.calls["Billing.void_proration"] == (1 if failing == "paid" else 0)
    granted = "grant_tier" in done
    assert bindings.calls["Entitlement.restore_previous_tier"] == (1 if granted else 0)
    last = flow_entries(runtime, result)[-1]
    end = "CompensationCompleted" if done else "FlowFailed"
    assert last == (end, failing, ended)
    # The reason is in the entry's payload digest and in the stored run.
    assert runner.result(result.flow_id).reason == f"injected failure at {failing}"


@pytest.mark.parametrize("answer", ["declined", "silent", "wrong amount"])
def test_an_upgrade_is_granted_only_once_its_charge_is_captured(
    world: tuple[Runtime, FlowRunner, Any, Injector], answer: str
) -> None:
    """A proration charge the processor declines, never answers (Billing voids it after 1h)
    or captures for another amount is not a paid upgrade: the flow's wait for the capture
    fails, nothing was granted, and nothing is refunded by the compensation (no money was
    kept)."""
    runtime, runner, bindings, _ = world
    customer = f"unpaid-{answer.replace(' ', '-')}"
    active_customer(runtime, runner, customer)
    before = dict(bindings.calls)
    result = runner.start("SubscriptionUpgrade", customer, upgrade_inputs(customer))
    assert result.status == "waiting"
    if answer == "declined":
        runtime.governor("Billing").dispatch(
            customer,
            "PaymentFailed",
            {"customer_id": customer, "idempotency_key": f"up-{customer}", "reason": "declined"},
        )
    elif answer == "wrong amount":
        capture_proration(runtime, customer, amount="99.00")
    runtime.clock.advance(61 * 60_000)  # type: ignore[attr-defined]
    runtime.fire_due()
    runtime.deliver_outbox()
    assert state(runtime, "Billing", customer) == "Current"
    assert state(runtime, "Subscription", customer) == "Active"  # Billing's TierChangeFailed
    assert runner.resume(result.flow_id).status == "waiting"  # until its 1h30m are up
    runtime.clock.advance(30 * 60_000)  # type: ignore[attr-defined]
    result = runner.resume(result.flow_id)
    assert (result.status, result.failed_step) == ("compensated", "paid")
    assert undone(runtime, result) == ["charge_proration", "create_order"]
    calls = {k: v - before.get(k, 0) for k, v in bindings.calls.items() if v != before.get(k, 0)}
    assert "Entitlement.enable_tier_features" not in calls
    assert "QuotaSla.reallocate_quota" not in calls
    assert "Billing.submit_refund" not in calls
    assert calls["Billing.record_nothing_to_refund"] == 1
    assert state(runtime, "Billing", customer) == "Current"
    assert state(runtime, "Entitlement", customer) == "Active"


CANCEL_STEPS = ("calculate_refund", "issue_refund", "suspend_entitlements", "archive_subscription")


@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_a_step_whose_look_found_nothing_to_call_looks_again_and_calls_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    """The refund step's look before the transaction found nothing to call (here it is told
    so: the receiver was elsewhere then) and its unit then takes the row that calls the
    refund processor: the unit calls nothing in the write transaction and stores nothing,
    and the step looks again under its claim, calls once, and commits with the run's write
    (on the memory store, in the batch of units of its own)."""
    db = tmp_path / "m.db"
    refunds: list[bool] = []  # whether the store's write lock was free at each call
    refund = _Payments.submit_refund

    def watched(payments: _Payments, ctx: Any) -> None:
        if store == "sqlite":
            probe = sqlite3.connect(db, timeout=0, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
                refunds.append(True)
            except sqlite3.OperationalError:  # locked: a transaction is open
                refunds.append(False)
            finally:
                probe.close()
        else:
            refunds.append(True)
        refund(payments, ctx)

    monkeypatch.setattr(_Payments, "submit_refund", watched)
    runtime, runner, _ = marketplace(SQLiteStore(db) if store == "sqlite" else MemoryStore())
    real = Governor._preflight
    unlooked = [True]

    def nothing_seen_once(governor: Governor, instance_id: str, event: str, *rest: Any) -> Any:
        if event == "IssueCancellationRefund" and unlooked[0]:
            unlooked[0] = False
            return None  # as a look that found the receiver where the event calls nothing
        return real(governor, instance_id, event, *rest)

    with runtime:
        active_customer(runtime, runner, "r")
        monkeypatch.setattr(Governor, "_preflight", nothing_seen_once)
        inputs = {"customer_id": "r", "request_id": "cx-r", "reason": "too pricey"}
        result = runner.start("SubscriptionCancellation", "r", inputs)
        assert result.status == "completed"
        assert not unlooked[0]
        assert refunds == [True]  # once, outside the write transaction
        assert state(runtime, "Billing", "r") == "CancellationRefunding"


@pytest.mark.parametrize("failing", [None, *CANCEL_STEPS])
def test_cancellation_saga_compensates_in_reverse(
    world: tuple[Runtime, FlowRunner, Any, Injector], failing: str | None
) -> None:
    runtime, runner, _, injector = world
    customer = f"x-{failing}"
    active_customer(runtime, runner, customer)
    if failing is not None:
        injector.target = (customer, "SubscriptionCancellation", failing, "do")
    inputs = {"customer_id": customer, "request_id": f"cx-{customer}", "reason": "too pricey"}
    result = runner.start("SubscriptionCancellation", customer, inputs)
    if failing is None:
        assert result.status == "completed"
        assert result.values == {"calculate_refund": "15.00"}
        assert state(runtime, "Subscription", customer) == "Cancelled"
        # A worker delivers the saga's outbox before the processor answers the refund.
        runtime.deliver_outbox()
        assert runtime.store.outbox(kind="event", status="failed") == []
        assert state(runtime, "Entitlement", customer) == "Revoked"
        assert state(runtime, "Billing", customer) == "ClosingRefunding"  # the refund owed
        _billing("RefundSucceeded", owner=False, refund_id="rf", amount="15.00")(runtime, customer)
        assert state(runtime, "Billing", customer) == "Closed"
        return
    done = CANCEL_STEPS[: CANCEL_STEPS.index(failing)]
    # The pure step has nothing to undo; the others are undone newest first.
    expected = [s for s in reversed(done) if s in ("issue_refund", "suspend_entitlements")]
    assert undone(runtime, result) == expected
    assert result.status == ("compensated" if expected else "failed")  # nothing undone
    assert state(runtime, "Subscription", customer) == "Active"
    assert state(runtime, "Entitlement", customer) == "Active"
    assert state(runtime, "Billing", customer) == "Current"


@pytest.mark.parametrize("before", ["Active", "Degraded", "Grace", "Suspended"])
def test_a_compensated_cancellation_puts_the_entitlement_back_as_it_was(
    tmp_path: Path, before: str
) -> None:
    """RestoreEntitlements undoes the suspension: a Degraded tenant comes back Degraded (not
    with full features), one in Grace to Grace; a suspended one was never switched on and
    stays Suspended."""
    injector = Injector()
    severe = {"Entitlement": {"contention_is_severe": lambda ctx: True}}
    store = SQLiteStore(tmp_path / "m.db")
    runtime, runner, bindings = marketplace(store, before_step=injector, guards=severe)
    with runtime:
        customer = f"was-{before}"
        active_customer(runtime, runner, customer)
        entitlement = runtime.governor("Entitlement")
        if before == "Degraded":
            contention = {"tenant_id": customer, "resource": "cpu", "severity": "high"}
            entitlement.dispatch(customer, "TenantContention", contention)
        elif before == "Grace":
            entitlement.dispatch(customer, "PaymentOverdue", {"customer_id": customer})
        elif before == "Suspended":
            entitlement.dispatch(customer, "Suspend", {"reason": "operator"})
        assert state(runtime, "Entitlement", customer) == before
        injector.target = (customer, "SubscriptionCancellation", "archive_subscription", "do")
        inputs = {"customer_id": customer, "request_id": f"cx-{customer}", "reason": "bye"}
        result = runner.start("SubscriptionCancellation", customer, inputs)
        assert result.status == "compensated"
        assert undone(runtime, result) == ["suspend_entitlements", "issue_refund"]
        assert state(runtime, "Entitlement", customer) == before
        assert bindings.calls["Entitlement.enable_access"] == (before in ("Active", "Grace"))
        assert bindings.calls["Entitlement.enable_reduced_access"] == (before == "Degraded")


@pytest.mark.parametrize("billing", ["Retry3", "MaxRetriesExceeded"])
@pytest.mark.parametrize("archived", [True, False])
def test_a_customer_whose_renewal_failed_cancels_with_nothing_refunded(
    world: tuple[Runtime, FlowRunner, Any, Injector], billing: str, archived: bool
) -> None:
    """An unpaid period has nothing to refund: Billing on its retry ladder (or past it) takes
    the saga's refund as nothing to pay, the ladder runs on, and CloseAccount writes the
    balance off. Compensated, nothing is reversed and the ladder is where it was."""
    runtime, runner, bindings, injector = world
    customer = f"unpaid-{billing}-{archived}"
    billing_in(runtime, runner, customer, billing)
    runtime.governor("Entitlement").dispatch(customer, "PaymentOverdue", {"customer_id": customer})
    runtime.deliver_outbox()  # the ladder's end, if it came: RenewalFailed, Suspend
    subscription = state(runtime, "Subscription", customer)
    entitlement = state(runtime, "Entitlement", customer)
    assert (subscription, entitlement) == (
        ("PastDue", "Grace") if billing == "Retry3" else ("Suspended", "Suspended")
    )
    if not archived:
        injector.target = (customer, "SubscriptionCancellation", "archive_subscription", "do")
    before = dict(bindings.calls)
    inputs = {"customer_id": customer, "request_id": f"cx-{customer}", "reason": "bye"}
    result = runner.start("SubscriptionCancellation", customer, inputs)
    runtime.deliver_outbox()
    assert runtime.store.outbox(kind="event", status="failed") == []
    calls = {k: v - before.get(k, 0) for k, v in bindings.calls.items() if v != before.get(k, 0)}
    assert "Billing.submit_refund" not in calls
    assert "Billing.void_refund" not in calls
    if archived:
        assert result.status == "completed"
        assert state(runtime, "Subscription", customer) == "Cancelled"
        assert state(runtime, "Billing", customer) == "Closed"
        assert calls["Billing.write_off_balance"] == 1
        assert state(runtime, "Entitlement", customer) == "Revoked"
    else:
        assert result.status == "compensated"
        assert undone(runtime, result) == ["suspend_entitlements", "issue_refund"]
        assert state(runtime, "Subscription", customer) == subscription
        assert state(runtime, "Billing", customer) == billing
        assert state(runtime, "Entitlement", customer) == entitlement


@pytest.mark.parametrize("outbox_late", [False, True])
def test_a_cancellation_refund_left_unanswered_is_retried_and_the_account_closes(
    world: tuple[Runtime, FlowRunner, Any, Injector], outbox_late: bool
) -> None:
    """The saga reports its refund issued: a processor silent for hours never voids it. The
    refund goes through the retry ladder; the subscription's end (delivered before the first
    hour is up, or after it) moves it to the closing ladder, and the refund paid closes the
    account."""
    runtime, runner, bindings, _ = world
    customer = f"silent-{outbox_late}"
    active_customer(runtime, runner, customer)
    inputs = {"customer_id": customer, "request_id": f"cx-{customer}", "reason": "bye"}
    assert runner.start("SubscriptionCancellation", customer, inputs).status == "completed"
    if not outbox_late:
        runtime.deliver_outbox()
    _hours(1)(runtime, customer)
    expected = "ClosingRefundRetry1" if not outbox_late else "RefundRetry1"
    assert state(runtime, "Billing", customer) == expected
    runtime.deliver_outbox()
    assert runtime.store.outbox(kind="event", status="failed") == []
    assert state(runtime, "Billing", customer) == "ClosingRefundRetry1"
    _hours(1)(runtime, customer)  # the ladder's first retry
    assert state(runtime, "Billing", customer) == "ClosingRefundRetry1Paying"
    assert bindings.calls["Billing.retry_refund"] == 1
    _billing("RefundSucceeded", owner=False, refund_id="rf", amount="15.00")(runtime, customer)
    assert state(runtime, "Billing", customer) == "Closed"
    assert bindings.calls["Billing.void_refund"] == 0
    assert bindings.calls["Billing.record_refund"] == 1


@pytest.mark.parametrize(("failing", "commits"), [(None, 3), ("archive_subscription", 4)])
def test_a_saga_step_is_one_commit_and_the_last_one_ends_the_run(
    tmp_path: Path, failing: str | None, commits: int
) -> None:
    """Each send is one commit (the run's write, the dispatch, its result), and the last
    send's, or the last compensation's, also holds the end of the run: no commit of its own.
    A step failing before its dispatch (here its hook) is written with the first
    compensation: two sends and two compensations, four commits."""
    injector = Injector()
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "m.db"), before_step=injector)
    with runtime:
        active_customer(runtime, runner, "c")
        injector.target = (
            None if failing is None else ("c", "SubscriptionCancellation", failing, "do")
        )
        before = runtime.commit_batches
        inputs = {"customer_id": "c", "request_id": "r", "reason": "bye"}
        result = runner.start("SubscriptionCancellation", "c", inputs)
        assert runtime.commit_batches - before == commits
        last = [(e.kind, e.event, e.to_state) for e in list(runtime.ledger())[-9:]]
        if failing is None:
            assert result.status == "completed"
            assert last[-4:] == [
                ("flow", "StepStarted", "running"),
                ("transition", "CancelRequested", "Cancelled"),
                ("flow", "StepSucceeded", "running"),
                ("flow", "FlowCompleted", "completed"),
            ]
        else:
            assert result.status == "compensated"
            assert last == [
                ("transition", "SuspendForCancellation", "CancellationHold"),
                ("flow", "StepSucceeded", "running"),  # suspend_entitlements
                ("flow", "StepStarted", "running"),  # archive_subscription
                ("flow", "StepFailed", "compensating"),  # in the first compensation's commit
                ("transition", "RestoreEntitlements", "Active"),
                ("flow", "StepCompensated", "compensating"),
                ("transition", "ReverseRefund", "Current"),
                ("flow", "StepCompensated", "compensating"),
                ("flow", "CompensationCompleted", "compensated"),
            ]
        assert runner.result(result.flow_id) == result  # as stored


def test_an_asyncio_saga_step_is_one_batch_and_the_last_one_ends_the_run(tmp_path: Path) -> None:
    """On asyncio too, a send that calls nothing outside is one commit with the run's write,
    and the last one's also holds its result and the end of the run. The refund calls the
    processor (its claim and call run before its unit), so the run's write goes ahead in a
    commit of its own: four commits, the ledger as the sync API writes it."""
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "m.db"))
    with runtime:
        active_customer(runtime, runner, "c")
        before = runtime.commit_batches
        inputs = {"customer_id": "c", "request_id": "r", "reason": "bye"}
        result = asyncio.run(runner.start_async("SubscriptionCancellation", "c", inputs))
        assert runtime.commit_batches - before == 4
        assert result.status == "completed"
        last = [(e.kind, e.event, e.to_state) for e in list(runtime.ledger())[-6:]]
        assert last == [
            ("transition", "SuspendForCancellation", "CancellationHold"),
            ("flow", "StepSucceeded", "running"),
            ("flow", "StepStarted", "running"),
            ("transition", "CancelRequested", "Cancelled"),
            ("flow", "StepSucceeded", "running"),
            ("flow", "FlowCompleted", "completed"),
        ]
        assert runner.result(result.flow_id) == result  # as stored


@pytest.mark.parametrize("api", ["sync", "asyncio"])
@pytest.mark.parametrize("case", ["completed", "rejected"])
def test_a_send_as_one_unit_records_what_separate_units_record(
    tmp_path: Path, api: str, case: str
) -> None:
    """On SQLite a send is one unit of work (the run's pending notes, the dispatch, its
    outcome and the run's record, written once); on the memory store the run's write, the
    dispatch and the last send's outcome are units of their own. Both store the same run and
    the same ledger entries in the same order, also when the receiver rejects a step (the
    entitlement revoked: its dispatch raises inside the unit, which is rolled back whole, and
    the notes and the failure are written without it) and the run is compensated."""

    def saga(store: SQLiteStore | MemoryStore) -> tuple[FlowResult, list[tuple[str, ...]], str]:
        runtime, runner, _ = marketplace(store)
        with runtime:
            active_customer(runtime, runner, "c")
            if case == "rejected":
                runtime.governor("Entitlement").dispatch("c", "Revoke", {"reason": "gone"})
            before = len(list(runtime.ledger()))
            inputs = {"customer_id": "c", "request_id": "r", "reason": "bye"}
            if api == "sync":
                result = runner.start("SubscriptionCancellation", "c", inputs)
            else:
                result = asyncio.run(runner.start_async("SubscriptionCancellation", "c", inputs))
            entries: list[tuple[str, ...]] = [
                (e.kind, e.machine, e.instance, e.event, e.from_state, e.to_state, e.actor)
                for e in list(runtime.ledger())[before:]
            ]
            stored = runtime.store.get_flow(result.flow_id)
            assert stored is not None and runner.result(result.flow_id) == result
            return result, entries, stored.data

    one_unit = saga(SQLiteStore(tmp_path / "m.db"))
    assert one_unit == saga(MemoryStore())
    result, entries, _ = one_unit
    assert result.status == ("completed" if case == "completed" else "compensated")
    flow = [
        (event, step, status) for kind, _, _, event, step, status, _ in entries if kind == "flow"
    ]
    if case == "rejected":
        assert flow[-5:] == [
            ("StepSucceeded", "issue_refund", "running"),
            ("StepStarted", "suspend_entitlements", "running"),
            ("StepFailed", "suspend_entitlements", "compensating"),
            ("StepCompensated", "issue_refund", "compensating"),
            ("CompensationCompleted", "suspend_entitlements", "compensated"),
        ]
        assert result.reason is not None and result.reason.startswith("R")


def test_a_rejected_compensation_ends_the_run_failed(
    world: tuple[Runtime, FlowRunner, Any, Injector],
) -> None:
    runtime, runner, _, injector = world
    customer = "x-comp"
    active_customer(runtime, runner, customer)
    injector.target = (customer, "SubscriptionCancellation", "suspend_entitlements", "undo")
    saga = runner.specs["SubscriptionCancellation"]
    assert saga.steps[-1].irreversible

    def fail_archive_and_restore(ctx: StepContext) -> None:
        if ctx.step == "archive_subscription" or (
            ctx.phase == "undo" and ctx.step != "issue_refund"
        ):
            raise StepFailed(f"{ctx.step} {ctx.phase} refused")

    runner.before_step = fail_archive_and_restore
    inputs = {"customer_id": customer, "request_id": "r", "reason": "bye"}
    result = runner.start("SubscriptionCancellation", customer, inputs)
    assert result.status == "failed"
    assert result.steps["suspend_entitlements"] == "uncompensated"
    assert result.uncompensated == ("suspend_entitlements",)
    assert result.steps["issue_refund"] == "compensated"
    assert flow_entries(runtime, result)[-1][0] == "FlowFailed"


PAID = {"transaction_id": "t9", "amount": "30", "idempotency_key": "k9"}
PAYMENT = {**PAID, "reason": "x"}


def charged_customer(runtime: Runtime, runner: FlowRunner, customer: str) -> None:
    """An active customer whose renewal charge is awaiting the processor."""
    active_customer(runtime, runner, customer)
    runtime.governor("Subscription").dispatch(
        customer,
        "RenewalDue",
        {
            "customer_id": customer,
            "period_end": "2026-02-01T00:00:00+00:00",
            "invoice_id": f"inv2-{customer}",
            "amount": "30",
        },
    )
    runtime.deliver_outbox()
    assert state(runtime, "Billing", customer) == "AwaitingPayment"


def test_payment_success_goes_to_billing_then_renewal(
    world: tuple[Runtime, FlowRunner, Any, Injector],
) -> None:
    runtime, runner, _, _ = world
    customer = "p-ok"
    charged_customer(runtime, runner, customer)
    inputs = {"outcome": "Success", "customer_id": customer, "case_id": "case", **PAYMENT}
    result = runner.start("PaymentProcessed", customer, inputs)
    assert result.status == "waiting"  # Subscription's renewal arrives through the outbox
    runtime.deliver_outbox()
    (resumed,) = runner.resume_all()
    assert resumed.status == "completed"
    assert state(runtime, "Billing", customer) == "Current"
    assert state(runtime, "Subscription", customer) == "Active"


def test_payment_failure_waits_durably_on_the_retry_ladder(stores: Stores) -> None:
    """The Failed branch waits in the store while Billing's ladder runs on timers: a new
    process (a new Runtime on the same store) picks the wait up and finishes the run."""
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())  # the ledger's root key
    runtime, runner, _ = marketplace(stores.open("m", partitions=4), signer=signer)
    customer = "p-fail"
    charged_customer(runtime, runner, customer)
    inputs = {"outcome": "Failed", "customer_id": customer, "case_id": "case", **PAYMENT}
    result = runner.start("PaymentProcessed", customer, inputs)
    assert result.status == "waiting"
    assert state(runtime, "Billing", customer) == "Retry1"
    assert state(runtime, "Entitlement", customer) == "Grace"
    clock = runtime.clock
    runtime.close()

    runtime, runner, bindings = marketplace(stores.open("m"), signer=signer, clock=clock)
    bindings.payments.invoices[customer] = Decimal("30")  # the processor's memory of the invoice
    clock.advance(2 * 3_600_000)
    runtime.fire_due()
    (still,) = runner.resume_all()
    assert still.status == "waiting"
    runtime.governor("Billing").dispatch(
        customer, "PaymentSucceeded", {"customer_id": customer, **PAID}
    )
    (done,) = runner.resume_all()
    assert done.status == "completed"
    assert state(runtime, "Entitlement", customer) == "Active"
    runtime.close()


def test_payment_failure_ends_when_the_ladder_gives_up(
    world: tuple[Runtime, FlowRunner, Any, Injector],
) -> None:
    """The Failed branch's wait ends as soon as Billing's ladder gives up (MaxRetriesExceeded,
    8d 4h after the decline here): the next resume fails the run there, not 9 days after the
    wait began (before: still waiting until then)."""
    runtime, runner, _, _ = world
    customer = "p-lost"
    charged_customer(runtime, runner, customer)
    inputs = {"outcome": "Failed", "customer_id": customer, "case_id": "case", **PAYMENT}
    assert runner.start("PaymentProcessed", customer, inputs).status == "waiting"
    failure = {"customer_id": customer, "idempotency_key": "k9", "reason": "declined"}
    for hours in (1, 3, 24, 168):
        runtime.clock.advance(hours * 3_600_000)
        runtime.fire_due()
        runtime.governor("Billing").dispatch(customer, "PaymentFailed", failure)
    runtime.deliver_outbox()
    assert state(runtime, "Billing", customer) == "MaxRetriesExceeded"
    assert state(runtime, "Entitlement", customer) == "Suspended"  # from Grace, by the ladder
    (result,) = runner.resume_all()  # the clock not moved on: the outcome is known now
    assert result.status == "failed"  # not "compensated": every step is irreversible
    assert result.failed_step == "settled"
    assert result.reason == "Billing reached MaxRetriesExceeded"


def test_payment_failure_with_no_answer_at_all_runs_the_whole_ladder(
    world: tuple[Runtime, FlowRunner, Any, Injector],
) -> None:
    """Issue 12: after the declined charge neither the processor nor the collection agency
    ever answers. Jumping from one due timer to the next in virtual time, Billing's ladder runs
    to its end by itself: MaxRetriesExceeded tells Subscription RenewalFailed and suspends
    Entitlement (before Subscription's own 10d grace period would); 72h later Entitlement's
    auto-refund reaches Billing, which has nothing to refund. No outbox delivery fails."""
    runtime, runner, _, _ = world
    customer = "p-silent"
    charged_customer(runtime, runner, customer)
    inputs = {"outcome": "Failed", "customer_id": customer, "case_id": "case", **PAYMENT}
    assert runner.start("PaymentProcessed", customer, inputs).status == "waiting"
    end = runtime.clock.now_ms() + 12 * 86_400_000  # past the auto-refund at 8d 19h + 72h
    path = [state(runtime, "Billing", customer)]
    results: list[FlowResult] = []
    while (due := runtime.next_deadline()) is not None and due <= end:
        runtime.clock.advance(max(0, due - runtime.clock.now_ms()))  # type: ignore[attr-defined]
        runtime.fire_due()
        runtime.deliver_outbox()
        results += runner.resume_all()
        if (now := state(runtime, "Billing", customer)) != path[-1]:
            path.append(now)
    assert path == [
        "Retry1",
        "Retry1Charging",
        "Retry2",
        "Retry2Charging",
        "Retry3",
        "Retry3Charging",
        "CollectionAgency",
        "CollectionAgencyPending",
        "MaxRetriesExceeded",  # the agency's 12h without an answer ended the ladder
    ]

    def moves(machine: str) -> list[tuple[str, str, str]]:
        entries = runtime.store.ledger_entries(machine=machine, instance=customer)
        return [(e.event, e.from_state, e.to_state) for e in entries]

    assert moves("Billing")[-1] == (
        "CollectionAgencyPending/PaymentRetry/4/timeout",
        "CollectionAgencyPending",
        "MaxRetriesExceeded",
    )
    assert ("RenewalFailed", "PastDue", "Suspended") in moves("Subscription")
    entitlement = moves("Entitlement")
    assert ("Suspend", "Grace", "Suspended") in entitlement
    assert entitlement[-1][2] == "Refunded"  # its auto-refund went to Billing, which ignored it
    assert runtime.store.outbox(kind="event", status="failed") == []
    assert runtime.store.outbox(kind="event", status="pending") == []
    assert [(r.status, r.failed_step) for r in results if r.status != "waiting"] == [
        ("failed", "settled")  # the charge was never collected; every step is irreversible
    ]
    # It failed when the ladder gave up (8d 19h), not when the 9 days ran out.
    [failed] = [r for r in results if r.status == "failed"]
    entries = runtime.store.ledger_entries(machine=failed.flow, instance=failed.flow_id)
    [ended] = [e for e in entries if e.event == "FlowFailed"]
    [gave_up] = [
        e
        for e in runtime.store.ledger_entries(machine="Billing", instance=customer)
        if e.to_state == "MaxRetriesExceeded"
    ]
    assert ended.ts_ms == gave_up.ts_ms


def _billing(event: str, *, owner: bool = True, **payload: str) -> Callable[[Runtime, str], None]:
    """Send Billing `event` (with the customer's id when `owner`)."""

    def send(runtime: Runtime, customer: str) -> None:
        data = {"customer_id": customer, **payload} if owner else payload
        runtime.governor("Billing").dispatch(customer, event, data)

    return send


def _hours(hours: int) -> Callable[[Runtime, str], None]:
    def wait(runtime: Runtime, customer: str) -> None:
        runtime.clock.advance(hours * 3_600_000)  # type: ignore[attr-defined]
        runtime.fire_due()

    return wait


_DECLINED = _billing("PaymentFailed", idempotency_key="k", reason="declined")
_REFUND_FAILED = _billing("RefundFailed", owner=False, reason="processor down")
_LADDER = (_DECLINED, _hours(1), _DECLINED, _hours(3), _DECLINED, _hours(24), _DECLINED)
_REFUND_LADDER = (_REFUND_FAILED, _hours(1), _REFUND_FAILED, _hours(6), _REFUND_FAILED)
_DISPUTE = _billing("PaymentDisputed", transaction_id="t0", amount="30", reason="chargeback")
_CLOSING = (
    _billing("IssueCancellationRefund", idempotency_key="c"),
    _billing("CloseAccount", reason="cancelled"),
)

# How each Billing state is reached with real events and timers: from a renewal charge awaiting
# the processor ("charged") or from a paid-up account ("current").
BILLING_PATHS: dict[str, tuple[str, tuple[Callable[[Runtime, str], None], ...]]] = {
    "Current": ("current", ()),
    "AwaitingPayment": ("charged", ()),
    "CancellationAwaitingPayment": ("charged", _CLOSING[:1]),
    "ClosingAwaitingPayment": ("charged", _CLOSING),
    "Retry1": ("charged", _LADDER[:1]),
    "Retry1Charging": ("charged", _LADDER[:2]),
    "Retry2": ("charged", _LADDER[:3]),
    "Retry2Charging": ("charged", _LADDER[:4]),
    "Retry3": ("charged", _LADDER[:5]),
    "Retry3Charging": ("charged", _LADDER[:6]),
    "CollectionAgency": ("charged", _LADDER),
    "CollectionAgencyPending": ("charged", (*_LADDER, _hours(7 * 24))),
    "MaxRetriesExceeded": ("charged", (*_LADDER, _hours(7 * 24), _DECLINED)),
    "Reconciling": (
        "charged",
        (_billing("PaymentSucceeded", transaction_id="t", amount="31", idempotency_key="k"),),
    ),
    "ProrationPending": (
        "current",
        (
            _billing(
                "ProcessProrationCharge", amount="10", idempotency_key="up", new_tier="enterprise"
            ),
        ),
    ),
    "CancellationRefunding": (
        "current",
        (_billing("IssueCancellationRefund", idempotency_key="c"),),
    ),
    "Refunding": ("current", (_billing("RefundRequested", reason="suspended 72h"),)),
    "RefundRetry1": ("current", (_billing("RefundRequested", reason="r"), *_REFUND_LADDER[:1])),
    "RefundRetry1Paying": (
        "current",
        (_billing("RefundRequested", reason="r"), *_REFUND_LADDER[:2]),
    ),
    "RefundRetry2": ("current", (_billing("RefundRequested", reason="r"), *_REFUND_LADDER[:3])),
    "RefundRetry2Paying": (
        "current",
        (_billing("RefundRequested", reason="r"), *_REFUND_LADDER[:4]),
    ),
    "RefundManualReview": ("current", (_billing("RefundRequested", reason="r"), *_REFUND_LADDER)),
    "ClosingRefunding": ("current", _CLOSING),
    "ClosingRefundRetry1": ("current", (*_CLOSING, *_REFUND_LADDER[:1])),
    "ClosingRefundRetry1Paying": ("current", (*_CLOSING, *_REFUND_LADDER[:2])),
    "ClosingRefundRetry2": ("current", (*_CLOSING, *_REFUND_LADDER[:3])),
    "ClosingRefundRetry2Paying": ("current", (*_CLOSING, *_REFUND_LADDER[:4])),
    "ClosingRefundManualReview": ("current", (*_CLOSING, *_REFUND_LADDER)),
    "Disputed": ("current", (_DISPUTE,)),
    "DisputedUnpaid": ("charged", (_DISPUTE,)),
    "DisputedInArrears": ("charged", (*_LADDER, _hours(7 * 24), _DECLINED, _DISPUTE)),
    "RefundDisputed": (
        "current",
        (_billing("RefundRequested", reason="r"), _DISPUTE),
    ),
    "ClosingDisputed": ("current", (_DISPUTE, _CLOSING[1])),
    "ClosingRefundDisputed": ("current", (*_CLOSING, _DISPUTE)),
}
# A refund still owed is held while the dispute is open; an unpaid charge waits for the
# decision, then the retry ladder collects it (docs/language.md, "Why disputes everywhere");
# an account closing stays closing (its Closing* dispute states).
REFUND_SIDE = {state for state in BILLING_PATHS if "Refund" in state}
UNPAID_SIDE = {"AwaitingPayment", "CancellationAwaitingPayment", "DisputedUnpaid"} | {
    state for state in BILLING_PATHS if state.startswith(("Retry", "CollectionAgency"))
}
ARREARS_SIDE = {"MaxRetriesExceeded", "DisputedInArrears"}


def disputed_in(target: str) -> str:
    """The dispute state a chargeback moves Billing to from `target`."""
    if target.startswith("Closing"):
        return "ClosingRefundDisputed" if "Refund" in target else "ClosingDisputed"
    if target in REFUND_SIDE:
        return "RefundDisputed"
    if target in UNPAID_SIDE:
        return "DisputedUnpaid"
    return "DisputedInArrears" if target in ARREARS_SIDE else "Disputed"


def billing_in(runtime: Runtime, runner: FlowRunner, customer: str, target: str) -> None:
    start, path = BILLING_PATHS[target]
    (active_customer if start == "current" else charged_customer)(runtime, runner, customer)
    for move in path:
        move(runtime, customer)
    assert state(runtime, "Billing", customer) == target


def test_every_billing_state_that_holds_money_has_a_dispute_path() -> None:
    """The test below covers every state Billing declares, except the final one: a new state
    fails here until it is reached there."""
    billing = importlib.import_module("autonomic.generated.billing").MACHINE
    assert set(BILLING_PATHS) == {s.value for s in billing.state_type} - billing.finals


def test_disputes_are_accepted_in_every_state_that_holds_money(
    world: tuple[Runtime, FlowRunner, Any, Injector],
) -> None:
    """The PaymentProcessed flow's Disputed branch, in every non-final Billing state reached
    with real events and timers: Billing freezes the funds (holding a refund still owed) and
    Compliance investigates."""
    runtime, runner, _, _ = world
    for target in BILLING_PATHS:
        customer = f"d-{target}"
        billing_in(runtime, runner, customer, target)
        inputs = {
            "outcome": "Disputed",
            "customer_id": customer,
            "case_id": f"case-{customer}",
            **PAYMENT,
        }
        result = runner.start("PaymentProcessed", customer, inputs)
        assert (target, result.status, result.reason) == (target, "completed", None)
        assert (target, state(runtime, "Billing", customer)) == (target, disputed_in(target))
        assert state(runtime, "Compliance", f"case-{customer}") == "Investigating"


@pytest.mark.parametrize(
    ("outcome", "billing_after"), [("customer", "Current"), ("merchant", "Refunding")]
)
def test_a_refund_held_by_a_dispute_follows_compliances_decision(
    world: tuple[Runtime, FlowRunner, Any, Injector], outcome: str, billing_after: str
) -> None:
    """Upheld: the chargeback paid the customer back, the held refund is cancelled. Rejected:
    the refund is still owed and is submitted again."""
    runtime, runner, bindings, _ = world
    customer = f"rd-{outcome}"
    billing_in(runtime, runner, customer, "RefundRetry1Paying")
    inputs = {
        "outcome": "Disputed",
        "customer_id": customer,
        "case_id": f"case-{customer}",
        **PAYMENT,
    }
    assert runner.start("PaymentProcessed", customer, inputs).status == "completed"
    refunds = bindings.calls["Billing.submit_refund"]
    compliance = runtime.governor("Compliance")
    evidence = {"evidence_ref": "ev-1", "submitted_at": "2026-01-02T00:00:00+00:00"}
    compliance.dispatch(f"case-{customer}", "EvidenceSubmitted", evidence)
    compliance.dispatch(f"case-{customer}", "DisputeDecided", {"outcome": outcome})
    runtime.deliver_outbox()
    assert state(runtime, "Billing", customer) == billing_after
    assert bindings.calls["Billing.submit_refund"] == refunds + (outcome == "merchant")
    assert bindings.calls["Billing.cancel_held_refund"] == (outcome == "customer")


def test_noisy_neighbour_gathers_replies_with_a_quorum(
    world: tuple[Runtime, FlowRunner, Any, Injector],
) -> None:
    runtime, runner, _, _ = world
    inputs = {
        "tenant_id": "t",
        "resource": "cpu",
        "severity": "high",
        "violation_id": "v1",
        "window_start": "2026-01-01T00:00:00+00:00",
    }
    customer = "n-ok"
    active_customer(runtime, runner, customer)
    result = runner.start("NoisyNeighbour", customer, {"customer_id": customer, **inputs})
    assert result.status == "completed"
    assert result.gathered == dict.fromkeys(("contention", "sla_credit", "notify"), "succeeded")
    # Mid-ladder Billing refuses SLA credits: two of three replies still make the quorum.
    customer = "n-ladder"
    charged_customer(runtime, runner, customer)
    runtime.governor("Billing").dispatch(
        customer, "PaymentFailed", {"customer_id": customer, "idempotency_key": "k", "reason": "r"}
    )
    result = runner.start("NoisyNeighbour", customer, {"customer_id": customer, **inputs})
    assert result.status == "completed"
    assert result.gathered is not None and result.gathered["sla_credit"] == "failed"
    assert flow_entries(runtime, result)[-2][0] == "FanInGathered"


NOISY = {
    "tenant_id": "t",
    "resource": "cpu",
    "severity": "high",
    "violation_id": "v1",
    "window_start": "2026-01-01T00:00:00+00:00",
}


def unanswered(*steps: str) -> Callable[[StepContext], None]:
    """A before_step hook: these fanout branches' receivers do not answer."""

    def hook(ctx: StepContext) -> None:
        if ctx.step in steps:
            raise NoReply(f"{ctx.step}: no answer")

    return hook


def test_a_fanout_waits_durably_for_replies_until_its_deadline(tmp_path: Path) -> None:
    """`within 30s`: a branch without a reply keeps the run waiting in the store (wake_ms is
    the deadline); a restarted process gathers at the deadline, and the quorum decides."""
    db = tmp_path / "m.db"
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime, runner, _ = marketplace(
        SQLiteStore(db), signer=signer, before_step=unanswered("notify")
    )
    customer = "n-slow"
    active_customer(runtime, runner, customer)
    started = runtime.clock.now_ms()
    result = runner.start("NoisyNeighbour", customer, {"customer_id": customer, **NOISY})
    assert result.status == "waiting" and result.gathered is None
    assert runner.next_wake() == started + 30_000
    runtime.clock.advance("10s")
    (still,) = runner.resume_all()  # asked again: still no reply, nothing new recorded
    assert still.status == "waiting"
    clock = runtime.clock
    runtime.close()

    runtime, runner, _ = marketplace(
        SQLiteStore(db), signer=signer, clock=clock, before_step=unanswered("notify")
    )
    clock.advance("20s")
    (done,) = runner.resume_all()
    assert done.status == "completed"  # two of three replies: the quorum of 2
    assert done.gathered == {
        "contention": "succeeded",
        "sla_credit": "succeeded",
        "notify": "timed_out",
    }
    events = [event for event, _, _ in flow_entries(runtime, done)]
    assert events.count("StepWaiting") == 1
    assert events[-2:] == ["FanInGathered", "FlowCompleted"]
    assert runtime.verify(Keyring([signer.public_info()])).ok
    runtime.close()


def test_a_reply_before_the_deadline_counts_and_a_missed_quorum_fails(tmp_path: Path) -> None:
    hook = unanswered("notify", "sla_credit")
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "m.db"), before_step=hook)
    active_customer(runtime, runner, "n-late")
    active_customer(runtime, runner, "n-lost")
    late = runner.start("NoisyNeighbour", "n-late", {"customer_id": "n-late", **NOISY})
    lost = runner.start("NoisyNeighbour", "n-lost", {"customer_id": "n-lost", **NOISY})
    assert late.status == lost.status == "waiting"
    runner.before_step = lambda ctx: hook(ctx) if ctx.instance == "n-lost" else None
    runtime.clock.advance("29s")
    by_id = {r.flow_id: r for r in runner.resume_all()}
    assert by_id[late.flow_id].status == "completed"
    assert set((by_id[late.flow_id].gathered or {}).values()) == {"succeeded"}
    assert by_id[lost.flow_id].status == "waiting"
    runtime.clock.advance("1s")
    (failed,) = runner.resume_all()
    assert failed.status == "failed" and failed.reason == "1 of 3 replies, quorum 2"
    runtime.close()


def test_the_asyncio_fanout_keeps_the_same_durable_deadline(tmp_path: Path) -> None:
    runtime, runner, _ = marketplace(
        SQLiteStore(tmp_path / "m.db"), before_step=unanswered("contention", "notify")
    )
    active_customer(runtime, runner, "n-async")
    inputs = {"customer_id": "n-async", **NOISY}
    result = asyncio.run(runner.start_async("NoisyNeighbour", "n-async", inputs))
    assert result.status == "waiting"
    runtime.clock.advance("30s")
    (done,) = asyncio.run(runner.resume_all_async())
    assert done.status == "failed"
    assert done.gathered == {
        "contention": "timed_out",
        "sla_credit": "succeeded",
        "notify": "timed_out",
    }
    runtime.close()


def test_async_signups_run_branches_concurrently_through_group_commit(tmp_path: Path) -> None:
    """Branches and runs go through Governor.dispatch_async and the run's writes through the
    same asyncio batcher: 8 concurrent signups (4 branches each) commit in a few batches."""
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "m.db"))

    async def main() -> list[FlowResult]:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(runner.start_async("CustomerSignup", f"a{i}", signup(f"a{i}")))
                for i in range(8)
            ]
        return [task.result() for task in tasks]

    committer = runtime._committer
    batches, units = committer.batches, committer.committed_units
    results = asyncio.run(main())
    assert all(r.status == "completed" for r in results)
    batches, units = committer.batches - batches, committer.committed_units - units
    assert units >= 8 * (4 + 2)  # at least each branch's dispatch and the run's two writes
    # Concurrency became fewer commits: 4+ units a commit (about 8 on an idle machine; the
    # branches' outside calls run in action threads first, so their units arrive spread out).
    assert batches * 4 <= units
    runtime.close()


def test_the_ledger_with_flow_entries_verifies(tmp_path: Path) -> None:
    from autonomic.runtime.keys import Signer
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime, runner, _ = marketplace(MemoryStore(), signer=signer)
    runner.start("CustomerSignup", "v", signup("v"))
    keyring = Keyring([signer.public_info()])
    report = runtime.verify(keyring)
    assert report.ok, report


@pytest.mark.parametrize("api", ["sync", "asyncio"])
def test_a_driver_whose_run_another_driver_finished_meanwhile_returns_its_end(
    tmp_path: Path, api: str
) -> None:
    """Two runtimes on one SQLite file drive the same upgrade run: while the first is at the
    charge step (its before_step hook), the second drives the whole run to its end. The first's
    charge is then a repeat of the step's event id (nothing charged again), and its write of
    the run finds the run moved on (R020 on the flow id, raised out of start before): it reads
    the run again and returns it completed. (The second driver's run waits for the charge's
    capture: the processor's webhook comes, and it resumes the run to its end.)"""
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    other, other_runner, other_world = marketplace(SQLiteStore(tmp_path / "m.db"), signer=signer)
    active_customer(other, other_runner, "c1")
    overtaken: list[FlowResult] = []

    def overtake(ctx: StepContext) -> None:
        if ctx.step == "charge_proration" and not overtaken:
            ended = other_runner.start("SubscriptionUpgrade", "c1", upgrade_inputs("c1"))
            if ended.status == "waiting":  # for the capture of the charge
                capture_proration(other, "c1")
                ended = other_runner.resume(ended.flow_id)
            overtaken.append(ended)

    runtime, runner, world = marketplace(
        SQLiteStore(tmp_path / "m.db"), signer=signer, before_step=overtake
    )
    inputs = upgrade_inputs("c1")
    if api == "sync":
        result = runner.start("SubscriptionUpgrade", "c1", inputs)
    else:
        result = asyncio.run(runner.start_async("SubscriptionUpgrade", "c1", inputs))
    assert [r.status for r in overtaken] == ["completed"]
    assert result.status == "completed" and result.steps == overtaken[0].steps
    charges = world.payments.submitted + other_world.payments.submitted
    assert charges.count("up-c1") == 1
    runtime.close()
    other.close()
