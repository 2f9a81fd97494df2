"""Escalation notices' `within` deadlines in the product: started with the notice, met by the
move they wait for, escalated and re-armed 24 h after the miss by the runtime's due work in
time order with the timers (however seldom it runs), across a restart, on SQLite and
PostgreSQL with a signed ledger and a virtual clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autonomic.generated.compliance import MACHINE as COMPLIANCE
from autonomic.generated.entitlement import MACHINE as ENTITLEMENT
from autonomic.runtime.keys import Keyring, load_signer
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.notice_deadlines import notice_deadline_id
from autonomic.runtime.partitions import partition_of
from autonomic.runtime.resilience import DeadlineTracker
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.base import DeadlineRecord
from autonomic.runtime.timers import VirtualClock
from billing_world import START
from conftest import Stores
from runtime_machines import Bindings, counter_spec

HOUR = 3_600_000
MANAGER_STEP = "PendingApproval/ApprovalLadder/1"
MANAGER = f"notice:Entitlement:{MANAGER_STEP}:c1"
DIRECTOR = "notice:Entitlement:PendingApproval/ApprovalLadder/2:c1"
PROVIDER = "notice:Compliance:Verifying/ProviderTimeout/1:case1"
HOLD_REMINDER = "notice:Counter:Holding.HoldLadder.1:x"


def _open(
    stores: Stores, keys: Path, clock: VirtualClock, name: str = "s", **options: Any
) -> Runtime:
    runtime = Runtime(
        stores.open(name, **options),
        clock=clock,
        sealer=LedgerSealer(load_signer(keys), "sign-each"),
    )
    for spec in (ENTITLEMENT, COMPLIANCE):
        guards = {name: (lambda ctx: True) for name in spec.guards}
        actions: dict[str, Any] = {name: (lambda ctx: None) for name in spec.actions}
        runtime.load(spec, guards, actions)
    return runtime


def _at(clock: VirtualClock, hours: int) -> None:
    clock.advance(START + hours * HOUR - clock.now_ms())


def _deadlines(runtime: Runtime) -> dict[str, tuple[int, int]]:
    """id -> (hours after START it is due, level)."""
    return {d.id: ((d.due_ms - START) // HOUR, d.level) for d in runtime.store.deadlines()}


def _missed(runtime: Runtime) -> list[tuple[str, str, str, int]]:
    return [
        (e.instance.removeprefix("deadline:"), e.from_state, e.to_state, (e.ts_ms - START) // HOUR)
        for e in runtime.ledger()
        if e.kind == "escalation" and e.event == "DeadlineMissed"
    ]


def test_notice_deadlines_of_two_governors_escalate_rearm_and_clear(
    stores: Stores, keys: Path
) -> None:
    clock = VirtualClock(START)
    runtime = _open(stores, keys, clock)
    runtime.governor("Entitlement").create("c1")
    compliance = runtime.governor("Compliance")
    compliance.create("case1")
    compliance.dispatch("case1", "VerifyIdentity", {"customer_id": "c1"})

    _at(clock, 1)
    runtime.fire_due()  # the provider notice, within 4h: its deadline starts with it
    assert _deadlines(runtime) == {PROVIDER: (5, 0)}
    fired = [e for e in runtime.ledger() if e.instance == "case1" and e.kind == "escalation"]
    assert [e.event for e in fired] == ["Verifying/ProviderTimeout/1"]
    _at(clock, 2)
    passed = {"verification_id": "v1", "decided_by": "provider"}
    compliance.dispatch("case1", "VerificationPassed", passed)  # what the notice waited for
    assert _deadlines(runtime) == {}

    _at(clock, 24)
    runtime.fire_due()
    assert _deadlines(runtime) == {MANAGER: (28, 0)}
    runtime.close()  # a restart: the deadline is in the store

    runtime = _open(stores, keys, clock)
    assert runtime.next_deadline() == START + 28 * HOUR
    _at(clock, 29)
    runtime.fire_due()  # missed at 28: escalated now, and due again 24 h after the miss
    assert _deadlines(runtime) == {MANAGER: (52, 1)}
    assert _missed(runtime) == [(MANAGER, "level0", "level1", 29)]
    notices = [json.loads(m.body) for m in runtime.notifications()]
    assert [(n["recipient"], n["message"], (n["deadline_ms"] - START) // HOUR) for n in notices][
        -1
    ] == (
        "manager_review_queue",
        "deadline passed (escalation level 1): Manual review of pending approval",
        52,
    )

    _at(clock, 48)
    runtime.fire_due()
    assert _deadlines(runtime) == {DIRECTOR: (49, 0), MANAGER: (52, 1)}
    _at(clock, 53)
    runtime.fire_due()  # both missed: the director's once, the manager's again
    assert _deadlines(runtime) == {DIRECTOR: (73, 1), MANAGER: (76, 2)}
    assert _missed(runtime)[1:] == [
        (DIRECTOR, "level0", "level1", 53),
        (MANAGER, "level1", "level2", 53),
    ]

    _at(clock, 60)
    runtime.governor("Entitlement").dispatch("c1", "Approve", {"approver": "vendor-admin"})
    assert _deadlines(runtime) == {}  # met: the move that left PendingApproval cleared both
    _at(clock, 200)
    runtime.fire_due()
    assert len(_missed(runtime)) == 3 and runtime.next_deadline() is None
    runtime.close()
    assert stores.verify("s", Keyring.from_files([keys])).ok


def test_a_ladder_that_moves_on_by_itself_meets_only_the_deadlines_not_yet_missed(
    stores: Stores, keys: Path
) -> None:
    """The 72 h auto-approval, fired by due work that runs once a day: the deadlines missed
    before it (the director's at 49 h, the manager's again at 52 h) escalate first, as they
    would with due work running every second; one that falls due at the very instant of the
    move is met: the timer fires first."""
    clock = VirtualClock(START)
    runtime = _open(stores, keys, clock)
    runtime.governor("Entitlement").create("c1")
    for hours in (24, 48):
        _at(clock, hours)
        runtime.fire_due()
    assert _deadlines(runtime) == {MANAGER: (52, 1), DIRECTOR: (49, 0)}
    # An application's deadline under a notice's id, due at the move's instant: met.
    tracker = DeadlineTracker(runtime)
    tracker.track(
        "notice:Entitlement:PendingApproval/ApprovalLadder/3:c1",
        name="auto-approval",
        governor="Entitlement",
        due_ms=START + 72 * HOUR,
        action="notify queue x",
    )
    _at(clock, 72)
    runtime.fire_due()
    record = runtime.governor("Entitlement").get("c1")
    assert record is not None and record.state == "Active"
    assert _deadlines(runtime) == {}
    assert [m[:3] for m in _missed(runtime)] == [
        (MANAGER, "level0", "level1"),
        (DIRECTOR, "level0", "level1"),
        (MANAGER, "level1", "level2"),
    ]
    runtime.close()


def test_the_tracker_sees_notice_deadlines_with_its_own(stores: Stores, keys: Path) -> None:
    """Deadlines from several places are tracked together: the application's own (any id)
    and the notices'; the tracker's check escalates both, the due work only the notices'."""
    clock = VirtualClock(START)
    runtime = _open(stores, keys, clock)
    tracker = DeadlineTracker(runtime)
    tracker.track("refund-7", name="refund", governor="Billing", due_ms=START + HOUR, action="x")
    runtime.governor("Entitlement").create("c1")
    _at(clock, 24)
    runtime.fire_due()  # the application's deadline is the tracker's to check
    assert _deadlines(runtime) == {"refund-7": (1, 0), MANAGER: (28, 0)}
    _at(clock, 30)
    assert [(e.id, e.level) for e in tracker.check()] == [("refund-7", 1), (MANAGER, 1)]
    # The application's deadline due again 24 h after the check (the seed's tracker), the
    # notice's 24 h after its miss at 28 h (its schedule does not depend on the check).
    assert _deadlines(runtime) == {"refund-7": (54, 1), MANAGER: (52, 1)}
    assert isinstance(runtime.store.deadlines()[0], DeadlineRecord)
    runtime.close()


def _escalations_polled_every(stores: Stores, keys: Path, minutes: int) -> list[object]:
    """Entitlement's approval ladder and Compliance's verification for 120 h, with the due
    work run every `minutes`: the escalations, their notifications and what is left."""
    clock = VirtualClock(START)
    name = f"every{minutes}"
    runtime = _open(stores, keys, clock, name)
    runtime.governor("Entitlement").create("c1")
    compliance = runtime.governor("Compliance")
    compliance.create("case1")
    compliance.dispatch("case1", "VerifyIdentity", {"customer_id": "c1"})
    while clock.now_ms() < START + 120 * HOUR:
        clock.advance(minutes * 60_000)
        runtime.fire_due()
    passed = [json.loads(m.body) for m in runtime.notifications()]
    found: list[object] = [
        sorted(m[:3] for m in _missed(runtime)),
        sorted(
            (n["recipient"], n["message"], n["deadline_ms"] - START)
            for n in passed
            if n["message"].startswith("deadline passed")
        ),
        _deadlines(runtime),
        [(r.state, r.version) for r in (runtime.governor("Compliance").get("case1"),) if r],
    ]
    runtime.close()
    assert stores.verify(name, Keyring.from_files([keys])).ok
    return found


def test_due_work_once_a_day_escalates_what_due_work_every_15_minutes_does(
    stores: Stores, keys: Path
) -> None:
    """Issue 12, "a missed deadline escalates, and then re-arms 24 h later": however late the
    due work runs (once a day, every 5 h), it escalates the deadlines missed meanwhile in time
    order with the timers, before a later move would delete them as met."""
    often = _escalations_polled_every(stores, keys, 15)
    assert set(often[0]) >= {  # type: ignore[call-overload]
        (DIRECTOR, "level0", "level1"),  # due 49 h, re-armed 73 h: met by the move at 72 h
        (MANAGER, "level0", "level1"),  # due 28 h
        (MANAGER, "level1", "level2"),  # due 52 h, re-armed 76 h
        (PROVIDER, "level0", "level1"),  # due 5 h, re-armed 29 h: met by ManualReview at 24 h
    }
    for minutes in (24 * 60, 5 * 60):
        assert _escalations_polled_every(stores, keys, minutes) == often, minutes


def test_a_second_miss_of_a_deadline_with_the_same_schedule_gets_its_own_notification(
    stores: Stores, keys: Path
) -> None:
    """Two workers on one store whose clocks differ (the PostgreSQL crash test's three): the
    instance held again at an instant the first worker has passed sends the same notice with
    the same schedule; its miss is a new one and notifies again, not a duplicate event id
    (main 4cab46e counted the deadline from its timer's due time: UniqueViolation)."""
    minute = 60_000
    spec = counter_spec()
    workers = []
    clocks = []
    for _ in range(2):
        clocks.append(VirtualClock(START))
        runtime = Runtime(
            stores.open("s"),
            clock=clocks[-1],
            sealer=LedgerSealer(load_signer(keys), "sign-each"),
        )
        runtime.load(spec, *Bindings().for_spec(spec))
        workers.append(runtime)
    first = workers[0]
    first.governor("Counter").create("x")
    for worker, clock in zip(workers, clocks, strict=True):
        worker.governor("Counter").dispatch("x", "Hold")
        clock.advance(20 * minute)  # the reminder at 10 min, its deadline at 15
        assert [f.timer.timer_id for f in worker.fire_due()] == ["Holding.HoldLadder.1"]
        worker.governor("Counter").dispatch("x", "Release")  # meets the re-armed deadline
    missed = [
        m.event_id for m in first.store.outbox(kind="notification") if "deadline passed" in m.body
    ]
    assert len(missed) == len(set(missed)) == 2
    assert [m[:3] for m in _missed(first)] == [(HOLD_REMINDER, "level0", "level1")] * 2
    assert _deadlines(first) == {}
    for worker in workers:
        worker.close()


def _late_approval(stores: Stores, keys: Path, name: str, hours: int, due_work: bool) -> Runtime:
    """The manager's notice sent at 24 h (its deadline due at 28 h), then the approval at
    `hours`, with or without the due work run just before it."""
    clock = VirtualClock(START)
    runtime = _open(stores, keys, clock, name)
    runtime.governor("Entitlement").create("c1")
    _at(clock, 24)
    runtime.fire_due()
    _at(clock, hours)
    if due_work:
        runtime.fire_due()
    runtime.governor("Entitlement").dispatch("c1", "Approve", {"approver": "vendor-admin"})
    assert _deadlines(runtime) == {}  # met by the approval either way
    return runtime


def _passed(runtime: Runtime) -> list[tuple[str, str, str, int]]:
    return [
        (m.event_id, json.loads(m.body)["recipient"], json.loads(m.body)["message"], m.version)
        for m in runtime.store.outbox(kind="notification")
        if "deadline passed" in m.body
    ]


def test_an_event_after_a_missed_deadline_escalates_it_then_meets_it(
    stores: Stores, keys: Path
) -> None:
    """The approval arrives at 30 h, after the manager's deadline (28 h) but before any due
    work ran: the miss escalates as the due work at 30 h would have escalated it (the same
    notification and event id, the same ledger entry), then the approval meets it (before,
    the approval deleted it as met: nobody heard of the miss)."""
    timely = _late_approval(stores, keys, "timely", 30, due_work=True)
    late = _late_approval(stores, keys, "late", 30, due_work=False)
    assert _missed(late) == _missed(timely) == [(MANAGER, "level0", "level1", 30)]
    assert _passed(late) == _passed(timely) and len(_passed(late)) == 1
    escalated = [e for e in late.ledger() if e.instance.startswith("deadline:")]
    approved = [e for e in late.ledger() if e.event == "Approve"]
    assert escalated[0].seq < approved[0].seq  # the miss came first
    assert [e.payload_sha256 for e in escalated] == [
        e.payload_sha256 for e in timely.ledger() if e.instance.startswith("deadline:")
    ]
    # Missed at 28 h and again at 52 h when the approval comes at 60 h; at the deadline's
    # very instant it is met.
    again = _late_approval(stores, keys, "again", 60, due_work=False)
    assert _missed(again) == [(MANAGER, "level0", "level1", 60), (MANAGER, "level1", "level2", 60)]
    assert [p[2][:38] for p in _passed(again)] == [
        "deadline passed (escalation level 1): ",
        "deadline passed (escalation level 2): ",
    ]
    on_time = _late_approval(stores, keys, "on_time", 28, due_work=False)
    assert _missed(on_time) == [] and _passed(on_time) == []
    for runtime, name in (
        (timely, "timely"),
        (late, "late"),
        (again, "again"),
        (on_time, "on_time"),
    ):
        runtime.close()
        assert stores.verify(name, Keyring.from_files([keys])).ok


def test_a_late_event_escalates_a_deadline_whose_chain_is_another_first(
    postgres_stores: Stores, keys: Path
) -> None:
    """Partitioned PostgreSQL: the manager's deadline of a customer whose ledger chain is not
    the deadline's own (`deadline:<id>` picks it), missed at 28 h and 52 h, met by the
    approval at 60 h before any due work ran. The approval's unit cannot write the
    deadline's chain: it sends both misses' notifications and leaves their entries to the
    next due work, which seals them there; the same notifications and entries as due work
    run before the approval (before, the approval deleted the deadline unescalated)."""
    customer = next(
        c
        for c in (f"c{n}" for n in range(100))
        if partition_of(c, 4)
        != partition_of(f"deadline:{notice_deadline_id('Entitlement', MANAGER_STEP, c)}", 4)
    )
    deadline = notice_deadline_id("Entitlement", MANAGER_STEP, customer)
    found = {}
    for name, due_work in (("timely", True), ("late", False)):
        clock = VirtualClock(START)
        runtime = _open(postgres_stores, keys, clock, name, partitions=4)
        entitlement = runtime.governor("Entitlement")
        entitlement.create(customer)
        _at(clock, 24)
        runtime.fire_due()  # the manager's notice: its deadline due at 28 h
        _at(clock, 60)
        if due_work:
            runtime.fire_due()
        entitlement.dispatch(customer, "Approve", {"approver": "vendor-admin"})
        runtime.fire_due()  # the due work after the approval: nothing of the deadline is left
        assert _deadlines(runtime) == {}
        found[name] = (  # the manager's (due work at 60 h also fired the director's notice)
            [m for m in _missed(runtime) if m[0] == deadline],
            # Their messages (in the timely run the director's notice moved the version
            # the second miss's event id names).
            [p[2] for p in _passed(runtime) if p[1] == "manager_review_queue"],
            [e.payload_sha256 for e in runtime.ledger() if e.instance == f"deadline:{deadline}"],
        )
        runtime.close()
        assert postgres_stores.verify(name, Keyring.from_files([keys])).ok
    assert found["late"] == found["timely"]
    missed, passed, _ = found["late"]
    assert missed == [(deadline, "level0", "level1", 60), (deadline, "level1", "level2", 60)]
    assert len(passed) == 2
