"""Billing with a scripted payment processor: the generated machine with its PaymentProcessor
policy (retry, breaker, fallback, bulkhead), for the resilience tests and their subprocesses."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from autonomic.generated.billing import MACHINE as BILLING
from autonomic.runtime.keys import load_signer
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.resilience import ServiceFailure
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.base import Store
from autonomic.runtime.timers import Clock

START = 1_900_000_000_000
# A charge of customer c1, as the claim and breaker tests send it.
CHARGE = {"customer_id": "c1", "invoice_id": "i1", "amount": "99.00", "idempotency_key": "k1"}


class Processor:
    """A payment processor whose answers the test scripts: each call pops the next outcome
    (an exception class to raise, or None to capture)."""

    def __init__(self) -> None:
        self.outcomes: list[type[Exception] | None] = []
        self.failing: type[Exception] | None = None
        self.failing_for: set[str] = set()  # tenants whose charges always fail (ServiceFailure)
        self.charged: list[str] = []

    def __call__(self, ctx: Any) -> dict[str, str]:
        outcome = self.outcomes.pop(0) if self.outcomes else self.failing
        if ctx.instance in self.failing_for:
            outcome = ServiceFailure
        if outcome is not None:
            raise outcome(f"processor said no to {ctx.instance}")
        self.charged.append(ctx.instance)
        return {"captured": ctx.instance}


def noop(ctx: Any) -> None:
    return None


def yes(ctx: Any) -> bool:
    return True


def open_billing(
    store: Store,
    keys: Path,
    clock: Clock,
    primary: Callable[[Any], object],
    backup: Callable[[Any], object] | None = None,
) -> Runtime:
    """A signing runtime on `store` with Billing loaded: `primary` submits charges (and
    retries them), `backup` is the fallback processor."""
    runtime = Runtime(store, clock=clock, sealer=LedgerSealer(load_signer(keys), "sign-each"))
    actions: dict[str, Callable[[Any], object]] = {name: noop for name in BILLING.actions}
    actions["submit_charge"] = actions["retry_charge"] = primary
    actions["charge_backup_processor"] = backup or Processor()
    runtime.load(BILLING, {name: yes for name in BILLING.guards}, actions)
    return runtime


def charge(runtime: Runtime, customer: str, event_id: str | None = None) -> None:
    """Create the customer's Billing if needed and request a charge."""
    governor = runtime.governor("Billing")
    if governor.get(customer) is None:
        governor.create(customer)
    governor.dispatch(
        customer,
        "ChargeRequested",
        {"customer_id": customer, "invoice_id": "inv", "amount": "99.00", "idempotency_key": "k"},
        event_id=event_id,
    )
