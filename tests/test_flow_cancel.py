"""Cancelling an asyncio flow (or dispatch) while its outside calls run: the calls already
handed to the action threads are recorded there and their claims let go, so the run is
resumed, in this runtime or another on the store, and completes with each call made once,
no claim left and none renewed."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from autonomic.runtime.dispatch import Governor
from autonomic.runtime.flows import FlowResult, FlowRunner, StepContext
from autonomic.runtime.keys import Signer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.tables import TransitionContext
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flow_world import marketplace
from test_flows import SIGNUP_STEPS, flow_entries, signup

# The signup's outside actions (policy actions): one per branch.
SLOW = {
    "CustomerAccount": "create_profile",
    "Subscription": "start_trial",
    "QuotaSla": "allocate_quota",
    "Compliance": "start_identity_check",
}


class Services:
    """The signup's outside services: each call counted, held until `answer` is set."""

    def __init__(self, patience_s: float = 30) -> None:
        self.patience_s = patience_s  # how long a call waits for `answer`, then fails
        self.calls: Counter[str] = Counter()
        self.returned = 0
        self.answer = threading.Event()
        self._lock = threading.Lock()

    def action(self, name: str) -> Callable[[TransitionContext[Any]], None]:
        def call(ctx: TransitionContext[Any]) -> None:
            with self._lock:
                self.calls[name] += 1
            assert self.answer.wait(self.patience_s)
            with self._lock:
                self.returned += 1

        return call

    def actions(self) -> dict[str, dict[str, Callable[[TransitionContext[Any]], None]]]:
        return {machine: {name: self.action(name)} for machine, name in SLOW.items()}

    async def all_calling(self, count: int) -> None:
        for _ in range(3000):
            if sum(self.calls.values()) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"only {dict(self.calls)} called")


def resumed(runner: FlowRunner) -> list[FlowResult]:
    """`runner.resume_all()`, failing (not hanging) if a claim of the cancelled calls is
    never let go."""
    done: list[list[FlowResult]] = []
    thread = threading.Thread(target=lambda: done.append(runner.resume_all()), daemon=True)
    thread.start()
    thread.join(60)
    assert done, "resume_all still waits for the claims of the cancelled calls"
    return done[0]


def no_claims(runtime: Runtime, db: Path) -> None:
    """No claim is left in the store, and this runtime renews none."""
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outside_claims").fetchone() == (0,)
    assert not runtime._outside._renewing


@pytest.mark.parametrize("resumer", ["this runtime", "another runtime"])
def test_a_cancelled_start_async_leaves_a_run_that_resumes(tmp_path: Path, resumer: str) -> None:
    db = tmp_path / "m.db"
    services = Services()
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    runtime, runner, _ = marketplace(SQLiteStore(db), signer=signer, actions=services.actions())

    async def cancelled_mid_call() -> None:
        start = runner.start_async("CustomerSignup", "c", signup("c"))
        call = asyncio.ensure_future(start)
        await services.all_calling(len(SLOW))
        call.cancel()  # as asyncio.wait_for does when its timeout passes
        with pytest.raises(asyncio.CancelledError):
            await call

    with runtime:
        asyncio.run(cancelled_mid_call())
        services.answer.set()  # the calls end after their caller has gone
        if resumer == "this runtime":
            [done] = resumed(runner)
        else:
            other, again, _ = marketplace(
                SQLiteStore(db), signer=signer, actions=services.actions()
            )
            with other:
                [done] = resumed(again)
                no_claims(other, db)
        assert done.status == "completed"
        assert dict(done.steps) == dict.fromkeys(SIGNUP_STEPS, "succeeded")
        # The calls made before the cancellation were recorded, not made again.
        assert services.calls == Counter(SLOW.values())
        events = [event for event, _, _ in flow_entries(runtime, done)]
        assert events.count("StepSucceeded") == 4 and events[-1] == "FlowCompleted"
        no_claims(runtime, db)


class Crash(Exception):
    """The process stops at a step's hook (before any call)."""


def cancelled_then_resumed(
    runtime: Runtime, runner: FlowRunner, services: Services, db: Path
) -> None:
    """`resume_all_async` cancelled once the two stored signups' eight calls are all made,
    then the calls answered and both runs resumed: each completes, each call made once per
    customer, no claim left."""

    async def cancelled_mid_call() -> None:
        call = asyncio.ensure_future(runner.resume_all_async())
        await services.all_calling(2 * len(SLOW))
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(cancelled_mid_call())
    services.answer.set()
    done = resumed(runner)
    assert sorted((r.instance, r.status) for r in done) == [
        ("a", "completed"),
        ("b", "completed"),
    ]
    assert services.calls == Counter({name: 2 for name in SLOW.values()})
    no_claims(runtime, db)


def test_a_cancelled_resume_all_async_leaves_runs_that_resume(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    services = Services()
    crashing = [True]

    def crash(ctx: StepContext) -> None:
        if crashing[0]:
            raise Crash(ctx.step)

    runtime, runner, _ = marketplace(SQLiteStore(db), actions=services.actions(), before_step=crash)
    with runtime:
        for customer in ("a", "b"):  # stored, their branches not sent
            with pytest.raises(Crash):
                runner.start("CustomerSignup", customer, signup(customer))
        crashing[0] = False

        cancelled_then_resumed(runtime, runner, services, db)


def test_a_receiver_created_by_another_driver_after_the_look_is_called_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The test above failed rarely under load with a third call: the crashed `start` of
    run b had left branches in the action threads, and one of them created b's Compliance
    instance (a missing receiver is created first) after the asyncio driver's look had found
    none (nothing to call) and before its unit, which then made the call inside the write
    transaction. Every commit waited for it, so the other calls never started, the held
    call gave up (30 s) and failed, and the resume called again. Here the creation is made
    at that point: the driver looks again and calls before the transaction, once."""
    db = tmp_path / "m.db"
    services = Services(patience_s=3)
    crashing = [True]
    crashed = threading.Semaphore(0)

    def crash(ctx: StepContext) -> None:
        if crashing[0]:
            crashed.release()
            raise Crash(ctx.step)

    runtime, runner, _ = marketplace(SQLiteStore(db), actions=services.actions(), before_step=crash)
    real = Governor._preflight

    def created_meanwhile(governor: Governor, instance_id: str, *rest: Any) -> Any:
        preran = real(governor, instance_id, *rest)
        if (governor.name, instance_id) == ("Compliance", "b") and governor.get("b") is None:
            governor.create("b", "flow")  # as the other driver of the run did
        return preran

    with runtime:
        for customer in ("a", "b"):
            with pytest.raises(Crash):
                runner.start("CustomerSignup", customer, signup(customer))
        for _ in range(2 * len(SLOW)):
            # `start` raises with the first branch's crash, the others still in the action
            # threads: each crashes too, or it would be a second driver, sending its step.
            assert crashed.acquire(timeout=30)
        crashing[0] = False
        monkeypatch.setattr(Governor, "_preflight", created_meanwhile)

        cancelled_then_resumed(runtime, runner, services, db)


def test_a_start_async_cancelled_while_its_units_commit_leaves_a_run_that_resumes(
    tmp_path: Path,
) -> None:
    """Cancelled once the calls have returned and their units wait for their commit (another
    connection holds the write lock): the units commit all the same, or the action threads
    commit them, and the claims are let go."""
    db = tmp_path / "m.db"
    services = Services()
    runtime, runner, _ = marketplace(SQLiteStore(db), actions=services.actions())
    blocker = sqlite3.connect(db, isolation_level=None)

    async def cancelled_at_commit() -> None:
        call = asyncio.ensure_future(runner.start_async("CustomerSignup", "c", signup("c")))
        await services.all_calling(len(SLOW))  # the run's start and the claims are written
        blocker.execute("BEGIN IMMEDIATE")
        services.answer.set()
        for _ in range(3000):
            if services.returned == len(SLOW):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # their units queued, their batch waiting for the lock
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # Let the commit go on before the event loop closes (asyncio.run waits for the
        # batch's task, whose commit waits for this lock).
        blocker.execute("COMMIT")

    with runtime:
        asyncio.run(cancelled_at_commit())
        blocker.close()
        [done] = resumed(runner)
        assert done.status == "completed"
        assert services.calls == Counter(SLOW.values())
        transitions = [
            e.event
            for e in runtime.ledger()
            if e.kind == "transition" and e.instance == "c" and e.event in SIGNUP_EVENTS
        ]
        assert sorted(transitions) == sorted(SIGNUP_EVENTS)  # each once
        no_claims(runtime, db)


SIGNUP_EVENTS = ("CreateProfile", "CreateTrialSubscription", "AllocateQuota", "VerifyIdentity")
