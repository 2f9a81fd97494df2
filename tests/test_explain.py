"""`check --explain`: worst-case time without an outside event, from timers and ladders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from autonomic.compiler.checks import check_paths
from autonomic.compiler.diagram import build_diagram
from autonomic.compiler.explain import Explanation, explain, format_duration, render_explanation
from autonomic.compiler.lower import lower
from autonomic.compiler.parser import parse_text

ROOT = Path(__file__).resolve().parents[1]


def explained(text: str) -> Explanation:
    machine, diagnostics = parse_text(text)
    assert machine is not None, diagnostics
    return explain(lower(machine, others=None))


def governor(name: str) -> Explanation:
    report = check_paths([ROOT / "machines"])
    machine = next(m for m in report.machines if m.name.value == name)
    return explain(lower(machine, others=None))


def test_governor_bounds() -> None:
    entitlement = governor("Entitlement")
    pending = entitlement.bound("PendingApproval")
    assert (pending.within_ms, pending.within_text, pending.stops_in) == (
        72 * 3_600_000,
        "72h",
        "Active",
    )
    assert "Active" in entitlement.waiting() and "Revoked" not in entitlement.waiting()
    billing = governor("Billing")
    ladder = next(lad for lad in billing.ladders if lad.name == "PaymentRetry")
    assert ladder.within_text == "8d 19h" and ladder.delays == (
        "1h + 1h attempt",
        "3h + 1h attempt",
        "1d + 1h attempt",
        "7d + 12h attempt",
    )
    assert ladder.target == "MaxRetriesExceeded"


def test_chains_add_up_and_the_earliest_exit_wins() -> None:
    e = explained(
        "machine M { event Go\n"
        "  initial state A { on Go -> D  after 5h -> D  after 1h -> B }\n"
        "  state B { on Go -> D  after 2h30m -> C }\n"
        "  state C { on Go -> D  after 90m do ping }\n"
        "  final state D }"
    )
    a = e.bound("A")
    assert (a.within_ms, a.path, a.stops_in, a.stop) == (
        (60 + 150) * 60_000,
        ("A", "B", "C"),
        "C",
        "event",
    )
    assert a.within_text == "3h 30m"
    assert e.bound("C").within_ms == 0 and e.waiting() == ("C",)
    assert e.bound("D").stop == "final"


def test_timers_that_cycle_never_settle() -> None:
    e = explained(
        "machine M { event Go\n"
        "  initial state A { on Go -> D  after 1h -> B }\n"
        "  state B { on Go -> D  after 1h -> A }\n"
        "  state C { on Go -> D  after 1h -> A }\n"
        "  final state D }"
    )
    assert [b.state for b in e.states if b.stop == "cycle"] == ["A", "B", "C"]
    assert all(b.within_ms is None for b in e.states if b.stop == "cycle")


def test_format_duration() -> None:
    assert format_duration(8 * 86_400_000 + 4 * 3_600_000) == "8d 4h"
    assert format_duration(1_500) == "1s 500ms"
    assert format_duration(0) == "0"


def test_check_explain_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "autonomic.compiler.cli", "check", "--explain", "Billing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("Billing (machines/billing.fsm): longest stay without an outside event")
    assert (
        "retry PaymentRetry (Retry1, Retry2, Retry3, CollectionAgency) -> MaxRetriesExceeded: "
        "ends within 8d 19h if every attempt fails "
        "(1h + 1h attempt + 3h + 1h attempt + 1d + 1h attempt + 7d + 12h attempt)"
    ) in out

    # The state column is as wide as the longest name: match any padding.
    def stays(state: str, rest: str) -> bool:
        return re.search(rf"^  {state} +{re.escape(rest)}", out, re.MULTILINE) is not None

    assert stays("ProrationPending", "within 1h reaches Current")
    # A charge or refund the processor never answers counts as failed after 1h, the collection
    # agency's silence after 12h: no stall. The cancellation saga's refund is retried, never
    # voided, and so is a refund owed while the account closes; a renewal charge in flight when
    # the customer cancels is decided within the hour once the account closes.
    assert stays("AwaitingPayment", "within 8d 20h reaches MaxRetriesExceeded")
    assert stays("CancellationAwaitingPayment", "within 8d 20h reaches MaxRetriesExceeded")
    assert stays("ClosingAwaitingPayment", "within 1h reaches Closed")
    assert stays("Refunding", "within 10h reaches RefundManualReview")
    assert stays("CancellationRefunding", "within 10h reaches RefundManualReview")
    assert stays("ClosingRefunding", "within 10h reaches ClosingRefundManualReview")
    assert (
        "only an outside event can leave: Current, MaxRetriesExceeded, "
        "Reconciling, Disputed, DisputedUnpaid, DisputedInArrears, RefundDisputed, "
        "ClosingDisputed, ClosingRefundDisputed, "
        "RefundManualReview, ClosingRefundManualReview\n"
    ) in out


def test_group_and_creation_timers_bound_the_states_they_are_armed_in() -> None:
    e = explained(
        "machine M { event Go\n"
        "  group Open { A, B }\n"
        "  after 8h in Open -> Closed\n"
        "  initial state A { on Go -> C  after 1h -> B }\n"
        "  state B { on Go -> C }\n"
        "  state C { on Go -> Closed }\n"
        "  final state Closed }"
    )
    # B waits for nothing but its group's deadline; A's 1h timer only moves it to B inside
    # the group, where the same deadline keeps running: 8h from now at the latest, not 1h + 8h.
    assert (e.bound("B").within_ms, e.bound("B").stops_in) == (8 * 3_600_000, "Closed")
    assert (e.bound("A").within_ms, e.bound("A").stops_in) == (8 * 3_600_000, "Closed")
    assert e.waiting() == ("C",)
    created = explained(
        "machine M { event Go\n"
        "  after 2d from creation -> Closed\n"
        "  initial state A { on Go -> B }\n"
        "  state B { on Go -> Closed  after 1h -> A }\n"
        "  final state Closed }"
    )
    # The creation deadline is armed everywhere: nothing waits, and the A <-> B timers
    # cannot cycle past it.
    assert created.waiting() == ()
    assert created.bound("A").within_ms == 2 * 86_400_000


def test_a_group_deadline_keeps_running_while_timers_move_inside_the_group() -> None:
    """The on-call incident: an acknowledged incident re-triggers after 30m and a snoozed one
    after the responder's chosen time, all inside Open, whose auto-resolve deadline (at most
    1d12h) is measured from entering Open; so each resolves within 1d12h, however it moves."""
    report = check_paths([ROOT / "examples" / "machines" / "incident.fsm"])
    e = explain(lower(report.machines[0], others=None))
    for state in ("Triggered", "Acknowledged", "Snoozed"):
        bound = e.bound(state)
        assert (bound.within_ms, bound.stops_in, bound.stop) == (
            36 * 3_600_000,
            "AutoResolved",
            "final",
        ), state
    # Leaving the group early still counts: B's timer leaves Open for C, which takes 5h more.
    e = explained(
        "machine M { event Go\n"
        "  group Open { A, B }\n"
        "  after 8h in Open -> Closed\n"
        "  initial state A { on Go -> Closed  after 1h -> B }\n"
        "  state B { on Go -> Closed  after 2h -> C }\n"
        "  state C { on Go -> Closed  after 5h -> Closed }\n"
        "  final state Closed }"
    )
    # A -> B -> C by its own timers takes 1h + 2h + 5h = 8h, within the cap 8h + 5h.
    assert e.bound("A").within_ms == 8 * 3_600_000
    assert e.bound("B").within_ms == 7 * 3_600_000


def test_cycles_inside_a_group_end_at_its_deadline_and_others_never_settle() -> None:
    e = explained(
        "machine M { event Go\n"
        "  group Loop { A, B }\n"
        "  after 3h in Loop -> Out\n"
        "  initial state A { on Go -> Out  after 1h -> B }\n"
        "  state B { on Go -> Out  after 1h -> A }\n"
        "  state C { on Go -> Out  after 1h -> D }\n"
        "  state D { on Go -> Out  after 1h -> C }\n"
        "  final state Out }"
    )
    assert e.bound("A").within_ms == 3 * 3_600_000 and e.bound("A").stops_in == "Out"
    assert e.bound("C").stop == "cycle" and e.bound("D").within_ms is None


def test_setting_delays_count_at_their_upper_bound_and_field_delays_are_unbounded() -> None:
    source = (
        "machine M { event Go event Snooze { snooze_for: duration }\n"
        '  setting grace "Grace period." between 1d and 30d\n'
        "  initial state A { on Go -> B  on Snooze -> S }\n"
        "  state B { on Go -> A  after setting grace -> Done }\n"
        "  state S { on Go -> A  after event.snooze_for -> A }\n"
        "  final state Done }"
    )
    e = explained(source)
    b = e.bound("B")
    assert (b.within_ms, b.stops_in, b.stop) == (30 * 86_400_000, "Done", "final")
    s = e.bound("S")
    assert (s.within_ms, s.stop, s.data_delay) == (0, "data", "event.snooze_for")
    assert e.unbounded() == ("S",) and "S" not in e.waiting()
    text = render_explanation(e, "m.fsm")
    assert "no bound: its delay comes from event.snooze_for, which has no limit" in text
    assert "note: setting grace counts at its upper bound, 30d" in text
    assert "note: a delay from event.snooze_for has no upper bound" in text
    machine, _ = parse_text(source)
    assert machine is not None
    diagram = build_diagram(lower(machine, others=None))
    bounds = {node.id: node.bound for node in diagram.nodes}
    assert bounds["B"] == "within 30d -> Done"
    assert bounds["S"] == "no bound: delay from event.snooze_for"
