"""A forward flow step whose receiver does not answer (its outside call unavailable, its
policy's retries spent) is no refusal: the run waits with the step in the store and tries it
again after the jitter backoff, with the same event id, until it is answered or its bound
(a day) passes. One blip in the cancellation saga, the upgrade sequence or one of the
signup's parallel branches no longer ends the run: each completes with each effect once, on
SQLite and PostgreSQL, with the sync and the asyncio API. Only a refusal, or the bound, fails
the step and compensates. (kill -9 while a step waits: tests/test_flow_crash.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from autonomic.runtime.flows import FlowResult, FlowRunner, StepContext, StepFailed
from autonomic.runtime.flows.compensation import STEP_RETRY_LIMIT_MS
from autonomic.runtime.keys import load_signer
from autonomic.runtime.resilience.errors import Unavailable
from autonomic.runtime.results import derive_event_id
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.tables import TransitionContext
from conftest import Stores
from flow_world import marketplace
from test_flows import (
    active_customer,
    capture_proration,
    flow_entries,
    signup,
    state,
    upgrade_inputs,
)
from test_instance_audit import audit, keys


class Service:
    """An outside service that is unreachable for its next `down` calls (every call while
    `down` is negative); it remembers each call's event id and idempotency key."""

    def __init__(self, why: str) -> None:
        self.why = why
        self.down = 0
        self.calls: list[tuple[str | None, str | None]] = []

    def __call__(self, ctx: TransitionContext[Any]) -> None:
        self.calls.append((ctx.event_id, ctx.idempotency_key))
        if self.down:
            self.down -= 1
            raise Unavailable(self.why)


def start(runner: FlowRunner, api: str, flow: str, instance: str, inputs: Any) -> FlowResult:
    if api == "sync":
        return runner.start(flow, instance, inputs)
    return asyncio.run(runner.start_async(flow, instance, inputs))


def resume_all(runner: FlowRunner, api: str) -> list[FlowResult]:
    if api == "sync":
        return runner.resume_all()
    return asyncio.run(runner.resume_all_async())


def transitions(runtime: Runtime, machine: str, instance: str, event: str) -> int:
    entries = runtime.store.ledger_entries(machine=machine, instance=instance)
    return sum(1 for e in entries if e.kind == "transition" and e.event == event)


def cancel(customer: str) -> dict[str, str]:
    return {"customer_id": customer, "request_id": f"cx-{customer}", "reason": "bye"}


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_refund_unreachable_once_is_tried_again_and_the_cancellation_completes(
    stores: Stores, tmp_path: Path, api: str
) -> None:
    refunds = Service("refund processor unreachable")
    public = keys(tmp_path)
    runtime, runner, _ = marketplace(
        stores.open("m", partitions=4),
        signer=load_signer(public.parent),
        actions={"Billing": {"submit_refund": refunds}},
    )
    with runtime:
        customer = f"c-{api}"
        active_customer(runtime, runner, customer)
        refunds.down = 1
        result = start(runner, api, "SubscriptionCancellation", customer, cancel(customer))

        # The step waits in the store; nothing was refunded, nothing undone.
        assert result.status == "waiting" and result.failed_step is None
        assert dict(result.steps) == {"calculate_refund": "succeeded", "issue_refund": "started"}
        assert flow_entries(runtime, result)[-1] == ("StepRetrying", "issue_refund", "waiting")
        assert state(runtime, "Billing", customer) == "Current"
        wake = runner.next_wake()
        assert wake is not None and wake > runtime.clock.now_ms()
        # Not due yet: a resume calls nothing.
        assert [r.status for r in resume_all(runner, api)] == ["waiting"]
        assert len(refunds.calls) == 1
        assert audit(stores, public)[0] == 0

        runtime.clock.set(wake)  # type: ignore[attr-defined]
        [done] = resume_all(runner, api)
        assert done.status == "completed"
        assert set(done.steps.values()) == {"succeeded"}
        assert state(runtime, "Subscription", customer) == "Cancelled"
        assert transitions(runtime, "Billing", customer, "IssueCancellationRefund") == 1
        # Both attempts under the step's one event id: the processor can deduplicate.
        step_id = derive_event_id("flow", result.flow_id, "issue_refund", "do")
        assert [event_id for event_id, _ in refunds.calls] == [step_id, step_id]
        events = [event for event, _, _ in flow_entries(runtime, done)]
        assert events.count("StepRetrying") == 1
        assert events.count("StepStarted") == 4
        assert events[-1] == "FlowCompleted" and "StepFailed" not in events
        assert resume_all(runner, api) == [] and len(refunds.calls) == 2
    assert audit(stores, public)[0] == 0


def test_a_quota_service_blip_at_the_upgrades_last_step_keeps_the_paid_upgrade(
    tmp_path: Path,
) -> None:
    """The upgrade's last step, QuotaSla's in-transaction reallocation, unreachable once: the
    captured proration is kept (not refunded), the run completes at the retry."""
    quota = Service("quota service unreachable")
    actions = {"QuotaSla": {"allocate_quota": quota, "reallocate_quota": quota}}
    runtime, runner, _ = marketplace(SQLiteStore(tmp_path / "m.db"), actions=actions)
    with runtime:
        active_customer(runtime, runner, "u1")
        result = runner.start("SubscriptionUpgrade", "u1", upgrade_inputs("u1"))
        quota.down = 1
        capture_proration(runtime, "u1")
        result = runner.resume(result.flow_id)
        assert result.status == "waiting" and result.steps["allocate_quota"] == "started"
        assert result.steps["grant_tier"] == "succeeded"
        wake = runner.next_wake()
        assert wake is not None
        runtime.clock.set(wake)  # type: ignore[attr-defined]
        runtime.fire_due()
        runtime.deliver_outbox()
        [done] = runner.resume_all()
        assert done.status == "completed"
        assert state(runtime, "Billing", "u1") == "Current"  # not Refunding
        assert transitions(runtime, "Billing", "u1", "ProcessProrationCharge") == 1
        assert transitions(runtime, "Billing", "u1", "CompensationRefund") == 0
        assert transitions(runtime, "QuotaSla", "u1", "AllocateQuota") == 2  # signup, upgrade


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_signup_branch_unreachable_once_waits_while_the_others_finish(
    tmp_path: Path, api: str
) -> None:
    identity = Service("identity provider unreachable")
    runtime, runner, _ = marketplace(
        SQLiteStore(tmp_path / "m.db"),
        actions={"Compliance": {"start_identity_check": identity}},
    )
    with runtime:
        identity.down = 1
        result = start(runner, api, "CustomerSignup", "s1", signup("s1"))
        assert result.status == "waiting"
        assert dict(result.steps) == {
            "profile": "succeeded",
            "trial": "succeeded",
            "quota": "succeeded",
            "identity": "started",
        }
        wake = runner.next_wake()
        assert wake is not None
        runtime.clock.set(wake)  # type: ignore[attr-defined]
        [done] = resume_all(runner, api)
        assert done.status == "completed"
        assert set(done.steps.values()) == {"succeeded"}
        assert len(identity.calls) == 2
        assert len({event_id for event_id, _ in identity.calls}) == 1
        # Every branch took effect once: the retry sent only the unanswered one again.
        for machine, event in (
            ("CustomerAccount", "CreateProfile"),
            ("Subscription", "CreateTrialSubscription"),
            ("QuotaSla", "AllocateQuota"),
            ("Compliance", "VerifyIdentity"),
        ):
            assert transitions(runtime, machine, "s1", event) == 1, machine
        assert state(runtime, "Compliance", "s1") == "Verifying"


def test_a_refused_branch_compensates_though_another_waits_for_its_reply(
    tmp_path: Path,
) -> None:
    """One branch unanswered, another refused: the run compensates what finished (the
    unanswered branch fails with it, it is not tried again)."""

    def refuse_quota(ctx: StepContext) -> None:
        if ctx.step == "quota" and ctx.phase == "do":
            raise StepFailed("no capacity")

    identity = Service("identity provider unreachable")
    runtime, runner, _ = marketplace(
        SQLiteStore(tmp_path / "m.db"),
        before_step=refuse_quota,
        actions={"Compliance": {"start_identity_check": identity}},
    )
    with runtime:
        identity.down = 1
        result = runner.start("CustomerSignup", "s2", signup("s2"))
        assert result.status == "compensated"
        assert result.steps["quota"] == "failed" and result.steps["identity"] == "failed"
        assert result.steps["profile"] == result.steps["trial"] == "compensated"
        assert runner.next_wake() is None and len(identity.calls) == 1


def test_a_step_unanswered_for_a_day_fails_with_few_retry_entries(tmp_path: Path) -> None:
    """The refund processor never answers: the step is tried at the backoff's pace, the
    ledger records attempts 1, 2, 4, 8 (the rule of CompensationRetrying), and the first
    attempt a day after the first one fails the step: the run ends (nothing to undo before
    the refund), the subscription stays active."""
    refunds = Service("refund processor unreachable")
    stores, public = Stores("sqlite", tmp_path, None), keys(tmp_path)
    runtime, runner, _ = marketplace(
        stores.open("m"),
        signer=load_signer(public.parent),
        actions={"Billing": {"submit_refund": refunds}},
    )
    with runtime:
        active_customer(runtime, runner, "c1")
        refunds.down = -1
        first = runtime.clock.now_ms()
        result = runner.start("SubscriptionCancellation", "c1", cancel("c1"))
        for _ in range(9):
            wake: Any = runner.next_wake()
            runtime.clock.set(wake)  # type: ignore[attr-defined]
            assert [r.status for r in runner.resume_all()] == ["waiting"]
        assert len(refunds.calls) == 10
        retrying = [
            e
            for e in runtime.store.ledger_entries(machine=result.flow, instance=result.flow_id)
            if e.event == "StepRetrying"
        ]
        assert len(retrying) == 4  # attempts 1, 2, 4, 8
        # The run's writes without an entry (attempts 3, 5, 6, ...) are what the audit allows.
        assert audit(stores, public)[0] == 0
        runtime.clock.set(first + STEP_RETRY_LIMIT_MS)  # type: ignore[attr-defined]
        [ended] = runner.resume_all()
        assert (ended.status, ended.failed_step) == ("failed", "issue_refund")
        assert ended.reason is not None
        assert ended.reason.endswith("(no answer in 11 attempts over 1d)"), ended.reason
        assert state(runtime, "Subscription", "c1") == "Active"
        assert transitions(runtime, "Billing", "c1", "IssueCancellationRefund") == 0
        assert runner.next_wake() is None and runner.resume_all() == []
    assert audit(stores, public)[0] == 0
