"""Hand-built MachineSpecs for runtime tests: the same data a generated module would hold.

`entitlement_spec()` mirrors the seed's Entitlement governor (a 24h/48h/72h escalation
ladder), `billing_spec()` its Billing governor (an idempotent charge and a 1h/3h/1d/7d retry
ladder), `counter_spec()` a self-loop used for concurrency and crash tests. The `Bindings`
class records every guard and action call so tests can assert on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, cast

from autonomic.runtime.tables import (
    ELSE,
    Emit,
    EscalationLadder,
    EscalationStepSpec,
    GovernorEnum,
    MachineSpec,
    Notify,
    Payload,
    RetryLadderSpec,
    RetryStepSpec,
    SourceRef,
    TimerKind,
    TimerSpec,
    Transition,
    frozen_map,
)

HOUR = 3_600_000
DAY = 24 * HOUR
MINUTE = 60_000


class _Line:
    """Source positions that look like a machine file, one line per table row."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.line = 1

    def __call__(self, column: int = 5) -> SourceRef:
        self.line += 1
        return SourceRef(self.path, self.line, column)


def _enum(name: str, members: Iterable[str]) -> type[GovernorEnum]:
    created = GovernorEnum(name, [(m, m) for m in members])  # type: ignore[call-arg]
    return cast(type[GovernorEnum], created)


@dataclass
class SpecBuilder:
    """Assembles a MachineSpec the way the code generator lowers a machine file."""

    name: str
    states: list[str]
    events: list[str]
    initial: str
    finals: set[str] = field(default_factory=set)
    rows: list[Transition] = field(default_factory=list)
    timers: list[TimerSpec] = field(default_factory=list)
    ignored: dict[str, set[str]] = field(default_factory=dict)
    payloads: dict[str, type[Payload]] = field(default_factory=dict)
    escalations: dict[str, EscalationLadder] = field(default_factory=dict)
    retries: dict[str, RetryLadderSpec] = field(default_factory=dict)
    guards: dict[str, SourceRef] = field(default_factory=dict)
    actions: dict[str, SourceRef] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pos = _Line(f"machines/{self.name.lower()}.fsm")

    def on(
        self,
        source: str,
        event: str,
        target: str,
        *,
        when: str | None = None,
        do: tuple[str, ...] = (),
        emit: tuple[tuple[str, str] | Emit, ...] = (),
    ) -> SpecBuilder:
        ref = self.pos()
        if when is not None and when != ELSE:
            self.guards.setdefault(when, SourceRef(ref.path, ref.line, 30))
        for action in do:
            self.actions.setdefault(action, SourceRef(ref.path, ref.line, 40))
        emits = tuple(e if isinstance(e, Emit) else Emit(*e) for e in emit)
        self.rows.append(Transition(source, event, target, when, do, emits, ref))
        return self

    def timer(
        self,
        state: str,
        after_ms: int,
        *,
        kind: TimerKind = "timeout",
        target: str | None = None,
        do: tuple[str, ...] = (),
        emit: tuple[tuple[str, str], ...] = (),
        notify: Notify | None = None,
        ladder: str | None = None,
        step: int | None = None,
        timer_id: str | None = None,
    ) -> TimerSpec:
        ref = self.pos()
        for action in do:
            self.actions.setdefault(action, SourceRef(ref.path, ref.line, 40))
        spec = TimerSpec(
            id=timer_id or f"{state}.after.{after_ms}",
            state=state,
            after_ms=after_ms,
            kind=kind,
            target=target,
            actions=do,
            emits=tuple(Emit(m, e) for m, e in emit),
            notify=notify,
            ladder=ladder,
            step=step,
            ref=ref,
        )
        self.timers.append(spec)
        return spec

    def build(self) -> MachineSpec:
        table: dict[tuple[str, str], list[Transition]] = {}
        for row in self.rows:
            table.setdefault((row.source, row.event), []).append(row)
        ordered = {
            key: tuple(sorted(rows, key=lambda r: r.guard == ELSE)) for key, rows in table.items()
        }
        by_state: dict[str, list[TimerSpec]] = {}
        for timer in self.timers:
            by_state.setdefault(timer.state, []).append(timer)
        return MachineSpec(
            name=self.name,
            doc=None,
            source_path=f"machines/{self.name.lower()}.fsm",
            source_sha256="0" * 64,
            compiler_version="test",
            state_type=_enum(f"{self.name}State", self.states),
            event_type=_enum(f"{self.name}Event", self.events),
            initial=self.initial,
            finals=frozenset(self.finals),
            transitions=frozen_map(ordered),
            timers=frozen_map(
                {s: tuple(sorted(t, key=lambda x: x.after_ms)) for s, t in by_state.items()}
            ),
            ignored=frozen_map({s: frozenset(e) for s, e in self.ignored.items()}),
            payloads=frozen_map(self.payloads),
            escalations=frozen_map(self.escalations),
            retries=frozen_map(self.retries),
            guards=frozen_map(self.guards),
            actions=frozen_map(self.actions),
        )


class ApprovePayload(Payload):
    approver: str
    note: str | None = None


class RejectPayload(Payload):
    reason: str


class ChargePayload(Payload):
    amount: Decimal
    currency: Literal["USD", "EUR"]


class PaymentFailedPayload(Payload):
    reason: str | None = None


def entitlement_spec() -> MachineSpec:
    """The seed's Entitlement governor: approval with a 24h/48h/72h escalation ladder."""
    b = SpecBuilder(
        name="Entitlement",
        states=["PendingApproval", "Active", "Suspended", "Rejected", "Revoked", "Expired"],
        events=["Approve", "Reject", "Suspend", "Resume", "Ping"],
        initial="PendingApproval",
        finals={"Rejected", "Revoked", "Expired"},
    )
    b.payloads = {"Approve": ApprovePayload, "Reject": RejectPayload}
    b.on(
        "PendingApproval",
        "Approve",
        "Active",
        when="is_approver",
        do=("record_approval",),
        emit=(("Billing", "StartBilling"),),
    )
    b.on("PendingApproval", "Approve", "Rejected", when=ELSE)
    b.on("PendingApproval", "Reject", "Rejected")
    b.ignored["PendingApproval"] = {"Ping"}
    b.on("Active", "Suspend", "Suspended")
    b.on("Active", "Ping", "Active")
    b.on("Suspended", "Resume", "Active")
    ladder = "ApprovalLadder"
    manager = Notify("queue", "manager_review_queue", 4 * HOUR, "Manual review of pending approval")
    director = Notify("queue", "director_review_queue", 1 * HOUR, "Director review required")
    steps = []
    for number, (after, notify) in enumerate(((24 * HOUR, manager), (48 * HOUR, director)), 1):
        spec = b.timer(
            "PendingApproval",
            after,
            kind="escalation_step",
            notify=notify,
            ladder=ladder,
            step=number,
            timer_id=f"PendingApproval.{ladder}.{number}",
        )
        steps.append(EscalationStepSpec(number, after, notify, spec.id))
    end = b.timer(
        "PendingApproval",
        72 * HOUR,
        kind="escalation_end",
        target="Active",
        do=("auto_approve",),
        ladder=ladder,
        timer_id=f"PendingApproval.{ladder}.end",
    )
    b.escalations[ladder] = EscalationLadder(
        ladder, "PendingApproval", tuple(steps), 72 * HOUR, "Active", end.id, b.pos()
    )
    b.timer("Active", 30 * DAY, target="Expired", timer_id="Active.after.30d")
    b.timer(
        "Suspended",
        72 * HOUR,
        target="Revoked",
        emit=(("Billing", "RefundRequested"),),
        timer_id="Suspended.after.72h",
    )
    return b.build()


RETRY_STEPS = (("Retry1", 1 * HOUR), ("Retry2", 3 * HOUR), ("Retry3", DAY), ("Collection", 7 * DAY))


def billing_spec() -> MachineSpec:
    """The seed's Billing governor: an idempotent charge and a 1h/3h/1d/7d retry ladder."""
    step_states = [name for name, _ in RETRY_STEPS]
    b = SpecBuilder(
        name="Billing",
        states=["Idle", "AwaitingPayment", *step_states, "Paid", "MaxRetriesExceeded", "Refunded"],
        events=["StartBilling", "Charge", "PaymentSucceeded", "PaymentFailed", "RefundRequested"],
        initial="Idle",
        finals={"MaxRetriesExceeded", "Refunded"},
    )
    b.payloads = {"Charge": ChargePayload, "PaymentFailed": PaymentFailedPayload}
    b.on("Idle", "StartBilling", "AwaitingPayment")
    b.on("AwaitingPayment", "Charge", "Paid", when="amount_matches", do=("charge_card",))
    b.on("AwaitingPayment", "Charge", "AwaitingPayment", when=ELSE)
    b.on("AwaitingPayment", "PaymentFailed", "Retry1")
    retry_steps = []
    previous = "Retry1"
    for number, (state, after) in enumerate(RETRY_STEPS, 1):
        if number > 1:
            b.on(previous, "PaymentFailed", state)
        b.on(state, "PaymentSucceeded", "Paid")
        spec = b.timer(
            state,
            after,
            kind="retry_step",
            do=("retry_charge",),
            ladder="PaymentRetry",
            step=number,
            timer_id=f"{state}.PaymentRetry.{number}",
        )
        retry_steps.append(RetryStepSpec(number, state, after, ("retry_charge",), spec.id))
        previous = state
    b.on(previous, "PaymentFailed", "MaxRetriesExceeded")
    b.on("Paid", "RefundRequested", "Refunded")
    b.ignored["Idle"] = {"RefundRequested"}
    b.retries["PaymentRetry"] = RetryLadderSpec(
        "PaymentRetry",
        "PaymentFailed",
        ("AwaitingPayment",),
        tuple(retry_steps),
        "MaxRetriesExceeded",
        b.pos(),
    )
    return b.build()


def counter_spec() -> MachineSpec:
    """A self-loop (Tick) plus a timed side state: concurrency and crash tests count on it.

    Hold arms a 10 minute reminder (escalation step, notifies) and a 30 minute timeout back to
    Counting, so a run that advances its clock fires timers of both kinds.
    """
    b = SpecBuilder(
        name="Counter",
        states=["Counting", "Holding", "Stopped"],
        events=["Tick", "Hold", "Release", "Stop"],
        initial="Counting",
        finals={"Stopped"},
    )
    b.on("Counting", "Tick", "Counting", do=("count",))
    b.on("Counting", "Hold", "Holding")
    b.on("Holding", "Release", "Counting")
    b.on("Counting", "Stop", "Stopped")
    b.on("Holding", "Stop", "Stopped")
    reminder = Notify("role", "operator", 5 * MINUTE, "Counter held for 10 minutes")
    step = b.timer(
        "Holding",
        10 * MINUTE,
        kind="escalation_step",
        notify=reminder,
        ladder="HoldLadder",
        step=1,
        timer_id="Holding.HoldLadder.1",
    )
    end = b.timer(
        "Holding",
        30 * MINUTE,
        kind="escalation_end",
        target="Counting",
        ladder="HoldLadder",
        timer_id="Holding.HoldLadder.end",
    )
    b.escalations["HoldLadder"] = EscalationLadder(
        "HoldLadder",
        "Holding",
        (EscalationStepSpec(1, 10 * MINUTE, reminder, step.id),),
        30 * MINUTE,
        "Counting",
        end.id,
        b.pos(),
    )
    return b.build()


@dataclass
class Bindings:
    """Guard outcomes and action recorders for the hand-built machines."""

    outcomes: dict[str, bool] = field(default_factory=dict)
    calls: list[tuple[str, str, str]] = field(default_factory=list)

    def guard(self, name: str, default: bool = True) -> Callable[[Any], bool]:
        def check(ctx: Any) -> bool:
            self.calls.append(("guard", name, ctx.instance))
            return self.outcomes.get(name, default)

        return check

    def action(self, name: str) -> Callable[[Any], object]:
        def run(ctx: Any) -> object:
            self.calls.append(("action", name, ctx.instance))
            return {"action": name, "instance": ctx.instance, "version": ctx.version}

        return run

    def for_spec(
        self, spec: MachineSpec
    ) -> tuple[Mapping[str, Callable[[Any], bool]], Mapping[str, Callable[[Any], object]]]:
        guards = {name: self.guard(name) for name in spec.guards}
        actions = {name: self.action(name) for name in spec.actions}
        return guards, actions


# -- worker processes for the crash and concurrency tests ------------------------------------------
# Run as `python tests/runtime_machines.py crash-worker|counter-worker ...`; each prints one JSON
# line per committed change, flushed, so the parent knows exactly what was acknowledged.


def _emit_line(doc: dict[str, object]) -> None:
    import json
    import sys

    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _open_counter_runtime(db: str, keys: str, mode: str, start_ms: int | None) -> Any:
    """A runtime on the store at `db`: an SQLite path or a postgresql:// URL."""
    from autonomic.runtime.keys import load_signer
    from autonomic.runtime.ledger import LedgerSealer
    from autonomic.runtime.runtime import Runtime
    from autonomic.runtime.store.locate import open_store
    from autonomic.runtime.timers import VirtualClock

    sealer = LedgerSealer(load_signer(keys), mode)  # type: ignore[arg-type]
    return Runtime(open_store(db, lease_ms=2000), clock=VirtualClock(start_ms), sealer=sealer)


def load_counter(runtime: Any) -> None:
    """`autonomic worker --app runtime_machines:load_counter`: the Counter governor."""
    spec = counter_spec()
    runtime.load(spec, *Bindings().for_spec(spec))


# The SQLite probe stays open for the worker's life, as an application's own connection
# would be: opening the store beside it must not drop the locks this process holds on the
# file (main a14254a).
_PROBES: dict[str, Any] = {}


def _newest_ts(db: str) -> int | None:
    """The newest ledger timestamp in the store at `db`, or None for a new store."""
    if db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(db, autocommit=True) as connection:
            if connection.execute("SELECT to_regclass('ledger')").fetchone() == (None,):
                return None
            row = connection.execute("SELECT max(ts_ms) FROM ledger").fetchone()
    else:
        import sqlite3

        probe = _PROBES[db] = sqlite3.connect(db)
        if not probe.execute("SELECT 1 FROM sqlite_master WHERE name = 'ledger'").fetchone():
            return None
        row = probe.execute("SELECT max(ts_ms) FROM ledger").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def crash_worker(db: str, keys: str, seed: int, run: int) -> None:
    """Create, tick, hold and release counters and fire their timers, forever (until killed).

    The virtual clock resumes one minute after the newest ledger entry, so timers armed before
    a crash come due in later runs.
    """
    import random

    from autonomic.runtime.errors import InvalidTransition

    newest = _newest_ts(db)
    start = 1_800_000_000_000 if newest is None else newest + MINUTE
    rt = _open_counter_runtime(db, keys, "checkpoint", start)
    spec = counter_spec()
    counter = rt.load(spec, *Bindings().for_spec(spec))
    rng = random.Random(seed)
    created = 0
    while True:
        known = [r.instance for r in rt.store.instances("Counter")]
        roll = rng.random()
        if roll < 0.15 or not known:
            name = f"r{run}-{seed % 1000}-{created}"
            created += 1
            result = counter.create(name, "worker")
            _emit_line(
                {
                    "op": "ack",
                    "instance": name,
                    "seq": result.seq,
                    "version": 1,
                    "state": result.to_state,
                }
            )
        elif roll < 0.85:
            name = rng.choice(known)
            event = rng.choice(["Tick", "Tick", "Hold", "Release", "Hold"])
            try:
                result = counter.dispatch(name, event, actor="worker")
            except InvalidTransition:
                continue
            _emit_line(
                {
                    "op": "ack",
                    "instance": name,
                    "seq": result.seq,
                    "version": result.version,
                    "state": result.to_state,
                }
            )
        else:
            rt.clock.advance(rng.randrange(1, 20) * MINUTE)
            for fired in rt.fire_due():
                _emit_line(
                    {
                        "op": "fired",
                        "instance": fired.timer.instance,
                        "seq": fired.result.seq,
                        "event_id": fired.result.event_id,
                        "version": fired.result.version,
                        "state": fired.result.to_state,
                    }
                )


def counter_worker(db: str, keys: str, instances: int, increments: int, seed: int) -> None:
    """Tick shared counters `increments` times with optimistic retries on version conflicts."""
    import random
    import sys

    from autonomic.runtime.errors import ConcurrentUpdateDetected

    rt = _open_counter_runtime(db, keys, "sign-each", None)
    spec = counter_spec()
    counter = rt.load(spec, *Bindings().for_spec(spec))
    rng = random.Random(seed)
    conflicts = 0
    _emit_line({"op": "ready"})
    sys.stdin.readline()  # start together with the other workers
    for _ in range(increments):
        name = f"c{rng.randrange(instances)}"
        while True:
            record = counter.get(name)
            assert record is not None
            try:
                result = counter.dispatch(
                    name, "Tick", actor=f"p{seed}", expected_version=record.version
                )
            except ConcurrentUpdateDetected:
                conflicts += 1
                continue
            break
        _emit_line({"op": "ack", "instance": name, "seq": result.seq, "version": result.version})
    rt.close()
    _emit_line({"op": "done", "conflicts": conflicts})


if __name__ == "__main__":
    import sys

    command, *arguments = sys.argv[1:]
    if command == "crash-worker":
        crash_worker(arguments[0], arguments[1], int(arguments[2]), int(arguments[3]))
    elif command == "counter-worker":
        db, keys, instances, increments, seed = arguments
        counter_worker(db, keys, int(instances), int(increments), int(seed))
    else:
        raise SystemExit(f"unknown command {command!r}")
