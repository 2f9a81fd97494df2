"""Billing's machine-file policies applied by the runtime: retry, breaker (in the signed ledger),
fallback and per-tenant breakers, on SQLite with real signatures and a virtual clock."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from autonomic.generated.billing import MACHINE as BILLING
from autonomic.runtime.dispatch import DispatchRequest, Governor
from autonomic.runtime.errors import (
    ActionFailed,
    ConcurrentUpdateDetected,
    OutsideCallsSuperseded,
    UnknownInstance,
)
from autonomic.runtime.keys import Keyring, load_signer
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.resilience import (
    BreakerState,
    DeadlineTracker,
    ServiceFailure,
    TransientFailure,
    Unavailable,
    dispatch_in_chunks,
)
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import MemoryStore, SQLiteStore
from autonomic.runtime.tables import ActionPolicy
from autonomic.runtime.timers import VirtualClock
from billing_world import START, Processor, open_billing
from billing_world import charge as _charge
from billing_world import noop as _noop
from billing_world import yes as _yes

CRASH_WORKER = Path(__file__).with_name("breaker_crash_worker.py")


@pytest.fixture
def billing(tmp_path: Path, keys: Path) -> Iterator[tuple[Runtime, Processor, Processor]]:
    clock = VirtualClock(START)
    runtime = Runtime(
        SQLiteStore(tmp_path / "store.db"),
        clock=clock,
        sealer=LedgerSealer(load_signer(keys), "sign-each"),
    )
    primary, backup = Processor(), Processor()
    actions: dict[str, Callable[[Any], object]] = {name: _noop for name in BILLING.actions}
    actions["submit_charge"] = primary
    actions["charge_backup_processor"] = backup
    runtime.load(BILLING, {name: _yes for name in BILLING.guards}, actions)
    yield runtime, primary, backup
    runtime.close()


def test_the_generated_billing_tables_carry_its_policies() -> None:
    assert BILLING.policies["PaymentProcessor"] == ActionPolicy(
        name="PaymentProcessor",
        actions=("retry_charge", "submit_charge"),
        attempts=3,
        backoff="jitter",
        backoff_max_ms=2000,
        tolerated_failures=10,
        cooldown_ms=30_000,
        fallback="charge_backup_processor",
        bulkhead=4,
        ref=BILLING.policies["PaymentProcessor"].ref,
    )
    assert "charge_backup_processor" in BILLING.actions  # so binding it is required


def test_a_transient_processor_failure_is_retried_within_the_dispatch(
    billing: tuple[Runtime, Processor, Processor],
) -> None:
    runtime, primary, backup = billing
    primary.outcomes = [TransientFailure, TransientFailure]
    _charge(runtime, "cust-1")
    assert primary.charged == ["cust-1"] and backup.charged == []
    assert runtime.clock.now_ms() - START == 217 + 434  # waited on the virtual clock
    assert runtime.governor("Billing").get("cust-1").state == "AwaitingPayment"  # type: ignore[union-attr]
    primary.outcomes = [TransientFailure] * 3
    with pytest.raises(ActionFailed):
        _charge(runtime, "cust-2")  # three attempts, all transient: the dispatch fails
    assert runtime.governor("Billing").get("cust-2").state == "Current"  # type: ignore[union-attr]


def test_the_breaker_opens_falls_back_and_closes_with_every_move_in_the_signed_ledger(
    billing: tuple[Runtime, Processor, Processor], keys: Path
) -> None:
    runtime, primary, backup = billing
    clock = runtime.clock
    assert isinstance(clock, VirtualClock)
    primary.failing = ServiceFailure  # counted by the breaker, neither transient nor unavailable
    for n in range(11):
        with pytest.raises(ActionFailed):
            _charge(runtime, f"cust-{n}")
    breaker = runtime.policies.breaker("Billing", "PaymentProcessor")
    assert breaker is not None and breaker.state is BreakerState.OPEN
    calls_before = len(primary.outcomes)
    _charge(runtime, "cust-11")  # fails fast on the open breaker: the backup charges
    assert backup.charged == ["cust-11"] and primary.charged == [] and calls_before == 0

    clock.advance("30s")
    primary.failing = None
    _charge(runtime, "cust-12")  # the half-open probe succeeds on the primary
    assert primary.charged == ["cust-12"] and breaker.state is BreakerState.CLOSED

    moves = [e for e in runtime.ledger() if e.kind == "breaker"]
    assert [(e.machine, e.instance, e.event, e.from_state, e.to_state) for e in moves] == [
        ("Billing", "policy:PaymentProcessor", "BreakerOpened", "closed", "open"),
        ("Billing", "policy:PaymentProcessor", "BreakerHalfOpened", "open", "half_open"),
        ("Billing", "policy:PaymentProcessor", "BreakerClosed", "half_open", "closed"),
    ]
    assert all(e.signature for e in moves)
    assert [e.ts_ms - START for e in moves] == [0, 30_000, 30_000]
    report = runtime.verify(Keyring.from_files([keys]))
    assert report.ok, report


def _billing_runtime(
    path: Path, keys: Path, clock: VirtualClock, primary: Processor | None = None
) -> tuple[Runtime, Processor]:
    primary = primary or Processor()
    return open_billing(SQLiteStore(path), keys, clock, primary), primary


def test_an_open_breaker_stays_open_across_a_restart(tmp_path: Path, keys: Path) -> None:
    """Breaker state lives in the store: a new process finds the breaker (and a tenant's
    bulkhead breaker) open, fails fast without calling the processor, and probes after the
    cool-down counted from the original opening."""
    clock = VirtualClock(START)
    path = tmp_path / "store.db"
    runtime, primary = _billing_runtime(path, keys, clock)
    primary.failing_for = {"noisy"}
    for n in range(11):  # between other tenants' charges: only the tenant's breaker opens
        with pytest.raises(ActionFailed):
            _charge(runtime, "noisy")
        _charge(runtime, f"quiet-{n}")
    primary.failing_for = set()
    primary.failing = ServiceFailure
    for n in range(11):
        with pytest.raises(ActionFailed):
            _charge(runtime, f"cust-{n}")
    runtime.close()

    clock.advance("10s")
    runtime, primary = _billing_runtime(path, keys, clock)
    breaker = runtime.policies.breaker("Billing", "PaymentProcessor")
    assert breaker is not None and breaker.state is BreakerState.OPEN
    bulkheads = runtime.policies.bulkheads("Billing", "PaymentProcessor")
    assert bulkheads is not None
    assert bulkheads.for_tenant("noisy").breaker.state is BreakerState.OPEN
    assert bulkheads.for_tenant("quiet").breaker.state is BreakerState.CLOSED
    assert not bulkheads.for_tenant("noisy").first_failure()  # still failing: counted once
    _charge(runtime, "cust-a")  # fails fast: the backup charges, the primary is not called
    assert primary.charged == [] and primary.outcomes == []
    clock.advance("20s")  # 30 s after the opening, not after the restart
    _charge(runtime, "cust-b")
    assert primary.charged == ["cust-b"] and breaker.state is BreakerState.CLOSED
    stored = runtime.store.get_breaker("Billing", "PaymentProcessor")
    assert stored is not None and stored.state == "closed"
    moves = [(e.instance, e.event) for e in runtime.ledger() if e.kind == "breaker"]
    assert moves == [
        ("policy:PaymentProcessor[noisy]", "BreakerOpened"),
        ("policy:PaymentProcessor", "BreakerOpened"),
        ("policy:PaymentProcessor", "BreakerHalfOpened"),
        ("policy:PaymentProcessor", "BreakerClosed"),
    ]
    assert runtime.verify(Keyring.from_files([keys])).ok
    runtime.close()


def test_a_charge_and_a_refund_the_processor_never_answers_do_not_stall(
    tmp_path: Path, keys: Path
) -> None:
    """No answer ever comes from the processor: the first charge counts as failed after 1h
    and the payment ladder runs its attempts, the collection agency's too, to its end; a refund
    runs its own ladder's attempts to manual review. Nothing waits for ever on the processor."""
    clock = VirtualClock(START)
    runtime, primary = _billing_runtime(tmp_path / "store.db", keys, clock)
    billing = runtime.governor("Billing")
    _charge(runtime, "c")
    billing.create("r")
    billing.dispatch("r", "RefundRequested", {"customer_id": "r", "reason": "suspended"})
    path: dict[str, list[str]] = {"c": ["AwaitingPayment"], "r": ["Refunding"]}
    while (due := runtime.next_deadline()) is not None and due < START + 10 * 86_400_000:
        clock.advance(due - clock.now_ms())
        runtime.fire_due()
        for instance, states in path.items():
            record = billing.get(instance)
            assert record is not None
            if record.state != states[-1]:
                states.append(record.state)
    assert path["c"] == [
        "AwaitingPayment",
        "Retry1",
        "Retry1Charging",
        "Retry2",
        "Retry2Charging",
        "Retry3",
        "Retry3Charging",
        "CollectionAgency",
        "CollectionAgencyPending",
        "MaxRetriesExceeded",
    ]
    assert primary.charged == ["c"] * 4  # the first charge and three retries, each once
    assert path["r"] == [
        "Refunding",
        "RefundRetry1",
        "RefundRetry1Paying",
        "RefundRetry2",
        "RefundRetry2Paying",
        "RefundManualReview",
    ]
    runtime.close()


def test_a_closed_breakers_run_of_failures_survives_a_restart(tmp_path: Path, keys: Path) -> None:
    """Every change of the run of failures is stored, the reset by a success too: a restarted
    runtime opens the breaker on the same failure that would have opened it without the
    restart (the 11th in a row), not 11 failures after the restart."""
    clock = VirtualClock(START)
    path = tmp_path / "store.db"
    runtime, primary = _billing_runtime(path, keys, clock)
    failure: type[Exception] = ServiceFailure
    primary.outcomes = [failure] * 6 + [None] + [failure] * 10
    for n in range(17):
        if n == 6:
            _charge(runtime, f"cust-{n}")  # a success ends the run: 0 is stored
            stored = runtime.store.get_breaker("Billing", "PaymentProcessor")
            assert stored is not None and (stored.state, stored.failures) == ("closed", 0)
            continue
        with pytest.raises(ActionFailed):
            _charge(runtime, f"cust-{n}")
    runtime.close()

    runtime, primary = _billing_runtime(path, keys, clock)
    breaker = runtime.policies.breaker("Billing", "PaymentProcessor")
    assert breaker is not None and breaker.state is BreakerState.CLOSED
    assert breaker.failures == 10
    primary.failing = ServiceFailure
    with pytest.raises(ActionFailed):
        _charge(runtime, "cust-17")
    assert breaker.state is BreakerState.OPEN
    stored = runtime.store.get_breaker("Billing", "PaymentProcessor")
    assert stored is not None and (stored.state, stored.failures) == ("open", 11)
    moves = [(e.instance, e.event) for e in runtime.ledger() if e.kind == "breaker"]
    assert moves == [("policy:PaymentProcessor", "BreakerOpened")]
    assert runtime.verify(Keyring.from_files([keys])).ok
    runtime.close()


@pytest.mark.parametrize("charges", [10, 11])
def test_a_breaker_change_commits_with_the_charge_that_made_it(
    tmp_path: Path, keys: Path, charges: int
) -> None:
    """Killed (SIGKILL) right after the first commit of a charge's dispatch, whose primary
    failed (the backup made the charge): that commit holds the charge and the breaker's
    count, and at the 11th the opening with its signed entry. A restart after 10 opens the
    breaker on the next failure."""
    db = tmp_path / "store.db"
    done = subprocess.run(
        [sys.executable, str(CRASH_WORKER), str(db), str(keys), str(charges)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    runtime, primary = _billing_runtime(db, keys, VirtualClock(START))
    last = runtime.governor("Billing").get(f"c{charges - 1}")
    assert last is not None and last.state == "AwaitingPayment"  # the charge committed
    stored = runtime.store.get_breaker("Billing", "PaymentProcessor")
    opened = charges > 10
    assert stored is not None
    assert (stored.state, stored.failures) == ("open" if opened else "closed", charges)
    moves = [e.event for e in runtime.ledger() if e.kind == "breaker"]
    assert moves == (["BreakerOpened"] if opened else [])
    assert runtime.verify(Keyring.from_files([keys])).ok
    if not opened:
        primary.failing = Unavailable
        _charge(runtime, "c10")
        breaker = runtime.policies.breaker("Billing", "PaymentProcessor")
        assert breaker is not None and breaker.state is BreakerState.OPEN
    runtime.close()


class HeldProcessor(Processor):
    """A processor that holds the calls of the tenants in `held` (instance or customer_id)
    until `release` is set (a processor that stopped answering them), counting how many it
    holds at once."""

    def __init__(self, held: set[str]) -> None:
        super().__init__()
        self.held = held
        self.release = threading.Event()
        self.entered = threading.Event()  # set when the first held call arrives
        self.holding = 0
        self.most_held = 0
        self._lock = threading.Lock()

    def __call__(self, ctx: Any) -> dict[str, str]:
        if ctx.instance in self.held or getattr(ctx.payload, "customer_id", None) in self.held:
            with self._lock:
                self.holding += 1
                self.most_held = max(self.most_held, self.holding)
            self.entered.set()
            try:
                assert self.release.wait(30)
            finally:
                with self._lock:
                    self.holding -= 1
        return super().__call__(ctx)


def _charge_while_another_dispatcher_moves_it(
    tmp_path: Path, keys: Path, event: str, payload: dict[str, str]
) -> tuple[Runtime, HeldProcessor, BaseException | None]:
    """Two dispatchers on one SQLite file (two runtimes): the first charges c1 and its
    processor call is held; meanwhile the second sends `event` to c1 and commits; then the
    call is answered. Returns the first runtime, its processor and what the charge raised."""
    clock = VirtualClock(START)
    processor = HeldProcessor({"c1"})
    first = open_billing(SQLiteStore(tmp_path / "store.db"), keys, clock, processor)
    second = open_billing(SQLiteStore(tmp_path / "store.db"), keys, clock, Processor())
    first.governor("Billing").create("c1")
    raised: list[BaseException] = []

    def charge_c1() -> None:
        try:
            _charge(first, "c1", event_id="charge-c1")
        except BaseException as error:
            raised.append(error)

    charging = threading.Thread(target=charge_c1)
    charging.start()
    assert processor.entered.wait(30)  # the charge is at the processor, nothing committed
    second.governor("Billing").dispatch("c1", event, payload)
    processor.release.set()
    charging.join(30)
    second.close()
    return first, processor, raised[0] if raised else None


SLA_CREDIT = {"customer_id": "c1", "violation_id": "v1", "window_start": "2026-01-01T00:00:00Z"}


def test_a_charge_decided_the_same_after_a_concurrent_move_takes_its_one_call(
    tmp_path: Path, keys: Path
) -> None:
    """The instance moved (an SLA credit, Current -> Current) while the charge's call was at
    the processor: the event is still decided the same way, so the transaction takes the
    call's result; the processor is called once, not again inside the transaction."""
    runtime, processor, raised = _charge_while_another_dispatcher_moves_it(
        tmp_path, keys, "SLAViolation", SLA_CREDIT
    )
    assert raised is None
    assert processor.charged == ["c1"]
    record = runtime.governor("Billing").get("c1")
    assert record is not None and (record.state, record.version) == ("AwaitingPayment", 3)
    events = [e.event for e in runtime.governor("Billing").history("c1")]
    assert events == ["create", "SLAViolation", "ChargeRequested"]
    assert runtime.store.processed("Billing", "charge-c1") is not None
    runtime.close()


def test_a_charge_decided_otherwise_after_a_concurrent_move_is_refused_with_its_result(
    tmp_path: Path, keys: Path
) -> None:
    """The account was closed while the charge's call was at the processor: the charge is
    no longer valid, so nothing of it is stored and the processor is not called again; the
    refusal (a ConcurrentUpdateDetected) carries the call's result for the caller to settle."""
    runtime, processor, raised = _charge_while_another_dispatcher_moves_it(
        tmp_path, keys, "CloseAccount", {"customer_id": "c1", "reason": "cancelled"}
    )
    assert isinstance(raised, OutsideCallsSuperseded)
    assert isinstance(raised, ConcurrentUpdateDetected)
    assert (raised.expected, raised.actual) == (1, 2)
    assert raised.results == {"submit_charge": {"captured": "c1"}}
    assert processor.charged == ["c1"]
    record = runtime.governor("Billing").get("c1")
    assert record is not None and record.state == "Closed"
    assert [e.event for e in runtime.governor("Billing").history("c1")] == [
        "create",
        "CloseAccount",
    ]
    assert runtime.store.processed("Billing", "charge-c1") is None
    runtime.close()


def _observe_claim_waits(runtime: Runtime) -> threading.Event:
    """An event set when a dispatch finds its event id or key claimed by another one."""
    claims = runtime._outside
    try_local = claims.try_local
    waiting = threading.Event()

    def observed(keys: Any, thread: int | None = None) -> Any:
        release, busy = try_local(keys, thread)
        if busy is not None:
            waiting.set()
        return release, busy

    claims.try_local = observed  # type: ignore[method-assign]
    return waiting


def test_two_dispatches_of_one_event_id_at_once_call_the_processor_once(
    tmp_path: Path, keys: Path
) -> None:
    """Two threads send the same charge (same event id) at once: the second waits while the
    first's call is at the processor, then finds the first's result committed and returns it
    without calling the processor again."""
    processor = HeldProcessor({"c1"})
    runtime = open_billing(SQLiteStore(tmp_path / "store.db"), keys, VirtualClock(START), processor)
    runtime.governor("Billing").create("c1")
    waiting = _observe_claim_waits(runtime)
    results: list[Any] = []

    def charge_c1() -> None:
        _charge(runtime, "c1", event_id="charge-c1")
        results.append(runtime.store.processed("Billing", "charge-c1"))

    first, second = threading.Thread(target=charge_c1), threading.Thread(target=charge_c1)
    first.start()
    assert processor.entered.wait(30)
    second.start()
    assert waiting.wait(30)  # the second dispatch is at the claim, not at the processor
    processor.release.set()
    first.join(30)
    second.join(30)
    assert processor.charged == ["c1"] and processor.most_held == 1
    assert len(results) == 2 and results[0] == results[1] is not None
    assert [e.event for e in runtime.governor("Billing").history("c1")] == [
        "create",
        "ChargeRequested",
    ]
    runtime.close()


def test_a_memory_store_owner_waiting_for_a_claim_does_not_hold_up_the_thread_holding_it(
    keys: Path,
) -> None:
    """On the memory store the owning thread sends a charge whose event id another thread
    holds (its call at the processor): the owner waits for the claim inside dispatch. The
    other thread then enters the store, which revokes the owner and waits until the owner is
    out of dispatch's unlocked code: it is (waiting for the claim), so both finish (they
    waited for each other for ever before)."""
    processor = HeldProcessor({"c1"})
    store = MemoryStore()
    opened: list[Runtime] = []
    owned = threading.Event()

    def owner() -> None:  # the first thread to enter the store: it owns it
        opened.append(open_billing(store, keys, VirtualClock(START), processor))
        opened[0].governor("Billing").create("c1")
        assert store.owner == threading.get_ident()
        owned.set()
        assert processor.entered.wait(30)
        _charge(opened[0], "c1", event_id="charge-c1")

    first = threading.Thread(target=owner, daemon=True)
    first.start()
    assert owned.wait(30)
    runtime = opened[0]
    waiting = _observe_claim_waits(runtime)
    second = threading.Thread(target=_charge, args=(runtime, "c1", "charge-c1"), daemon=True)
    second.start()
    assert waiting.wait(30)  # the owner waits at the claim, inside dispatch
    processor.release.set()
    first.join(30)
    second.join(30)
    assert not first.is_alive() and not second.is_alive()
    assert processor.charged == ["c1"]
    assert runtime.store.processed("Billing", "charge-c1") is not None
    runtime.close()


def test_two_async_dispatches_of_one_event_id_call_the_processor_once(
    tmp_path: Path, keys: Path
) -> None:
    """The same under asyncio: the second coroutine waits for the claim without blocking
    the event loop, and gets the first's result."""
    processor = HeldProcessor({"c1"})
    runtime = open_billing(SQLiteStore(tmp_path / "store.db"), keys, VirtualClock(START), processor)
    governor = runtime.governor("Billing")
    governor.create("c1")
    waiting = _observe_claim_waits(runtime)
    payload = {"customer_id": "c1", "invoice_id": "i", "amount": "9.00", "idempotency_key": "k"}

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(
            governor.dispatch_async("c1", "ChargeRequested", payload, event_id="e1")
        )
        assert await loop.run_in_executor(None, processor.entered.wait, 30)
        second = asyncio.create_task(
            governor.dispatch_async("c1", "ChargeRequested", payload, event_id="e1")
        )
        assert await loop.run_in_executor(None, waiting.wait, 30)
        processor.release.set()
        return list(await asyncio.gather(first, second))

    one, two = asyncio.run(main())
    assert processor.charged == ["c1"]
    assert (one.version, one.seq) == (two.version, two.seq) and one.version == 2
    runtime.close()


def test_retries_wait_outside_the_write_transaction(tmp_path: Path, keys: Path) -> None:
    """The charge's retry waits for the processor while other work commits: a policy's
    actions run before the unit of work takes the write lock, and the unit takes their
    result instead of calling again (one capture)."""
    processor = HeldProcessor({"cust-1"})
    processor.outcomes = [TransientFailure]  # the first attempt fails: the retry is held
    runtime, _ = _billing_runtime(tmp_path / "s.db", keys, VirtualClock(START), processor)
    runtime.governor("Billing").create("cust-1")
    charging = threading.Thread(target=_charge, args=(runtime, "cust-1"))
    charging.start()
    while processor.holding == 0:  # the retry is in flight
        charging.join(0.001)
    other = threading.Thread(target=_charge, args=(runtime, "cust-2"))
    other.start()
    other.join(10)
    assert not other.is_alive()  # committed while the retry waited
    assert runtime.governor("Billing").get("cust-2").state == "AwaitingPayment"  # type: ignore[union-attr]
    processor.release.set()
    charging.join(10)
    assert processor.charged == ["cust-2", "cust-1"]  # each captured once
    history = runtime.governor("Billing").history("cust-1")
    assert [e.event for e in history] == ["create", "ChargeRequested"]
    runtime.close()


def test_a_retry_ladder_step_calls_the_processor_outside_the_write_transaction(
    tmp_path: Path, keys: Path
) -> None:
    """The ladder's timer fires retry_charge (a policy's action) before the firing's
    transaction: while the processor holds the retry, other work commits."""
    processor = HeldProcessor(set())
    clock = VirtualClock(START)
    runtime, _ = _billing_runtime(tmp_path / "s.db", keys, clock, processor)
    governor = runtime.governor("Billing")
    governor.create("cust-1")
    _charge(runtime, "cust-1")
    failure = {"customer_id": "cust-1", "idempotency_key": "k", "reason": "declined"}
    governor.dispatch("cust-1", "PaymentFailed", failure)
    assert governor.get("cust-1").state == "Retry1"  # type: ignore[union-attr]
    processor.held = {"cust-1"}
    clock.advance("1h")
    firing = threading.Thread(target=runtime.fire_due)
    firing.start()
    while processor.holding == 0:
        firing.join(0.001)
    other = threading.Thread(target=_charge, args=(runtime, "cust-2"))
    other.start()
    other.join(10)
    assert not other.is_alive()  # committed while the retry was with the processor
    processor.release.set()
    firing.join(10)
    assert governor.get("cust-1").state == "Retry1Charging"  # type: ignore[union-attr]
    assert processor.charged == ["cust-1", "cust-2", "cust-1"]  # the retry called once
    runtime.close()


def test_a_hung_tenant_leaves_the_others_throughput_intact_under_asyncio(
    tmp_path: Path, keys: Path
) -> None:
    """Tenant "noisy" has 12 billing accounts (12 subscriptions, one customer_id) and the
    processor stops answering its charges. dispatch_async runs the policy's actions in the
    runtime's 8 action threads: without the bulkhead the tenant's 12 calls would hold all 8
    and starve everyone. The bulkhead (4 per tenant, the tenant being the events'
    customer_id) lets it hold 4 and refuses its other 8 at once, so 20 other tenants' charges
    are all made while the 4 still hang; then the 4 complete. Nothing is timed."""
    processor = HeldProcessor({"noisy"})
    runtime = Runtime(
        SQLiteStore(tmp_path / "s.db"),
        clock=VirtualClock(START),
        sealer=LedgerSealer(load_signer(keys), "sign-each"),
        action_threads=8,
    )
    actions: dict[str, Callable[[Any], object]] = {name: _noop for name in BILLING.actions}
    actions["submit_charge"] = actions["retry_charge"] = processor
    actions["charge_backup_processor"] = Processor()
    governor = runtime.load(BILLING, {name: _yes for name in BILLING.guards}, actions)
    accounts = [f"noisy-sub-{n}" for n in range(12)]
    quiet = [f"quiet-{n}" for n in range(20)]
    for account in [*accounts, *quiet]:
        governor.create(account)

    def charge(account: str, tenant: str) -> Any:
        payload = {
            "customer_id": tenant,
            "invoice_id": f"inv-{account}",
            "amount": "99.00",
            "idempotency_key": f"k-{account}",
        }
        return governor.dispatch_async(account, "ChargeRequested", payload)

    async def main() -> tuple[list[Any], int, list[Any]]:
        noisy = [asyncio.ensure_future(charge(account, "noisy")) for account in accounts]
        # Until the tenant's calls are settled in: 4 held, 8 refused (or the cap broken).
        while processor.most_held <= 4 and not (
            processor.holding == 4 and sum(task.done() for task in noisy) == 8
        ):
            await asyncio.sleep(0.001)
        served = await asyncio.gather(*(charge(account, account) for account in quiet))
        held_meanwhile = processor.holding
        processor.release.set()
        return served, held_meanwhile, await asyncio.gather(*noisy, return_exceptions=True)

    served, held_meanwhile, noisy = asyncio.run(main())
    assert [r.to_state for r in served] == ["AwaitingPayment"] * 20
    assert held_meanwhile == 4 and processor.most_held == 4
    refused = [r for r in noisy if isinstance(r, ActionFailed)]
    assert len(refused) == 8
    assert all("tenant 'noisy' has 4 calls in flight" in str(r) for r in refused)
    charged = [r.instance for r in noisy if not isinstance(r, BaseException)]
    assert len(charged) == 4 and sorted(processor.charged) == sorted([*quiet, *charged])
    for account in accounts:  # a refused charge wrote nothing; a served one its transition
        state = governor.get(account).state  # type: ignore[union-attr]
        assert state == ("AwaitingPayment" if account in charged else "Current")
    assert runtime.verify(Keyring.from_files([keys])).ok
    runtime.close()


def test_an_unavailable_primary_goes_to_the_backup_and_a_decline_does_not(
    billing: tuple[Runtime, Processor, Processor],
) -> None:
    runtime, primary, backup = billing
    primary.outcomes = [Unavailable]
    _charge(runtime, "cust-1")
    assert backup.charged == ["cust-1"]
    primary.outcomes = [ValueError]
    with pytest.raises(ActionFailed):
        _charge(runtime, "cust-2")
    assert backup.charged == ["cust-1"]


def test_declined_cards_of_many_customers_leave_the_breaker_closed_and_the_primary_serving(
    billing: tuple[Runtime, Processor, Processor], keys: Path
) -> None:
    """15 customers' cards are declined (the processor is up and answers): each charge fails
    to its caller, nothing is stored for it, and the shared breaker counts none of it; the next
    customer is charged by the primary, and the declined customers' failure events reach
    Billing as usual (PaymentFailed starts the retry ladder)."""
    runtime, primary, backup = billing
    primary.outcomes = [ValueError] * 15
    for n in range(15):
        with pytest.raises(ActionFailed, match="processor said no"):
            _charge(runtime, f"declined-{n}")
    breaker = runtime.policies.breaker("Billing", "PaymentProcessor")
    assert breaker is not None and (breaker.state, breaker.failures) == (BreakerState.CLOSED, 0)
    assert runtime.store.get_breaker("Billing", "PaymentProcessor") is None  # nothing changed
    _charge(runtime, "healthy")
    assert primary.charged == ["healthy"] and backup.charged == []
    governor = runtime.governor("Billing")
    declined = {"customer_id": "healthy", "idempotency_key": "k", "reason": "card_declined"}
    assert governor.dispatch("healthy", "PaymentFailed", declined).to_state == "Retry1"
    assert breaker.state is BreakerState.CLOSED
    assert [e for e in runtime.ledger() if e.kind == "breaker"] == []
    assert runtime.verify(Keyring.from_files([keys])).ok


def test_standard_network_errors_retry_fall_back_and_open_the_breaker(
    billing: tuple[Runtime, Processor, Processor], keys: Path
) -> None:
    """A refused connection never reached the primary: retried, then the backup charges. A
    timeout may have reached it: retried under the same key, never sent to the backup. The
    shared breaker counts each tenant's run of failures once (its retries are the tenant's):
    it opens at the 11th tenant failing in a row, mid-retry; then the backup takes the
    charges."""
    runtime, primary, backup = billing
    primary.outcomes = [ConnectionRefusedError] * 3
    _charge(runtime, "refused")
    assert backup.charged == ["refused"] and primary.outcomes == []
    primary.outcomes = [TimeoutError, None]
    _charge(runtime, "slow")
    assert primary.charged == ["slow"] and backup.charged == ["refused"]
    primary.failing = TimeoutError
    for n in range(10):  # 3 attempts each, 30 failures of 10 tenants in a row
        with pytest.raises(ActionFailed, match="TimeoutError"):
            _charge(runtime, f"timeout-{n}")
    assert runtime.clock.now_ms() - START == 12 * 217 + 11 * 434  # every retry was made
    breaker = runtime.policies.breaker("Billing", "PaymentProcessor")
    assert breaker is not None and (breaker.state, breaker.failures) == (BreakerState.CLOSED, 10)
    _charge(runtime, "opens")  # the 11th tenant's failure opens it mid-retry: the backup charges
    assert breaker.state is BreakerState.OPEN
    assert backup.charged == ["refused", "opens"]
    moves = [(e.instance, e.event) for e in runtime.ledger() if e.kind == "breaker"]
    assert moves == [("policy:PaymentProcessor", "BreakerOpened")]
    assert runtime.verify(Keyring.from_files([keys])).ok


def test_a_burst_of_failures_from_one_tenant_opens_only_its_own_breaker(
    billing: tuple[Runtime, Processor, Processor], keys: Path
) -> None:
    """One tenant's charges fail 11 times in a row, nobody else calling meanwhile (the
    processor 500s on its merchant account): its own breaker opens and it fails fast; the
    shared breaker counted the tenant once, so every other tenant stays on the primary.
    Eleven tenants failing in a row are the processor's trouble: that opens the shared one."""
    runtime, primary, backup = billing
    bulkheads = runtime.policies.bulkheads("Billing", "PaymentProcessor")
    shared = runtime.policies.breaker("Billing", "PaymentProcessor")
    assert bulkheads is not None and bulkheads.max_concurrent == 4 and shared is not None
    primary.failing_for = {"noisy"}
    for _ in range(11):
        with pytest.raises(ActionFailed, match="ServiceFailure"):
            _charge(runtime, "noisy")
    assert bulkheads.for_tenant("noisy").breaker.state is BreakerState.OPEN
    assert (shared.state, shared.failures) == (BreakerState.CLOSED, 1)
    primary.failing_for = set()
    with pytest.raises(ActionFailed, match=r"PaymentProcessor\[noisy\] unavailable"):
        _charge(runtime, "noisy")  # fails fast: its own breaker is open
    for n in range(3):
        _charge(runtime, f"quiet-{n}")  # the others are served by the primary as before
    assert primary.charged == ["quiet-0", "quiet-1", "quiet-2"] and backup.charged == []
    tenant = runtime.store.get_breaker("Billing", "PaymentProcessor[noisy]")
    assert tenant is not None and (tenant.state, tenant.failures) == ("open", 11)

    primary.failing = ServiceFailure
    for n in range(11):
        with pytest.raises(ActionFailed, match="ServiceFailure"):
            _charge(runtime, f"cust-{n}")
    assert shared.state is BreakerState.OPEN
    _charge(runtime, "quiet-3")
    assert backup.charged == ["quiet-3"]
    moves = [(e.instance, e.event) for e in runtime.ledger() if e.kind == "breaker"]
    assert moves == [
        ("policy:PaymentProcessor[noisy]", "BreakerOpened"),
        ("policy:PaymentProcessor", "BreakerOpened"),
    ]
    assert runtime.verify(Keyring.from_files([keys])).ok


def test_a_billing_cycle_commits_once_per_chunk(
    billing: tuple[Runtime, Processor, Processor],
) -> None:
    runtime, primary, _ = billing
    governor = runtime.governor("Billing")
    customers = [f"cust-{n:03}" for n in range(300)]
    for customer in customers:
        governor.create(customer)
    requests = [
        DispatchRequest(
            customer,
            "ChargeRequested",
            {
                "customer_id": customer,
                "invoice_id": "inv-7",
                "amount": "99.00",
                "idempotency_key": customer,
            },
        )
        for customer in [*customers[:100], "nobody", *customers[100:]]
    ]
    before = runtime.commit_batches
    results = dispatch_in_chunks(governor, requests, chunk_size=50)
    assert runtime.commit_batches - before == 7  # ceil(301 / 50) commits, not 301
    assert isinstance(results[100], UnknownInstance)  # only its own unit failed
    charged = [r for r in results if not isinstance(r, Exception)]
    assert [r.instance for r in charged] == customers and primary.charged == customers
    assert {governor.get(c).state for c in customers} == {"AwaitingPayment"}  # type: ignore[union-attr]
    # Sent again (a rerun after a crash), nothing is charged twice: the keys are known.
    again = dispatch_in_chunks(governor, requests, chunk_size=50)
    assert primary.charged == customers
    assert [r.version for r in again if not isinstance(r, Exception)] == [
        r.version for r in charged
    ]


def test_a_chunk_whose_charges_fail_writes_their_breaker_changes_in_its_one_commit(
    billing: tuple[Runtime, Processor, Processor],
) -> None:
    """The processor fails every charge of a chunk: the 11 failures (the 11th opens the
    breaker, then the backup takes the rest) are counted and stored with the chunk's one
    commit, not in a commit each."""
    runtime, primary, backup = billing
    primary.failing = ServiceFailure
    governor = runtime.governor("Billing")
    customers = [f"c{n:02}" for n in range(30)]
    for customer in customers:
        governor.create(customer)
    payload = {"invoice_id": "inv", "amount": "9.00"}
    requests = [
        DispatchRequest(c, "ChargeRequested", {**payload, "customer_id": c, "idempotency_key": c})
        for c in customers
    ]
    before = runtime.commit_batches
    results = dispatch_in_chunks(governor, requests, chunk_size=30)
    assert runtime.commit_batches - before == 1
    assert [isinstance(r, ActionFailed) for r in results] == [True] * 11 + [False] * 19
    assert backup.charged == customers[11:]
    stored = runtime.store.get_breaker("Billing", "PaymentProcessor")
    assert stored is not None and (stored.state, stored.failures) == ("open", 11)
    tenant = runtime.store.get_breaker("Billing", "PaymentProcessor[c00]")
    assert tenant is not None and (tenant.state, tenant.failures) == ("closed", 1)
    assert [e.event for e in runtime.ledger() if e.kind == "breaker"] == ["BreakerOpened"]


def test_missed_deadlines_of_several_governors_are_signed_into_the_ledger(
    tmp_path: Path, keys: Path
) -> None:
    clock = VirtualClock(START)
    path = tmp_path / "store.db"
    runtime = Runtime(
        SQLiteStore(path), clock=clock, sealer=LedgerSealer(load_signer(keys), "sign-each")
    )
    tracker = DeadlineTracker(runtime)  # in the runtime's store, escalations in its ledger
    hour = 3_600_000
    tracker.track(
        "inv-1", name="payment retry", governor="Billing", due_ms=START + hour, action="retry"
    )
    tracker.track(
        "ent-7", name="approval", governor="Entitlement", due_ms=START + 4 * hour, action="review"
    )
    clock.advance("5h")
    tracker.check()
    clock.advance("1d")
    tracker.check()
    entries = [e for e in runtime.ledger() if e.kind == "escalation"]
    assert [(e.machine, e.instance, e.from_state, e.to_state) for e in entries] == [
        ("Billing", "deadline:inv-1", "level0", "level1"),
        ("Entitlement", "deadline:ent-7", "level0", "level1"),
        # both re-armed at the same instant: earliest first, then by id
        ("Entitlement", "deadline:ent-7", "level1", "level2"),
        ("Billing", "deadline:inv-1", "level1", "level2"),
    ]
    assert [e.ts_ms - START for e in entries] == [5 * hour] * 2 + [29 * hour] * 2
    assert runtime.verify(Keyring.from_files([keys])).ok
    runtime.close()


def test_an_escalation_that_cannot_be_recorded_leaves_the_deadline_unmoved(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The escalation's ledger entry and the deadline's new level are one transaction: when
    sealing the entry fails, the deadline is still due at level 0 and escalates later."""
    clock = VirtualClock(START)
    runtime = Runtime(
        SQLiteStore(tmp_path / "store.db"),
        clock=clock,
        sealer=LedgerSealer(load_signer(keys), "sign-each"),
    )
    tracker = DeadlineTracker(runtime)
    tracker.track("inv-1", name="retry", governor="Billing", due_ms=START, action="retry")
    seal = LedgerSealer.seal

    def refuse(self: LedgerSealer, seq: int, prev: bytes, data: Any) -> Any:
        if data[6] == "DeadlineMissed":
            raise OSError("disk full")
        return seal(self, seq, prev, data)

    monkeypatch.setattr(LedgerSealer, "seal", refuse)
    with pytest.raises(OSError):
        tracker.check()
    assert [(d.id, d.level, d.due_ms) for d in tracker.pending()] == [("inv-1", 0, START)]
    monkeypatch.setattr(LedgerSealer, "seal", seal)
    assert [e.level for e in tracker.check()] == [1]
    assert [e.to_state for e in runtime.ledger() if e.kind == "escalation"] == ["level1"]
    runtime.close()


class LockWatchingProcessor(Processor):
    """A processor that notes, at each call, whether the store's write lock was free (a
    connection of its own can begin a write at once): a call inside the write transaction
    holds every commit of the store up for as long as the processor takes."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.lock_free: list[bool] = []

    def __call__(self, ctx: Any) -> dict[str, str]:
        probe = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            self.lock_free.append(True)
        except sqlite3.OperationalError:  # database is locked
            self.lock_free.append(False)
        finally:
            probe.close()
        return super().__call__(ctx)


@pytest.mark.parametrize("api", ["dispatch", "dispatch_async", "dispatch_many", "repeated"])
def test_a_receiver_created_between_the_look_and_the_unit_is_called_outside_the_transaction(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    """The look before the transaction finds no instance (nothing to call), and another
    driver creates it before the unit runs (a flow's receiver on its first event, created
    by a second driver of the run): the unit must not make the call in the transaction,
    which would hold the store's write lock through it (every commit waiting: the flow
    cancel test's 30 s stall) and call again whenever the unit is rolled back and run
    again. The dispatch looks again and calls once, before the transaction ("repeated":
    a dispatch_many batch holding the event id twice, the repeat taking the first's
    result)."""
    path = tmp_path / "s.db"
    processor = LockWatchingProcessor(path)
    runtime, _ = _billing_runtime(path, keys, VirtualClock(START), processor)
    real = Governor._preflight

    def created_meanwhile(governor: Governor, instance_id: str, *rest: Any) -> Any:
        preran = real(governor, instance_id, *rest)
        if governor.get(instance_id) is None:
            governor.create(instance_id)  # after the look, before the unit
        return preran

    monkeypatch.setattr(Governor, "_preflight", created_meanwhile)
    billing = runtime.governor("Billing")
    if api == "dispatch":
        billing.dispatch("c1", "ChargeRequested", CHARGE_PAYLOAD, event_id="charge-c1")
    elif api == "dispatch_async":
        asyncio.run(
            billing.dispatch_async("c1", "ChargeRequested", CHARGE_PAYLOAD, event_id="charge-c1")
        )
    else:
        request = DispatchRequest("c1", "ChargeRequested", CHARGE_PAYLOAD, event_id="charge-c1")
        # "repeated": the batch sends the event id twice; the repeat finds the first's result.
        requests = [request] * (2 if api == "repeated" else 1)
        done = billing.dispatch_many(requests)
        assert not any(isinstance(d, Exception) for d in done), done
        assert len({(d.version, d.seq) for d in done if not isinstance(d, Exception)}) == 1
    assert processor.lock_free == [True]  # one call, made outside the write transaction
    assert processor.charged == ["c1"]
    assert billing.get("c1").state == "AwaitingPayment"  # type: ignore[union-attr]
    assert [e.event for e in billing.history("c1")] == ["create", "ChargeRequested"]
    assert runtime.store.processed("Billing", "charge-c1") is not None
    runtime.close()


CHARGE_PAYLOAD = {
    "customer_id": "c1",
    "invoice_id": "inv",
    "amount": "99.00",
    "idempotency_key": "k",
}


def test_an_async_event_that_calls_nothing_outside_takes_no_action_thread(
    billing: tuple[Runtime, Processor, Processor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Billing calls the outside world (a policy's charge), but CloseAccount does not: its
    dispatch_async commits without a claim or a hand-off to the action threads (it took one
    to learn that its look had nothing to call)."""
    runtime, primary, _ = billing
    governor = runtime.governor("Billing")
    governor.create("c1")
    assert "CloseAccount" not in governor._external_events

    def no_threads() -> None:
        raise AssertionError("an action thread for an event that calls nothing outside")

    monkeypatch.setattr(runtime, "_action_threads", no_threads)
    payload = {"customer_id": "c1", "reason": "cancelled"}
    done = asyncio.run(governor.dispatch_async("c1", "CloseAccount", payload, event_id="close"))
    assert (done.to_state, done.version) == ("Closed", 2)
    assert runtime.store.get_instance("Billing", "c1").state == "Closed"
    assert primary.charged == []
