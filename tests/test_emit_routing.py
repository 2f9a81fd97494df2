"""Emits routed by kept instance data (`keep customer_id`, `emit ... to customer_id`): a
Compliance dispute case whose id is not the customer's reaches that customer's Billing on
every path (decided, withdrawn, the 7-day concession timer across a restart, and the
PaymentProcessed flow's Disputed branch), on the memory store, SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from autonomic.runtime.errors import InputRejected, StoreIntegrityError
from autonomic.runtime.keys import Signer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.base import Store, Transaction
from autonomic.runtime.store.memory import MemoryStore
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.timers import VirtualClock
from conftest import Stores
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flow_world import START_MS, marketplace

DAY_MS = 86_400_000
DISPUTE = {"transaction_id": "txn-1", "amount": "20.00", "reason": "chargeback"}


def disputed(runtime: Runtime, customer: str, case: str) -> None:
    """The customer's Billing holds a disputed charge; the case investigates it."""
    billing = runtime.governor("Billing")
    billing.create(customer)
    billing.dispatch(customer, "PaymentDisputed", {"customer_id": customer, **DISPUTE})
    compliance = runtime.governor("Compliance")
    compliance.create(case)
    compliance.dispatch(case, "InvestigateDispute", {"customer_id": customer, **DISPUTE})
    assert runtime.governor("Billing").get(customer).state == "Disputed"  # type: ignore[union-attr]


def delivered_to(runtime: Runtime, event: str) -> list[tuple[str, str, str]]:
    """(target machine, target instance, status) of each delivery of `event` just made."""
    return [
        (d.message.target_machine, d.message.target_instance, d.status)
        for d in runtime.deliver_outbox()
        if d.message.event == event
    ]


def decide(runtime: Runtime, case: str) -> None:
    compliance = runtime.governor("Compliance")
    evidence = {"evidence_ref": "ev-1", "submitted_at": "2026-01-02T00:00:00+00:00"}
    compliance.dispatch(case, "EvidenceSubmitted", evidence)
    compliance.dispatch(case, "DisputeDecided", {"outcome": "customer"})


def withdraw(runtime: Runtime, case: str) -> None:
    runtime.governor("Compliance").dispatch(case, "DisputeWithdrawn", {"note": "withdrawn"})


PATHS: dict[str, tuple[Callable[[Runtime, str], None], str]] = {
    "decided": (decide, "DisputeUpheld"),
    "withdrawn": (withdraw, "DisputeRejected"),
}


def check_paths(runtime: Runtime) -> None:
    for path, (act, outcome) in PATHS.items():
        customer, case = f"cust-{path}", f"case-{path}"
        disputed(runtime, customer, case)
        act(runtime, case)
        assert delivered_to(runtime, outcome) == [("Billing", customer, "delivered")]
        assert runtime.governor("Billing").get(customer).state == "Current"  # type: ignore[union-attr]
        assert runtime.governor("Billing").get(case) is None
        assert runtime.governor("Compliance").get(case).state == "Resolved"  # type: ignore[union-attr]


def test_a_dispute_reaches_its_customer_on_the_memory_store() -> None:
    runtime, _, _ = marketplace(MemoryStore())
    with runtime:
        check_paths(runtime)


def test_a_dispute_reaches_its_customer_on_durable_stores(stores: Stores) -> None:
    runtime, _, _ = marketplace(stores.open("m"))
    with runtime:
        check_paths(runtime)
        data = runtime.store.get_instance_data("Compliance", "case-decided")
        assert json.loads(data or "") == {"customer_id": "cust-decided"}
        assert runtime.store.get_instance_data("Compliance", "cust-decided") is None


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_the_seven_day_concession_reaches_the_customer(kind: str, tmp_path: Path) -> None:
    """The timer has no payload: its emit reads the customer id the case kept. On SQLite the
    process stops while the timer waits, and a new one fires it."""
    path = tmp_path / "concede.db"

    def store() -> Store:
        return MemoryStore() if kind == "memory" else SQLiteStore(path)

    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    clock = VirtualClock(START_MS)
    runtime, _, _ = marketplace(store(), signer=signer, clock=clock)
    disputed(runtime, "cust-7", "case-7")
    if kind == "sqlite":
        runtime.close()
        clock = VirtualClock(START_MS)
        runtime, _, _ = marketplace(store(), signer=signer, clock=clock)
    with runtime:
        clock.advance(7 * DAY_MS)
        fired = runtime.fire_due()
        # The ladder's two notices (3d, 6d), then its end: the concession.
        moves = [f.result.to_state for f in fired if f.timer.machine == "Compliance"]
        assert moves == ["Investigating", "Investigating", "Resolved"]
        assert delivered_to(runtime, "DisputeUpheld") == [("Billing", "cust-7", "delivered")]
        assert runtime.governor("Billing").get("cust-7").state == "Current"  # type: ignore[union-attr]
        assert runtime.governor("Billing").get("case-7") is None


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_the_payment_flows_disputed_branch_reaches_the_customer(kind: str, tmp_path: Path) -> None:
    store: Store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "flow.db")
    runtime, runner, _ = marketplace(store)
    with runtime:
        customer, case = "buyer-9", "case-4711"
        billing = runtime.governor("Billing")
        billing.create(customer)
        charge = {"invoice_id": "inv-9", "amount": "20.00", "idempotency_key": "inv-9"}
        billing.dispatch(customer, "ChargeRequested", {"customer_id": customer, **charge})
        inputs = {
            "outcome": "Disputed",
            "customer_id": customer,
            "case_id": case,
            "idempotency_key": "inv-9",
            **DISPUTE,
        }
        assert runner.start("PaymentProcessed", customer, inputs).status == "completed"
        assert runtime.governor("Compliance").get(case).state == "Investigating"  # type: ignore[union-attr]
        decide(runtime, case)
        assert delivered_to(runtime, "DisputeUpheld") == [("Billing", customer, "delivered")]
        # The charge disputed while still unpaid: the retry ladder collects it now.
        assert billing.get(customer).state == "Retry1"  # type: ignore[union-attr]


def test_a_malformed_kept_id_refuses_the_row_that_keeps_it() -> None:
    runtime, _, _ = marketplace(MemoryStore())
    with runtime:
        compliance = runtime.governor("Compliance")
        compliance.create("case-x")
        bad = {"customer_id": "line\nbreak", **DISPUTE}
        with pytest.raises(InputRejected, match="customer_id"):
            compliance.dispatch("case-x", "InvestigateDispute", bad)
        assert compliance.get("case-x").state == "Opened"  # type: ignore[union-attr]
        assert runtime.store.get_instance_data("Compliance", "case-x") is None


def test_unreadable_kept_data_fails_the_emit_and_writes_nothing(tmp_path: Path) -> None:
    runtime, _, _ = marketplace(SQLiteStore(tmp_path / "bad.db"))
    with runtime:
        disputed(runtime, "cust-b", "case-b")

        def tamper(txn: Transaction) -> None:
            txn.save_instance_data("Compliance", "case-b", "[1, 2]")

        runtime.store.run([tamper])
        with pytest.raises(StoreIntegrityError, match="kept data"):
            withdraw(runtime, "case-b")
        assert runtime.governor("Compliance").get("case-b").state == "Investigating"  # type: ignore[union-attr]
        assert runtime.store.outbox(kind="event") == []


@pytest.mark.parametrize("amount", ["30", "31"])
def test_an_outbox_delivery_carries_its_payloads_idempotency_key(amount: str) -> None:
    """Subscription emits Billing.ChargeRequested(idempotency_key = invoice_id); the
    processor's webhook charged that invoice under the same key before the delivery. The same
    request: the delivery gets the webhook's stored result, charged once. Another amount: the
    receiver refuses the key (R009), the delivery is marked failed (not raised out of
    deliver_outbox, which would leave it pending for ever), nothing charged again."""
    runtime, runner, bindings = marketplace(MemoryStore())
    with runtime:
        customer = "buyer-1"
        signup = {
            "email": "ops@buyer.example",
            "country": "DE",
            "product_id": "p",
            "tier": "starter",
        }
        assert (
            runner.start("CustomerSignup", customer, {"customer_id": customer, **signup}).status
            == "completed"
        )
        billing = runtime.governor("Billing")
        billing.create(customer)
        invoice = {"customer_id": customer, "invoice_id": "inv-1"}
        convert = {**invoice, "payment_method_id": "pm", "amount": "30"}
        runtime.governor("Subscription").dispatch(customer, "ConvertTrial", convert)
        webhook = {**invoice, "amount": amount, "idempotency_key": "inv-1"}
        billing.dispatch(customer, "ChargeRequested", webhook, "webhook", idempotency_key="inv-1")
        [delivery] = [d for d in runtime.deliver_outbox() if d.message.event == "ChargeRequested"]
        if amount == "30":
            assert delivery.status == "delivered"
            assert delivery.result is not None and delivery.result.duplicate
        else:
            assert delivery.status == "failed" and delivery.result is None
            assert delivery.error is not None and delivery.error.startswith("R009 ")
        assert bindings.payments.submitted == ["inv-1"]
        assert runtime.deliver_outbox() == []
