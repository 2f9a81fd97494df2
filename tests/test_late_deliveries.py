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
    a second CompensationRefund of the same upgrade, while the refund is in flight, is ignored
    by `Refunding`: one refund."""
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
    again = runtime.governor("Billing").dispatch(
        customer, "CompensationRefund", {"reason": "operator undo", "amount": PRORATION}
    )
    assert again.ignored and again.to_state == "Refunding"
    assert bindings.calls["Billing.submit_refund"] == 1
