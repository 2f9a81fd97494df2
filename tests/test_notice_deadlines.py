"""Escalation notices' `within` deadlines in the product: started with the notice, met by the
move they wait for, escalated and re-armed 24 h later by the runtime's due work, across a
restart, on SQLite and PostgreSQL with a signed ledger and a virtual clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from autonomic.generated.compliance import MACHINE as COMPLIANCE
from autonomic.generated.entitlement import MACHINE as ENTITLEMENT
from autonomic.runtime.keys import Keyring, load_signer
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.resilience import DeadlineTracker
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.base import DeadlineRecord
from autonomic.runtime.timers import VirtualClock
from billing_world import START
from conftest import Stores

HOUR = 3_600_000
MANAGER = "notice:Entitlement:PendingApproval/ApprovalLadder/1:c1"
DIRECTOR = "notice:Entitlement:PendingApproval/ApprovalLadder/2:c1"
PROVIDER = "notice:Compliance:Verifying/ProviderTimeout/1:case1"


def _open(stores: Stores, keys: Path, clock: VirtualClock) -> Runtime:
    runtime = Runtime(
        stores.open(), clock=clock, sealer=LedgerSealer(load_signer(keys), "sign-each")
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
    runtime.fire_due()  # missed: escalated, and due again 24 h after the check
    assert _deadlines(runtime) == {MANAGER: (53, 1)}
    assert _missed(runtime) == [(MANAGER, "level0", "level1", 29)]
    notices = [json.loads(m.body) for m in runtime.notifications()]
    assert [(n["recipient"], n["message"], (n["deadline_ms"] - START) // HOUR) for n in notices][
        -1
    ] == (
        "manager_review_queue",
        "deadline passed (escalation level 1): Manual review of pending approval",
        53,
    )

    _at(clock, 48)
    runtime.fire_due()
    assert _deadlines(runtime) == {DIRECTOR: (49, 0), MANAGER: (53, 1)}
    _at(clock, 53)
    runtime.fire_due()  # both missed: the director's once, the manager's again
    assert _deadlines(runtime) == {DIRECTOR: (77, 1), MANAGER: (77, 2)}
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


def test_a_ladder_that_moves_on_by_itself_meets_its_notices_deadlines(
    stores: Stores, keys: Path
) -> None:
    """The 72 h auto-approval fires at the instant the re-armed deadlines fall due: the
    timers fire first, so the deadlines are met, not escalated."""
    clock = VirtualClock(START)
    runtime = _open(stores, keys, clock)
    runtime.governor("Entitlement").create("c1")
    for hours in (24, 48):
        _at(clock, hours)
        runtime.fire_due()
    assert _deadlines(runtime) == {MANAGER: (72, 1), DIRECTOR: (49, 0)}
    _at(clock, 72)
    runtime.fire_due()
    record = runtime.governor("Entitlement").get("c1")
    assert record is not None and record.state == "Active"
    assert _deadlines(runtime) == {}
    assert [m[0] for m in _missed(runtime)] == [MANAGER]
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
    assert _deadlines(runtime) == {"refund-7": (54, 1), MANAGER: (54, 1)}
    assert isinstance(runtime.store.deadlines()[0], DeadlineRecord)
    runtime.close()
