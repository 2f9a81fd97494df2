"""Refusal notices (`emit ... if refused Notice(...)`): a refused outbox delivery is told to its
sender at once, exactly once. A downgrade whose Entitlement step is refused ends with
TierChangeFailed and the restore emitted, without waiting for Subscription's 2h timeout, on the
memory store, SQLite and PostgreSQL; a repeated refusal or a redelivered notice runs nothing
twice."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from autonomic.compiler.codegen import generate_module
from autonomic.compiler.parser import parse_text
from autonomic.runtime.demo import _Bindings
from autonomic.runtime.flows import FlowRunner
from autonomic.runtime.keys import Signer
from autonomic.runtime.outbox import _deliver_all, mark
from autonomic.runtime.results import Delivery
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.base import Store, Transaction
from autonomic.runtime.store.memory import MemoryStore
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.timers import VirtualClock
from conftest import Stores
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flow_world import marketplace
from strategies import load_module
from test_flows import active_customer

DOWNGRADE = {"current_tier": "professional", "new_tier": "starter"}


def downgrade_refused(runtime: Runtime, customer: str) -> list[Delivery]:
    """An active customer whose Entitlement is suspended (it takes no grant) downgrades;
    the outbox delivers what the downgrade emitted."""
    runtime.governor("Entitlement").dispatch(customer, "Suspend", {"reason": "fraud check"})
    subscription = runtime.governor("Subscription")
    subscription.dispatch(customer, "DowngradeRequested", {"customer_id": customer, **DOWNGRADE})
    assert subscription.get(customer).state == "Downgrading"  # type: ignore[union-attr]
    return runtime.deliver_outbox()


def check_the_downgrade_ends_at_once(runtime: Runtime, runner: FlowRunner, customer: str) -> None:
    active_customer(runtime, runner, customer)
    deliveries = downgrade_refused(runtime, customer)
    shown = [(d.message.target_machine, d.message.event, d.status) for d in deliveries]
    assert shown[:2] == [
        ("Entitlement", "GrantEntitlements", "failed"),
        ("Subscription", "TierChangeFailed", "delivered"),
    ]
    told = deliveries[1]
    assert told.result is not None and told.result.to_state == "Active"
    assert told.message.target_instance == customer
    assert told.message.machine == "Entitlement"  # the notice comes from the refuser
    assert [(e.machine, e.event) for e in told.result.emitted] == [
        ("Entitlement", "RestorePreviousTier"),
        ("QuotaSla", "RestoreQuota"),
    ]
    assert runtime.governor("Subscription").get(customer).state == "Active"  # type: ignore[union-attr]
    # The quota step was delivered: its notice is dropped, never sent.
    assert ("QuotaSla", "AllocateQuota", "delivered") in shown
    assert [d for d in shown if d[1] == "TierChangeFailed"] == [
        ("Subscription", "TierChangeFailed", "delivered")
    ]
    entries = [
        e
        for e in runtime.store.ledger_entries(machine="Subscription", instance=customer)
        if e.event == "TierChangeFailed"
    ]
    assert [(e.from_state, e.to_state, e.event_id) for e in entries] == [
        ("Downgrading", "Active", told.message.event_id)
    ]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_refused_downgrade_ends_at_once_with_tier_change_failed(
    kind: str, tmp_path: Path
) -> None:
    store: Store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "down.db")
    runtime, runner, _ = marketplace(store)
    with runtime:
        check_the_downgrade_ends_at_once(runtime, runner, "down-1")


def test_a_refused_downgrade_ends_at_once_on_durable_stores(stores: Stores) -> None:
    runtime, runner, _ = marketplace(stores.open("m", partitions=2))
    with runtime:
        check_the_downgrade_ends_at_once(runtime, runner, "down-2")


def test_a_repeated_refusal_or_a_redelivered_notice_runs_nothing_twice(tmp_path: Path) -> None:
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "twice.db"))
    with runtime:
        customer = "down-3"
        active_customer(runtime, runner, customer)
        deliveries = downgrade_refused(runtime, customer)
        grant, notice = deliveries[0].message, deliveries[1].message
        while runtime.deliver_outbox():  # the restores the notice emitted
            pass
        ledger = list(runtime.store.ledger_entries())
        outbox = runtime.store.outbox(status=None)

        # The refused grant delivered again (an operator's retry, a worker's lost lease) is
        # refused again, and releases no second notice; the notice delivered again is a
        # repeat of its event id: the stored result, no second transition, no second restore.
        def again(txn: Transaction) -> None:
            assert grant.id is not None and notice.id is not None
            txn.mark_outbox(grant.id, "pending", None)
            txn.mark_outbox(notice.id, "pending", None)

        runtime.store.run([again])
        repeated = runtime.deliver_outbox()
        shown = [(d.message.event, d.status) for d in repeated]
        assert shown == [("GrantEntitlements", "failed"), ("TierChangeFailed", "delivered")]
        assert repeated[1].result is not None
        assert repeated[1].result.version == deliveries[1].result.version  # type: ignore[union-attr]
        assert list(runtime.store.ledger_entries()) == ledger
        assert len(runtime.store.outbox(status=None)) == len(outbox)
        assert runtime.governor("Subscription").get(customer).state == "Active"  # type: ignore[union-attr]


def test_a_delivered_event_drops_its_notice(tmp_path: Path) -> None:
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "ok.db"))
    with runtime:
        customer = "down-4"
        active_customer(runtime, runner, customer)
        subscription = runtime.governor("Subscription")
        request = {"customer_id": customer, **DOWNGRADE}
        subscription.dispatch(customer, "DowngradeRequested", request)
        held = [m for m in runtime.store.outbox(status="held")]
        assert [(m.target_machine, m.target_instance, m.event) for m in held] == [
            ("Subscription", customer, "TierChangeFailed"),
            ("Subscription", customer, "TierChangeFailed"),
        ]
        assert [m.machine for m in held] == ["Entitlement", "QuotaSla"]
        deliveries = runtime.deliver_outbox()
        assert all(d.message.event != "TierChangeFailed" for d in deliveries)
        assert runtime.store.outbox(status="held") == []
        assert len(runtime.store.outbox(status="dropped")) == 2


def test_a_released_notice_is_delivered_after_a_restart(tmp_path: Path) -> None:
    """The process stops after the unit that marked the refusal and released the notice, and
    before the notice's delivery: the next process delivers it, once."""
    path = tmp_path / "restart.db"
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime, runner, _ = marketplace(SQLiteStore(path), signer=signer)
    customer = "down-5"
    active_customer(runtime, runner, customer)
    runtime.governor("Entitlement").dispatch(customer, "Suspend", {"reason": "fraud check"})
    request = {"customer_id": customer, **DOWNGRADE}
    runtime.governor("Subscription").dispatch(customer, "DowngradeRequested", request)
    [grant] = [m for m in runtime.store.outbox(kind="event") if m.event == "GrantEntitlements"]
    released = mark(runtime, grant, "failed", "R004 refused on purpose")
    assert released is not None and released.event == "TierChangeFailed"
    runtime.close()

    runtime, _, _ = marketplace(SQLiteStore(path), signer=signer)
    with runtime:
        deliveries = runtime.deliver_outbox()
        told = [d for d in deliveries if d.message.event == "TierChangeFailed"]
        assert [(d.status, d.message.event_id) for d in told] == [("delivered", released.event_id)]
        assert runtime.governor("Subscription").get(customer).state == "Active"  # type: ignore[union-attr]
        later = [d for d in runtime.deliver_outbox() if d.message.event == "TierChangeFailed"]
        assert later == []


PINGER = """
machine Pinger {
  event Ping
  event Refused { reason: str }
  initial state Idle {
    entry emit Ping if refused Refused(reason = "at creation")
    on Refused -> Waiting
  }
  state Waiting {
    after 1h emit Ping if refused Refused(reason = $event)
    on Refused -> Told
  }
  final state Told
}
"""


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_entry_and_timer_emits_tell_their_sender_too(kind: str, tmp_path: Path) -> None:
    """Ping is accepted nowhere: the entry's emit at `create` and the timer's emit are both
    refused, and each notice moves the instance on."""
    machine, diagnostics = parse_text(PINGER, "pinger.fsm")
    assert machine is not None and diagnostics == []
    module = load_module(generate_module(machine), tmp_path, "pinger")
    store: Store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path / "ping.db")
    clock = VirtualClock(0)
    with Runtime(store, clock=clock) as runtime:
        pinger = runtime.load(module.MACHINE, {}, {})
        pinger.create("p1")
        told = [(d.message.event, d.status) for d in runtime.deliver_outbox()]
        assert told == [("Ping", "failed"), ("Refused", "delivered")]
        assert pinger.get("p1").state == "Waiting"  # type: ignore[union-attr]
        clock.advance("1h")
        runtime.fire_due()
        deliveries = runtime.deliver_outbox()
        assert [(d.message.event, d.status) for d in deliveries] == told
        assert pinger.get("p1").state == "Told"  # type: ignore[union-attr]
        # $event in a timer's notice is the timer's id, as in the timer's own emits.
        assert deliveries[1].message.body == '{"reason":"Waiting/after/1h#0"}'


def test_a_notice_carries_the_receivers_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`if refused TierChangeFailed(reason = $refusal_message, refusal_code = $refusal_code)`:
    the notice's payload holds the code and message of Entitlement's actual refusal, also
    when it is delivered by a process started after the one that released it."""
    seen: list[Any] = []
    recorder = _Bindings._recorder

    def recording(self: _Bindings, machine: str, action: str) -> Callable[[Any], None]:
        inner = recorder(self, machine, action)

        def record(ctx: Any) -> None:
            if action == "record_downgrade_failure":
                seen.append(ctx.payload)
            inner(ctx)

        return record

    monkeypatch.setattr(_Bindings, "_recorder", recording)
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "why.db"), signer=signer)
    with runtime:
        active_customer(runtime, runner, "down-6")
        deliveries = downgrade_refused(runtime, "down-6")
    refusal = deliveries[0].error
    assert refusal is not None and refusal.startswith("R006 ")
    (told,) = seen
    assert (told.stage, told.refusal_code, told.reason) == ("entitlement", "R006", refusal[5:])
    assert "Suspended" in told.reason  # Entitlement's own words: the state that refused

    # Released, then the process stops before delivering it: the refusal is stored with it.
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "later.db"), signer=signer)
    with runtime:
        active_customer(runtime, runner, "down-7")
        runtime.governor("Entitlement").dispatch("down-7", "Suspend", {"reason": "fraud check"})
        subscription = runtime.governor("Subscription")
        subscription.dispatch(
            "down-7", "DowngradeRequested", {"customer_id": "down-7", **DOWNGRADE}
        )
        (grant,) = [m for m in runtime.store.outbox(kind="event") if m.event == "GrantEntitlements"]
        assert mark(runtime, grant, "failed", "R099 the receiver said no") is not None
    seen.clear()
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "later.db"), signer=signer)
    with runtime:
        delivered = [d for d in runtime.deliver_outbox() if d.message.event == "TierChangeFailed"]
        assert [d.status for d in delivered] == ["delivered"]
    (told,) = seen
    assert (told.refusal_code, told.reason) == ("R099", "the receiver said no")


def test_a_released_notice_is_leased_to_the_worker_that_delivers_it(
    postgres_stores: Stores,
) -> None:
    """On a fleet store the worker that marks a delivery refused releases its notice leased
    to itself, in the same transaction: another worker's claim skips it while this one
    delivers it (and takes it once the lease runs out, if this one dies)."""
    runtime, runner, _ = marketplace(postgres_stores.open("m", partitions=2))
    with runtime:
        customer = "down-8"
        active_customer(runtime, runner, customer)
        runtime.governor("Entitlement").dispatch(customer, "Suspend", {"reason": "fraud check"})
        subscription = runtime.governor("Subscription")
        subscription.dispatch(
            customer, "DowngradeRequested", {"customer_id": customer, **DOWNGRADE}
        )
        (grant,) = [m for m in runtime.store.outbox(kind="event") if m.event == "GrantEntitlements"]
        notice = mark(runtime, grant, "failed", "R006 refused")
        assert notice is not None and notice.status == "pending"
        query = f"SELECT lease_owner FROM outbox WHERE event_id = '{notice.event_id}'"
        assert postgres_stores.rows("m", query) == [(runtime.store.owner,)]  # type: ignore[attr-defined]
        other = postgres_stores.open("m")
        try:
            claimed = other.claim_outbox(kind="event", limit=100)  # type: ignore[attr-defined]
        finally:
            other.close()
        assert notice.event_id not in {m.event_id for m in claimed}
        (told,) = _deliver_all(runtime, [notice], 1)
        assert told.status == "delivered"
        assert postgres_stores.rows("m", query) == [(None,)]
