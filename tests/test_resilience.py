"""The resilience library: backoff, retry, breaker, fallback, bulkheads, deadlines, TTL cache,
batches and proration, on virtual clocks and real SQLite files (no real sleeps)."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from autonomic.runtime.resilience import (
    BreakerChange,
    BreakerState,
    BulkheadFull,
    CatalogCache,
    ChunkFailed,
    CircuitBreaker,
    CircuitOpen,
    DeadlineTracker,
    Retry,
    ServiceFailure,
    TenantBulkheads,
    TransientFailure,
    Unavailable,
    call_with_fallback,
    call_with_fallback_async,
    clock_sleeper,
    is_transient,
    is_unavailable,
    is_unhealthy,
    jitter_delay_ms,
    jitter_with_cap,
    prorate,
    retry_call,
    run_in_chunks,
    throttle_delay_ms,
)
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import MemoryStore, SQLiteStore
from autonomic.runtime.timers import VirtualClock
from hypothesis import given, settings
from hypothesis import strategies as st

START = 1_700_000_000_000


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(START)


class Flaky:
    """A service that fails with `error` for its first `failures` calls, then answers."""

    def __init__(self, failures: int, error: type[Exception] = TransientFailure) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return f"ok after {self.calls}"


# ---------------------------------------------------------------------------------- backoff


def test_throttle_delay_has_the_seeds_values() -> None:
    assert [throttle_delay_ms(n) for n in (0, 1, 2, 7)] == [100, 200, 400, 10_000]
    assert [throttle_delay_ms(n) for n in range(3, 7)] == [800, 1600, 3200, 6400]
    assert throttle_delay_ms(1000) == 10_000


def test_jitter_delay_is_the_seeds_formula_and_grows_until_its_cap() -> None:
    # 100 * 2^n + (17 n) % 100
    assert [jitter_delay_ms(n, 60_000) for n in range(6)] == [100, 217, 434, 851, 1668, 3285]
    assert jitter_delay_ms(10, 10**9) == 102_400 + 70
    assert jitter_delay_ms(11, 10**9) == 102_400 + 87  # the exponent stops at 10
    delays = [jitter_delay_ms(n, 10_000) for n in range(12)]
    assert delays == sorted(delays) and delays[-1] == 10_000
    assert jitter_with_cap(500)(3) == 500


def test_backoffs_reject_negative_counts() -> None:
    with pytest.raises(ValueError):
        throttle_delay_ms(-1)
    with pytest.raises(ValueError):
        jitter_delay_ms(0, -5)


# ------------------------------------------------------------------------------------ retry


def test_retry_repeats_transient_failures_waiting_the_backoff_on_the_clock(
    clock: VirtualClock,
) -> None:
    service = Flaky(3)
    result = Retry(5, jitter_with_cap(60_000), sleep_ms=clock_sleeper(clock)).call(service)
    assert result == "ok after 4" and service.calls == 4
    assert clock.now_ms() - START == 217 + 434 + 851  # after failures 1, 2 and 3


def test_retry_gives_up_after_its_attempts_with_the_last_error(clock: VirtualClock) -> None:
    service = Flaky(10)
    with pytest.raises(TransientFailure, match="failure 3"):
        retry_call(service, attempts=3, backoff=throttle_delay_ms, sleep_ms=clock_sleeper(clock))
    assert service.calls == 3
    assert clock.now_ms() - START == 200 + 400  # no wait after the last attempt


def test_retry_never_repeats_a_permanent_failure(clock: VirtualClock) -> None:
    service = Flaky(1, ValueError)
    with pytest.raises(ValueError):
        Retry(5, sleep_ms=clock_sleeper(clock)).call(service)
    assert service.calls == 1 and clock.now_ms() == START


def test_retry_accepts_foreign_errors_marked_transient(clock: VirtualClock) -> None:
    class Timeout(Exception):
        transient = True

    service = Flaky(2, Timeout)
    assert Retry(3, sleep_ms=clock_sleeper(clock)).call(service) == "ok after 3"


def test_retry_async_waits_through_the_given_async_sleep() -> None:
    waits: list[int] = []

    async def sleep(ms: int) -> None:
        waits.append(ms)

    service = Flaky(2)

    async def call() -> str:
        return service()

    rule = Retry(4, throttle_delay_ms, sleep_ms_async=sleep)
    assert asyncio.run(rule.call_async(call)) == "ok after 3"
    assert waits == [200, 400]


def test_retry_needs_one_attempt() -> None:
    with pytest.raises(ValueError):
        Retry(0)


# ---------------------------------------------------------------------------------- breaker


def _failing() -> None:
    raise ConnectionError("processor timed out")


def test_breaker_opens_after_more_than_ten_failures_and_fails_fast(clock: VirtualClock) -> None:
    changes: list[BreakerChange] = []
    breaker = CircuitBreaker("payment processor", clock=clock, on_change=changes.append)
    for _ in range(10):
        with pytest.raises(ConnectionError):
            breaker.call(_failing)
    assert breaker.state is BreakerState.CLOSED and changes == []
    with pytest.raises(ConnectionError):
        breaker.call(_failing)  # the 11th
    assert breaker.state is BreakerState.OPEN
    service = Flaky(0)
    with pytest.raises(CircuitOpen, match="payment processor unavailable"):
        breaker.call(service)
    assert service.calls == 0
    assert [(c.from_state, c.to_state, c.failures, c.event) for c in changes] == [
        (BreakerState.CLOSED, BreakerState.OPEN, 11, "BreakerOpened")
    ]


def test_a_success_ends_the_run_of_failures(clock: VirtualClock) -> None:
    breaker = CircuitBreaker("processor", clock=clock)
    for _ in range(3):
        for _ in range(10):
            with pytest.raises(ConnectionError):
                breaker.call(_failing)
        breaker.call(Flaky(0))
    assert breaker.state is BreakerState.CLOSED and breaker.failures == 0


def test_breaker_probes_half_open_after_the_cooldown_then_closes(clock: VirtualClock) -> None:
    changes: list[BreakerChange] = []
    breaker = CircuitBreaker(
        "processor", clock=clock, tolerated_failures=0, cooldown_ms=5_000, on_change=changes.append
    )
    with pytest.raises(ConnectionError):
        breaker.call(_failing)
    clock.advance(4_999)
    with pytest.raises(CircuitOpen):
        breaker.call(Flaky(0))
    clock.advance(1)
    assert breaker.state is BreakerState.HALF_OPEN
    # One probe at a time: a second caller while the probe runs fails fast.
    seen: list[str] = []

    def probe() -> str:
        with pytest.raises(CircuitOpen):
            breaker.call(Flaky(0))
        seen.append("second caller refused")
        return "answered"

    assert breaker.call(probe) == "answered" and seen == ["second caller refused"]
    assert breaker.state is BreakerState.CLOSED
    assert [c.event for c in changes] == ["BreakerOpened", "BreakerHalfOpened", "BreakerClosed"]
    assert [c.at_ms - START for c in changes] == [0, 5_000, 5_000]


def test_a_failed_probe_opens_the_breaker_for_a_new_cooldown(clock: VirtualClock) -> None:
    breaker = CircuitBreaker("processor", clock=clock, tolerated_failures=0, cooldown_ms=1_000)
    with pytest.raises(ConnectionError):
        breaker.call(_failing)
    clock.advance(1_000)
    with pytest.raises(ConnectionError):
        breaker.call(_failing)  # the probe
    assert breaker.state is BreakerState.OPEN
    clock.advance(999)
    assert breaker.state is BreakerState.OPEN
    clock.advance(1)
    assert breaker.state is BreakerState.HALF_OPEN


def test_failures_the_breaker_does_not_count_leave_it_closed(clock: VirtualClock) -> None:
    breaker = CircuitBreaker(
        "processor",
        clock=clock,
        tolerated_failures=0,
        counts=lambda error: not isinstance(error, ValueError),
    )
    with pytest.raises(ValueError):
        breaker.call(Flaky(1, ValueError))
    assert breaker.state is BreakerState.CLOSED


def test_the_default_breaker_counts_unhealth_not_business_refusals(clock: VirtualClock) -> None:
    """Declined cards (the customer's) never open it, and do not end a run of outages; the
    standard timeout and connection errors and a ServiceFailure count."""
    breaker = CircuitBreaker("processor", clock=clock, tolerated_failures=2)
    refusals: tuple[type[Exception], ...] = (ValueError, KeyError, PermissionError)
    for refusal in refusals * 5:
        with pytest.raises(refusal):
            breaker.call(Flaky(1, refusal))
    assert (breaker.state, breaker.failures) == (BreakerState.CLOSED, 0)
    for error in (TimeoutError, ConnectionResetError, ValueError, ServiceFailure):
        with pytest.raises(error):
            breaker.call(Flaky(1, error))
    assert (breaker.state, breaker.failures) == (BreakerState.OPEN, 3)


class _Declined(ConnectionError):
    transient = False  # a library's own word outranks the standard mapping


@pytest.mark.parametrize(
    ("error", "transient", "unavailable", "unhealthy"),
    [
        (TimeoutError(), True, False, True),
        (ConnectionResetError(), True, False, True),
        (BrokenPipeError(), True, False, True),
        (ConnectionRefusedError(), True, True, True),
        (socket.gaierror(), True, True, True),
        (TransientFailure(), True, False, True),
        (Unavailable(), False, True, True),
        (CircuitOpen("p", 0), False, True, True),
        (ServiceFailure(), False, False, True),
        (ValueError("card declined"), False, False, False),
        (OSError("disk full"), False, False, False),
        (_Declined(), False, False, False),
    ],
)
def test_how_standard_and_declared_errors_are_classified(
    error: Exception, transient: bool, unavailable: bool, unhealthy: bool
) -> None:
    assert (is_transient(error), is_unavailable(error), is_unhealthy(error)) == (
        transient,
        unavailable,
        unhealthy,
    )


def test_standard_connection_and_timeout_errors_retry_and_fall_back_as_classified(
    clock: VirtualClock,
) -> None:
    retry = Retry(3, sleep_ms=clock_sleeper(clock))
    for error in (TimeoutError, ConnectionResetError):
        service = Flaky(2, error)
        assert retry.call(service) == "ok after 3"
    backup = Flaky(0)
    assert call_with_fallback(Flaky(1, ConnectionRefusedError), backup) == "ok after 1"
    with pytest.raises(TimeoutError):  # it may have reached the primary: no second processor
        call_with_fallback(Flaky(1, TimeoutError), backup)
    assert backup.calls == 1


# --------------------------------------------------------------------------------- fallback


def test_fallback_uses_the_backup_only_when_the_primary_is_unavailable() -> None:
    backup = Flaky(0)
    assert call_with_fallback(Flaky(0), backup) == "ok after 1" and backup.calls == 0
    assert call_with_fallback(Flaky(1, Unavailable), backup) == "ok after 1"
    assert backup.calls == 1
    with pytest.raises(ValueError):
        call_with_fallback(Flaky(1, ValueError), backup)  # a decline is not an outage
    with pytest.raises(TransientFailure):
        call_with_fallback(Flaky(1, TransientFailure), backup)
    assert backup.calls == 1


def test_fallback_routes_around_an_open_breaker_without_calling_the_primary(
    clock: VirtualClock,
) -> None:
    breaker = CircuitBreaker("primary processor", clock=clock, tolerated_failures=0)
    with pytest.raises(ConnectionError):
        breaker.call(_failing)
    primary, backup = Flaky(0), Flaky(0)
    heard: list[BaseException] = []
    result = call_with_fallback(lambda: breaker.call(primary), backup, on_fallback=heard.append)
    assert result == "ok after 1" and primary.calls == 0 and backup.calls == 1
    assert isinstance(heard[0], CircuitOpen)


def test_fallback_async() -> None:
    async def primary() -> str:
        raise Unavailable("primary down")

    async def backup() -> str:
        return "backup"

    assert asyncio.run(call_with_fallback_async(primary, backup)) == "backup"


# --------------------------------------------------------------------------------- bulkhead


def test_a_misbehaving_tenant_leaves_the_others_throughput_intact_threads(
    clock: VirtualClock,
) -> None:
    """Tenant "noisy" floods the service with calls that hang, then with failures; tenants
    "a" and "b" still get every call through, and only noisy's breaker opens."""
    changes: list[BreakerChange] = []
    bulkheads = TenantBulkheads(
        "processor", clock=clock, max_concurrent=4, tolerated_failures=3, on_change=changes.append
    )
    release = threading.Event()
    hung = threading.Barrier(4 + 1)

    def hang() -> str:
        hung.wait()
        release.wait()
        return "late"

    refused = 0
    refused_lock = threading.Lock()

    def noisy_call() -> None:
        nonlocal refused
        try:
            bulkheads.call("noisy", hang)
        except BulkheadFull:
            with refused_lock:
                refused += 1

    threads = [threading.Thread(target=noisy_call) for _ in range(20)]
    for thread in threads[:4]:
        thread.start()
    hung.wait()  # the noisy tenant holds all 4 of its slots
    for thread in threads[4:]:
        thread.start()
    for thread in threads[4:]:
        thread.join()
    assert refused == 16 and bulkheads.for_tenant("noisy").in_flight == 4

    served: dict[str, int] = {"a": 0, "b": 0}

    def polite(tenant: str) -> None:
        for _ in range(50):
            bulkheads.call(tenant, lambda: None)
            served[tenant] += 1

    polite_threads = [threading.Thread(target=polite, args=(t,)) for t in served]
    for thread in polite_threads:
        thread.start()
    for thread in polite_threads:
        thread.join()
    assert served == {"a": 50, "b": 50}  # while noisy's 4 calls still hang
    release.set()
    for thread in threads[:4]:
        thread.join()

    for _ in range(4):
        with pytest.raises(ConnectionError):
            bulkheads.call("noisy", _failing)
    with pytest.raises(CircuitOpen, match=r"processor\[noisy\] unavailable"):
        bulkheads.call("noisy", lambda: None)
    assert bulkheads.call("a", lambda: "fine") == "fine"
    assert [(c.breaker, c.event) for c in changes] == [("processor[noisy]", "BreakerOpened")]


def test_a_misbehaving_tenant_leaves_the_others_throughput_intact_asyncio(
    clock: VirtualClock,
) -> None:
    bulkheads = TenantBulkheads("processor", clock=clock, max_concurrent=2)

    async def scenario() -> tuple[int, int, int]:
        release = asyncio.Event()
        hanging = 0

        async def hang() -> None:
            nonlocal hanging
            hanging += 1
            await release.wait()

        async def quick() -> None:
            await asyncio.sleep(0)

        async def noisy() -> bool:
            try:
                await bulkheads.call_async("noisy", hang)
            except BulkheadFull:
                return False
            return True

        noisy_tasks = [asyncio.create_task(noisy()) for _ in range(10)]
        while hanging < 2:
            await asyncio.sleep(0)
        polite: list[None] = []
        for _ in range(25):  # waves of as many calls per tenant as its cap allows
            polite += await asyncio.gather(
                *(bulkheads.call_async(t, quick) for t in ("a", "b") for _ in range(2))
            )
        refused_before_release = sum(1 for task in noisy_tasks if task.done())
        release.set()
        outcomes = await asyncio.gather(*noisy_tasks)
        return len(polite), refused_before_release, sum(outcomes)

    polite, refused, admitted = asyncio.run(scenario())
    assert (polite, refused, admitted) == (100, 8, 2)


def test_a_shared_breaker_counts_each_failing_tenant_once(clock: VirtualClock) -> None:
    """Behind the bulkheads, a breaker shared by the tenants asks `first_failure`: the noisy
    tenant's four calls failing together (in flight at once) and its next ones count once;
    a success of the tenant makes its next failure count again; more than 2 tenants failing
    in a row open it; its half-open probe's failure reopens it even from a failing tenant."""
    shared = CircuitBreaker("processor", clock=clock, tolerated_failures=2, cooldown_ms=1_000)
    bulkheads = TenantBulkheads("processor", clock=clock, max_concurrent=4, tolerated_failures=9)

    async def call(tenant: str, function: Callable[[], Awaitable[object]]) -> object:
        bulkhead = bulkheads.for_tenant(tenant)

        async def through_shared() -> object:
            return await shared.call_async(function, in_run=bulkhead.first_failure)

        return await bulkhead.call_async(through_shared)

    async def scenario() -> list[object]:
        gate = asyncio.Event()

        async def failing_later() -> None:
            await gate.wait()
            raise ServiceFailure("500")

        together = [asyncio.create_task(call("noisy", failing_later)) for _ in range(4)]
        await asyncio.sleep(0)
        gate.set()
        outcomes = list(await asyncio.gather(*together, return_exceptions=True))
        for _ in range(5):
            outcomes += await asyncio.gather(call("noisy", failing_later), return_exceptions=True)
        return outcomes

    outcomes = asyncio.run(scenario())
    assert [type(o) for o in outcomes] == [ServiceFailure] * 9
    assert (shared.state, shared.failures) == (BreakerState.CLOSED, 1)
    assert bulkheads.for_tenant("noisy").breaker.failures == 9

    def fails() -> None:
        raise ServiceFailure("500")

    async def once(tenant: str, function: Callable[[], object]) -> object:
        async def run() -> object:
            return function()

        return await call(tenant, run)

    asyncio.run(once("noisy", lambda: "ok"))  # the noisy tenant succeeds: no longer failing
    assert (shared.failures, bulkheads.for_tenant("noisy").breaker.failures) == (0, 0)
    for tenant in ("noisy", "a", "b"):
        with pytest.raises(ServiceFailure):
            asyncio.run(once(tenant, fails))
    assert (shared.state, shared.failures) == (BreakerState.OPEN, 3)
    clock.advance(1_000)
    with pytest.raises(ServiceFailure):
        asyncio.run(once("a", fails))  # the probe, from a tenant already failing
    assert shared.state is BreakerState.OPEN and shared.opened_ms == clock.now_ms()


def test_bulkhead_frees_its_slot_whatever_the_call_does(clock: VirtualClock) -> None:
    bulkheads = TenantBulkheads("processor", clock=clock, max_concurrent=1)
    with pytest.raises(ConnectionError):
        bulkheads.call("t", _failing)
    assert bulkheads.call("t", lambda: 7) == 7 and bulkheads.for_tenant("t").in_flight == 0


# -------------------------------------------------------------------------------- deadlines

HOUR = 3_600_000


def test_deadlines_of_several_governors_escalate_and_rearm_a_day_later(
    tmp_path: Path, clock: VirtualClock
) -> None:
    path = tmp_path / "store.sqlite"
    runtime = Runtime(SQLiteStore(path), clock=clock)
    tracker = DeadlineTracker(runtime)
    tracker.track(
        "b1", name="payment retry", governor="Billing", due_ms=START + HOUR, action="retry"
    )
    tracker.track(
        "e1",
        name="approval review",
        governor="Entitlement",
        due_ms=START + 4 * HOUR,
        action="escalate to manager",
    )
    assert tracker.check() == []
    clock.advance(2 * HOUR)
    first = tracker.check()
    assert [(e.id, e.governor, e.level, e.missed_ms - START) for e in first] == [
        ("b1", "Billing", 1, HOUR)
    ]
    assert first[0].rearmed_ms == clock.now_ms() + 24 * HOUR
    assert tracker.check() == []  # escalated once per due time
    runtime.close()

    # Durable: a new runtime on the same store (a restarted process) carries on.
    clock.advance(24 * HOUR)
    runtime = Runtime(SQLiteStore(path), clock=clock)
    again = DeadlineTracker(runtime)
    escalated = again.check()
    assert [(e.id, e.level) for e in escalated] == [("e1", 1), ("b1", 2)]
    assert again.resolve("b1") and not again.resolve("b1")
    assert [d.id for d in again.pending()] == ["e1"]
    runtime.close()


def test_deadlines_work_the_same_on_the_memory_store(clock: VirtualClock) -> None:
    tracker = DeadlineTracker(Runtime(MemoryStore(), clock=clock), rearm_ms=HOUR)
    tracker.track("n", name="notice", governor="Subscription", due_ms=START, action="notify")
    assert [(e.id, e.level) for e in tracker.check()] == [("n", 1)]
    assert tracker.check() == []
    clock.advance(HOUR)
    assert [(e.id, e.level) for e in tracker.check()] == [("n", 2)]


def test_two_processes_sharing_a_store_escalate_a_deadline_once(
    tmp_path: Path, clock: VirtualClock
) -> None:
    path = tmp_path / "store.sqlite"
    runtimes = [Runtime(SQLiteStore(path), clock=clock) for _ in range(2)]
    one, two = (DeadlineTracker(r) for r in runtimes)
    for n in range(20):
        one.track(f"d{n}", name="notice", governor="Subscription", due_ms=START, action="notify")
    results: list[int] = []

    def check(tracker: DeadlineTracker) -> None:
        results.append(len(tracker.check()))

    threads = [threading.Thread(target=check, args=(t,)) for t in (one, two)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0, 20]
    for runtime in runtimes:
        runtime.close()


# -------------------------------------------------------------------------------- TTL cache


def test_catalog_cache_serves_until_the_ttl_on_the_injected_clock(clock: VirtualClock) -> None:
    loads: list[str] = []

    def load(product_id: str) -> dict[str, str]:
        loads.append(product_id)
        return {"id": product_id, "price": "499.00"}

    cache = CatalogCache(load, clock=clock, ttl_ms=60_000)
    assert cache.get("prod_123")["price"] == "499.00"
    clock.advance(59_999)
    cache.get("prod_123")
    assert loads == ["prod_123"] and (cache.hits, cache.misses) == (1, 1)
    clock.advance(1)  # elapsed == ttl: stale
    cache.get("prod_123")
    assert loads == ["prod_123", "prod_123"]
    cache.invalidate("prod_123")
    cache.get("prod_123")
    assert len(loads) == 3 and len(cache) == 1
    clock.advance(60_000)
    assert len(cache) == 0


# ------------------------------------------------------------------------------------ batch


def test_a_billing_cycle_commits_once_per_chunk_in_sqlite(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "billing.sqlite")
    db.execute("CREATE TABLE invoices (customer TEXT PRIMARY KEY, amount TEXT)")
    db.commit()
    statements: list[str] = []
    db.set_trace_callback(statements.append)

    def bill(chunk: Sequence[str]) -> list[str]:
        with db:  # one transaction per chunk
            db.executemany("INSERT INTO invoices VALUES (?, ?)", [(c, "99.00") for c in chunk])
        return list(chunk)

    customers = [f"cust_{n:04}" for n in range(1000)]
    assert run_in_chunks(customers, 64, bill) == customers
    assert sum(1 for s in statements if s.strip().upper() == "COMMIT") == 16  # ceil(1000/64)
    assert db.execute("SELECT count(*) FROM invoices").fetchone() == (1000,)

    def failing(chunk: Sequence[str]) -> list[str]:
        with db:
            db.executemany("INSERT INTO invoices VALUES (?, ?)", [(c, "1") for c in chunk])
        return list(chunk)

    db.execute("DELETE FROM invoices WHERE customer >= 'cust_0500'")
    db.commit()
    with pytest.raises(ChunkFailed) as failed:
        run_in_chunks(customers[400:], 50, failing)  # cust_0400.. already exist
    assert failed.value.done == 0
    with pytest.raises(ChunkFailed) as failed:
        run_in_chunks([*customers[500:], "cust_0000"], 100, failing)
    assert failed.value.done == 500
    assert db.execute("SELECT count(*) FROM invoices").fetchone() == (1000,)
    db.close()


# -------------------------------------------------------------------------------- proration

cents = st.integers(min_value=0, max_value=10_000_000).map(lambda n: Decimal(n) / 100)
cycles = st.integers(min_value=1, max_value=31).flatmap(
    lambda length: st.tuples(st.integers(min_value=0, max_value=length), st.just(length))
)


def test_proration_has_the_seeds_example_values() -> None:
    result = prorate(Decimal("99.00"), Decimal("499.00"), 10, 30)
    assert (result.refund, result.charge, result.net) == (
        Decimal("66.00"),
        Decimal("332.67"),
        Decimal("266.67"),
    )
    with pytest.raises(ValueError):
        prorate(Decimal("9.999"), Decimal("1"), 1, 30)
    with pytest.raises(ValueError):
        prorate(Decimal("1"), Decimal("1"), 31, 30)


@settings(max_examples=60, deadline=None)
@given(cents, cents, cycles)
def test_proration_is_idempotent_and_balances_to_the_cent(
    current: Decimal, new: Decimal, cycle: tuple[int, int]
) -> None:
    day, length = cycle
    first = prorate(current, new, day, length)
    assert prorate(current, new, day, length) == first == prorate(current, new, day, length)
    assert first.charge - first.refund == first.net
    for amount in (first.refund, first.charge, first.net):
        assert amount == amount.quantize(Decimal("0.01"))
    assert 0 <= first.refund <= current and 0 <= first.charge <= new
    back = prorate(new, current, day, length)
    assert first.net + back.net == 0  # change tier and change back: nothing owed
    assert first.refund == back.charge and first.charge == back.refund
