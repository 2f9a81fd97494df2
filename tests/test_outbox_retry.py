"""An outbox delivery whose receiver's outside call gets no answer (the card processor times
out, it and its backup are unreachable, the tenant's breaker is open, the tenant's bulkhead is
full) stays pending and is tried again with the jitter backoff, under the same event id and
idempotency key, until the processor answers: the renewal's charge is made once and Billing
enters its ladder. Only a refusal fails a delivery at once; one unanswered for 24 h is given
up, and its refusal notice tells the sender. On SQLite and PostgreSQL, with virtual time."""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import pytest
from autonomic.runtime.demo import _Payments
from autonomic.runtime.dispatch import DispatchRequest
from autonomic.runtime.errors import ActionFailed
from autonomic.runtime.keys import Signer
from autonomic.runtime.outbox import GIVE_UP_MS
from autonomic.runtime.resilience import (
    BulkheadFull,
    ServiceFailure,
    Unavailable,
    dispatch_in_chunks,
)
from autonomic.runtime.resilience.backoff import retry_later_ms
from autonomic.runtime.results import Delivery
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.base import Store
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.timers import VirtualClock
from conftest import Stores
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flow_world import marketplace
from test_flows import active_customer, state
from test_refusal_notices import DOWNGRADE

CUSTOMER = "c1"
RENEWAL = {
    "customer_id": CUSTOMER,
    "invoice_id": f"inv-{CUSTOMER}-2",
    "amount": "99.00",
    "period_end": "2026-02-01T00:00:00+00:00",
}


class Card:
    """The card processor and its backup: down (raising `down`) or up (charging through the
    demo's payments, whose invoices Billing's amount guard reads); it can hold a tenant's
    calls until released, as a processor that stopped answering them."""

    def __init__(self) -> None:
        self.payments: _Payments | None = None
        self.down: type[Exception] | None = None
        self.down_for: set[str] = set()  # only these instances' calls fail, when not empty
        self.calls: list[tuple[str, str | None, str | None]] = []
        self.charged: list[tuple[str, str | None, str | None]] = []
        self.hold: set[str] = set()
        self.holding = 0
        self.release = threading.Event()
        self._lock = threading.Lock()

    def primary(self, ctx: Any) -> object:
        if getattr(ctx.payload, "customer_id", None) in self.hold:
            with self._lock:
                self.holding += 1
            assert self.release.wait(30)
        return self._answer(ctx, self.down, "submit_charge")

    def backup(self, ctx: Any) -> object:
        return self._answer(ctx, None if self.down is None else Unavailable, "backup")

    def _answer(self, ctx: Any, failure: type[Exception] | None, route: str) -> object:
        call = (ctx.instance, ctx.event_id, ctx.idempotency_key)
        self.calls.append(call)
        if failure is not None and (not self.down_for or ctx.instance in self.down_for):
            raise failure(f"{route}: processor down")
        self.charged.append(call)
        assert self.payments is not None
        if route == "backup":
            return self.payments.charge_backup_processor(ctx)
        return self.payments.submit_charge(ctx)


def world(
    store: Store, signer: Signer | None = None, customers: Sequence[str] = (CUSTOMER,)
) -> tuple[Runtime, VirtualClock, Card]:
    """The marketplace on `store`, its card processor `Card`, `customers` active and paid."""
    card = Card()
    bound = {"submit_charge": card.primary, "charge_backup_processor": card.backup}
    runtime, runner, bindings = marketplace(store, signer=signer, actions={"Billing": bound})
    card.payments = bindings.payments
    for customer in customers:
        active_customer(runtime, runner, customer)
        bindings.payments.invoices[customer] = Decimal("99.00")
    card.calls.clear()
    card.charged.clear()
    clock = runtime.clock
    assert isinstance(clock, VirtualClock)
    return runtime, clock, card


def renew(runtime: Runtime) -> Delivery:
    """The billing calendar's RenewalDue, and the outbox's delivery of its charge request."""
    runtime.governor("Subscription").dispatch(CUSTOMER, "RenewalDue", RENEWAL)
    (delivery,) = runtime.deliver_outbox()
    assert delivery.message.event == "ChargeRequested"
    return delivery


def until_delivered(runtime: Runtime, clock: VirtualClock, first: Delivery) -> list[Delivery]:
    """Each retry of the delivery when it is due (never before: nothing is delivered a
    millisecond early), until it is no longer retrying."""
    tries = [first]
    while tries[-1].status == "retrying":
        due = tries[-1].message.retry_at_ms
        assert due is not None
        clock.advance(due - 1 - clock.now_ms())
        assert runtime.deliver_outbox() == []
        clock.advance(1)
        (delivery,) = runtime.deliver_outbox()
        tries.append(delivery)
    return tries


def check_waited_then_charged_once(
    runtime: Runtime, clock: VirtualClock, card: Card, first: Delivery
) -> list[Delivery]:
    """Called right after `first`, the delivery that met the outage."""
    message = first.message
    assert first.status == "retrying", first
    assert (message.attempts, message.retry_at_ms) == (1, clock.now_ms() + retry_later_ms(1))
    assert state(runtime, "Billing", CUSTOMER) == "Current"  # nothing taken yet
    card.down = None
    card.hold.clear()
    tries = until_delivered(runtime, clock, first)
    assert tries[-1].status == "delivered"
    assert state(runtime, "Billing", CUSTOMER) == "AwaitingPayment"
    dues = [t.message.retry_at_ms or 0 for t in tries[:-1]]
    waits = [later - earlier for earlier, later in itertools.pairwise(dues)]
    assert waits == [retry_later_ms(n) for n in range(2, len(tries))]  # the jitter backoff
    # One charge, under the delivery's event id and idempotency key, as was every attempt.
    same = (CUSTOMER, message.event_id, f"inv-{CUSTOMER}-2")
    assert card.charged == [same]
    assert set(card.calls) <= {same}
    assert runtime.store.outbox(kind="event") == []
    assert runtime.store.outbox(kind="event", status="failed") == []
    (row,) = [
        m
        for m in runtime.store.outbox(kind="event", status=None)
        if m is not None and m.event_id == message.event_id
    ]
    assert (row.status, row.attempts, row.retry_at_ms) == ("delivered", 0, None)
    # Billing's ladder runs from here: the processor's answer never comes, so after 1 h the
    # first attempt counts as failed.
    clock.advance("1h")
    runtime.fire_due()
    assert state(runtime, "Billing", CUSTOMER) != "AwaitingPayment"
    return tries


def outage(runtime: Runtime, clock: VirtualClock, card: Card, cause: str) -> None:
    card.down = TimeoutError if cause == "timeout" else Unavailable
    first = renew(runtime)
    expected = "TimeoutError" if cause == "timeout" else "Unavailable: backup"
    assert first.error is not None and expected in first.error
    tries = check_waited_then_charged_once(runtime, clock, card, first)
    assert len(tries) == 2  # the processor was back for the first retry


@pytest.mark.parametrize("cause", ["timeout", "unavailable"])
def test_a_renewal_charge_the_processor_does_not_answer_is_retried_and_made_once(
    cause: str, tmp_path: Any
) -> None:
    runtime, clock, card = world(SQLiteStore(tmp_path / "s.db"))
    with runtime:
        outage(runtime, clock, card, cause)


def test_the_retry_survives_a_restart_on_postgres(postgres_stores: Stores) -> None:
    """The attempt count and due time are stored: a new runtime (a fleet worker) takes the
    delivery when it is due, not before, and charges once."""
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime, clock, card = world(postgres_stores.open("s"), signer)
    with runtime:
        card.down = TimeoutError
        first = renew(runtime)
        assert first.status == "retrying" and first.message.attempts == 1
        again = card.calls[:]
    assert len(again) == 3  # the policy's three attempts, all timed out
    runtime, _, bindings = marketplace(
        postgres_stores.open("s"),
        signer=signer,
        clock=clock,
        actions={
            "Billing": {"submit_charge": card.primary, "charge_backup_processor": card.backup}
        },
    )
    with runtime:
        card.payments = bindings.payments
        bindings.payments.invoices[CUSTOMER] = Decimal("99.00")
        (stored,) = runtime.store.outbox(kind="event")
        assert (stored.attempts, stored.retry_at_ms) == (1, first.message.retry_at_ms)
        card.down = None
        (done,) = until_delivered(runtime, clock, first)[1:]
        assert done.status == "delivered"
        assert card.charged == [(CUSTOMER, first.message.event_id, f"inv-{CUSTOMER}-2")]
        assert state(runtime, "Billing", CUSTOMER) == "AwaitingPayment"
        assert postgres_stores.rows("s", "SELECT count(*) FROM outbox_retries") == [(0,)]


def test_a_renewal_charge_meeting_an_open_breaker_waits_for_the_probe(tmp_path: Any) -> None:
    """The tenant's breaker opened on its earlier charges (11 server errors): the delivery
    fails fast (CircuitOpen, the processor not called), waits, and is made once by the
    half-open probe 30 s after the opening."""
    runtime, clock, card = world(SQLiteStore(tmp_path / "s.db"))
    with runtime:
        billing = runtime.governor("Billing")
        card.down = ServiceFailure
        for n in range(11):
            billing.create(f"{CUSTOMER}-old-{n}")
            charge = {
                "customer_id": CUSTOMER,
                "invoice_id": f"o{n}",
                "amount": "9",
                "idempotency_key": f"o{n}",
            }
            with pytest.raises(ActionFailed):
                billing.dispatch(f"{CUSTOMER}-old-{n}", "ChargeRequested", charge)
        opened = clock.now_ms()
        card.calls.clear()
        first = renew(runtime)
        assert first.error is not None and "CircuitOpen" in first.error
        assert card.calls == []  # failed fast
        tries = check_waited_then_charged_once(runtime, clock, card, first)
        assert len(tries) > 2  # retried while the breaker stayed open
        assert tries[-2].message.retry_at_ms >= opened + 30_000  # type: ignore[operator]


def test_a_renewal_charge_refused_by_a_full_bulkhead_waits_for_a_slot(tmp_path: Any) -> None:
    """The tenant has 4 charges in flight (its bulkhead's cap) that the processor holds: the
    renewal's delivery is refused BulkheadFull, waits, and is made once after they end."""
    runtime, clock, card = world(SQLiteStore(tmp_path / "s.db"))
    with runtime:
        billing = runtime.governor("Billing")
        card.hold = {CUSTOMER}
        threads = []
        for n in range(4):
            account = f"{CUSTOMER}-sub-{n}"
            billing.create(account)
            charge = {
                "customer_id": CUSTOMER,
                "invoice_id": f"s{n}",
                "amount": "9",
                "idempotency_key": f"s{n}",
            }
            threads.append(
                threading.Thread(target=billing.dispatch, args=(account, "ChargeRequested", charge))
            )
            threads[-1].start()
        while card.holding < 4:
            threads[0].join(0.001)
        first = renew(runtime)
        assert first.error is not None and BulkheadFull.__name__ in first.error
        card.release.set()
        for thread in threads:
            thread.join(30)
        card.charged = [c for c in card.charged if c[0] == CUSTOMER]
        card.calls = [c for c in card.calls if c[0] == CUSTOMER]
        check_waited_then_charged_once(runtime, clock, card, first)


def test_a_refusal_still_fails_the_delivery_at_once(tmp_path: Any) -> None:
    """A declined card (the processor answered) is Billing's refusal: failed, not retried."""
    runtime, clock, card = world(SQLiteStore(tmp_path / "s.db"))
    with runtime:
        card.down = ValueError
        first = renew(runtime)
        assert first.status == "failed" and first.error is not None
        assert first.error.startswith("R008 ") and "ValueError" in first.error
        clock.advance("1h")
        assert runtime.deliver_outbox() == []
        assert len(card.calls) == 1


def test_a_delivery_unanswered_for_a_day_is_given_up_and_its_sender_told(tmp_path: Any) -> None:
    """A downgrade's quota reallocation (`if refused TierChangeFailed(...)`) meets a quota
    service that stays unreachable: retried for 24 h after the emit, then failed with the
    reason, and the notice moves Subscription back to Active."""

    def reallocate(ctx: Any) -> None:
        raise Unavailable("quota service unreachable")

    runtime, runner, _ = marketplace(
        SQLiteStore(tmp_path / "s.db"), actions={"QuotaSla": {"reallocate_quota": reallocate}}
    )
    clock = runtime.clock
    assert isinstance(clock, VirtualClock)
    with runtime:
        active_customer(runtime, runner, CUSTOMER)
        subscription = runtime.governor("Subscription")
        subscription.dispatch(
            CUSTOMER, "DowngradeRequested", {"customer_id": CUSTOMER, **DOWNGRADE}
        )
        shown = [(d.message.event, d.status) for d in runtime.deliver_outbox()]
        assert shown == [("GrantEntitlements", "delivered"), ("AllocateQuota", "retrying")]
        clock.advance(GIVE_UP_MS - 1)
        (waiting,) = runtime.deliver_outbox()
        assert waiting.status == "retrying" and waiting.message.attempts == 2
        clock.advance(retry_later_ms(2))
        shown = [(d.message.event, d.status) for d in runtime.deliver_outbox()]
        assert shown == [("AllocateQuota", "failed"), ("TierChangeFailed", "delivered")]
        (failed,) = runtime.store.outbox(kind="event", status="failed")
        assert failed.error is not None
        assert "Unavailable: quota service unreachable" in failed.error
        assert "no answer within 24 h of the emit, 3 attempts: given up" in failed.error
        assert state(runtime, "Subscription", CUSTOMER) == "Active"


def test_a_billing_cycle_delivers_its_charges_in_one_commit_per_chunk(tmp_path: Any) -> None:
    """RenewalDue to six customers in one chunk, then their six charge requests delivered
    and marked in the commits of their dispatches: one per chunk of four; the charge the
    processor does not answer is left pending in one more commit, and delivered later."""
    customers = [f"cycle-{n}" for n in range(6)]
    runtime, clock, card = world(SQLiteStore(tmp_path / "s.db"), customers=customers)
    with runtime:
        renewals = [
            DispatchRequest(c, "RenewalDue", {**RENEWAL, "customer_id": c, "invoice_id": f"r-{c}"})
            for c in customers
        ]
        before = runtime.commit_batches
        dispatch_in_chunks(runtime.governor("Subscription"), renewals, chunk_size=6)
        assert runtime.commit_batches - before == 1
        card.down_for = {"cycle-3"}
        card.down = TimeoutError
        deliveries = runtime.deliver_outbox(chunk_size=4)
        assert runtime.commit_batches - before == 1 + 2 + 1
        statuses = {d.message.target_instance: d.status for d in deliveries}
        assert statuses == {c: "retrying" if c == "cycle-3" else "delivered" for c in customers}
        assert [m.target_instance for m in runtime.store.outbox(kind="event")] == ["cycle-3"]
        card.down = None
        clock.advance("1s")
        before = runtime.commit_batches
        assert [d.status for d in runtime.deliver_outbox()] == ["delivered"]
        assert runtime.commit_batches - before == 1
        assert sorted(c[0] for c in card.charged) == customers
        for customer in customers:
            assert state(runtime, "Billing", customer) == "AwaitingPayment"


def test_a_forged_retry_time_delays_a_delivery_no_more_than_a_backoff(tmp_path: Any) -> None:
    """outbox_retries is not sealed (a hint, like a lease): a retry time within a minute is
    honoured, one pushed ten days ahead by someone with the database is no backoff's and is
    ignored (more than RETRY_LATER_CAP_MS ahead)."""
    path = tmp_path / "s.db"
    runtime, clock, card = world(SQLiteStore(path))
    with runtime:
        card.down = TimeoutError
        first = renew(runtime)
        assert first.status == "retrying"
        with sqlite3.connect(path) as db:
            db.execute("UPDATE outbox_retries SET retry_at_ms = ?", (clock.now_ms() + 5_000,))
        clock.advance(4_999)
        assert runtime.deliver_outbox() == []  # up to a minute ahead: a backoff's, honoured
        with sqlite3.connect(path) as db:
            db.execute("UPDATE outbox_retries SET retry_at_ms = retry_at_ms + 864000000")
        card.down = None
        assert [d.status for d in runtime.deliver_outbox()] == ["delivered"]  # not 10 days
        assert [c[0] for c in card.charged] == [CUSTOMER]


def test_a_delivery_whose_claim_a_killed_process_holds_waits_for_its_lease(tmp_path: Any) -> None:
    """A process killed while it called the processor for this charge left the claim on its
    event id: dispatch_many does not wait for a held claim (R025), so that delivery is made
    alone, as `dispatch` makes it, once the dead holder's lease has run out; charged once."""
    runtime, _, card = world(SQLiteStore(tmp_path / "s.db"))
    with runtime:
        runtime.governor("Subscription").dispatch(CUSTOMER, "RenewalDue", RENEWAL)
        (message,) = runtime.store.outbox(kind="event")
        assert runtime.store.claim_outside([("Billing", "event", message.event_id)], "dead", 300)
        (delivery,) = runtime.deliver_outbox()
        assert delivery.status == "delivered"
        assert [c[0] for c in card.charged] == [CUSTOMER]
        assert state(runtime, "Billing", CUSTOMER) == "AwaitingPayment"
