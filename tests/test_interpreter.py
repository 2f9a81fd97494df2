"""Dispatch over tables: bindings, payloads, guards, rejections, dedup, idempotency, outbox."""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from collections.abc import Iterator
from decimal import Decimal
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any, Literal

import pytest
from autonomic.runtime.dispatch import Governor
from autonomic.runtime.errors import (
    ActionFailed,
    BindingError,
    ConcurrentUpdateDetected,
    IdempotencyConflict,
    InstanceExists,
    InvalidTransition,
    NestedDispatch,
    NoGuardHeld,
    PayloadInvalid,
    RuntimeFailure,
    UnknownEvent,
    UnknownInstance,
    UnknownMachine,
)
from autonomic.runtime.event_inputs import canonical_decimal
from autonomic.runtime.keys import Keyring, generate_keypair, load_signer
from autonomic.runtime.ledger import PAYLOAD_TAG, LedgerMode, LedgerSealer, canonical_json
from autonomic.runtime.results import _request_digest
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import MemoryStore, SQLiteStore
from autonomic.runtime.tables import Emit, EmitArg, Payload, TransitionContext
from autonomic.runtime.timers import SystemClock, VirtualClock
from conftest import Stores
from hypothesis import given, settings
from hypothesis import strategies as st
from runtime_machines import (
    Bindings,
    ChargePayload,
    SpecBuilder,
    billing_spec,
    counter_spec,
    entitlement_spec,
)

CHARGE = {"amount": "19.99", "currency": "USD"}


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder)
    return folder


@pytest.fixture(params=["memory", "sqlite"])
def runtime(request: pytest.FixtureRequest, tmp_path: Path, key_dir: Path) -> Iterator[Runtime]:
    sealer = LedgerSealer(load_signer(key_dir), "checkpoint")
    store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "store.db")
    rt = Runtime(store, clock=VirtualClock(), sealer=sealer)
    yield rt
    rt.close()


def keyring(key_dir: Path) -> Keyring:
    return Keyring.from_files([key_dir])


def load_all(rt: Runtime, bindings: Bindings | None = None) -> tuple[Governor, Governor]:
    b = bindings or Bindings()
    ent, bil = entitlement_spec(), billing_spec()
    return rt.load(ent, *b.for_spec(ent)), rt.load(bil, *b.for_spec(bil))


def awaiting_payment(bil: Governor, instance: str = "b1") -> None:
    bil.create(instance, "ops")
    bil.dispatch(instance, "StartBilling", actor="ops")


# -- bindings ------------------------------------------------------------------------------------


def test_binding_problems_are_reported_together_with_positions() -> None:
    spec = billing_spec()
    guards = {"amount_matchs": lambda ctx: True}  # misspelled: missing + unknown
    actions: dict[str, Any] = {
        "charge_card": 42,
        "retry_charge": lambda: None,
        "refund": lambda ctx: None,
    }
    with pytest.raises(BindingError) as caught:
        Runtime().load(spec, guards, actions)
    problems = caught.value.problems
    text = "\n".join(problems)
    guard_ref = spec.guards["amount_matches"]
    assert f"{guard_ref}: R010 [error] guard 'amount_matches' has no binding" in text
    assert "did you mean 'amount_matchs'?" in text
    assert (
        f"{spec.actions['charge_card']}: R014 [error] action 'charge_card' is bound to a int"
        in text
    )
    retry_ref = spec.actions["retry_charge"]
    assert f"{retry_ref}: R014 [error] action 'retry_charge' must accept one argument" in text
    assert "R012 [error] guard 'amount_matchs' is bound but the machine names no such guard" in text
    assert "R013 [error] action 'refund' is bound but the machine names no such action" in text
    assert len(problems) == 5


def test_binding_error_reports_missing_actions_too() -> None:
    spec = entitlement_spec()
    with pytest.raises(BindingError) as caught:
        Runtime().load(spec, {"is_approver": lambda ctx: True}, {})
    codes = [line.split(": ")[1].split()[0] for line in caught.value.problems]
    assert codes == ["R011", "R011"]  # record_approval and auto_approve, in file order


def test_runtime_lookups_name_loaded_governors() -> None:
    rt = Runtime()
    b = Bindings()
    rt.load(counter_spec(), *b.for_spec(counter_spec()))
    assert rt.governor("Counter").name == "Counter"
    with pytest.raises(UnknownMachine) as caught:
        rt.governor("Billing")
    assert caught.value.hint == "loaded: Counter"
    with pytest.raises(ValueError, match="already loaded"):
        rt.load(counter_spec(), *b.for_spec(counter_spec()))


# -- dispatch ------------------------------------------------------------------------------------


def test_dispatch_returns_what_it_did(runtime: Runtime) -> None:
    ent, _ = load_all(runtime)
    created = ent.create("e1", "alice")
    # seq 0 is the ledger's genesis entry
    assert (created.to_state, created.version, created.seq) == ("PendingApproval", 1, 1)
    result = ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob")
    assert result.machine == "Entitlement" and result.instance == "e1"
    assert (result.from_state, result.to_state, result.event) == (
        "PendingApproval",
        "Active",
        "Approve",
    )
    assert result.version == 2 and result.seq == 2
    assert [(e.machine, e.instance, e.event) for e in result.emitted] == [
        ("Billing", "e1", "StartBilling")
    ]
    assert result.action_results["record_approval"] == {
        "action": "record_approval",
        "instance": "e1",
        "version": 1,
    }
    assert [t.timer_id for t in result.armed] == ["Active.after.30d"]
    assert not result.duplicate and not result.ignored
    record = ent.get("e1")
    assert record is not None and (record.state, record.version) == ("Active", 2)
    assert [t.timer_id for t in ent.timers("e1")] == ["Active.after.30d"]
    assert [e.kind for e in ent.history("e1")] == ["transition", "transition"]


def test_enum_members_and_strings_dispatch_alike(runtime: Runtime) -> None:
    spec = counter_spec()
    gov = runtime.load(spec, *Bindings().for_spec(spec))
    gov.create("c1")
    tick = spec.event_type("Tick")
    assert gov.dispatch("c1", tick).to_state == "Counting"
    result = gov.dispatch("c1", "Tick")
    assert result.version == 3 and type(result.event) is str


def test_guards_are_tried_in_order_and_else_is_last(runtime: Runtime) -> None:
    bindings = Bindings(outcomes={"is_approver": False})
    ent, _ = load_all(runtime, bindings)
    ent.create("e1", "alice")
    result = ent.dispatch("e1", "Approve", {"approver": "mallory"}, "mallory")
    assert result.to_state == "Rejected"
    assert ("guard", "is_approver", "e1") in bindings.calls
    assert not any(call[0] == "action" for call in bindings.calls)


def test_guard_context_carries_the_event(runtime: Runtime) -> None:
    seen: list[TransitionContext] = []

    def is_approver(ctx: TransitionContext) -> bool:
        seen.append(ctx)
        return ctx.payload is not None and getattr(ctx.payload, "approver", "") == "bob"

    spec = entitlement_spec()
    actions = {name: (lambda ctx: None) for name in spec.actions}
    ent = runtime.load(spec, {"is_approver": is_approver}, actions)
    ent.create("e1", "alice")
    assert ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob").to_state == "Active"
    ctx = seen[0]
    assert (ctx.machine, ctx.instance, ctx.state, ctx.event, ctx.actor) == (
        "Entitlement",
        "e1",
        "PendingApproval",
        "Approve",
        "bob",
    )
    assert ctx.version == 1 and ctx.target is None


def test_no_guard_held_is_a_typed_rejection() -> None:
    b = SpecBuilder("Gate", ["Closed", "Open"], ["Push"], "Closed")
    b.on("Closed", "Push", "Open", when="has_coin")
    b.on("Closed", "Push", "Open", when="has_token")
    spec = b.build()
    rt = Runtime()
    gate = rt.load(spec, {"has_coin": lambda c: False, "has_token": lambda c: False}, {})
    gate.create("g1")
    with pytest.raises(NoGuardHeld) as caught:
        gate.dispatch("g1", "Push")
    assert caught.value.guards == ("has_coin", "has_token")
    assert "no guard held (has_coin, has_token)" in caught.value.message
    assert isinstance(caught.value, InvalidTransition)


def test_invalid_transition_changes_nothing(runtime: Runtime) -> None:
    ent, _ = load_all(runtime)
    ent.create("e1", "alice")
    before = (ent.get("e1"), ent.timers("e1"), list(runtime.ledger()))
    with pytest.raises(InvalidTransition) as caught:
        ent.dispatch("e1", "Resume", actor="alice")
    error = caught.value
    assert (error.machine, error.state, error.event) == ("Entitlement", "PendingApproval", "Resume")
    assert "Entitlement in state PendingApproval has no transition on Resume" in error.message
    assert error.hint is not None and "Approve" in error.hint
    assert error.ledger_seq is None
    assert (ent.get("e1"), ent.timers("e1"), list(runtime.ledger())) == before


def test_rejection_is_recorded_only_when_asked(runtime: Runtime, key_dir: Path) -> None:
    ent, _ = load_all(runtime)
    ent.create("e1", "alice")
    with pytest.raises(InvalidTransition) as caught:
        ent.dispatch("e1", "Resume", actor="alice", record_rejection=True)
    assert caught.value.ledger_seq == 2
    entries = list(runtime.ledger())
    assert [e.kind for e in entries] == ["genesis", "transition", "rejection"]
    rejection = entries[2]
    assert (rejection.from_state, rejection.to_state, rejection.event) == (
        "PendingApproval",
        "PendingApproval",
        "Resume",
    )
    record = ent.get("e1")
    assert record is not None and record.version == 1  # a rejection changes nothing
    runtime.checkpoint()  # the memory store signs per 1000 entries or per second
    assert runtime.verify(keyring(key_dir)).ok


def test_ignored_event_writes_nothing(runtime: Runtime) -> None:
    ent, _ = load_all(runtime)
    ent.create("e1", "alice")
    before = list(runtime.ledger())
    result = ent.dispatch("e1", "Ping", event_id="ping-1")
    assert result.ignored and result.to_state == result.from_state == "PendingApproval"
    assert result.version == 1 and result.seq is None
    assert list(runtime.ledger()) == before
    again = ent.dispatch("e1", "Ping", event_id="ping-1")
    assert again.ignored and not again.duplicate  # ignored events are not remembered


def test_unknown_event_and_instance(runtime: Runtime) -> None:
    ent, _ = load_all(runtime)
    ent.create("e1", "alice")
    with pytest.raises(UnknownEvent) as caught:
        ent.dispatch("e1", "Aprove")
    assert caught.value.hint == "did you mean 'Approve'?"
    with pytest.raises(UnknownInstance):
        ent.dispatch("nobody", "Suspend")
    with pytest.raises(InstanceExists):
        ent.create("e1", "alice")


def test_action_failure_stores_nothing(runtime: Runtime) -> None:
    spec = billing_spec()
    guards, actions = Bindings().for_spec(spec)

    def declined(ctx: Any) -> object:
        raise RuntimeError("card declined")

    bil = runtime.load(spec, guards, {**actions, "charge_card": declined})
    awaiting_payment(bil)
    before = (bil.get("b1"), list(runtime.ledger()))
    with pytest.raises(ActionFailed, match="charge_card' failed: RuntimeError: card declined"):
        bil.dispatch("b1", "Charge", CHARGE, "shop", idempotency_key="k1")
    assert (bil.get("b1"), list(runtime.ledger())) == before
    with pytest.raises(ActionFailed):
        bil.dispatch("b1", "Charge", CHARGE, "shop", idempotency_key="k1")  # key not burnt


# -- payloads ------------------------------------------------------------------------------------


def test_bad_payload_names_each_field_and_stores_nothing(runtime: Runtime) -> None:
    _, bil = load_all(runtime)
    awaiting_payment(bil)
    before = (bil.get("b1"), list(runtime.ledger()), runtime.store.outbox(status=None))
    with pytest.raises(PayloadInvalid) as caught:
        bil.dispatch("b1", "Charge", {"amount": "lots", "currency": "GBP", "x": 1}, "shop")
    assert caught.value.fields == ("amount", "currency", "x")
    assert (
        "field 'amount': Input should be a decimal: an integer or a string such as"
        in caught.value.message
    )
    with pytest.raises(PayloadInvalid) as missing:
        bil.dispatch("b1", "Charge", {"currency": "USD"}, "shop")
    assert missing.value.fields == ("amount",)
    assert "field 'amount': Field required" in missing.value.message  # not "a decimal"
    with pytest.raises(PayloadInvalid, match="field 'reason': unexpected field"):
        bil.dispatch("b1", "StartBilling", {"reason": "x"}, "shop")
    after = (bil.get("b1"), list(runtime.ledger()), runtime.store.outbox(status=None))
    assert after == before


def test_payload_model_instances_are_accepted(runtime: Runtime) -> None:
    _, bil = load_all(runtime)
    awaiting_payment(bil)
    payload = ChargePayload(amount=Decimal("19.99"), currency="USD")
    result = bil.dispatch("b1", "Charge", payload, "shop")
    assert result.to_state == "Paid"
    entry = bil.history("b1")[-1]
    from autonomic.runtime.ledger import payload_digest

    assert entry.payload_sha256 == payload_digest(CHARGE)


# -- dedup and idempotency -----------------------------------------------------------------------


def test_repeated_event_id_returns_the_first_result(runtime: Runtime) -> None:
    ent, _ = load_all(runtime)
    ent.create("e1", "alice")
    first = ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob", event_id="evt-1")
    ledger = list(runtime.ledger())
    again = ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob", event_id="evt-1")
    assert again.duplicate
    assert again._replace(duplicate=False, action_results={}) == first._replace(action_results={})
    assert dict(again.action_results) == dict(first.action_results)
    # even a different event under the same id is answered with the first result
    odd = ent.dispatch("e1", "Suspend", None, "bob", event_id="evt-1")
    assert odd.duplicate and odd.to_state == "Active" and odd.event == "Approve"
    assert list(runtime.ledger()) == ledger
    assert len(runtime.store.outbox(status=None)) == 1


def test_idempotency_key_same_payload_returns_stored_result(runtime: Runtime) -> None:
    bindings = Bindings()
    _, bil = load_all(runtime, bindings)
    awaiting_payment(bil)
    first = bil.dispatch("b1", "Charge", CHARGE, "shop", idempotency_key="pay_abc123")
    charges = [c for c in bindings.calls if c[1] == "charge_card"]
    again = bil.dispatch(
        "b1", "Charge", {"currency": "USD", "amount": "19.99"}, "shop", idempotency_key="pay_abc123"
    )
    assert again.duplicate and again.seq == first.seq and again.version == first.version
    assert [c for c in bindings.calls if c[1] == "charge_card"] == charges  # charged once
    with pytest.raises(IdempotencyConflict) as caught:
        bil.dispatch(
            "b1",
            "Charge",
            {"amount": "20.00", "currency": "USD"},
            "shop",
            idempotency_key="pay_abc123",
        )
    assert caught.value.key == "pay_abc123"


def test_an_amount_under_one_idempotency_key_compares_by_value(
    stores: Stores, key_dir: Path
) -> None:
    """ "30.00" then "30" under one key is one request (before: R009 IdempotencyConflict): the
    repeat is answered with the stored result and charges nothing; another amount or another
    currency under the key is still a conflict. A key stored before the rule (its request
    digest of the text as sent) still takes its exact repeat."""
    bindings = Bindings()
    runtime = Runtime(
        stores.open(), clock=VirtualClock(), sealer=LedgerSealer(load_signer(key_dir))
    )
    _, bil = load_all(runtime, bindings)
    awaiting_payment(bil)
    sent = {**CHARGE, "amount": "30.00"}
    first = bil.dispatch("b1", "Charge", sent, "shop", idempotency_key="k")
    for again in ("30", 30, "30.0", "3E+1", "+30.000", Decimal("0.3E2")):
        repeat = bil.dispatch(
            "b1", "Charge", {**CHARGE, "amount": again}, "shop", idempotency_key="k"
        )
        assert repeat.duplicate and repeat.seq == first.seq, again
    assert [c[1] for c in bindings.calls].count("charge_card") == 1
    for other in ("30.01", "3", "300", "-30"):
        with pytest.raises(IdempotencyConflict):
            bil.dispatch("b1", "Charge", {**CHARGE, "amount": other}, "shop", idempotency_key="k")
    with pytest.raises(IdempotencyConflict):
        bil.dispatch("b1", "Charge", {**sent, "currency": "EUR"}, "shop", idempotency_key="k")
    legacy = _request_digest(
        "b1", "Charge", hashlib.sha256(PAYLOAD_TAG + canonical_json(sent)).digest()
    )
    stored = runtime.store.idempotency("Billing", "k")
    assert stored is not None and stored[0] != legacy
    runtime.store.run([lambda txn: txn.record_idempotency("Billing", "old", legacy, stored[1], 0)])
    assert bil.dispatch("b1", "Charge", sent, "shop", idempotency_key="old").duplicate
    assert runtime.verify(keyring(key_dir)).ok
    runtime.close()


_DECIMALS = st.builds(
    lambda coefficient, exponent: Decimal(f"{coefficient}E{exponent}"),
    st.integers(-(10**40), 10**40),
    st.integers(-45, 45),
)


@settings(max_examples=200, deadline=None)
@given(_DECIMALS, _DECIMALS, st.integers(0, 40))
def test_canonical_decimals_are_one_text_per_value(a: Decimal, b: Decimal, zeros: int) -> None:
    """Equal values, however written (trailing zeros, exponent), have one canonical text;
    different values never share one (no rounding: 40-digit coefficients, past Decimal's
    28-digit context); the text reads back as the same value."""
    sign, digits, exponent = a.as_tuple()
    assert isinstance(exponent, int)
    padded = Decimal((sign, (*digits, *(0,) * zeros), exponent - zeros))
    assert padded == a and canonical_decimal(padded) == canonical_decimal(a)
    assert (canonical_decimal(a) == canonical_decimal(b)) == (a == b)
    assert Decimal(canonical_decimal(a)) == a


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.sampled_from(["7", "7.0", "7.00", "70E-1", "7.01", "0.7E1", "8", "-7"]),
        min_size=2,
        max_size=4,
    )
)
def test_repeats_under_a_key_are_duplicates_exactly_when_the_amounts_are_equal(
    amounts: list[str],
) -> None:
    runtime = Runtime(MemoryStore(), clock=VirtualClock())
    _, bil = load_all(runtime)
    awaiting_payment(bil)
    bil.dispatch("b1", "Charge", {**CHARGE, "amount": amounts[0]}, "shop", idempotency_key="k")
    for amount in amounts[1:]:
        if Decimal(amount) == Decimal(amounts[0]):
            assert bil.dispatch(
                "b1", "Charge", {**CHARGE, "amount": amount}, "shop", idempotency_key="k"
            ).duplicate
        else:
            with pytest.raises(IdempotencyConflict):
                bil.dispatch(
                    "b1", "Charge", {**CHARGE, "amount": amount}, "shop", idempotency_key="k"
                )
    runtime.close()


def test_dedup_and_idempotency_survive_a_restart(tmp_path: Path, key_dir: Path) -> None:
    path = tmp_path / "store.db"
    clock = VirtualClock()

    def open_runtime() -> tuple[Runtime, Governor, Governor]:
        rt = Runtime(SQLiteStore(path), clock=clock, sealer=LedgerSealer(load_signer(key_dir)))
        ent, bil = load_all(rt)
        return rt, ent, bil

    rt, ent, bil = open_runtime()
    ent.create("e1", "alice")
    ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob", event_id="evt-1")
    awaiting_payment(bil)
    charged = bil.dispatch("b1", "Charge", CHARGE, "shop", idempotency_key="k1")
    rt.close()
    rt, ent, bil = open_runtime()
    assert ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob", event_id="evt-1").duplicate
    again = bil.dispatch("b1", "Charge", CHARGE, "shop", idempotency_key="k1")
    assert again.duplicate and again.seq == charged.seq
    with pytest.raises(IdempotencyConflict):
        bil.dispatch("b1", "Charge", {**CHARGE, "amount": "1"}, "shop", idempotency_key="k1")
    assert rt.verify(keyring(key_dir)).ok
    rt.close()


def test_retention_window_purges_old_records(runtime: Runtime) -> None:
    clock = runtime.clock
    assert isinstance(clock, VirtualClock)
    ent, bil = load_all(runtime)
    ent.create("e1", "alice")
    ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob", event_id="old-event")
    clock.advance("6d")
    awaiting_payment(bil)
    bil.dispatch("b1", "Charge", CHARGE, "shop", idempotency_key="recent-key")
    clock.advance("2d")  # old-event is now 8 days old, recent-key 2 days
    assert runtime.purge_expired() == (1, 0)
    fresh = ent.dispatch("e1", "Suspend", None, "bob", event_id="old-event")
    assert not fresh.duplicate and fresh.to_state == "Suspended"
    assert bil.dispatch("b1", "Charge", CHARGE, "shop", idempotency_key="recent-key").duplicate


# -- optimistic concurrency ----------------------------------------------------------------------


def test_stale_expected_version_is_refused(runtime: Runtime) -> None:
    ent, _ = load_all(runtime)
    ent.create("e1", "alice")
    ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob", expected_version=1)
    before = list(runtime.ledger())
    with pytest.raises(ConcurrentUpdateDetected) as caught:
        ent.dispatch("e1", "Suspend", None, "carol", expected_version=1)
    assert (caught.value.expected, caught.value.actual) == (1, 2)
    assert list(runtime.ledger()) == before
    assert ent.dispatch("e1", "Suspend", None, "carol", expected_version=2).version == 3


# -- outbox ---------------------------------------------------------------------------------------


def test_emitted_events_are_delivered_once(runtime: Runtime) -> None:
    ent, bil = load_all(runtime)
    ent.create("c1", "alice")
    bil.create("c1", "alice")
    result = ent.dispatch("c1", "Approve", {"approver": "bob"}, "bob")
    emitted = result.emitted[0]
    deliveries = runtime.deliver_outbox()
    assert [(d.status, d.message.event_id) for d in deliveries] == [("delivered", emitted.event_id)]
    delivered = deliveries[0].result
    assert delivered is not None and delivered.to_state == "AwaitingPayment"
    assert delivered.event_id == emitted.event_id
    assert runtime.deliver_outbox() == []
    # A delivery that crashed before marking its message is repeated: the receiver dedups.
    repeat = bil.dispatch("c1", "StartBilling", None, "Entitlement:c1", event_id=emitted.event_id)
    assert repeat.duplicate
    record = bil.get("c1")
    assert record is not None and record.version == 2


def test_undeliverable_events_are_marked_failed(runtime: Runtime) -> None:
    ent, _ = load_all(runtime)
    ent.create("c1", "alice")
    ent.dispatch("c1", "Approve", {"approver": "bob"}, "bob")  # Billing c1 does not exist
    [delivery] = runtime.deliver_outbox()
    assert delivery.status == "failed" and delivery.error is not None
    assert delivery.error.startswith("R002 Billing has no instance 'c1'")
    assert runtime.store.outbox(status="failed")[0].event_id == delivery.message.event_id


def test_emitted_event_ids_are_deterministic() -> None:
    def run() -> list[str]:
        rt = Runtime(clock=VirtualClock(0))
        ent, _ = load_all(rt)
        ent.create("c1", "alice")
        return [e.event_id for e in ent.dispatch("c1", "Approve", {"approver": "b"}, "b").emitted]

    assert run() == run()


# -- the fast path gives the same answers as the general one --------------------------------------
# One random script runs on four runtimes: the memory store's owning thread (short path, and
# units of work it runs itself), the same store once another thread has entered it (every unit
# submitted under its lock), the owning thread with expected versions (every dispatch a unit of
# work), and SQLite (units through group commit). Results, errors, timer firings, ledger,
# checkpoints, snapshots, records, timers and outbox must be identical.

INSTANCES = ["t0", "t1", "t2"]
TURNSTILE_EVENTS = ["Coin", "Push", "Kick", "Reset", "Pay", "Wait", "Nudge"]
# An hour ahead: inside the validity window of the test key, generated after this import.
START_MS = SystemClock().now_ms() + 3_600_000


def turnstile_spec() -> Any:
    """Rows of every kind the short paths tell apart: unguarded without actions (Coin,
    Nudge), with an action (Push from Unlocked), guarded with `else` (Push from Locked) and
    without (Coin from Unlocked), arming and cancelling timers (Alarm), emitting (Kick), with
    a payload (Pay), ignored (Wait), and a final state that rejects everything."""
    from runtime_machines import RejectPayload

    b = SpecBuilder(
        "Turnstile",
        ["Locked", "Unlocked", "Alarm", "Broken"],
        TURNSTILE_EVENTS,
        "Locked",
        finals={"Broken"},
    )
    b.on("Locked", "Coin", "Unlocked")
    b.on("Locked", "Nudge", "Locked")
    b.on("Unlocked", "Nudge", "Locked")
    b.on("Unlocked", "Push", "Locked", do=("count",))
    b.on("Locked", "Push", "Alarm", when="even_version", do=("count",))
    b.on("Locked", "Push", "Locked", when="else")
    b.on("Unlocked", "Coin", "Unlocked", when="third_version", do=("refund",))
    b.on("Alarm", "Reset", "Locked")
    b.on("Unlocked", "Kick", "Broken", emit=(("Turnstile", "Reset"),))
    b.on("Unlocked", "Pay", "Unlocked", do=("count",))
    b.timer("Alarm", 3 * 60_000, target="Locked")
    b.ignored["Locked"] = {"Wait"}
    b.payloads["Pay"] = RejectPayload
    return b.build()


def turnstile_bindings() -> tuple[dict[str, Any], dict[str, Any]]:
    guards = {
        "even_version": lambda ctx: ctx.version % 2 == 0,
        "third_version": lambda ctx: ctx.version % 3 == 0,
    }
    actions = {
        "count": lambda ctx: {"n": ctx.version, "event": ctx.event, "at": ctx.now_ms},
        "refund": lambda ctx: ctx.instance,
    }
    return guards, actions


# (kind, number, event, flag): dispatch `event` to instance `number` (mod 3), `flag` asking to
# record a rejection; create instance `number`; advance the clock `number` minutes and, with
# `flag`, fire the due timers.
Step = tuple[str, int, str, bool]

script_steps = st.tuples(
    st.sampled_from(["dispatch"] * 8 + ["create", "advance", "advance"]),
    st.integers(0, 8),
    st.sampled_from(TURNSTILE_EVENTS),
    st.booleans(),
)


def normalised(result: Any) -> tuple[Any, ...]:
    """The whole result as a tuple; action results as a plain dict (a store may return a
    read-only mapping)."""
    fields = list(result)
    index = result._fields.index("action_results")
    fields[index] = dict(fields[index])
    return tuple(fields)


def run_script(
    rt: Runtime, steps: list[Step], general: bool, keys: Keyring | None
) -> dict[str, Any]:
    gov = rt.load(turnstile_spec(), *turnstile_bindings())
    clock = rt.clock
    assert isinstance(clock, VirtualClock)
    seen: list[object] = []
    for kind, number, event, flag in steps:
        instance = INSTANCES[number % len(INSTANCES)]
        try:
            if kind == "create":
                seen.append(normalised(gov.create(instance, "gate")))
            elif kind == "advance":
                clock.advance(number * 60_000)
                if flag:
                    fired = rt.fire_due()
                    seen.append([(f.timer, f.kind, normalised(f.result)) for f in fired])
            else:
                record = gov.get(instance)
                expected = record.version if general and record is not None else None
                payload = {"reason": f"fare {number}"} if event == "Pay" else None
                result = gov.dispatch(
                    instance,
                    event,
                    payload,
                    "rider",
                    expected_version=expected,
                    record_rejection=flag,
                )
                seen.append(normalised(result))
        except RuntimeFailure as exc:
            seen.append((type(exc).__name__, exc.code, exc.message, getattr(exc, "ledger_seq", 0)))
    rt.checkpoint()  # checkpoint mode: cover the tail, so every ledger verifies in full
    report = None if keys is None else rt.verify(keys)
    store = rt.store
    return {
        "seen": seen,
        "records": [store.get_instance("Turnstile", i) for i in INSTANCES],
        "ledger": list(rt.ledger()),
        "checkpoints": store.checkpoints(),
        "snapshots": [store.latest_snapshot("Turnstile", i) for i in INSTANCES],
        "timers": store.armed_timers(),
        "outbox": store.outbox(status=None),
        "verified": None if report is None else (report.ok, report.count, report.reason),
    }


@pytest.mark.parametrize("mode", [None, "sign-each", "checkpoint"], ids=str)
@settings(max_examples=40, deadline=None)
@given(steps=st.lists(script_steps, min_size=10, max_size=40))
def test_fast_path_matches_general_path(
    key_dir: Path, mode: LedgerMode | None, steps: list[Step]
) -> None:
    # Every instance exists at first (the steps may create it again: InstanceExists).
    steps = [("create", n, "", False) for n in range(len(INSTANCES))] + steps
    signer = load_signer(key_dir)

    def runtime_on(store: Any) -> Runtime:
        sealer = None if mode is None else LedgerSealer(signer, mode)
        return Runtime(
            store,
            clock=VirtualClock(START_MS),
            sealer=sealer,
            checkpoint_every=2,
            snapshot_every=3,
        )

    keys = None if mode is None else keyring(key_dir)
    # The owning thread's short path where it applies, else the unit it runs itself; a store
    # another thread has entered (every dispatch a unit of work submitted under the lock);
    # expected versions (always a unit of work); SQLite (units through group commit).
    fast = run_script(runtime_on(MemoryStore()), steps, False, keys)
    locked = run_script(runtime_on(shared_store()), steps, False, keys)
    general = run_script(runtime_on(MemoryStore()), steps, True, keys)
    with tempfile.TemporaryDirectory() as folder:
        rt = runtime_on(SQLiteStore(Path(folder) / "s.db", synchronous="NORMAL"))
        try:
            durable = run_script(rt, steps, False, keys)
        finally:
            rt.store.close()
    for name, other in (("locked", locked), ("general", general), ("sqlite", durable)):
        for part, value in fast.items():
            if name == "sqlite" and part == "checkpoints":
                # Where (and when) checkpoints are signed follows the commits: SQLite commits
                # the timers one fire_due call fires as one batch, the memory store each on
                # its own. The last checkpoint covers the same whole ledger in both.
                heads = [[(c.size, c.head_hash) for c in run[part][-1:]] for run in (fast, other)]
                assert heads[0] == heads[1], (name, part)
            else:
                assert value == other[part], (name, part)
    if mode is None:
        assert fast["ledger"] == [] and fast["checkpoints"] == []
    else:
        assert fast["verified"] == (True, len(fast["ledger"]), None)
    if mode == "checkpoint":
        assert fast["checkpoints"][-1].size == len(fast["ledger"])


def shared_store() -> MemoryStore:
    """A memory store that a second thread has entered: every thread locks it from then on."""
    store = MemoryStore()
    store.instances("M")  # this thread first, then another
    other = threading.Thread(target=lambda: store.instances("M"))
    other.start()
    other.join()
    assert store.owner is None
    return store


@pytest.mark.parametrize("shared", [False, True])
def test_the_runtimes_compared_take_different_paths(shared: bool) -> None:
    # The comparison above means something only if the paths differ: the owner's short path
    # fills an unsealed result slot by slot without a unit of work; a unit of work builds a
    # result through the common constructor.
    store = shared_store() if shared else MemoryStore()
    rt = Runtime(store, clock=VirtualClock(START_MS))
    gov = rt.load(turnstile_spec(), *turnstile_bindings())
    gov.create("t0")
    short = gov.dispatch("t0", "Coin")
    general = gov.dispatch("t0", "Nudge", expected_version=2)
    assert (type(short).__name__ == "_UnsealedResult") is not shared
    assert type(general).__name__ == "_RowResult"
    assert (short.to_state, general.to_state, general.version) == ("Unlocked", "Locked", 3)


def test_delivered_events_carry_the_fields_the_target_declares() -> None:
    from runtime_machines import PaymentFailedPayload, RejectPayload

    source = SpecBuilder("Payments", ["Open", "Failed"], ["Fail"], "Open")
    source.payloads = {"Fail": PaymentFailedPayload}
    # As the compiler writes it: the target's `reason` comes from the causing `reason`.
    block = Emit("Access", "Block", args=(EmitArg("reason", "field", "reason"),))
    source.on("Open", "Fail", "Failed", emit=(block,))
    target = SpecBuilder("Access", ["On", "Off"], ["Block"], "On")
    target.payloads = {"Block": RejectPayload}  # declares `reason` only
    target.on("On", "Block", "Off")
    rt = Runtime()
    payments, access = rt.load(source.build()), rt.load(target.build())
    payments.create("acct-1")
    access.create("acct-1")
    payments.dispatch("acct-1", "Fail", {"reason": "card_declined"})
    [delivery] = rt.deliver_outbox()
    assert delivery.status == "delivered" and delivery.result is not None
    assert delivery.result.to_state == "Off"
    assert json.loads(delivery.message.body) == {"reason": "card_declined"}


def test_dispatching_a_bare_row_from_inside_an_action_is_refused() -> None:
    # The memory store's short path (a row that only changes the state) must refuse too.
    b = SpecBuilder("Pair", ["A", "B"], ["Go", "Flip"], "A")
    b.on("A", "Go", "B", do=("nest",))
    b.on("A", "Flip", "B")
    holder: list[Governor] = []
    rt = Runtime()
    pair = rt.load(b.build(), actions={"nest": lambda ctx: holder[0].dispatch("p2", "Flip")})
    holder.append(pair)
    pair.create("p1")
    pair.create("p2")
    with pytest.raises(ActionFailed) as caught:
        pair.dispatch("p1", "Go")
    assert isinstance(caught.value.cause, NestedDispatch)
    assert [pair.get(i).state for i in ("p1", "p2")] == ["A", "A"]  # type: ignore[union-attr]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_dispatching_from_inside_an_action_is_refused(tmp_path: Path, store: str) -> None:
    spec = counter_spec()
    guards, actions = Bindings().for_spec(spec)
    holder: list[Governor] = []

    def count(ctx: Any) -> None:
        holder[0].dispatch("c2", "Tick")

    backing = MemoryStore() if store == "memory" else SQLiteStore(tmp_path / "n.db")
    rt = Runtime(backing)
    counter = rt.load(spec, guards, {**actions, "count": count})
    holder.append(counter)
    counter.create("c1")
    counter.create("c2")
    with pytest.raises(ActionFailed) as caught:
        counter.dispatch("c1", "Tick")
    assert isinstance(caught.value.cause, NestedDispatch)
    assert [counter.get(i).version for i in ("c1", "c2")] == [1, 1]  # type: ignore[union-attr]
    rt.close()


def test_payload_bounds_without_a_ledger_hold_exactly() -> None:
    # No ledger and no idempotency key: a flat payload's size is bounded from its values' text
    # (at most 6 bytes a character) and its JSON is measured only past that bound, so the
    # limit holds to the byte either way; a nested input to a flat model is refused for its
    # depth, checked once validation has failed.
    from autonomic.runtime.errors import InputRejected
    from autonomic.runtime.inputs import InputLimits
    from runtime_machines import RejectPayload

    b = SpecBuilder("Gate", ["Open"], ["Pay"], "Open")
    b.on("Open", "Pay", "Open")
    b.payloads["Pay"] = RejectPayload
    gate = Runtime(limits=InputLimits(max_payload_bytes=64, max_depth=2)).load(b.build())
    gate.create("g")
    room = 64 - len('{"reason":""}')
    assert gate.dispatch("g", "Pay", {"reason": "x" * room}).version == 2
    assert gate.dispatch("g", "Pay", {"reason": "é" * (room // 2)}).version == 3
    for reason in ("x" * (room + 1), "\x01" * 9, "€" * (room // 3 + 1)):
        with pytest.raises(InputRejected):
            gate.dispatch("g", "Pay", {"reason": reason})
    nested: list[Any] = []
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(InputRejected):
        gate.dispatch("g", "Pay", {"reason": nested})
    with pytest.raises(PayloadInvalid):
        gate.dispatch("g", "Pay", {"reason": ["not too deep"]})
    assert gate.get("g").version == 3  # type: ignore[union-attr]


class _Note(Payload):
    text: str
    tag: str | None = None
    level: Literal["low", "high"] = "low"


# Text of every JSON size around the limit: one character (plain, escaped, multi-byte) repeated.
# Valid Unicode only: a lone surrogate has no UTF-8 size to compare (model_dump_json, which
# measures the expected size here, refuses it; the ledger's refusal is tested in test_ledger).
_chars = st.characters(codec="utf-8")
_texts = st.text(_chars, max_size=20) | st.builds(str.__mul__, _chars, st.integers(0, 160))


@settings(max_examples=80, deadline=None)
@given(text=_texts, tag=st.none() | _texts, level=st.sampled_from(["low", "high"]))
def test_payload_size_limit_is_exact_through_the_capped_validator(
    text: str, tag: str | None, level: str
) -> None:
    # Without a ledger a flat model of strings validates through a copy of its schema whose
    # strings are capped so that nothing over the limit passes (inputs.capped_validator); what
    # a cap refuses is validated again and measured. Either way a payload passes exactly when
    # its JSON fits, and an invalid one gets the model's own errors.
    from autonomic.runtime.errors import InputRejected
    from autonomic.runtime.inputs import InputLimits

    b = SpecBuilder("Notes", ["Open"], ["Note"], "Open")
    b.on("Open", "Note", "Open")
    b.payloads["Note"] = _Note
    notes = Runtime(limits=InputLimits(max_payload_bytes=300)).load(b.build())
    notes.create("n")
    payload = {"text": text, "tag": tag, "level": level}
    size = len(_Note.model_validate(payload).model_dump_json().encode())
    if size <= 300:
        assert notes.dispatch("n", "Note", payload).version == 2
    else:
        with pytest.raises(InputRejected):
            notes.dispatch("n", "Note", payload)
    with pytest.raises(PayloadInvalid) as caught:
        notes.dispatch("n", "Note", {**payload, "level": "mid"})
    assert [where for where, _ in caught.value.problems] == ["level"]


class _Colour(StrEnum):
    RED = "red"


class _Level(IntEnum):
    HIGH = 2


_result_texts = st.text(max_size=12) | st.sampled_from([_Colour.RED, 'évt\u2028"\\'])
_result_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | _result_texts
    | st.just(_Level.HIGH)
    | st.floats(allow_nan=False)
)
_result_values = st.recursive(
    _result_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(
    texts=st.lists(_result_texts, min_size=5, max_size=5),
    event_id=st.none() | _result_texts,
    numbers=st.tuples(st.integers(0, 2**40) | st.just(True), st.none() | st.integers(0, 99)),
    emitted=st.lists(st.tuples(_result_texts, _result_texts, _result_texts, _result_texts)),
    noticed=st.booleans(),
    actions=st.dictionaries(
        st.text(max_size=8) | st.integers(0, 3), _result_scalars | _result_values, max_size=3
    ),
    armed=st.lists(st.tuples(_result_texts, st.integers(0, 2**40)), max_size=2),
)
def test_a_stored_result_is_the_json_of_its_document(
    texts: list[str],
    event_id: str | None,
    numbers: tuple[int, int | None],
    emitted: list[tuple[str, str, str, str]],
    noticed: bool,
    actions: dict[Any, object],
    armed: list[tuple[str, int]],
) -> None:
    # The result a dispatch stores for its event id (results._result_to_json) is the text
    # _dumps writes of its document, or its error (keys of two types do not sort).
    from autonomic.runtime.results import (
        DispatchResult,
        EmittedEvent,
        Notification,
        _dumps,
        _result_to_json,
    )
    from autonomic.runtime.timers import ArmedTimer

    machine, instance, event, from_state, to_state = texts
    notices = (Notification(machine, instance, to_state, None, 1, "k", "r", None, 5, None, "e"),)
    timers = tuple(ArmedTimer(machine, instance, t, to_state, due, 3) for t, due in armed)
    result = DispatchResult(
        machine,
        instance,
        event,
        from_state,
        to_state,
        numbers[0],
        numbers[1],
        event_id,
        tuple(EmittedEvent(*e) for e in emitted),
        notices if noticed else (),
        actions,
        timers,
    )
    document = {
        "machine": machine,
        "instance": instance,
        "event": event,
        "from_state": from_state,
        "to_state": to_state,
        "version": numbers[0],
        "seq": numbers[1],
        "event_id": event_id,
        "emitted": [list(e) for e in emitted],
        "notifications": [list(n) for n in result.notifications],
        "action_results": actions,
        "armed": [t.row() for t in timers],
    }
    assert _text_or_error(_result_to_json, result) == _text_or_error(_dumps, document)


def test_a_dispatch_stores_the_text_json_writes_of_its_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dispatch writes its stored result from pieces its row made at load time
    # (rows._ResultText): the text _result_to_json writes of that result, for rows with
    # guards, actions, timers and emits (a signup and a cancellation saga).
    from autonomic.runtime.results import DispatchResult, _result_to_json
    from autonomic.runtime.rows import _ResultText
    from autonomic.runtime.store.sqlite import SQLiteStore
    from flow_world import marketplace

    made: list[tuple[str | None, DispatchResult]] = []
    text = _ResultText.text

    def spy(self: _ResultText, row: Any, instance: str, *rest: Any) -> str | None:
        version, seq, event_id, emitted, results, armed = rest
        result = DispatchResult(
            row.machine, instance, row.event, row.source, row.target, version, seq, event_id,
            emitted, (), results, armed,
        )  # fmt: skip
        made.append((text(self, row, instance, *rest), result))
        return made[-1][0]

    monkeypatch.setattr(_ResultText, "text", spy)
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "w.db"), mode="checkpoint")
    inputs = {"email": "ops@c.example", "country": "DE", "product_id": "p", "tier": "professional"}
    assert runner.start("CustomerSignup", "c", {"customer_id": "c", **inputs}).status == "completed"
    runtime.governor("Billing").create("c")
    runtime.governor("Entitlement").create("c")
    approve = {"approver": "vendor-admin"}
    runtime.governor("Entitlement").dispatch("c", "Approve", approve, event_id="a1")
    cancel = {"customer_id": "c", "request_id": "cx", "reason": "bench"}
    assert runner.start("SubscriptionCancellation", "c", cancel).status == "completed"
    runtime.close()
    written = [text for text, _ in made if text is not None]
    assert len(written) >= 5
    assert any('"emitted":[[' in text for text in written)
    assert any('"armed":[[' in text for text in written)
    for text, result in made:
        assert text is None or text == _result_to_json(result)


def _text_or_error(write: Any, value: object) -> object:
    try:
        return write(value)
    except Exception as exc:
        return type(exc), str(exc)
