"""A process that runs flows until it is killed: `python flow_crash_worker.py DB KEYS COUNT
[CLAIM_LEASE_MS]`. `load` is the same world for `autonomic worker --app`. With
$FLOW_HANG_AT = "INSTANCE:STEP" it stops for good before that step (to be killed there).

For customers c0..c{COUNT-1}, in order: the signup flow (parallel), a setup of raw dispatches
(each with an event id, so a repeat after a restart is deduplicated), then the cancellation
saga; every third customer's saga fails at a step, so it compensates, and each of its
compensations does not answer at its first attempt in each process (it is tried again from the
store, with backoff, until it is answered). With $FLOW_STEPS_UNANSWERED set, the refund of
the customers after those (c1, c4, ...) and the identity check of the signups after them (c2,
c5, ...) do not answer at their first attempt in each process either: the run waits and tries
the step again from the store.
On start it resumes every unfinished run first. One JSON line per finished run:
{"flow_id", "flow", "status"}.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from autonomic.runtime.demo import _Bindings
from autonomic.runtime.errors import InstanceExists
from autonomic.runtime.flows import FlowResult, FlowRunner, NoReply, StepContext, StepFailed
from autonomic.runtime.keys import load_signer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.timers import SystemClock
from flow_world import load_world, marketplace

SAGA = ("calculate_refund", "issue_refund", "suspend_entitlements", "archive_subscription")


def failing_step(customer: str) -> str | None:
    number = int(customer[1:])
    return SAGA[number // 3 % 4] if number % 3 == 0 else None


# The steps and compensations that have not answered yet in this process (see `inject`).
UNANSWERED: set[tuple[str, str, str]] = set()


def unanswered_step(customer: str) -> str | None:
    """The forward step of this customer's flows that does not answer at first."""
    if not os.environ.get("FLOW_STEPS_UNANSWERED"):
        return None
    number = int(customer[1:])
    return (None, "issue_refund", "identity")[number % 3]


def inject(ctx: StepContext) -> None:
    first = (ctx.flow_id, ctx.step, ctx.phase) not in UNANSWERED
    if first and (ctx.phase == "undo" or unanswered_step(ctx.instance) == ctx.step):
        # Not answered at its first attempt in a process: the run waits (compensating, or
        # waiting for the step) and tries it again from the store.
        UNANSWERED.add((ctx.flow_id, ctx.step, ctx.phase))
        raise NoReply(f"{ctx.step} not answered yet")
    if ctx.phase == "do" and os.environ.get("FLOW_HANG_AT") == f"{ctx.instance}:{ctx.step}":
        # Stop here for good (to be killed): the run's earlier steps are committed.
        print(json.dumps({"hang": ctx.flow_id}), flush=True)
        threading.Event().wait()
    saga_step = ctx.flow == "SubscriptionCancellation" and ctx.phase == "do"
    if saga_step and failing_step(ctx.instance) == ctx.step:
        raise StepFailed(f"injected failure at {ctx.step}")


def report(result: FlowResult) -> None:
    if result.finished:
        line = {"flow_id": result.flow_id, "flow": result.flow, "status": result.status}
        print(json.dumps(line), flush=True)


def setup(runtime: Runtime, customer: str) -> None:
    """Make the customer active and paid; every write has an event id, so it runs once."""

    def create(machine: str) -> None:
        with contextlib.suppress(InstanceExists):  # made by the signup flow
            runtime.governor(machine).create(customer, event_id=f"setup-{customer}-{machine}")

    create("Billing")
    create("Entitlement")
    steps = [
        ("Entitlement", "Approve", {"approver": "vendor-admin"}),
        (
            "Subscription",
            "ConvertTrial",
            {
                "customer_id": customer,
                "payment_method_id": "pm",
                "invoice_id": f"inv-{customer}",
                "amount": "30",
            },
        ),
    ]
    for index, (machine, event, payload) in enumerate(steps):
        runtime.governor(machine).dispatch(
            customer, event, payload, event_id=f"setup-{customer}-{index}"
        )
    runtime.deliver_outbox()
    paid = {
        "customer_id": customer,
        "transaction_id": "t1",
        "amount": "30",
        "idempotency_key": f"inv-{customer}",
    }
    runtime.governor("Billing").dispatch(
        customer, "PaymentSucceeded", paid, event_id=f"setup-{customer}-paid"
    )
    runtime.deliver_outbox()


def remember_invoices(bindings: _Bindings, count: int) -> None:
    """The processor's memory of each invoice (a restarted worker has lost its own)."""
    bindings.payments.invoices.update({f"c{i}": Decimal("30") for i in range(count)})


def main() -> None:
    db, keys, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    lease = {"claim_lease_ms": int(sys.argv[4])} if len(sys.argv) > 4 else {}
    runtime, runner, bindings = marketplace(
        SQLiteStore(db), signer=load_signer(keys), before_step=inject, clock=SystemClock(), **lease
    )
    remember_invoices(bindings, count)
    for result in runner.resume_all():
        report(result)
    for number in range(count):
        customer = f"c{number}"
        profile = {
            "customer_id": customer,
            "email": f"{customer}@example.com",
            "country": "DE",
            "product_id": "p",
            "tier": "professional",
        }
        signup = runner.start("CustomerSignup", customer, profile)
        report(signup)
        setup(runtime, customer)
        cancel = {"customer_id": customer, "request_id": f"cancel-{customer}", "reason": "bye"}
        report(runner.start("SubscriptionCancellation", customer, cancel))
    # Steps and compensations that did not answer are tried again when due (`next_wake`).
    while (wake := runner.next_wake()) is not None:
        time.sleep(max(0, wake - runtime.clock.now_ms()) / 1000)
        for result in runner.resume_all():
            report(result)
    print(json.dumps({"done": True}), flush=True)
    runtime.close()


def load(runtime: Runtime) -> FlowRunner:
    """`autonomic worker --app flow_crash_worker:load`: the governors and the flows, with the
    same injected failures, for runs of COUNT = $FLOW_CUSTOMERS customers."""
    runner, bindings = load_world(runtime, before_step=inject)
    remember_invoices(bindings, int(os.environ.get("FLOW_CUSTOMERS", "24")))
    return runner


if __name__ == "__main__":
    main()
