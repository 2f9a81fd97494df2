"""Flows' branches at once, for real: the signup's four outside calls all in flight together
(a barrier that only opens for four), in both APIs; a fanout's gather at its deadline with
what was committed by then, and a reply after it recorded as late. No timing: barriers,
events and a virtual clock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from autonomic.runtime.flows import FlowResult, FlowRunner, NoReply, StepContext, UnknownFlow
from autonomic.runtime.keys import Keyring, Signer
from autonomic.runtime.results import derive_event_id
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.timers import VirtualClock
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flow_world import START_MS, marketplace

SIGNUP_CALLS = {
    "CustomerAccount": "create_profile",
    "Subscription": "start_trial",
    "QuotaSla": "allocate_quota",
    "Compliance": "start_identity_check",
}
NOISY = {
    "tenant_id": "t",
    "resource": "cpu",
    "severity": "high",
    "violation_id": "v1",
    "window_start": "2026-01-01T00:00:00+00:00",
}


def signup(customer: str) -> dict[str, str]:
    return {
        "customer_id": customer,
        "email": f"ops@{customer}.example",
        "country": "DE",
        "product_id": "analytics",
        "tier": "professional",
    }


def start(runner: FlowRunner, api: str, flow: str, instance: str, inputs: Any) -> FlowResult:
    if api == "sync":
        return runner.start(flow, instance, inputs)
    return asyncio.run(runner.start_async(flow, instance, inputs))


@pytest.mark.parametrize("api", ["sync", "async"])
def test_the_signups_four_outside_calls_are_in_flight_at_once(tmp_path: Path, api: str) -> None:
    """Each branch's outside call waits at a barrier that opens only when all four are
    waiting there: run one after another, the first would break it (BrokenBarrierError,
    the branch fails and the signup is compensated)."""
    barrier = threading.Barrier(4, timeout=20)
    threads: set[int] = set()

    def meet(ctx: Any) -> None:
        threads.add(threading.get_ident())
        barrier.wait()

    actions = {machine: {action: meet} for machine, action in SIGNUP_CALLS.items()}
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "m.db"), actions=actions)
    with runtime:
        result = start(runner, api, "CustomerSignup", "c1", signup("c1"))
        assert result.status == "completed", result
        assert set(result.steps.values()) == {"succeeded"}
        assert len(threads) == 4 and not barrier.broken
        # The run's start is in the ledger before its branches' transitions.
        events = [(e.kind, e.event) for e in runtime.ledger()]
        first = min(i for i, (kind, _) in enumerate(events) if kind == "transition")
        assert ("flow", "FlowStarted") in events[:first]
        assert events[:first].count(("flow", "StepStarted")) == 4


def _late_notify(
    clock: VirtualClock, runtime: list[Runtime], customer: str
) -> tuple[Callable[[Any], None], threading.Event, threading.Event]:
    """send_notification (an outside call): once the other two branches are committed, it
    moves the clock past the fanout's deadline and then hangs until released."""
    waiting, release = threading.Event(), threading.Event()

    def notify(ctx: Any) -> None:
        if ctx.instance != customer:
            return
        governors = runtime[0].governors
        for _ in range(2000):  # until the fast branches' transitions are committed
            billing = governors["Billing"].get(customer)
            entitlement = governors["Entitlement"].get(customer)
            if billing and entitlement and billing.version > 1 and entitlement.version > 1:
                break
            threading.Event().wait(0.005)
        clock.advance("31s")
        waiting.set()
        release.wait(30)

    return notify, waiting, release


def _ready(runtime: Runtime, customer: str) -> None:
    """Entitlement Active, Billing Current, a customer profile: each branch can answer."""
    for machine in ("Billing", "Entitlement", "CustomerAccount"):
        runtime.governor(machine).create(customer)
    runtime.governor("Entitlement").dispatch(customer, "Approve", {"approver": "vendor-admin"})
    profile = {**signup(customer), "tier": "starter"}
    runtime.governor("CustomerAccount").dispatch(customer, "CreateProfile", profile)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_fanout_gathers_at_its_deadline_and_records_a_late_reply(
    tmp_path: Path, api: str
) -> None:
    """`within 30s`, quorum 2: the notification hangs past the deadline. The gather returns
    at the deadline with the two committed replies (completed); the notification's
    transition commits after the gather, stands, and is recorded as StepLate."""
    clock = VirtualClock(START_MS)
    holder: list[Runtime] = []
    customer = "n1"
    notify, waiting, release = _late_notify(clock, holder, customer)
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime, runner, _ = marketplace(
        SQLiteStore(tmp_path / "m.db"),
        clock=clock,
        signer=signer,
        actions={"CustomerAccount": {"send_notification": notify}},
    )
    holder.append(runtime)
    _ready(runtime, customer)
    inputs = {"customer_id": customer, **NOISY}

    def entries() -> list[tuple[str, str, str]]:
        return [(e.machine, e.event, e.from_state) for e in runtime.ledger()]

    async def run_async() -> tuple[FlowResult, list[tuple[str, str, str]]]:
        result = await runner.start_async("NoisyNeighbour", customer, inputs)
        before = entries()
        release.set()
        await runner.drain_async()
        return result, before

    with runtime:
        if api == "sync":
            result = runner.start("NoisyNeighbour", customer, inputs)
            before = entries()
            release.set()
            runner.drain()
        else:
            result, before = asyncio.run(run_async())
        assert waiting.is_set()
        assert result.status == "completed"
        assert result.gathered == {
            "contention": "succeeded",
            "sla_credit": "succeeded",
            "notify": "timed_out",
        }
        # At the gather, the ledger held the two replies and not the third.
        events = [event for _, event, _ in before]
        assert events.index("TenantContention") < events.index("FanInGathered")
        assert events.index("SLAViolation") < events.index("FanInGathered")
        assert "NotifyCustomer" not in events[events.index("FanInGathered") :]
        after = [event for _, event, _ in entries()]
        gathered = after.index("FanInGathered")
        notified = len(after) - 1 - after[::-1].index("NotifyCustomer")
        assert gathered < notified < after.index("StepLate")
        final = runner.result(result.flow_id)
        assert final.status == "completed" and final.steps["notify"] == "timed_out"
        assert final.gathered == result.gathered
        assert runtime.verify(Keyring([signer.public_info()])).ok


def test_a_reply_committed_before_the_gather_counts_even_past_the_deadline(
    tmp_path: Path,
) -> None:
    """The gather decides inside its own transaction: a branch whose transition was
    committed by then counts as a reply, so the gathered result never contradicts the
    ledger (here the reply arrives while the run waits, the runner unaware of it)."""
    silent = {"sla_credit", "notify"}

    def hook(ctx: StepContext) -> None:
        if ctx.step in silent:
            raise NoReply(f"{ctx.step}: no answer")

    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "m.db"), before_step=hook)
    with runtime:
        _ready(runtime, "n2")
        waiting = runner.start("NoisyNeighbour", "n2", {"customer_id": "n2", **NOISY})
        assert waiting.status == "waiting"
        # The Billing branch's dispatch commits, with the event id the step sends with.
        event_id = derive_event_id("flow", waiting.flow_id, "sla_credit", "do")
        credit = {"customer_id": "n2", "violation_id": "v1", "window_start": NOISY["window_start"]}
        runtime.governor("Billing").dispatch("n2", "SLAViolation", credit, event_id=event_id)
        runtime.clock.advance("30s")  # type: ignore[attr-defined]
        (done,) = runner.resume_all()
        assert done.status == "completed"
        assert done.gathered == {
            "contention": "succeeded",
            "sla_credit": "succeeded",
            "notify": "timed_out",
        }


def test_start_async_reads_the_stored_run_off_the_event_loop(tmp_path: Path) -> None:
    """A group commit holds the SQLite store's lock through its fsync; `start_async` first
    reads whether the run is stored, which waits for that lock. On the loop's thread that
    wait stalled every coroutine (before: the loop ran nothing until the commit ended, here
    the holder's 5 s); in an action thread, the loop goes on meanwhile."""
    store = SQLiteStore(tmp_path / "s.db")
    runtime, runner, _ = marketplace(store)
    held, release = threading.Event(), threading.Event()
    stalled: list[bool] = []

    def commit_in_progress(txn: object) -> None:
        held.set()
        stalled.append(not release.wait(5))

    holder = threading.Thread(target=store.run, args=([commit_in_progress],))
    holder.start()
    assert held.wait(20)

    async def main() -> FlowResult:
        opening = asyncio.create_task(runner.start_async("CustomerSignup", "c1", signup("c1")))
        for _ in range(3):
            await asyncio.sleep(0)  # the loop runs on while the start waits for the lock
        release.set()
        return await opening

    result = asyncio.run(main())
    holder.join()
    assert stalled == [False]
    assert result.status == "completed"
    runtime.close()


def _threads_opening(runner: FlowRunner, monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """The threads `runner` opens its runs in, one a start, as they do."""
    opened_in: list[threading.Thread] = []
    open_run = runner._open

    def opening(*arguments: Any) -> Any:
        opened_in.append(threading.current_thread())
        return open_run(*arguments)

    monkeypatch.setattr(runner, "_open", opening)
    return opened_in


def test_start_async_reads_on_the_loop_while_the_store_lock_is_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nobody holding the SQLite store's lock, `start_async` reads the stored run on
    the loop's thread (holding the lock, so it never waits there): the hop to an action
    thread and back costs more than the read."""
    store = SQLiteStore(tmp_path / "s.db")
    runtime, runner, _ = marketplace(store)
    opened_in = _threads_opening(runner, monkeypatch)
    result = asyncio.run(runner.start_async("CustomerSignup", "c1", signup("c1")))
    assert opened_in == [threading.main_thread()]
    assert result.status == "completed"
    runtime.close()


def test_start_asyncs_that_find_the_store_lock_held_read_in_one_hand_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starts that find the SQLite store's lock held (a commit through its fsync) read their
    runs in one action thread, one after another, once it is free: one hand-off for them all.
    Each still gets its own answer (an unknown flow its error), and a start cancelled while
    it waits leaves nothing stored."""
    store = SQLiteStore(tmp_path / "s.db")
    runtime, runner, _ = marketplace(store)
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=store.run, args=([lambda txn: (held.set(), release.wait(5))],))
    holder.start()
    assert held.wait(20)
    opened_in = _threads_opening(runner, monkeypatch)

    async def main() -> list[Any]:
        starts = [
            asyncio.create_task(runner.start_async("CustomerSignup", c, signup(c)))
            for c in ("c1", "c2", "c3")
        ]
        unknown = asyncio.create_task(runner.start_async("NoSuchFlow", "c4", {}))
        dropped = asyncio.create_task(runner.start_async("CustomerSignup", "c5", signup("c5")))
        for _ in range(3):
            await asyncio.sleep(0)
        dropped.cancel()
        release.set()
        return await asyncio.gather(*starts, unknown, dropped, return_exceptions=True)

    *results, unknown, dropped = asyncio.run(main())
    holder.join()
    assert [r.status for r in results] == ["completed"] * 3
    assert isinstance(unknown, UnknownFlow)
    assert isinstance(dropped, asyncio.CancelledError)
    assert len(opened_in) == 5
    assert len(set(opened_in)) == 1 and opened_in[0] is not threading.main_thread()
    assert store.get_flow(runner.flow_id("CustomerSignup", "c5", signup("c5"))) is None
    runtime.close()
