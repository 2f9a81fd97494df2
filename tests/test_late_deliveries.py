"""Outbox deliveries that arrive late or twice, with all seven generated governors on SQLite
under a virtual clock: one owner undoes an upgrade (the flow, never a timer of Subscription's),
and what trails an ended upgrade, a voided charge or an open chargeback is a decision of the
receiving machine, never a failed delivery."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from autonomic.runtime.demo import _Bindings
from autonomic.runtime.flows import FlowRunner
from autonomic.runtime.results import Delivery
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore
from flow_world import marketplace
from test_flows import PRORATION, active_customer, capture_proration, state, upgrade_inputs

MINUTE = 60_000
HOUR = 60 * MINUTE

World = tuple[Runtime, FlowRunner, _Bindings]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    runtime, runner, bindings = marketplace(SQLiteStore(tmp_path / "m.db"))
    with runtime:
        yield runtime, runner, bindings


def advance(runtime: Runtime, ms: int) -> None:
    runtime.clock.advance(ms)  # type: ignore[attr-defined]
    runtime.fire_due()


def failed(deliveries: list[Delivery]) -> list[tuple[str, str, str | None]]:
    return [
        (d.message.target_machine, d.message.event, d.error)
        for d in deliveries
        if d.status == "failed"
    ]


def transitions(runtime: Runtime, machine: str, customer: str) -> list[tuple[str, str, str]]:
    return [
        (e.event, e.from_state, e.to_state)
        for e in runtime.store.ledger_entries(machine=machine, instance=customer)
    ]


def test_a_completed_upgrade_is_not_undone_when_its_confirmation_is_late(world: World) -> None:
    """The flow grants the tier, allocates the quota and ends `completed`; QuotaSla's
    `TierChangeCompleted` reaches Subscription through an outbox 3h late (a worker outage).
    Nothing undoes the upgrade meanwhile: no refund, no tier restored, and the late
    confirmation moves Subscription on."""
    runtime, runner, bindings = world
    customer = "late-confirm"
    active_customer(runtime, runner, customer)
    result = runner.start("SubscriptionUpgrade", customer, upgrade_inputs(customer))
    assert result.status == "waiting"
    capture_proration(runtime, customer)  # Subscription Upgrading -> UpgradePaid
    result = runner.resume(result.flow_id)
    assert result.status == "completed"
    assert state(runtime, "Subscription", customer) == "UpgradePaid"
    advance(runtime, 3 * HOUR)  # the outbox not delivered meanwhile
    assert state(runtime, "Subscription", customer) == "UpgradePaid"
    assert failed(runtime.deliver_outbox()) == []
    assert state(runtime, "Subscription", customer) == "Active"
    assert transitions(runtime, "Subscription", customer)[-1] == (
        "TierChangeCompleted",
        "UpgradePaid",
        "Active",
    )
    assert bindings.calls["Subscription.confirm_tier_change"] == 1
    for undo in ("Billing.submit_refund", "Entitlement.restore_previous_tier"):
        assert bindings.calls[undo] == 0, undo
    assert bindings.calls["QuotaSla.restore_previous_quota"] == 0
    assert state(runtime, "Billing", customer) == "Current"
    assert runner.result(result.flow_id).status == "completed"


def test_a_late_driver_finds_the_capture_and_completes(world: World) -> None:
    """The flow's driver resumes 3h after the capture: Subscription waited in `UpgradePaid`
    (no timer of its own undid it), so the flow goes on and completes; nothing is refunded."""
    runtime, runner, bindings = world
    customer = "late-driver"
    active_customer(runtime, runner, customer)
    result = runner.start("SubscriptionUpgrade", customer, upgrade_inputs(customer))
    capture_proration(runtime, customer)
    advance(runtime, 3 * HOUR)
    assert failed(runtime.deliver_outbox()) == []
    assert runner.resume(result.flow_id).status == "completed"
    assert failed(runtime.deliver_outbox()) == []
    assert state(runtime, "Subscription", customer) == "Active"
    assert bindings.calls["Billing.submit_refund"] == 0
    assert bindings.calls["Entitlement.enable_tier_features"] == 1


def test_a_capture_told_after_the_flow_gave_up_is_ignored_and_refunded_once(
    world: World,
) -> None:
    """Billing captures the proration, but its `ProrationCaptured` sits in the outbox past the
    flow's 1h30m wait: the flow compensates (its CompensationRefund pays the capture back,
    UpgradeAbandoned ends the order). The late capture notice is then ignored by `Active`, and
    a second CompensationRefund of the same upgrade (an operator's undo, its charge key the
    upgrade's), while the refund is in flight, is taken by `Refunding` as a copy: one refund."""
    runtime, runner, bindings = world
    customer = "late-capture-notice"
    active_customer(runtime, runner, customer)
    result = runner.start("SubscriptionUpgrade", customer, upgrade_inputs(customer))
    paid = {"transaction_id": "tp", "amount": PRORATION, "new_tier": "professional"}
    runtime.governor("Billing").dispatch(
        customer,
        "ProrationPaid",
        {"customer_id": customer, "idempotency_key": f"up-{customer}", **paid},
    )
    advance(runtime, 91 * MINUTE)
    result = runner.resume(result.flow_id)
    assert (result.status, result.failed_step) == ("compensated", "paid")
    assert state(runtime, "Subscription", customer) == "Active"
    assert state(runtime, "Billing", customer) == "Refunding"
    assert failed(runtime.deliver_outbox()) == []
    last = list(runtime.store.ledger_entries(machine="Subscription", instance=customer))[-1]
    assert last.event == "UpgradeAbandoned"  # the late notice changed nothing
    for charge in ({"charge_key": f"up-{customer}"}, {}):  # named, or the last proration
        again = runtime.governor("Billing").dispatch(
            customer,
            "CompensationRefund",
            {"reason": "operator undo", "amount": PRORATION, **charge},
        )
        assert (again.from_state, again.to_state) == ("Refunding", "Refunding")
    assert bindings.calls["Billing.record_duplicate_refund"] == 2
    assert bindings.calls["Billing.owe_refund"] == 0
    assert bindings.calls["Billing.submit_refund"] == 1
    refund = {"refund_id": "rf", "amount": PRORATION}
    runtime.governor("Billing").dispatch(customer, "RefundSucceeded", refund)
    assert state(runtime, "Billing", customer) == "Current"  # nothing else was owed


def test_a_capture_after_the_void_is_paid_back_and_recorded(world: World) -> None:
    """The processor does not answer the proration charge for 1h: Billing voids it, the flow's
    wait fails and the upgrade is undone unpaid. Then the processor's capture arrives anyway
    (void and capture race): Billing accepts it and pays it back through its refund path, a
    ledger entry; a copy of a capture Billing recorded is not paid back."""
    runtime, runner, bindings = world
    customer = "capture-after-void"
    active_customer(runtime, runner, customer)
    result = runner.start("SubscriptionUpgrade", customer, upgrade_inputs(customer))
    advance(runtime, 61 * MINUTE)  # Billing voids the unanswered charge
    assert failed(runtime.deliver_outbox()) == []
    advance(runtime, 30 * MINUTE)
    assert runner.resume(result.flow_id).status == "compensated"
    assert state(runtime, "Billing", customer) == "Current"
    assert bindings.calls["Billing.submit_refund"] == 0  # nothing was taken yet
    capture_proration(runtime, customer)  # the late webhook, then the outbox
    assert transitions(runtime, "Billing", customer)[-1] == (
        "ProrationPaid",
        "Current",
        "Refunding",
    )
    assert bindings.calls["Billing.submit_refund"] == 1
    assert state(runtime, "Subscription", customer) == "Active"  # the upgrade stays undone
    assert failed(runtime.deliver_outbox()) == []
    # A capture Billing recorded, its webhook repeated, is a copy: nothing is paid back.
    other = "capture-recorded"
    active_customer(runtime, runner, other)
    done = runner.start("SubscriptionUpgrade", other, upgrade_inputs(other))
    capture_proration(runtime, other)
    assert runner.resume(done.flow_id).status == "completed"
    assert failed(runtime.deliver_outbox()) == []
    paid = {"transaction_id": "tp-copy", "amount": PRORATION, "new_tier": "professional"}
    copy = runtime.governor("Billing").dispatch(
        other, "ProrationPaid", {"customer_id": other, "idempotency_key": f"up-{other}", **paid}
    )
    assert (copy.from_state, copy.to_state) == ("Current", "Current")
    assert bindings.calls["Billing.submit_refund"] == 1


def dispute(runtime: Runtime, runner: FlowRunner, customer: str, n: int) -> str:
    """The PaymentProcessed flow's Disputed branch: Billing freezes, Compliance opens a case."""
    case = f"case-{customer}-{n}"
    inputs = {
        "outcome": "Disputed",
        "customer_id": customer,
        "transaction_id": f"t{n}",
        "amount": "30",
        "idempotency_key": f"inv-{customer}",
        "reason": "chargeback",
        "case_id": case,
    }
    assert runner.start("PaymentProcessed", customer, inputs).status == "completed"
    return case


def decide(runtime: Runtime, case: str, outcome: str) -> list[Delivery]:
    compliance = runtime.governor("Compliance")
    evidence = {"evidence_ref": "ev", "submitted_at": "2026-01-02T00:00:00+00:00"}
    compliance.dispatch(case, "EvidenceSubmitted", evidence)
    compliance.dispatch(case, "DisputeDecided", {"outcome": outcome})
    return runtime.deliver_outbox()


def renewal_due(runtime: Runtime, customer: str, invoice: str) -> list[Delivery]:
    renewal = {"customer_id": customer, "period_end": "2026-02-01T00:00:00+00:00"}
    runtime.governor("Subscription").dispatch(
        customer, "RenewalDue", {**renewal, "invoice_id": invoice, "amount": "30"}
    )
    return runtime.deliver_outbox()


def test_a_renewal_during_a_chargeback_waits_for_the_decision_then_is_collected(
    world: World,
) -> None:
    """Billing is Disputed when the billing calendar renews: the charge is not made while the
    chargeback is open (no failed delivery); Subscription goes PastDue as for any unpaid charge;
    after the decision the retry ladder charges the invoice and the renewal completes."""
    runtime, runner, bindings = world
    customer = "renew-in-dispute"
    active_customer(runtime, runner, customer)
    case = dispute(runtime, runner, customer, 1)
    assert state(runtime, "Billing", customer) == "Disputed"
    assert failed(renewal_due(runtime, customer, f"inv2-{customer}")) == []
    assert transitions(runtime, "Billing", customer)[-1] == (
        "ChargeRequested",
        "Disputed",
        "DisputedUnpaid",
    )
    charges = len(bindings.payments.submitted)
    advance(runtime, 2 * HOUR)
    assert state(runtime, "Subscription", customer) == "PastDue"
    assert failed(decide(runtime, case, "merchant")) == []
    assert state(runtime, "Billing", customer) == "Retry1"  # the ladder takes the invoice
    advance(runtime, HOUR)
    assert state(runtime, "Billing", customer) == "Retry1Charging"
    assert bindings.payments.retries == 1 and len(bindings.payments.submitted) == charges
    paid = {"customer_id": customer, "transaction_id": "t2", "amount": "30"}
    runtime.governor("Billing").dispatch(
        customer, "PaymentSucceeded", {**paid, "idempotency_key": f"inv2-{customer}"}
    )
    assert failed(runtime.deliver_outbox()) == []
    assert state(runtime, "Billing", customer) == "Current"
    assert state(runtime, "Subscription", customer) == "Active"


@pytest.mark.parametrize("outcome", ["customer", "merchant"])
def test_a_dispute_during_dunning_returns_to_the_retry_ladder(world: World, outcome: str) -> None:
    """A chargeback while the renewal is in Billing's retry ladder: after Compliance decides,
    either way, the unpaid invoice is collected again by the ladder, never dropped (and the
    suspension's auto-refund of the unpaid period is ignored meanwhile)."""
    runtime, runner, _ = world
    customer = f"dunning-{outcome}"
    active_customer(runtime, runner, customer)
    assert failed(renewal_due(runtime, customer, f"inv2-{customer}")) == []
    declined = {"customer_id": customer, "idempotency_key": "k", "reason": "declined"}
    runtime.governor("Billing").dispatch(customer, "PaymentFailed", declined)
    assert state(runtime, "Billing", customer) == "Retry1"
    case = dispute(runtime, runner, customer, 1)
    assert state(runtime, "Billing", customer) == "DisputedUnpaid"
    refund = {"customer_id": customer, "reason": "suspended 72h"}
    assert runtime.governor("Billing").dispatch(customer, "RefundRequested", refund).ignored
    assert failed(decide(runtime, case, outcome)) == []
    assert state(runtime, "Billing", customer) == "Retry1"
    advance(runtime, HOUR)
    assert state(runtime, "Billing", customer) == "Retry1Charging"


def test_repeated_disputes_keep_billing_disputed_until_every_case_is_decided(
    world: World,
) -> None:
    """Three chargebacks for one customer (three payments, three PaymentProcessed runs, three
    Compliance cases): Billing stays Disputed until the last case is decided, and no
    decision's delivery fails."""
    runtime, runner, _ = world
    customer = "disputed-thrice"
    active_customer(runtime, runner, customer)
    cases = [dispute(runtime, runner, customer, n) for n in (1, 2, 3)]
    assert state(runtime, "Billing", customer) == "Disputed"
    for case, outcome, after in zip(
        cases,
        ("customer", "merchant", "customer"),
        ("Disputed", "Disputed", "Current"),
        strict=True,
    ):
        assert failed(decide(runtime, case, outcome)) == []
        assert state(runtime, "Billing", customer) == after
