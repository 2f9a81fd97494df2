"""A compensation whose receiver does not answer is retried from the store until it is
answered: the upgrade's quota step fails for real while the refund processor is unreachable;
the run stays compensating, the refund is tried again with backoff (also by a runtime started
afterwards), and once the processor is back the charge is refunded exactly once and the run
ends compensated. Every attempt sends the same idempotency key (the action's
`ctx.event_id`), so a refund API deduplicates a repeat. On SQLite and PostgreSQL, with the
sync and the asyncio API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from autonomic.generated import quota_sla
from autonomic.runtime.flows import FlowResult, FlowRunner
from autonomic.runtime.keys import Signer
from autonomic.runtime.ledger import payload_digest
from autonomic.runtime.resilience.errors import ServiceFailure, Unavailable
from autonomic.runtime.results import derive_event_id
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.tables import MachineSpec, TransitionContext
from autonomic.runtime.timers import VirtualClock
from conftest import Stores
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flow_world import START_MS, marketplace
from test_flows import active_customer, capture_proration, flow_entries, state, upgrade_inputs


class RefundProcessor:
    """Billing's refund processor (unreachable while `down`; counts what it was sent) and the
    quota service."""

    def __init__(self) -> None:
        self.down = False
        self.why = "refund processor unreachable"
        self.quota_fails = False
        self.attempts = 0
        self.refunded: list[tuple[str, str]] = []  # (instance, event) of each refund paid
        self.prorations: dict[str, Decimal] = {}
        self.keys: set[str | None] = set()

    def submit_refund(self, ctx: TransitionContext[Any]) -> None:
        self.attempts += 1
        self.keys.add(ctx.event_id)  # what a refund API deduplicates by
        if self.down:
            raise Unavailable(self.why)
        self.refunded.append((ctx.instance, ctx.event))

    def quota_actions(
        self, spec: MachineSpec
    ) -> dict[str, Callable[[TransitionContext[Any]], None]]:
        """QuotaSla's actions, failing for good (a 500) on AllocateQuota while `quota_fails`
        (the upgrade's last step; the signup's allocation went through before)."""

        def act(ctx: TransitionContext[Any]) -> None:
            if self.quota_fails and ctx.event == "AllocateQuota":
                raise ServiceFailure("quota service failed")

        return dict.fromkeys(spec.actions, act)


def world(
    stores: Stores, processor: RefundProcessor, signer: Signer, clock: VirtualClock
) -> tuple[Runtime, FlowRunner]:
    actions: dict[str, dict[str, Callable[[TransitionContext[Any]], None]]] = {
        "QuotaSla": processor.quota_actions(quota_sla.MACHINE),
        "Billing": {"submit_refund": processor.submit_refund},
    }
    runtime, runner, bindings = marketplace(
        stores.open("m"), signer=signer, clock=clock, actions=actions
    )
    # The card processor remembers the captured proration charge (what a refund may pay
    # back) across this process's restarts.
    bindings.payments.prorations = processor.prorations
    return runtime, runner


def resume_all(runner: FlowRunner, api: str) -> list[FlowResult]:
    if api == "sync":
        return runner.resume_all()
    return asyncio.run(runner.resume_all_async())


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_refund_the_processor_cannot_take_yet_is_retried_until_paid_once(
    stores: Stores, api: str
) -> None:
    processor = RefundProcessor()
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    clock = VirtualClock(START_MS)
    runtime, runner = world(stores, processor, signer, clock)
    customer = f"u-{api}"
    active_customer(runtime, runner, customer)
    processor.quota_fails = True
    inputs = upgrade_inputs(customer)
    if api == "sync":
        result = runner.start("SubscriptionUpgrade", customer, inputs)
    else:
        result = asyncio.run(runner.start_async("SubscriptionUpgrade", customer, inputs))
    assert result.status == "waiting"
    capture_proration(runtime, customer)
    processor.down = True
    first = clock.now_ms()
    result = runner.resume(result.flow_id) if api == "sync" else resume_all(runner, api)[0]

    # The quota step failed; the tier is restored, the refund could not be sent: the run
    # waits to try it again, and nothing older than it is undone before it.
    assert (result.status, result.failed_step) == ("compensating", "allocate_quota")
    assert result.steps["grant_tier"] == "compensated"
    assert result.steps["charge_proration"] == "succeeded"
    assert result.steps["create_order"] == "succeeded"
    assert processor.refunded == []
    last = flow_entries(runtime, result)[-1]
    assert last == ("CompensationRetrying", "charge_proration", "compensating")
    wake = runner.next_wake()
    assert wake is not None and wake > clock.now_ms()
    # Not due yet: a resume tries nothing.
    attempts = processor.attempts
    assert resume_all(runner, api)[0].status == "compensating"
    assert runner.due_runs(stale_ms=3_600_000) == []
    assert processor.attempts == attempts

    # Due, still down: tried again, and the wait grows (the resilience jitter backoff).
    clock.set(wake)
    assert runner.due_runs(stale_ms=3_600_000) == [result.flow_id]
    assert resume_all(runner, api)[0].status == "compensating"
    assert processor.attempts > attempts
    later = runner.next_wake()
    assert later is not None and later - wake > wake - first

    # A new process on the store (the first one stopped) retries once the processor is back.
    runtime.close()
    processor.down = False
    clock.set(later)
    runtime, runner = world(stores, processor, signer, clock)
    with runtime:
        [done] = resume_all(runner, api)
        assert done.status == "compensated"
        assert dict(done.steps) == {
            **dict(result.steps),
            "grant_tier": "compensated",
            "charge_proration": "compensated",
            "create_order": "compensated",
        }
        assert processor.refunded == [(customer, "CompensationRefund")]
        events = [event for event, _, _ in flow_entries(runtime, done)]
        assert events.count("CompensationRetrying") == 2
        assert events[-4:] == [
            "CompensationRetrying",
            "StepCompensated",  # charge_proration
            "StepCompensated",  # create_order
            "CompensationCompleted",
        ]
        refunds = [
            e
            for e in runtime.store.ledger_entries(machine="Billing", instance=customer)
            if e.event == "CompensationRefund"
        ]
        assert len(refunds) == 1
        assert state(runtime, "Billing", customer) == "Refunding"
        assert resume_all(runner, api) == []
        assert processor.refunded == [(customer, "CompensationRefund")]
    # Every attempt, in both processes, sent the refund under one key: the compensation's
    # event id, derived from the run and the step.
    assert processor.attempts >= 3
    assert processor.keys == {derive_event_id("flow", result.flow_id, "charge_proration", "undo")}


def test_a_long_outage_writes_a_retry_entry_at_growing_intervals_and_on_a_new_error(
    tmp_path: Path,
) -> None:
    """A refund unanswered 24 times is tried 24 times, but the ledger records attempts 1, 2,
    4, 8 and 16 (each entry with its number, error and retry time), then the first attempt
    whose error is new: not one entry per attempt (1440 a day at the one-minute cap)."""
    processor = RefundProcessor()
    signer = Signer.from_private_key(Ed25519PrivateKey.generate())
    clock = VirtualClock(START_MS)
    runtime, runner = world(Stores("sqlite", tmp_path, None), processor, signer, clock)

    def noted() -> dict[str, Any]:
        """What the run's data holds of the refund's attempts, and the retry time."""
        record = runtime.store.get_flow(result.flow_id)
        assert record is not None and record.wake_ms is not None
        step = json.loads(record.data)["steps"]["charge_proration"]
        attempt = step["undo_attempts"]
        return {"error": step["undo_error"], "attempt": attempt, "retry_at": record.wake_ms}

    with runtime:
        active_customer(runtime, runner, "u-long")
        processor.quota_fails = True
        result = runner.start("SubscriptionUpgrade", "u-long", upgrade_inputs("u-long"))
        capture_proration(runtime, "u-long")
        processor.down = True
        runner.resume(result.flow_id)
        attempts = [noted()]
        for attempt in range(2, 25):
            if attempt == 22:
                processor.why = "refund processor answers 503"
            clock.set(attempts[-1]["retry_at"])
            [run] = runner.resume_all()
            assert run.status == "compensating"
            attempts.append(noted())
        assert processor.attempts == 24 and processor.refunded == []
        assert [a["attempt"] for a in attempts] == list(range(1, 25))
        retrying = [
            e
            for e in runtime.store.ledger_entries(machine=result.flow, instance=result.flow_id)
            if e.event == "CompensationRetrying"
        ]
        # Each entry is the one of its attempt: the digest of its number, error, retry time.
        assert [e.payload_sha256 for e in retrying] == [
            payload_digest(attempts[n - 1]) for n in (1, 2, 4, 8, 16, 22)
        ]
        assert attempts[21]["error"] != attempts[20]["error"]
