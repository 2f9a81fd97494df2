"""A timer whose action fails: Billing's retry ladders move on, other timers wait out a backoff.

A ladder attempt whose call is refused (a declined card) fails as its answer would; one that
gets no answer (timeout, processor and backup unreachable) is tried again with the jitter
backoff until the attempt's timeout, then counts as timed out. Nothing re-fires at the poll
rate (AUDIT4 blocker 3: Billing stalled in Retry1 and the worker charged the card every second).
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

import pytest
from autonomic.generated.billing import MACHINE as BILLING
from autonomic.runtime.errors import ActionFailed
from autonomic.runtime.keys import generate_keypair, load_signer
from autonomic.runtime.ledger import LedgerSealer, payload_digest
from autonomic.runtime.resilience import Unavailable, retry_later_ms
from autonomic.runtime.resilience.backoff import noted_attempt
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import MemoryStore, SQLiteStore
from autonomic.runtime.store.base import Store
from autonomic.runtime.timers import VirtualClock
from autonomic.runtime.worker import _round
from billing_world import START, noop, yes
from conftest import Stores
from runtime_machines import SpecBuilder

HOUR = 3_600_000
FAILURES: dict[str, type[Exception]] = {
    "declined": ValueError,  # the processor's synchronous answer: a refusal
    "timeout": TimeoutError,  # no answer: the policy retries it 3 times per firing
    "unavailable": Unavailable,  # not reached: the backup is tried, and is down too
}
PAYMENT_LADDER = ["Retry1", "Retry2", "Retry3", "CollectionAgency", "MaxRetriesExceeded"]


class Calls:
    """An outside action that always fails with `error`, counting its calls and the firings
    they belong to (a firing's actions share its `now`; a policy's retries call again)."""

    def __init__(self, error: type[Exception], firings: set[int] | None = None) -> None:
        self.error = error
        self.calls = 0
        self.firings = set() if firings is None else firings

    def __call__(self, ctx: Any) -> None:
        self.calls += 1
        self.firings.add(ctx.now_ms)
        raise self.error("card_declined" if self.error is ValueError else "processor down")


def _in_retry1(runtime: Runtime) -> None:
    billing = runtime.governor("Billing")
    billing.create("c1")
    billing.dispatch(
        "c1",
        "ChargeRequested",
        {"customer_id": "c1", "invoice_id": "i1", "amount": "30", "idempotency_key": "i1"},
    )
    billing.dispatch(
        "c1", "PaymentFailed", {"customer_id": "c1", "idempotency_key": "i1", "reason": "no"}
    )


def _drive(runtime: Runtime, clock: VirtualClock, until: int) -> list[str]:
    """Fire every deadline in time order up to `until`; the states c1 went through."""
    billing = runtime.governor("Billing")

    def state() -> str:
        record = billing.get("c1")
        assert record is not None
        return record.state

    path = [state()]
    while (due := runtime.next_deadline()) is not None and due <= until:
        assert due >= clock.now_ms(), "a deadline in the past was left unfired"
        clock.advance(due - clock.now_ms())
        try:
            runtime.fire_due()
        except ActionFailed as failure:  # a retried firing: due again after its backoff
            assert "stays armed" in str(failure.hint)
        if state() != path[-1]:
            path.append(state())
    return path


def _firings_within(window_ms: int) -> int:
    """How many firings the jitter backoff makes in an attempt's window: the first at the
    step's due time, then one after each failure's backoff while it falls inside it."""
    at, firings = 0, 1
    while at + retry_later_ms(firings) < window_ms:
        at += retry_later_ms(firings)
        firings += 1
    return firings


def _billing(store: Store, keys: Path, clock: VirtualClock, **failing: Calls) -> Runtime:
    """A signing runtime on `store` with Billing loaded, its `failing` actions bound."""
    runtime = Runtime(store, clock=clock, sealer=LedgerSealer(load_signer(keys), "sign-each"))
    actions: dict[str, Any] = {name: noop for name in BILLING.actions}
    actions.update(failing)
    runtime.load(BILLING, {name: yes for name in BILLING.guards}, actions)
    return runtime


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_the_payment_ladder_runs_to_its_end_when_every_retry_fails(
    tmp_path: Path, keys: Path, failure: str
) -> None:
    """Each rung's charge fails (declined, timed out, processor and backup unreachable): Billing
    goes Retry1 -> Retry2 -> Retry3 -> CollectionAgency -> MaxRetriesExceeded, with no more
    charge calls than one per rung (declined) or the backoff's firings within each attempt's
    1h timeout (unanswered), and tells Subscription and Entitlement at the end."""
    clock = VirtualClock(START)
    firings: set[int] = set()
    charge = Calls(FAILURES[failure], firings)
    backup = Calls(FAILURES[failure], firings)
    agency = Calls(ValueError)  # the agency refuses the debt: the ladder's last failure edge
    runtime = _billing(
        SQLiteStore(tmp_path / "s.db"),
        keys,
        clock,
        retry_charge=charge,
        charge_backup_processor=backup,
        hand_to_collection_agency=agency,
    )
    _in_retry1(runtime)
    assert _drive(runtime, clock, START + 30 * 24 * HOUR) == PAYMENT_LADDER
    if failure == "declined":  # one call a rung, no backup for a refusal
        assert (charge.calls, backup.calls, len(firings)) == (3, 0, 3)
    else:
        # Retried within each attempt's hour, at most as often as the backoff allows (the
        # breaker opens on the way and sends the rest to the backup).
        assert 3 * 20 <= len(firings) <= 3 * _firings_within(HOUR)
        assert charge.calls + backup.calls <= 3 * len(firings)
    assert agency.calls == 1
    assert runtime.store.armed_timers() == []
    told = sorted((m.target_machine, m.event) for m in runtime.store.outbox(kind="event"))
    assert ("Entitlement", "Suspend") in told and ("Subscription", "RenewalFailed") in told
    runtime.close()


def test_a_declined_retry_is_on_the_ledger_with_why(tmp_path: Path, keys: Path) -> None:
    """The move a refused attempt makes is one signed "timer" entry Retry1 -> Retry2 of the
    step's timer, whose payload names the action, its error and that it counts as the
    attempt's failure; the firing's event id is the step timer's, so it takes effect once."""
    clock = VirtualClock(START)
    runtime = _billing(SQLiteStore(tmp_path / "s.db"), keys, clock, retry_charge=Calls(ValueError))
    _in_retry1(runtime)
    [step] = runtime.store.armed_timers("Billing", "c1")
    clock.advance(HOUR)
    [firing] = runtime.fire_due()
    assert (firing.result.from_state, firing.result.to_state) == ("Retry1", "Retry2")
    entry = list(runtime.store.ledger_entries(machine="Billing", instance="c1"))[-1]
    assert (entry.kind, entry.event, entry.from_state, entry.to_state) == (
        "timer",
        "Retry1/PaymentRetry/1",
        "Retry1",
        "Retry2",
    )
    why = {
        "action": "retry_charge",
        "error": "ValueError: card_declined",
        "attempts": 1,
        "counts_as": "failure",
    }
    body = {"timer": step.timer_id, "due_ms": step.due_ms, "notify": [], "failed": why}
    assert entry.payload_sha256 == payload_digest(body)
    # Retry2 is entered at the failure: its charge is tried 3h later.
    [retry2] = runtime.store.armed_timers("Billing", "c1")
    assert (retry2.timer_id, retry2.due_ms) == ("Retry2/PaymentRetry/2", START + 4 * HOUR)
    runtime.close()


@pytest.mark.parametrize("ladder", ["RefundRetry", "ClosingRefundRetry"])
def test_the_refund_ladders_reach_manual_review_while_the_processor_is_down(
    tmp_path: Path, keys: Path, ladder: str
) -> None:
    """retry_refund unreachable at every attempt: each attempt is retried with backoff for its
    hour, then counts as timed out; the refund reaches manual review (finance pays it)."""
    clock = VirtualClock(START)
    refund = Calls(Unavailable)
    runtime = _billing(SQLiteStore(tmp_path / "s.db"), keys, clock, retry_refund=refund)
    billing = runtime.governor("Billing")
    billing.create("c1")
    billing.dispatch("c1", "RefundRequested", {"customer_id": "c1", "reason": "suspended"})
    if ladder == "ClosingRefundRetry":
        billing.dispatch("c1", "CloseAccount", {"customer_id": "c1", "reason": "cancelled"})
    path = _drive(runtime, clock, START + 30 * 24 * HOUR)
    prefix = "Closing" if ladder == "ClosingRefundRetry" else ""
    assert path[-3:] == [
        f"{prefix}RefundRetry1",
        f"{prefix}RefundRetry2",
        f"{prefix}RefundManualReview",
    ]
    assert 2 * 20 <= len(refund.firings) <= 2 * _firings_within(HOUR)
    runtime.close()


def test_a_worker_retries_a_failing_ladder_attempt_no_faster_than_the_backoff(
    tmp_path: Path, keys: Path
) -> None:
    """A worker polling every second over a Retry1 whose charge times out: the firings follow
    the backoff (not one per poll), each under the same event id, and the operator reads when
    the next one comes."""
    clock = VirtualClock(START)
    seen: list[tuple[int, str | None, str | None]] = []

    def timing_out(ctx: Any) -> None:
        seen.append((ctx.now_ms, ctx.event_id, ctx.idempotency_key))
        raise TimeoutError("processor timed out")

    runtime = _billing(SQLiteStore(tmp_path / "s.db"), keys, clock, retry_charge=timing_out)
    _in_retry1(runtime)
    clock.advance(HOUR)
    out = io.StringIO()
    rounds = 120
    for _ in range(rounds):
        _round(runtime, 100, out)
        clock.advance(1000)  # the worker's poll
    firings = sorted({now for now, _, _ in seen})
    # At most one firing a round, and only once the previous one's backoff has passed.
    assert len(firings) <= _firings_within(rounds * 1000)
    assert all(
        b - a >= retry_later_ms(n + 1) for n, (a, b) in enumerate(itertools.pairwise(firings))
    )
    assert len({(event_id, key) for _, event_id, key in seen}) == 1
    lines = out.getvalue().splitlines()
    assert len(lines) == len(firings)
    assert "stays armed: its firing is tried again in" in lines[-1]
    record = runtime.governor("Billing").get("c1")
    assert record is not None and record.state == "Retry1"
    runtime.close()


def test_a_failing_timer_outside_a_ladder_backs_off_with_few_ledger_entries(tmp_path: Path) -> None:
    """A plain timer whose action is refused every time: a worker over 20 minutes fires it as
    the backoff allows (capped at a minute), never at the poll rate, and the ledger records
    attempts 1, 2, 4, 8, ... and the change of error, not every attempt."""
    keys = tmp_path / "keys"
    generate_keypair(keys, valid_from_ms=START - 1)
    b = SpecBuilder("Job", ["Waiting", "Done"], ["Finish"], "Waiting")
    b.timer("Waiting", HOUR, do=("flaky",))
    b.on("Waiting", "Finish", "Done")
    calls: list[int] = []

    def flaky(ctx: Any) -> None:
        calls.append(ctx.now_ms)
        raise ValueError("refused" if len(calls) < 10 else "refused again")

    clock = VirtualClock(START)
    store = SQLiteStore(tmp_path / "s.db")
    runtime = Runtime(store, clock=clock, sealer=LedgerSealer(load_signer(keys), "sign-each"))
    job = runtime.load(b.build(), {}, {"flaky": flaky})
    job.create("j1")
    clock.advance(HOUR)
    out = io.StringIO()
    for _ in range(20 * 60):
        _round(runtime, 100, out)
        clock.advance(1000)
    assert _firings_within(20 * 60_000) - 1 <= len(calls) <= _firings_within(20 * 60_000)
    notes = [e for e in runtime.store.ledger_entries(machine="Job") if e.kind == "rejection"]
    noted = [n for n in range(1, len(calls) + 1) if noted_attempt(n) or n == 10]
    assert len(notes) == len(noted)
    assert all((e.from_state, e.to_state) == ("Waiting", "Waiting") for e in notes)
    assert job.timers("j1")  # still armed, tried again after its backoff
    runtime.close()


def test_a_ladder_attempt_on_postgresql_retries_then_moves_on(
    postgres_stores: Stores, keys: Path
) -> None:
    """PostgreSQL: the retry is kept in the store (due_timers skips the timer until then), an
    unanswered attempt counts as timed out after its hour, a declined one fails at once, and a
    new runtime on the store carries on from the stored count."""
    clock = VirtualClock(START)
    charge = Calls(Unavailable)
    store = postgres_stores.open()
    runtime = _billing(store, keys, clock, retry_charge=charge, charge_backup_processor=charge)
    _in_retry1(runtime)
    clock.advance(HOUR)
    with pytest.raises(ActionFailed) as failed:
        runtime.fire_due()
    assert "tried again in 217 ms" in str(failed.value.hint)
    assert runtime.fire_due(clock.now_ms() + 216) == []  # not before its backoff
    runtime.close()
    runtime = _billing(
        postgres_stores.open(), keys, clock, retry_charge=charge, charge_backup_processor=charge
    )
    clock.advance(217)
    with pytest.raises(ActionFailed) as failed:
        runtime.fire_due()
    assert "tried again in 434 ms" in str(failed.value.hint)  # the stored count: 2
    assert _drive(runtime, clock, START + 3 * HOUR) == ["Retry1", "Retry2"]
    assert postgres_stores.rows("s", "SELECT count(*) FROM timer_retries") == [(0,)]
    runtime.close()


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_the_collection_agency_rung_ends_the_ladder_whatever_its_hand_over_does(
    keys: Path, failure: str
) -> None:
    """The last rung's action runs in the firing's unit (no policy): refused, the ladder ends
    at once; unanswered, it is retried for the attempt's 12h and then counts as timed out.
    Either way Billing reaches MaxRetriesExceeded and tells Subscription and Entitlement."""
    clock = VirtualClock(START)
    agency = Calls(FAILURES[failure])
    runtime = _billing(
        MemoryStore(),
        keys,
        clock,
        retry_charge=Calls(ValueError),
        hand_to_collection_agency=agency,
    )
    _in_retry1(runtime)
    assert _drive(runtime, clock, START + 30 * 24 * HOUR) == PAYMENT_LADDER
    firings = 1 if failure == "declined" else _firings_within(12 * HOUR)
    assert agency.calls == len(agency.firings) == firings
    told = sorted((m.target_machine, m.event) for m in runtime.store.outbox(kind="event"))
    assert ("Entitlement", "Suspend") in told and ("Subscription", "RenewalFailed") in told
