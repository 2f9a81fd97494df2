"""`check --explain`: worst-case time without an outside event, from timers and ladders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from autonomic.compiler.checks import check_paths
from autonomic.compiler.explain import Explanation, explain, format_duration
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
    assert ladder.within_text == "8d 7h" and ladder.delays == (
        "1h + 1h attempt",
        "3h + 1h attempt",
        "1d + 1h attempt",
        "7d",
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
        "ends within 8d 7h if every attempt fails "
        "(1h + 1h attempt + 3h + 1h attempt + 1d + 1h attempt + 7d)"
    ) in out
    assert "ProrationPending       within 1h reaches Current" in out
    assert "only an outside event can leave: Current, AwaitingPayment" in out
