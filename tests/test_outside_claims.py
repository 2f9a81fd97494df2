"""Outside calls made once per event id or idempotency key across processes, runtimes,
`dispatch_many` and flow steps: the durable claims of runtime/resilience/claims.py, on real
stores (memory, SQLite files, and PostgreSQL under CI) and real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from autonomic.runtime.demo import _Payments
from autonomic.runtime.dispatch import DispatchRequest
from autonomic.runtime.errors import ActionFailed, OutsideCallInProgress
from autonomic.runtime.keys import Keyring, Signer, load_signer
from autonomic.runtime.store.memory import MemoryStore
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.timers import VirtualClock
from billing_world import CHARGE, START, Processor, open_billing
from conftest import Stores
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flow_world import marketplace
from pipe_lines import PipeLines
from test_flows import active_customer, capture_proration, upgrade_inputs

WORKER = Path(__file__).with_name("claim_worker.py")
FLOW_WORKER = Path(__file__).with_name("flow_claim_worker.py")
KEY = ("Billing", "event", "charge-c1")
PAYLOAD = CHARGE


def test_claims_are_all_or_none_and_leased(stores: Stores) -> None:
    store = stores.open()
    other = ("Billing", "key", "k1")
    assert store.claim_outside([KEY, other], "a", 60_000)
    assert not store.claim_outside([("Billing", "key", "k2"), KEY], "b", 60_000)
    assert store.claim_outside([("Billing", "key", "k2")], "b", 60_000)  # nothing of b's held
    assert store.claim_outside([KEY], "a", 60_000)  # the holder renews
    store.release_outside([KEY], "b")  # not b's: stays
    assert not store.claim_outside([KEY], "b", 60_000)
    store.release_outside([KEY, other], "a")
    assert store.claim_outside([KEY], "b", 0)  # a lease of 0 ms has run out at once
    assert store.claim_outside([KEY, other], "c", 60_000)
    store.close()


def test_a_lease_no_runtime_granted_holds_no_key(stores: Stores) -> None:
    """A claim row someone wrote with a lease beyond any a runtime grants (or, on SQLite, a
    lease that is no integer, which no runtime writes either) is taken over."""
    store = stores.open()
    assert store.claim_outside([KEY], "a", 60_000)
    stores.rows("s", f"UPDATE outside_claims SET until_ms = {2**62}")
    assert store.claim_outside([KEY], "b", 60_000)
    assert not store.claim_outside([KEY], "c", 60_000)  # b's lease is live
    holder = "b"
    if stores.kind == "sqlite":
        stores.rows("s", "UPDATE outside_claims SET until_ms = until_ms - 0.5")
        assert store.claim_outside([KEY], "c", 60_000)
        holder = "c"
    assert stores.rows("s", "SELECT holder FROM outside_claims") == [(holder,)]
    store.close()


def test_the_memory_store_keeps_claims_too() -> None:
    store = MemoryStore()
    assert store.claim_outside([KEY], "a", 60_000)
    assert not store.claim_outside([KEY], "b", 60_000)
    store.release_outside([KEY], "a")
    assert store.claim_outside([KEY], "b", 0) and store.claim_outside([KEY], "c", 1)


def test_only_the_holder_renews_and_a_taken_over_claim_is_not_held(stores: Stores) -> None:
    store = stores.open()
    other = ("Billing", "key", "k1")
    assert store.claim_outside([KEY, other], "a", 60_000)
    assert store.renew_outside([KEY, other], "a", 60_000)
    assert not store.renew_outside([KEY], "b", 60_000)  # not b's to renew
    assert store.run([lambda txn: txn.holds_outside([KEY, other], "a")])[0].value is True
    assert store.claim_outside([KEY], "a", 0)  # a's lease on KEY runs out at once ...
    assert store.run([lambda txn: txn.holds_outside([KEY], "a")])[0].value is True  # untaken
    assert store.claim_outside([KEY], "b", 60_000)  # ... and b takes it over
    assert not store.renew_outside([KEY, other], "a", 60_000)  # a never takes it back
    assert store.run([lambda txn: txn.holds_outside([KEY, other], "a")])[0].value is False
    store.release_outside([KEY], "b")  # let go: still not a's
    assert not store.renew_outside([KEY], "a", 60_000)
    assert store.run([lambda txn: txn.holds_outside([KEY], "a")])[0].value is False
    assert store.claim_outside([KEY], "c", 60_000)  # free: the renewal did not recreate it
    store.close()


def test_the_memory_store_renews_only_the_holders_claims() -> None:
    store = MemoryStore()
    assert store.claim_outside([KEY], "a", 0) and store.renew_outside([KEY], "a", 60_000)
    assert not store.claim_outside([KEY], "b", 60_000)  # renewed: live again
    assert store.holds_outside([KEY], "a") and not store.holds_outside([KEY], "b")
    store.release_outside([KEY], "a")
    assert not store.renew_outside([KEY], "a", 60_000) and not store.holds_outside([KEY], "a")
    assert store.claim_outside([KEY], "b", 60_000)


class Dispatcher:
    """A claim_worker.py process charging c1 with event id charge-c1 (with mode "fire":
    firing c1's due retry timer; with `worker=FLOW_WORKER`, a flow_claim_worker.py process
    driving c1's upgrade run)."""

    def __init__(
        self,
        location: str,
        keys: Path,
        lease_ms: int = 60_000,
        worker: Path = WORKER,
        *mode: str,
    ) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(worker), location, str(keys), str(lease_ms), *mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out = PipeLines(self.process.stdout)
        assert self.line() == "ready"

    def line(self) -> str:
        text = self.out.line(60, "the dispatcher")
        if text is None:
            self.process.wait(30)
            stderr = self.process.stderr.read() if self.process.stderr else ""
            raise AssertionError(f"the dispatcher ended: {stderr}")
        return text

    def go(self) -> str:
        """Send the charge; its first line."""
        self.answer()
        return self.line()

    def finish_failed(self) -> list[str]:
        """The lines up to and including the failure's hint; the process then exits 0."""
        lines = [self.line()]
        while not lines[-1].startswith("hint"):
            lines.append(self.line())
        assert self.process.wait(60) == 0
        return lines

    def answer(self) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write("ok\n")
        stdin.flush()

    def finish(self) -> list[str]:
        """The lines up to and including the result (or error); the process then exits 0."""
        lines = [self.line()]
        while not lines[-1].startswith(("result", "error")):
            lines.append(self.line())
        assert self.process.wait(60) == 0
        return lines

    def quiet(self, seconds: float) -> bool:
        """Whether the process says nothing within `seconds` (a poll, not a measurement)."""
        return not self.out.ready(seconds)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


def _billing_with_c1(stores: Stores, keys: Path) -> None:
    runtime = open_billing(stores.open(), keys, VirtualClock(START), Processor())
    runtime.governor("Billing").create("c1")
    runtime.close()


def test_two_processes_sending_one_event_id_at_once_charge_once(stores: Stores, keys: Path) -> None:
    """Two processes on one store send the same charge (same event id) at once: the second
    waits at the claim while the first's call is at the processor, then returns the first's
    result as a repeat, its processor never called."""
    _billing_with_c1(stores, keys)
    first = Dispatcher(stores.location(), keys)
    second = Dispatcher(stores.location(), keys)
    try:
        assert first.go() == "calling"
        assert second.go() == "waiting"  # not "calling": the store's claim holds it
        first.answer()
        assert first.finish() == ["charged", "result 2 2"]
        assert second.finish() == ["result 2 2"]
    finally:
        first.kill()
        second.kill()


def test_a_claim_whose_holder_was_killed_lets_go_when_its_lease_runs_out(
    stores: Stores, keys: Path
) -> None:
    """kill -9 a dispatcher at its processor: its claim (a 1 s lease) does not block the
    event id for ever; the next dispatcher waits it out, then calls and commits."""
    _billing_with_c1(stores, keys)
    first = Dispatcher(stores.location(), keys, lease_ms=1000)
    second = Dispatcher(stores.location(), keys)
    try:
        assert first.go() == "calling"
        assert second.go() == "waiting"
        first.kill()
        assert second.line() == "calling"
        second.answer()
        assert second.finish() == ["charged", "result 2 2"]
    finally:
        first.kill()
        second.kill()


def _lease_until(stores: Stores) -> int:
    rows = stores.rows(
        "s",
        "SELECT until_ms FROM outside_claims "
        "WHERE machine = 'Billing' AND kind = 'event' AND key = 'charge-c1'",
    )
    return int(rows[0][0]) if rows else -1


def test_a_call_longer_than_its_claims_lease_is_not_made_twice(stores: Stores, keys: Path) -> None:
    """A dispatcher's processor call outlasts its 1 s lease: its runtime renews the claim
    while it calls, so the second dispatcher keeps waiting (it would take the claim over and
    call too if the lease ran out), then returns the first's result. (A lease of 1 s leaves a
    loaded machine 667 ms to schedule each renewal.)"""
    _billing_with_c1(stores, keys)
    first = Dispatcher(stores.location(), keys, lease_ms=1000)
    second = Dispatcher(stores.location(), keys, lease_ms=1000)
    try:
        assert first.go() == "calling"
        assert second.go() == "waiting"
        # Wait until the lease was renewed to two leases past what it was while the second
        # waited: the lease the first took has run out on the store's clock, and it holds.
        taken = _lease_until(stores)
        for _ in range(1200):
            if _lease_until(stores) >= taken + 2000:
                break
            assert second.quiet(0.05), "the second dispatcher took the claim over"
        else:
            raise AssertionError("the claim's lease was never renewed")
        first.answer()
        assert first.finish() == ["charged", "result 2 2"]
        assert second.finish() == ["result 2 2"]  # not "calling": one call in all
    finally:
        first.kill()
        second.kill()
    assert _lease_until(stores) == -1  # let go at the commit


def test_a_holder_whose_claim_was_taken_over_refuses_to_commit(stores: Stores, keys: Path) -> None:
    """The first dispatcher's process is stopped (SIGSTOP) at its processor for longer than
    its lease, so it cannot renew: the second takes the claim over, calls and commits. The
    first, continued, gets its processor's answer and refuses to commit (R026 with a hint):
    the ledger holds one charge."""
    _billing_with_c1(stores, keys)
    first = Dispatcher(stores.location(), keys, lease_ms=300)
    second = Dispatcher(stores.location(), keys)
    try:
        assert first.go() == "calling"
        assert second.go() == "waiting"
        os.kill(first.process.pid, signal.SIGSTOP)
        try:
            assert second.line() == "calling"  # the stopped holder's lease ran out
            second.answer()
            assert second.finish() == ["charged", "result 2 2"]
        finally:
            os.kill(first.process.pid, signal.SIGCONT)
        first.answer()
        lines = first.finish_failed()
        assert lines[:2] == ["charged", "error R026"]
        assert "the other runtime's result stands" in lines[2]
    finally:
        first.kill()
        second.kill()
    charges = stores.rows("s", "SELECT count(*) FROM ledger WHERE event = 'ChargeRequested'")
    assert charges == [(1,)]
    instance = stores.rows("s", "SELECT state, version FROM instances WHERE instance = 'c1'")
    assert instance[0][1] == 2


@pytest.mark.parametrize("taker_first", [True, False], ids=["taker-commits-first", "both-at-once"])
def test_a_flow_driver_whose_step_claim_was_taken_over_hands_the_run_over(
    stores: Stores, keys: Path, taker_first: bool
) -> None:
    """Driver A of an upgrade run is stopped (SIGSTOP) at the processor of its proration
    charge for longer than its 1 s lease; driver B resumes the same run, takes the step's
    claim over and charges. A, continued, gets its processor's answer: its step's unit
    refuses to commit (its claim is gone, and B moved the run), and instead of raising out of
    `start` (R020/R026 before) it reads the run again and drives on from there, repeating
    the step under the same event id: with B's charge committed it gets B's result; with
    B still at its processor it waits at the claim first. Both drivers end with the run
    waiting for the processor to capture the charge; the ledger holds one charge and one
    recorded step result, and both processor calls carried the same idempotency key (what
    lets the processor deduplicate them)."""
    signer = load_signer(keys)
    runtime, runner, _ = marketplace(stores.open(), signer=signer, clock=VirtualClock(START))
    active_customer(runtime, runner, "c1")
    runtime.close()
    # One lease for both: a claim leased longer than a runtime's own lease is not one it
    # would grant, so it reads as expired (runtime/store/sqlite.py claim_outside).
    first = Dispatcher(stores.location(), keys, lease_ms=1000, worker=FLOW_WORKER)
    second = Dispatcher(stores.location(), keys, lease_ms=1000, worker=FLOW_WORKER)
    try:
        assert first.go() == "calling"
        assert second.go() == "waiting"
        os.kill(first.process.pid, signal.SIGSTOP)
        try:
            assert second.line() == "calling"  # the stopped driver's lease ran out
            if taker_first:
                second.answer()
                assert second.finish() == ["charged", "result waiting succeeded"]
        finally:
            os.kill(first.process.pid, signal.SIGCONT)
        first.answer()
        assert first.line() == "charged"  # the stalled call returns: the second call made
        if not taker_first:
            assert first.line() == "waiting"  # repeating the step, at B's live claim
            second.answer()
            assert second.finish() == ["charged", "result waiting succeeded"]
        assert first.finish() == ["result waiting succeeded"]
    finally:
        first.kill()
        second.kill()
    charges = stores.rows("s", "SELECT count(*) FROM ledger WHERE event = 'ProcessProrationCharge'")
    assert charges == [(1,)]
    recorded = stores.rows(
        "s",
        "SELECT count(*) FROM ledger WHERE kind = 'flow' AND event = 'StepSucceeded' "
        "AND from_state = 'charge_proration'",
    )
    assert recorded == [(1,)]
    completed = stores.rows("s", "SELECT count(*) FROM ledger WHERE event = 'FlowCompleted'")
    assert completed == [(1,)]  # the signup's; the upgrade waits for its capture
    assert stores.verify("s", Keyring.from_files([keys])).ok


class HeldProcessor(Processor):
    """Holds each call (while `holding`) until `answer` is set; `entered` is set when one
    arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = True
        self.entered = threading.Event()
        self.answer = threading.Event()

    def __call__(self, ctx: Any) -> dict[str, str]:
        if self.holding:
            self.entered.set()
            assert self.answer.wait(30)
        return super().__call__(ctx)


def _charge_request(event_id: str = "charge-c1") -> DispatchRequest:
    return DispatchRequest("c1", "ChargeRequested", PAYLOAD, event_id=event_id)


def test_dispatch_many_calls_once_for_an_event_id_repeated_in_its_batch(
    tmp_path: Path, keys: Path
) -> None:
    processor = Processor()
    runtime = open_billing(SQLiteStore(tmp_path / "s.db"), keys, VirtualClock(START), processor)
    governor = runtime.governor("Billing")
    governor.create("c1")
    one, two = governor.dispatch_many([_charge_request(), _charge_request()])
    assert processor.charged == ["c1"]
    assert not isinstance(one, Exception) and not isinstance(two, Exception)
    assert (one.version, one.seq) == (two.version, two.seq) == (2, 2)
    runtime.close()


def test_dispatch_many_does_not_call_again_for_a_repeat_of_a_failed_call(
    tmp_path: Path, keys: Path
) -> None:
    processor = Processor()
    processor.outcomes = [ValueError]  # the first call is declined; a second would capture
    runtime = open_billing(SQLiteStore(tmp_path / "s.db"), keys, VirtualClock(START), processor)
    governor = runtime.governor("Billing")
    governor.create("c1")
    one, two = governor.dispatch_many([_charge_request(), _charge_request()])
    assert isinstance(one, ActionFailed) and two is one
    assert processor.charged == [] and processor.outcomes == []
    runtime.close()


def test_dispatch_many_refuses_a_request_another_runtime_is_calling_for(
    tmp_path: Path, keys: Path
) -> None:
    """Another runtime on the file holds the event id at its processor: the batch does not
    wait for it (it holds other claims meanwhile) but fails that request with R025; sent
    again after the holder committed, it returns the holder's result, calling nothing."""
    held = HeldProcessor()
    holder = open_billing(SQLiteStore(tmp_path / "s.db"), keys, VirtualClock(START), held)
    holder.governor("Billing").create("c1")
    batcher_processor = Processor()
    batcher = open_billing(
        SQLiteStore(tmp_path / "s.db"), keys, VirtualClock(START), batcher_processor
    )
    sending = threading.Thread(
        target=holder.governor("Billing").dispatch,
        args=("c1", "ChargeRequested", PAYLOAD),
        kwargs={"event_id": "charge-c1"},
    )
    sending.start()
    try:
        assert held.entered.wait(30)
        (refused,) = batcher.governor("Billing").dispatch_many([_charge_request()])
        assert isinstance(refused, OutsideCallInProgress) and refused.code == "R025"
    finally:
        held.answer.set()
        sending.join(30)
    (repeat,) = batcher.governor("Billing").dispatch_many([_charge_request()])
    assert not isinstance(repeat, Exception) and repeat.version == 2
    assert held.charged == ["c1"] and batcher_processor.charged == []
    holder.close()
    batcher.close()


def test_a_flow_step_resumed_by_two_runtimes_at_once_charges_once(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runtimes on one store drive the same upgrade run: while the first's proration
    charge is at the processor, the second reaches the same step (its event id) and waits at
    the claim; it then finds the step's result committed, and the processor was called once."""

    entered, answer = threading.Event(), threading.Event()
    submit = _Payments.submit_charge

    def held_submit(payments: _Payments, ctx: Any) -> dict[str, str]:
        if ctx.payload.idempotency_key == "up-c1" and not entered.is_set():
            entered.set()
            assert answer.wait(30)
        return submit(payments, ctx)

    monkeypatch.setattr(_Payments, "submit_charge", held_submit)
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    first, first_runner, first_world = marketplace(stores.open("m", partitions=4), signer=signer)
    active_customer(first, first_runner, "c1")
    second, second_runner, second_world = marketplace(stores.open("m", partitions=4), signer=signer)
    waiting = threading.Event()
    claim = second.store.claim_outside

    def observed(keys: Any, holder: str, lease_ms: int) -> bool:
        taken = claim(keys, holder, lease_ms)
        if not taken:
            waiting.set()
        return taken

    monkeypatch.setattr(second.store, "claim_outside", observed)
    results: list[Any] = []

    def drive(runner: Any) -> None:
        try:
            results.append(runner.start("SubscriptionUpgrade", "c1", upgrade_inputs("c1")))
        except Exception as error:  # the run's own version check may refuse the slower one
            results.append(error)

    driving = threading.Thread(target=drive, args=(first_runner,))
    driving.start()
    assert entered.wait(30)
    resuming = threading.Thread(target=drive, args=(second_runner,))
    resuming.start()
    try:
        assert waiting.wait(30)  # at the claim of the charge step's event id
    finally:
        answer.set()
        driving.join(30)
        resuming.join(30)
    charges = [
        key
        for world in (first_world, second_world)
        for key in world.payments.submitted
        if key == "up-c1"
    ]
    assert charges == ["up-c1"]
    # The run goes on to its end once the charge is captured (a start of the same run
    # resumes it).
    capture_proration(first, "c1")
    final = first_runner.start("SubscriptionUpgrade", "c1", upgrade_inputs("c1"))
    assert final.status == "completed", results
    first.close()
    second.close()


def _billing_c1_in_retry1(stores: Stores, keys: Path) -> None:
    """c1's charge declined: its retry ladder's first step (retry_charge) is due at 1 h."""
    runtime = open_billing(stores.open(), keys, VirtualClock(START), Processor())
    billing = runtime.governor("Billing")
    billing.create("c1")
    billing.dispatch("c1", "ChargeRequested", PAYLOAD)
    failure = {"customer_id": "c1", "idempotency_key": "k1", "reason": "declined"}
    assert billing.dispatch("c1", "PaymentFailed", failure).to_state == "Retry1"
    runtime.close()


def test_a_timer_firing_whose_holder_stalled_past_its_lease_is_stored_once(
    stores: Stores, keys: Path
) -> None:
    """c1's retry ladder step (retry_charge, a policy's action) is due. The first firing
    process is stopped (SIGSTOP) at its processor for longer than its 1 s lease; the second
    fires the timer meanwhile (on SQLite it takes the firing's claim over, on PostgreSQL the
    timer's worker lease) and commits. The first, continued, gets its processor's answer and
    stores nothing: on SQLite its unit finds the claim gone and refuses (R026, with a hint);
    on PostgreSQL it finds the timer fired. One firing in the ledger, the instance moved once,
    the processor called by both (the call its stalled holder made cannot be taken back)."""
    _billing_c1_in_retry1(stores, keys)
    first = Dispatcher(stores.location(), keys, 1000, WORKER, "fire")
    second = Dispatcher(stores.location(), keys, 1000, WORKER, "fire-until")
    try:
        assert first.go() == "calling"
        os.kill(first.process.pid, signal.SIGSTOP)
        try:
            if stores.kind == "sqlite":
                assert second.go() == "waiting"  # the timer's firing is claimed
                assert second.line() == "calling"  # the stopped holder's lease ran out
            else:  # a timer leased to another worker is not listed as due
                assert second.go() == "calling"
            second.answer()
            assert second.finish() == ["charged", "result fired 1"]
        finally:
            os.kill(first.process.pid, signal.SIGCONT)
        first.answer()
        if stores.kind == "sqlite":
            lines = first.finish_failed()
            assert lines[:2] == ["charged", "error R026"]
            assert "the other runtime's result stands" in lines[2]
        else:
            assert first.finish() == ["charged", "result fired 0"]
    finally:
        first.kill()
        second.kill()
    firings = stores.rows(
        "s", "SELECT count(*) FROM ledger WHERE instance = 'c1' AND kind IN ('timer', 'escalation')"
    )
    assert firings == [(1,)]
    assert stores.rows("s", "SELECT version FROM instances WHERE instance = 'c1'") == [(4,)]


def test_a_retry_made_again_after_kill_9_sends_its_firings_key_and_the_next_retry_another(
    stores: Stores, keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """c1's retry ladder step (retry_charge, a timer's outside call) is at the processor when
    its process is killed (SIGKILL): nothing of the firing is stored, so the next process
    fires it again and calls again. Both calls send the same key, the firing's id (its ledger
    entry's event id), which the processor deduplicates by; the ladder's next retry, three
    hours after the attempt timed out, sends another."""
    _billing_c1_in_retry1(stores, keys)
    sent = tmp_path / "sent.txt"
    monkeypatch.setenv("CLAIM_WORKER_KEYS", str(sent))
    first = Dispatcher(stores.location(), keys, 1000, WORKER, "fire")
    try:
        assert first.go() == "calling"
    finally:
        first.kill()
    second = Dispatcher(stores.location(), keys, 1000, WORKER, "fire-until")
    try:
        line = second.go()
        if line == "waiting":  # SQLite: the killed one's claim holds until its lease runs out
            line = second.line()
        assert line == "calling"
        second.answer()
        assert second.finish() == ["charged", "result fired 1"]
    finally:
        second.kill()

    keys_sent: list[tuple[str | None, str | None]] = []

    def retry(ctx: Any) -> dict[str, str]:
        keys_sent.append((ctx.event_id, ctx.idempotency_key))
        return {"captured": ctx.instance}

    clock = VirtualClock(START + 3_600_000)
    runtime = open_billing(stores.open(), keys, clock, retry)
    with runtime:
        # Retry 1's attempt unanswered for an hour, then Retry 2's charge three hours later.
        runtime.fire_due(clock.advance("4h"))
        firings = [
            e.event_id
            for e in runtime.store.ledger_entries(machine="Billing", instance="c1")
            if e.kind == "timer" and e.to_state in ("Retry1Charging", "Retry2Charging")
        ]
    assert len(firings) == 2 and firings[0] != firings[1]
    assert sent.read_text().split() == [firings[0]] * 4  # event id and key, in both calls
    assert keys_sent == [(firings[1], firings[1])]


def test_two_runtimes_firing_one_retry_timer_call_the_processor_once(
    tmp_path: Path, keys: Path
) -> None:
    """Billing's retry ladder step (retry_charge, a policy's action) is due in two runtimes on
    one file: while the first's call is at the processor, the second's fire_due leaves that
    timer to it, and the processor is called once."""
    clock = VirtualClock(START)
    held, other = HeldProcessor(), Processor()
    first = open_billing(SQLiteStore(tmp_path / "s.db"), keys, clock, held)
    second = open_billing(SQLiteStore(tmp_path / "s.db"), keys, clock, other)
    billing = first.governor("Billing")
    billing.create("c1")
    held.holding = False
    billing.dispatch("c1", "ChargeRequested", PAYLOAD)
    failure = {"customer_id": "c1", "idempotency_key": "k1", "reason": "declined"}
    billing.dispatch("c1", "PaymentFailed", failure)
    assert billing.get("c1").state == "Retry1"  # type: ignore[union-attr]
    held.holding = True
    clock.advance("1h")
    fired: list[Any] = []
    firing = threading.Thread(target=lambda: fired.extend(first.fire_due()))
    firing.start()
    try:
        assert held.entered.wait(30)
        assert second.fire_due() == []  # held by the first: left to it
    finally:
        held.answer.set()
        firing.join(30)
    assert [f.timer.timer_id for f in fired] and held.charged == ["c1", "c1"]
    assert other.charged == []
    first.close()
    second.close()


# -- the release goes with the commit of the unit that records the calls' result ---------------


def test_a_transaction_lets_go_of_claims_when_it_commits_and_keeps_them_if_not(
    stores: Stores,
) -> None:
    store = stores.open()
    other = ("Billing", "key", "k1")
    assert store.claim_outside([KEY, other], "a", 60_000)

    def let_go_then_fail(txn: Any) -> None:
        txn.release_outside([KEY, other], "a")
        raise RuntimeError("rolled back")

    (failed,) = store.run([let_go_then_fail])
    assert isinstance(failed.error, RuntimeError)
    assert not store.claim_outside([KEY], "b", 60_000)  # kept: the transaction rolled back
    store.run([lambda txn: txn.release_outside([KEY, other], "b")])  # not b's: both stay
    assert not store.claim_outside([other], "b", 60_000)
    store.run([lambda txn: txn.release_outside([KEY, other], "a")])
    assert store.claim_outside([KEY, other], "b", 60_000)  # gone with the commit
    store.close()


def _no_own_release(store: Any, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make `store`'s own release write nothing (as if its process ended right after the
    dispatch's commit): what it was asked to let go of."""
    asked: list[object] = []
    monkeypatch.setattr(store, "release_outside", lambda keys, holder: asked.append(keys))
    return asked


@pytest.mark.parametrize("way", ["dispatch", "dispatch_async", "dispatch_many"])
def test_a_committed_charge_lets_go_of_its_claim_in_its_own_commit(
    stores: Stores, keys: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """The unit of work that records the charge deletes its claim rows (event id and key) in
    its transaction: no release of its own follows, nothing is left in outside_claims, and
    another holder claims the keys at once."""
    store = stores.open()
    asked = _no_own_release(store, monkeypatch)
    processor = Processor()
    runtime = open_billing(store, keys, VirtualClock(START), processor)
    billing = runtime.governor("Billing")
    billing.create("c1")
    if way == "dispatch":
        result = billing.dispatch("c1", "ChargeRequested", PAYLOAD, event_id="charge-c1")
    elif way == "dispatch_async":
        result = asyncio.run(
            billing.dispatch_async("c1", "ChargeRequested", PAYLOAD, event_id="charge-c1")
        )
    else:
        (result,) = billing.dispatch_many([_charge_request()])  # type: ignore[assignment]
    assert not isinstance(result, Exception) and result.version == 2
    assert processor.charged == ["c1"]
    assert asked == []
    assert stores.rows("s", "SELECT count(*) FROM outside_claims") == [(0,)]
    assert store.claim_outside([KEY, ("Billing", "key", "k1")], "another", 60_000)
    runtime.close()


def test_a_charge_whose_unit_does_not_commit_lets_go_on_its_own(tmp_path: Path, keys: Path) -> None:
    """Refused inside its unit (the instance moved on while the processor was called, so the
    decided move no longer applies): the claim is let go afterwards, on its own."""
    store = SQLiteStore(tmp_path / "s.db")
    runtime = open_billing(store, keys, VirtualClock(START), Processor())
    billing = runtime.governor("Billing")
    billing.create("c1")
    mover = open_billing(SQLiteStore(tmp_path / "s.db"), keys, VirtualClock(START), Processor())

    class Moving(Processor):
        def __call__(self, ctx: Any) -> dict[str, str]:
            # Another runtime moves c1 on while this call is at the processor.
            mover.governor("Billing").dispatch("c1", "ChargeRequested", PAYLOAD)
            return super().__call__(ctx)

    runtime.close()
    runtime = open_billing(SQLiteStore(tmp_path / "s.db"), keys, VirtualClock(START), Moving())
    with pytest.raises(Exception):  # noqa: B017 - whichever refusal the moved instance gives
        runtime.governor("Billing").dispatch("c1", "ChargeRequested", PAYLOAD, event_id="charge-c1")
    runtime.close()
    mover.close()
    assert sqlite3_rows(tmp_path / "s.db", "SELECT count(*) FROM outside_claims") == [(0,)]


def sqlite3_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


def test_a_committed_timer_firing_lets_go_of_its_claim_in_its_own_commit(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = VirtualClock(START)
    store = SQLiteStore(tmp_path / "s.db")
    processor = Processor()
    runtime = open_billing(store, keys, clock, processor)
    billing = runtime.governor("Billing")
    billing.create("c1")
    billing.dispatch("c1", "ChargeRequested", PAYLOAD)
    failure = {"customer_id": "c1", "idempotency_key": "k1", "reason": "declined"}
    billing.dispatch("c1", "PaymentFailed", failure)
    asked = _no_own_release(store, monkeypatch)
    clock.advance("1h")
    assert [f.timer.timer_id for f in runtime.fire_due()]
    assert processor.charged == ["c1", "c1"]  # the retry ladder's call
    assert asked == []
    assert sqlite3_rows(tmp_path / "s.db", "SELECT count(*) FROM outside_claims") == [(0,)]
    runtime.close()


def test_a_flow_steps_claim_goes_with_its_commit(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancellation saga's refund (Billing's outside call), driven sync and asyncio."""
    store = stores.open()
    asked = _no_own_release(store, monkeypatch)
    runtime, runner, _ = marketplace(store)
    for customer in ("x1", "x2"):
        active_customer(runtime, runner, customer)
    inputs = {"customer_id": "x1", "request_id": "cx-x1", "reason": "moving"}
    assert runner.start("SubscriptionCancellation", "x1", inputs).status == "completed"
    inputs = {"customer_id": "x2", "request_id": "cx-x2", "reason": "moving"}
    done = asyncio.run(runner.start_async("SubscriptionCancellation", "x2", inputs))
    assert done.status == "completed"
    runtime.close()
    assert asked == []
    assert stores.rows("s", "SELECT count(*) FROM outside_claims") == [(0,)]
