"""Events that cross one another, with all seven generated governors on SQLite under a virtual
clock: a cancellation while the renewal charge is in flight, a subscription ending during a
chargeback, a restart between two dispute decisions, a capture of a voided charge while a
refund is in flight, and two different refunds asked for at once. Each is decided by the
receiving machine: no outbox delivery fails, no money is kept or paid twice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from autonomic.runtime.keys import Signer
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.timers import VirtualClock
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flow_world import START_MS, marketplace
from test_flows import (
    PRORATION,
    Injector,
    active_customer,
    capture_proration,
    state,
    upgrade_inputs,
)
from test_late_deliveries import (
    HOUR,
    MINUTE,
    World,
    advance,
    decide,
    dispute,
    failed,
    renewal_due,
    transitions,
)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[World, Injector]]:
    injector = Injector()
    runtime, runner, bindings = marketplace(SQLiteStore(tmp_path / "m.db"), before_step=injector)
    with runtime:
        yield (runtime, runner, bindings), injector


def cancel(world: World, customer: str) -> str:
    runner = world[1]
    inputs = {"customer_id": customer, "request_id": f"cx-{customer}", "reason": "bye"}
    return runner.start("SubscriptionCancellation", customer, inputs).status


def renewing(world: World, customer: str) -> None:
    """An active customer whose renewal charge is with the processor."""
    runtime, runner, _ = world
    active_customer(runtime, runner, customer)
    assert failed(renewal_due(runtime, customer, f"inv2-{customer}")) == []
    assert state(runtime, "Subscription", customer) == "Renewing"
    assert state(runtime, "Billing", customer) == "AwaitingPayment"


def pay(world: World, customer: str, event: str) -> None:
    runtime = world[0]
    answer: dict[str, str] = {"customer_id": customer, "idempotency_key": f"inv2-{customer}"}
    if event == "PaymentSucceeded":
        answer |= {"transaction_id": "t2", "amount": "30"}
    else:
        answer |= {"reason": "declined"}
    runtime.governor("Billing").dispatch(customer, event, answer)


@pytest.mark.parametrize("answer", ["captured", "captured-before-close", "declined", "silent"])
def test_a_customer_cancels_while_the_renewal_charge_is_in_flight(
    world: tuple[World, Injector], answer: str
) -> None:
    """The saga completes at once (Subscription Renewing takes CancelRequested); Billing's
    refund waits for the processor: a capture, before or after the account's close, is refunded
    in full and the account closes when it is paid; a decline or silence voids the invoice and
    closes it. No delivery fails (Cancelled ignores the renewal's late answer)."""
    (runtime, _, bindings), _ = world
    customer = f"cx-renewing-{answer}"
    renewing(world[0], customer)
    assert cancel(world[0], customer) == "completed"
    assert state(runtime, "Billing", customer) == "CancellationAwaitingPayment"
    if answer == "captured-before-close":
        pay(world[0], customer, "PaymentSucceeded")
        assert state(runtime, "Billing", customer) == "CancellationRefunding"
    assert failed(runtime.deliver_outbox()) == []
    assert state(runtime, "Subscription", customer) == "Cancelled"
    if answer == "captured":
        assert state(runtime, "Billing", customer) == "ClosingAwaitingPayment"
        pay(world[0], customer, "PaymentSucceeded")
    elif answer == "declined":
        pay(world[0], customer, "PaymentFailed")
    elif answer == "silent":
        advance(runtime, HOUR)
    assert failed(runtime.deliver_outbox()) == []
    if answer.startswith("captured"):
        assert state(runtime, "Billing", customer) == "ClosingRefunding"
        assert bindings.calls["Billing.submit_refund"] == 1
        runtime.governor("Billing").dispatch(
            customer, "RefundSucceeded", {"refund_id": "rf", "amount": "30"}
        )
    else:
        assert bindings.calls["Billing.submit_refund"] == 0
        assert bindings.calls["Billing.void_invoice"] == 1
    assert state(runtime, "Billing", customer) == "Closed"
    assert state(runtime, "Entitlement", customer) == "Revoked"


def test_a_cancellation_after_the_first_attempt_failed_writes_the_debt_off(
    world: tuple[World, Injector],
) -> None:
    """90 minutes into the renewal Billing is on its retry ladder while Subscription still
    waits in Renewing: the saga completes, nothing is refunded, CloseAccount writes off."""
    (runtime, _, bindings), _ = world
    customer = "cx-renewing-ladder"
    renewing(world[0], customer)
    advance(runtime, 90 * MINUTE)
    assert (state(runtime, "Subscription", customer), state(runtime, "Billing", customer)) == (
        "Renewing",
        "Retry1",
    )
    assert cancel(world[0], customer) == "completed"
    assert failed(runtime.deliver_outbox()) == []
    assert state(runtime, "Billing", customer) == "Closed"
    assert bindings.calls["Billing.write_off_balance"] == 1
    assert bindings.calls["Billing.submit_refund"] == 0


def test_a_compensated_cancellation_leaves_the_renewal_to_go_on(
    world: tuple[World, Injector],
) -> None:
    """The saga's last step fails: the refund waiting on the renewal charge is reversed (there
    was nothing to pay back yet), and the renewal completes as if nobody had cancelled."""
    (runtime, _, bindings), injector = world
    customer = "cx-renewing-undone"
    renewing(world[0], customer)
    injector.target = (customer, "SubscriptionCancellation", "archive_subscription", "do")
    assert cancel(world[0], customer) == "compensated"
    assert state(runtime, "Billing", customer) == "AwaitingPayment"
    pay(world[0], customer, "PaymentSucceeded")
    assert failed(runtime.deliver_outbox()) == []
    assert state(runtime, "Subscription", customer) == "Active"
    assert state(runtime, "Billing", customer) == "Current"
    assert bindings.calls["Billing.submit_refund"] == 0


@pytest.mark.parametrize("refund_held", [False, True])
def test_a_subscription_ending_during_a_chargeback_closes_after_the_decisions(
    world: tuple[World, Injector], refund_held: bool
) -> None:
    """CloseAccount reaches Billing while two chargebacks are open (with a refund held, or
    not): the account stays closing until both cases are decided, then closes; the held refund
    is paid first when the last decision goes to the merchant."""
    (runtime, runner, bindings), _ = world
    customer = f"close-in-dispute-{refund_held}"
    active_customer(runtime, runner, customer)
    if refund_held:
        refund = {"customer_id": customer, "reason": "suspended 72h"}
        runtime.governor("Billing").dispatch(customer, "RefundRequested", refund)
    cases = [dispute(runtime, runner, customer, n) for n in (1, 2)]
    held = "RefundDisputed" if refund_held else "Disputed"
    assert state(runtime, "Billing", customer) == held
    close = {"customer_id": customer, "reason": "cancelled"}
    runtime.governor("Subscription").dispatch(customer, "CancelRequested", close)
    assert failed(runtime.deliver_outbox()) == []
    assert state(runtime, "Billing", customer) == f"Closing{held}"
    assert failed(decide(runtime, cases[0], "customer")) == []
    assert state(runtime, "Billing", customer) == "ClosingDisputed"  # the chargeback paid back
    assert bindings.calls["Billing.cancel_held_refund"] == refund_held
    assert failed(decide(runtime, cases[1], "merchant")) == []
    assert state(runtime, "Billing", customer) == "Closed"


def test_a_restarted_process_waits_for_every_open_dispute(tmp_path: Path) -> None:
    """Two chargebacks open, then the process restarts: Billing's dispute guard counts from
    its ledger, so the first decision still finds another case open, and the second closes
    the dispute (an in-memory count forgot both, left Disputed on the first decision and
    failed the second's delivery)."""
    db = tmp_path / "m.db"
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    clock = VirtualClock(START_MS)
    customer = "restarted"
    runtime, runner, _ = marketplace(SQLiteStore(db), signer=signer, clock=clock)
    with runtime:
        active_customer(runtime, runner, customer)
        cases = [dispute(runtime, runner, customer, n) for n in (1, 2)]
    runtime, runner, _ = marketplace(SQLiteStore(db), signer=signer, clock=clock)
    with runtime:
        assert state(runtime, "Billing", customer) == "Disputed"
        assert failed(decide(runtime, cases[0], "merchant")) == []
        assert state(runtime, "Billing", customer) == "Disputed"
        assert failed(decide(runtime, cases[1], "customer")) == []
        assert state(runtime, "Billing", customer) == "Current"


def upgrade_voided_then_another_captured(world: World, customer: str) -> str:
    """Upgrade 1's charge is voided unanswered (the run compensated, nothing taken); upgrade
    2's is captured and its run waits at `grant_tier`... as the caller drives it. The id of
    upgrade 2's run."""
    runtime, runner, _ = world
    active_customer(runtime, runner, customer)
    first = runner.start("SubscriptionUpgrade", customer, upgrade_inputs(customer))
    advance(runtime, 61 * MINUTE)  # Billing voids the unanswered charge
    assert failed(runtime.deliver_outbox()) == []
    advance(runtime, 30 * MINUTE)
    assert runner.resume(first.flow_id).status == "compensated"
    inputs = {**upgrade_inputs(customer), "request_id": f"up2-{customer}"}
    second = runner.start("SubscriptionUpgrade", customer, inputs)
    paid = {"customer_id": customer, "transaction_id": "tp2", "amount": PRORATION}
    runtime.governor("Billing").dispatch(
        customer,
        "ProrationPaid",
        {**paid, "idempotency_key": f"up2-{customer}", "new_tier": "professional"},
    )
    assert failed(runtime.deliver_outbox()) == []
    return second.flow_id


def late_capture(world: World, customer: str) -> None:
    """The processor captures upgrade 1's voided charge after all."""
    paid = {"customer_id": customer, "transaction_id": "tp1", "amount": PRORATION}
    world[0].governor("Billing").dispatch(
        customer,
        "ProrationPaid",
        {**paid, "idempotency_key": f"up-{customer}", "new_tier": "professional"},
    )


def test_a_second_different_refund_is_paid_after_the_one_in_flight(
    world: tuple[World, Injector],
) -> None:
    """Billing pays back a late capture of a voided charge (Refunding); meanwhile upgrade 2's
    run fails at its last step and compensates: its CompensationRefund names another charge,
    which is owed, not ignored, and paid when the first refund is; a copy of it pays nothing
    twice. Two refunds, one per charge."""
    (runtime, runner, bindings), injector = world
    customer = "two-refunds"
    flow_id = upgrade_voided_then_another_captured(world[0], customer)
    assert state(runtime, "Billing", customer) == "Current"
    late_capture(world[0], customer)
    assert transitions(runtime, "Billing", customer)[-1] == (
        "ProrationPaid",
        "Current",
        "Refunding",
    )
    injector.target = (customer, "SubscriptionUpgrade", "allocate_quota", "do")
    assert runner.resume(flow_id).status == "compensated"
    assert failed(runtime.deliver_outbox()) == []
    assert bindings.calls["Billing.owe_refund"] == 1
    copy = {"reason": "operator undo", "charge_key": f"up2-{customer}"}
    runtime.governor("Billing").dispatch(customer, "CompensationRefund", copy)
    assert bindings.calls["Billing.record_duplicate_refund"] == 1
    assert bindings.calls["Billing.submit_refund"] == 1
    refund = {"refund_id": "rf1", "amount": PRORATION}
    runtime.governor("Billing").dispatch(customer, "RefundSucceeded", refund)
    assert state(runtime, "Billing", customer) == "Refunding"  # the second one now
    assert bindings.calls["Billing.submit_refund"] == 2
    refund = {"refund_id": "rf2", "amount": PRORATION}
    runtime.governor("Billing").dispatch(customer, "RefundSucceeded", refund)
    assert state(runtime, "Billing", customer) == "Current"
    assert bindings.calls["Billing.submit_refund"] == 2


def test_a_late_capture_while_a_refund_is_in_flight_is_paid_back_after_it(
    world: tuple[World, Injector],
) -> None:
    """Upgrade 2 is compensated (its capture refunded: Refunding); then upgrade 1's voided
    charge is captured late. Refunding takes it (it was refused before) and pays it back after
    the refund in flight; a copy of a capture Billing recorded is not paid back."""
    (runtime, runner, bindings), injector = world
    customer = "capture-during-refund"
    flow_id = upgrade_voided_then_another_captured(world[0], customer)
    injector.target = (customer, "SubscriptionUpgrade", "allocate_quota", "do")
    assert runner.resume(flow_id).status == "compensated"
    assert failed(runtime.deliver_outbox()) == []
    assert state(runtime, "Billing", customer) == "Refunding"
    late_capture(world[0], customer)
    assert transitions(runtime, "Billing", customer)[-1] == (
        "ProrationPaid",
        "Refunding",
        "Refunding",
    )
    paid = {"customer_id": customer, "transaction_id": "tp2", "amount": PRORATION}
    runtime.governor("Billing").dispatch(
        customer,
        "ProrationPaid",
        {**paid, "idempotency_key": f"up2-{customer}", "new_tier": "professional"},
    )  # the recorded capture's webhook again
    assert bindings.calls["Billing.confirm_recorded_payment"] == 1
    for n in (1, 2):
        runtime.governor("Billing").dispatch(
            customer, "RefundSucceeded", {"refund_id": f"rf{n}", "amount": PRORATION}
        )
    assert state(runtime, "Billing", customer) == "Current"
    assert bindings.calls["Billing.submit_refund"] == 2


def test_a_late_capture_of_a_voided_charge_during_a_new_upgrade_is_not_taken_for_it(
    world: tuple[World, Injector],
) -> None:
    """Upgrade 1's charge was voided; upgrade 2's is in flight when upgrade 1's capture
    arrives with the same amount. It is paid back, not taken as upgrade 2's payment: upgrade 2
    is declined (its charge voided) and nothing is granted."""
    (runtime, runner, bindings), _ = world
    customer = "capture-during-upgrade"
    active_customer(runtime, runner, customer)
    first = runner.start("SubscriptionUpgrade", customer, upgrade_inputs(customer))
    advance(runtime, 61 * MINUTE)
    assert failed(runtime.deliver_outbox()) == []
    advance(runtime, 30 * MINUTE)
    assert runner.resume(first.flow_id).status == "compensated"
    inputs = {**upgrade_inputs(customer), "request_id": f"up2-{customer}"}
    second = runner.start("SubscriptionUpgrade", customer, inputs)
    assert state(runtime, "Billing", customer) == "ProrationPending"
    late_capture(world[0], customer)
    assert state(runtime, "Billing", customer) == "Refunding"
    assert failed(runtime.deliver_outbox()) == []
    assert state(runtime, "Subscription", customer) == "Active"
    refund = {"refund_id": "rf1", "amount": PRORATION}
    runtime.governor("Billing").dispatch(customer, "RefundSucceeded", refund)
    advance(runtime, 91 * MINUTE)  # the run's wait for the capture ends; nothing to pay back
    assert runner.resume(second.flow_id).status == "compensated"
    assert failed(runtime.deliver_outbox()) == []
    assert bindings.calls["Billing.submit_refund"] == 1
    assert bindings.calls["Entitlement.enable_tier_features"] == 0


@pytest.mark.parametrize("closing", [False, True])
def test_a_second_refund_asked_while_the_first_is_retried_is_paid_after_it(
    world: tuple[World, Injector], closing: bool
) -> None:
    """The late capture's refund gets no answer for an hour (the retry ladder, of an open or a
    closing account): upgrade 2's compensation, refused there before, is owed and paid once
    the retried refund is; a copy of it pays nothing twice."""
    (runtime, runner, bindings), injector = world
    customer = f"second-refund-on-ladder-{closing}"
    flow_id = upgrade_voided_then_another_captured(world[0], customer)
    late_capture(world[0], customer)
    if closing:
        close = {"customer_id": customer, "reason": "cancelled"}
        runtime.governor("Billing").dispatch(customer, "CloseAccount", close)
    advance(runtime, HOUR)
    prefix = "Closing" if closing else ""
    assert state(runtime, "Billing", customer) == f"{prefix}RefundRetry1"
    injector.target = (customer, "SubscriptionUpgrade", "allocate_quota", "do")
    assert runner.resume(flow_id).status == "compensated"
    copy = {"reason": "operator undo", "charge_key": f"up2-{customer}"}
    runtime.governor("Billing").dispatch(customer, "CompensationRefund", copy)
    assert (
        bindings.calls["Billing.owe_refund"],
        bindings.calls["Billing.record_duplicate_refund"],
    ) == (1, 1)
    advance(runtime, HOUR)  # the ladder's retry of the first refund
    runtime.governor("Billing").dispatch(
        customer, "RefundSucceeded", {"refund_id": "rf1", "amount": PRORATION}
    )
    assert state(runtime, "Billing", customer) == f"{prefix}Refunding"
    assert bindings.calls["Billing.submit_refund"] == 2
    runtime.governor("Billing").dispatch(
        customer, "RefundSucceeded", {"refund_id": "rf2", "amount": PRORATION}
    )
    assert state(runtime, "Billing", customer) == ("Closed" if closing else "Current")


def test_a_compensation_repeated_after_its_refund_was_paid_pays_nothing(
    world: tuple[World, Injector],
) -> None:
    """The upgrade's captured charge is refunded and the refund paid (Billing back in
    Current); the same compensation arrives again (same charge key: an operator's undo, a
    redelivery). The charge was paid back already: nothing is refunded twice."""
    (runtime, runner, bindings), injector = world
    customer = "refund-then-repeat"
    active_customer(runtime, runner, customer)
    injector.target = (customer, "SubscriptionUpgrade", "allocate_quota", "do")
    run = runner.start("SubscriptionUpgrade", customer, upgrade_inputs(customer))
    capture_proration(runtime, customer)
    assert runner.resume(run.flow_id).status == "compensated"
    assert failed(runtime.deliver_outbox()) == []
    assert state(runtime, "Billing", customer) == "Refunding"
    refund = {"refund_id": "rf1", "amount": PRORATION}
    runtime.governor("Billing").dispatch(customer, "RefundSucceeded", refund)
    assert state(runtime, "Billing", customer) == "Current"
    copy = {"reason": "operator undo", "charge_key": f"up-{customer}"}
    runtime.governor("Billing").dispatch(customer, "CompensationRefund", copy)
    assert state(runtime, "Billing", customer) == "Current"
    assert bindings.calls["Billing.submit_refund"] == 1
    assert bindings.calls["Billing.record_nothing_to_refund"] == 1


@pytest.mark.parametrize("disputed", [False, True])
def test_a_repeated_refund_webhook_is_not_taken_for_the_next_refund(
    world: tuple[World, Injector], disputed: bool
) -> None:
    """Two refunds owed: the first is paid and the second submitted; the first's
    RefundSucceeded arrives again (webhooks are at-least-once). It is a copy, not the second
    refund's payment: Billing keeps waiting for the refund in flight (or held for a
    chargeback), which is paid by its own webhook."""
    (runtime, runner, bindings), injector = world
    customer = f"repeated-refund-webhook-{disputed}"
    flow_id = upgrade_voided_then_another_captured(world[0], customer)
    late_capture(world[0], customer)
    injector.target = (customer, "SubscriptionUpgrade", "allocate_quota", "do")
    assert runner.resume(flow_id).status == "compensated"
    assert failed(runtime.deliver_outbox()) == []
    billing = runtime.governor("Billing")
    first = {"refund_id": "rf1", "amount": PRORATION}
    billing.dispatch(customer, "RefundSucceeded", first)
    assert state(runtime, "Billing", customer) == "Refunding"
    assert bindings.calls["Billing.submit_refund"] == 2
    waiting = "Refunding"
    if disputed:
        dispute(runtime, runner, customer, 1)
        waiting = "RefundDisputed"
        assert state(runtime, "Billing", customer) == waiting
    billing.dispatch(customer, "RefundSucceeded", first)  # the first refund's webhook again
    assert state(runtime, "Billing", customer) == waiting
    billing.dispatch(customer, "RefundSucceeded", {"refund_id": "rf2", "amount": PRORATION})
    assert state(runtime, "Billing", customer) == ("Disputed" if disputed else "Current")
    assert bindings.calls["Billing.submit_refund"] == 2
