"""A process that waits on the Entitlement approval ladder until it is killed:
`python flow_wait_worker.py DB KEYS HOUR [CLAIM_LEASE_MS]`.

Customer "w": signed up and paid, its entitlement still pending approval. The worker starts
(or resumes) the upgrade flow, whose first step awaits Entitlement in Active or Degraded.
Then, from virtual hour HOUR on, for each number n read from stdin it advances the clock n
hours, one at a time: fires due timers, delivers the outbox, resumes the flows and prints
{"hour", "status"}; it stops when the run has ended (the ladder auto-approves at 72 h, the
processor captures the proration charge at once) or stdin closes. Every setup write has an
event id, so a restart repeats nothing.
"""

from __future__ import annotations

import contextlib
import json
import sys
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from autonomic.runtime.errors import InstanceExists
from autonomic.runtime.flows import FlowRunner
from autonomic.runtime.keys import load_signer
from autonomic.runtime.resilience.claims import DEFAULT_CLAIM_LEASE_MS
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.timers import VirtualClock
from flow_world import START_MS, marketplace

HOUR = 3_600_000
CUSTOMER = "w"
UPGRADE = {
    "customer_id": CUSTOMER,
    "current_tier": "starter",
    "new_tier": "professional",
    "current_price": "10.00",
    "new_price": "30.00",
    "cycle_day": 10,
    "cycle_length": 30,
    "request_id": "up-w",
}
CAPTURE = {
    "customer_id": CUSTOMER,
    "transaction_id": "tp-w",
    "amount": "13.33",
    "idempotency_key": "up-w",
    "new_tier": "professional",
}


def capture(runtime: Runtime) -> bool:
    """The processor captures the upgrade's charge at once, before Billing's 1 h timeout
    (its webhook carries an event id: a restarted worker's repeat is deduplicated)."""
    record = runtime.governor("Billing").get(CUSTOMER)
    if record is None or record.state != "ProrationPending":
        return False
    runtime.governor("Billing").dispatch(CUSTOMER, "ProrationPaid", CAPTURE, event_id="capture-w")
    runtime.deliver_outbox()
    return True


def setup(runtime: Runtime, runner: FlowRunner) -> None:
    """Signed up and paid, the entitlement requested but not approved."""
    profile = {
        "customer_id": CUSTOMER,
        "email": "w@example.com",
        "country": "DE",
        "product_id": "p",
        "tier": "starter",
    }
    assert runner.start("CustomerSignup", CUSTOMER, profile).status == "completed"
    for machine in ("Billing", "Entitlement"):
        with contextlib.suppress(InstanceExists):
            runtime.governor(machine).create(CUSTOMER, event_id=f"setup-{machine}")
    convert = {"customer_id": CUSTOMER, "payment_method_id": "pm", "invoice_id": "inv-w"}
    runtime.governor("Subscription").dispatch(
        CUSTOMER, "ConvertTrial", {**convert, "amount": "30"}, event_id="setup-convert"
    )
    runtime.deliver_outbox()
    paid = {"customer_id": CUSTOMER, "transaction_id": "t1", "amount": "30"}
    runtime.governor("Billing").dispatch(
        CUSTOMER, "PaymentSucceeded", {**paid, "idempotency_key": "inv-w"}, event_id="setup-paid"
    )
    runtime.deliver_outbox()


def main() -> None:
    db, keys, hour = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    lease_ms = int(sys.argv[4]) if len(sys.argv) > 4 else DEFAULT_CLAIM_LEASE_MS
    clock = VirtualClock(START_MS + hour * HOUR)
    runtime, runner, bindings = marketplace(
        SQLiteStore(db), signer=load_signer(keys), clock=clock, claim_lease_ms=lease_ms
    )
    # The application's book of open invoices is durable in a deployment; this world's lives
    # in memory, so a restarted worker rebuilds it from Billing's state. A worker killed
    # between the upgrade's charge and its capture leaves the proration charge open: with
    # the renewal's 30 here instead, Billing's amount check refused the capture as a
    # mismatch and the upgrade was compensated (the test failed so under load).
    billing = runtime.governor("Billing").get(CUSTOMER)
    pending = billing is not None and billing.state == "ProrationPending"
    bindings.payments.invoices[CUSTOMER] = Decimal(CAPTURE["amount"] if pending else "30")
    if hour == 0:
        setup(runtime, runner)
    # A restart catches up first: timers missed while down fire, in order, then waits are
    # checked again.
    runtime.fire_due()
    runtime.deliver_outbox()
    capture(runtime)  # a worker killed between the charge and its capture
    result = runner.start("SubscriptionUpgrade", CUSTOMER, UPGRADE)
    if capture(runtime):  # the run charged as it resumed: it goes on once captured
        result = runner.resume(result.flow_id)
    print(json.dumps({"hour": hour, "status": result.status}), flush=True)
    for line in sys.stdin:
        for _ in range(int(line)):
            if result.finished:
                break
            hour += 1
            clock.advance(HOUR)
            runtime.fire_due()
            runtime.deliver_outbox()
            (result,) = runner.resume_all() or (runner.result(result.flow_id),)
            if capture(runtime):  # the run charged: it goes on once the charge is captured
                (result,) = runner.resume_all() or (runner.result(result.flow_id),)
            print(json.dumps({"hour": hour, "status": result.status}), flush=True)
        if result.finished:
            break
    runtime.close()


if __name__ == "__main__":
    main()
