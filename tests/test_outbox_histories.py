"""Random customer histories through the five flows and the processor's webhooks, with all
seven generated governors on SQLite under a virtual clock: the outbox delivered at random
moments (as a worker would, sometimes hours late), time jumping from minutes to days, the flows'
driver resuming late. No outbox delivery fails: whatever arrives late, twice or out of order,
its receiver decides (a transition or an `ignore` with a reason). A small version of the
auditor's outbox fuzz (AUDIT3, should-fix 10)."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from pathlib import Path

import pytest
from autonomic.runtime.errors import RuntimeFailure
from autonomic.runtime.flows import FlowRunner
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore
from flow_world import marketplace
from test_flows import PRORATION, active_customer, upgrade_inputs

MINUTE = 60_000
DAY = 24 * 60 * MINUTE
TICKS = (0, MINUTE, 60 * MINUTE, 180 * MINUTE, DAY, 3 * DAY)
KINDS = ("upgrade", "renew_ok", "renew_fail", "dispute", "noisy", "cancel", "tick")
NOISY = {
    "tenant_id": "t",
    "resource": "cpu",
    "severity": "high",
    "window_start": "2026-01-01T00:00:00+00:00",
}


class History:
    """One seeded history: its random choices, the marketplace, the moves."""

    def __init__(self, runtime: Runtime, runner: FlowRunner, seed: int) -> None:
        self.runtime, self.runner, self.rng = runtime, runner, random.Random(seed)

    def maybe_deliver(self) -> None:
        if self.rng.random() < 0.5:
            self.runtime.deliver_outbox()

    def tick(self) -> None:
        self.runtime.clock.advance(self.rng.choice(TICKS))  # type: ignore[attr-defined]
        self.runtime.fire_due()
        self.maybe_deliver()
        self.runner.resume_all()

    def upgrade(self, customer: str, step: int) -> None:
        inputs = {**upgrade_inputs(customer), "request_id": f"up-{customer}-{step}"}
        result = self.runner.start("SubscriptionUpgrade", customer, inputs)
        self.maybe_deliver()
        if result.status == "waiting" and self.rng.random() < 0.7:
            paid = {
                "customer_id": customer,
                "idempotency_key": inputs["request_id"],
                "transaction_id": f"tp{step}",
                "amount": PRORATION,
                "new_tier": "professional",
            }
            self.runtime.governor("Billing").dispatch(customer, "ProrationPaid", paid)
            self.maybe_deliver()
            self.runner.resume(result.flow_id)

    def payment(self, customer: str, step: int, outcome: str) -> None:
        invoice = f"inv-{customer}-{step}"
        renewal = {"customer_id": customer, "period_end": "2026-02-01T00:00:00+00:00"}
        self.runtime.governor("Subscription").dispatch(
            customer, "RenewalDue", {**renewal, "invoice_id": invoice, "amount": "30"}
        )
        self.runtime.deliver_outbox()
        inputs = {
            "outcome": outcome,
            "customer_id": customer,
            "transaction_id": f"t{step}",
            "amount": "30",
            "idempotency_key": invoice,
            "reason": "r",
            "case_id": f"case-{customer}-{step}",
        }
        self.runner.start("PaymentProcessed", customer, inputs)
        self.maybe_deliver()

    def move(self, customer: str, step: int) -> None:
        kind = self.rng.choice(KINDS)
        if kind == "upgrade":
            self.upgrade(customer, step)
        elif kind == "noisy":
            inputs = {"customer_id": customer, **NOISY, "violation_id": f"v{step}"}
            self.runner.start("NoisyNeighbour", customer, inputs)
            self.maybe_deliver()
        elif kind == "cancel":
            inputs = {"customer_id": customer, "request_id": f"cx-{customer}-{step}", "reason": "x"}
            self.runner.start("SubscriptionCancellation", customer, inputs)
            self.maybe_deliver()
        elif kind == "tick":
            self.tick()
        else:
            outcome = {"renew_ok": "Success", "renew_fail": "Failed", "dispute": "Disputed"}[kind]
            self.payment(customer, step, outcome)


@pytest.mark.parametrize("seed", [1])
def test_random_histories_fail_no_outbox_delivery(tmp_path: Path, seed: int) -> None:
    db = tmp_path / "m.db"
    runtime, runner, _ = marketplace(SQLiteStore(db))
    with runtime:
        history = History(runtime, runner, seed)
        for n in range(8):
            customer = f"h{n}"
            active_customer(runtime, runner, customer)
            for step in range(history.rng.randint(2, 6)):
                # A caller's event refused at once (say, a renewal while one is due) is the
                # caller's answer, not an outbox delivery.
                with contextlib.suppress(RuntimeFailure):
                    history.move(customer, step)
            history.tick()
        for _ in range(4):
            history.tick()
        runtime.deliver_outbox()
    with sqlite3.connect(db) as conn:
        failed = conn.execute(
            "SELECT machine, target_machine, event, error FROM outbox WHERE status = 'failed'"
        ).fetchall()
        delivered = conn.execute("SELECT count(*) FROM outbox WHERE status = 'delivered'")
        assert delivered.fetchone()[0] > 20  # the histories did go through the outbox
    assert failed == []
