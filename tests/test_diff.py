"""`autonomic diff`: the semantic change between versions, on files and on git revisions of a
real repository, as text, Markdown and coloured diagrams (golden files), and the migration
check against a real SQLite store and a PostgreSQL one."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from autonomic.compiler.checks import check_paths
from autonomic.compiler.diff import compare, match_renames
from autonomic.compiler.lower import lower
from autonomic.compiler.parser import parse_text
from autonomic.runtime.store.base import InstanceRecord
from autonomic.runtime.timers import ArmedTimer
from cli_process import autonomic
from conftest import Stores

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
EXPECTED = GOLDEN / "diff"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def changed(text: str) -> str:
    """The next version of the golden Entitlement: a rename, a new state and event, a
    changed guard, timer, ladder step and field, a removed transition and ignore."""
    edits = [
        ("Suspended", "OnHold"),
        ("after 72h -> Revoked", "after 96h -> Revoked"),
        ("when is_approver", "when is_manager"),
        ("  event Resume\n", "  event Resume\n  event Freeze\n"),
        (
            "    on Suspend -> OnHold do record_suspension\n",
            "    on Suspend -> OnHold do record_suspension\n    on Freeze -> Frozen\n",
        ),
        (
            "  final state Rejected\n",
            "  state Frozen { on Resume -> Active }\n  final state Rejected\n",
        ),
        ("    on Reject -> Rejected do record_rejection\n", ""),
        ("    ignore Suspend, Resume\n", "    ignore Suspend, Resume, Reject\n"),
        ("step Retry2 after 3h", "step Retry2 after 6h"),
        ("    seats: int,\n", "    seats: int,\n    reason: str?,\n"),
    ]
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    return text


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A git repository whose main holds the golden machines, and whose working tree holds
    the changed Entitlement."""
    root = tmp_path / "repo"
    shutil.copytree(GOLDEN / "machines", root / "machines")
    git("init", "-q", "-b", "main", cwd=tmp_path / "repo")
    git("-c", "user.name=t", "-c", "user.email=t@t", "add", ".", cwd=root)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1", cwd=root)
    machine = root / "machines" / "entitlement.fsm"
    machine.write_text(changed(machine.read_text(encoding="utf-8")), encoding="utf-8")
    return root


def check_golden(name: str, produced: str) -> None:
    path = EXPECTED / name
    if UPDATE:
        EXPECTED.mkdir(parents=True, exist_ok=True)
        path.write_text(produced, encoding="utf-8")
    assert produced == path.read_text(encoding="utf-8"), f"{name} differs from its golden file"


def test_text_report_from_a_git_revision(repository: Path) -> None:
    done = autonomic("diff", "main", "--", "machines/", cwd=repository)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for line in (
        "  ~ renamed state Suspended: now OnHold",
        "  + added state Frozen",
        "  + added event Freeze",
        "  + added field Approve.reason: str?",
        "  ~ changed guard AwaitingPayment",
        "  - removed transition PendingApproval --Reject--> Rejected",
        "  + added ignore PendingApproval ignores Reject",
        "  ~ changed ladder step PaymentRetry step 2: Retry2 after 3h -> Retry2 after 6h",
    ):
        assert line in out or line.replace("AwaitingPayment", "PendingApproval") in out, line
    assert "after 72h -> 96h" in out
    assert "Billing" not in out  # unchanged machines are not listed
    check_golden("report.txt", out)


def test_markdown_and_diagrams_are_golden(repository: Path) -> None:
    for fmt, name in (
        ("markdown", "report.md"),
        ("dot", "entitlement.dot"),
        ("mermaid", "entitlement.mmd"),
    ):
        done = autonomic("diff", "main", "--format", fmt, "--", "machines", cwd=repository)
        assert done.returncode == 0, done.stderr
        check_golden(name, done.stdout)
    dot = (EXPECTED / "entitlement.dot").read_text(encoding="utf-8")
    assert 'color="#1a7f37"' in dot and 'color="#cf222e"' in dot and 'color="#bf8700"' in dot
    mermaid = (EXPECTED / "entitlement.mmd").read_text(encoding="utf-8")
    assert "class Frozen added" in mermaid and "class Rejected" not in mermaid


def test_two_revisions_and_two_files(repository: Path) -> None:
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "v2", cwd=repository)
    by_revisions = autonomic("diff", "main~1", "main", "--", "machines", cwd=repository)
    assert by_revisions.returncode == 0, by_revisions.stderr
    old = repository / "old.fsm"
    old.write_text(git("show", "main~1:machines/entitlement.fsm", cwd=repository), "utf-8")
    by_files = autonomic("diff", "old.fsm", "machines/entitlement.fsm", cwd=repository)
    assert by_files.returncode == 0, by_files.stderr
    strip = [line for line in by_revisions.stdout.splitlines() if line.startswith("  ")]
    assert strip == [line for line in by_files.stdout.splitlines() if line.startswith("  ")]
    same = autonomic("diff", "main", "--", "machines", cwd=repository)
    assert same.stdout == "no semantic change\n"
    bad = autonomic("diff", "no-such-revision", "--", "machines", cwd=repository)
    assert bad.returncode == 1 and "neither a file nor a git revision" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_renames_are_a_matching() -> None:
    """Two removed and two added states, each pair alike: the matching pairs them right even
    when a greedy choice would cross them."""
    scores = {("A", "X"): 0.9, ("A", "Y"): 0.8, ("B", "X"): 0.85, ("B", "Y"): 0.1}
    pairs = match_renames(["A", "B"], ["X", "Y"], lambda a, b: scores[(a, b)])
    assert pairs == {"A": "Y", "B": "X"}
    assert match_renames(["A"], ["X"], lambda a, b: 0.2) == {}


def _store_with(
    stores: Stores, name: str, rows: list[tuple[str, str]], timers: list[tuple[str, str, str]]
) -> str:
    store = stores.open(name)
    try:

        def work(txn: object) -> None:
            for instance, state in rows:
                txn.insert_instance(InstanceRecord("Entitlement", instance, state, 1))  # type: ignore[attr-defined]
            txn.arm_timers(  # type: ignore[attr-defined]
                [
                    ArmedTimer("Entitlement", i, timer_id, state, 10**13, 1)
                    for i, timer_id, state in timers
                ]
            )

        outcomes = store.run([work])
        assert outcomes[0].error is None, outcomes[0].error
    finally:
        store.close()
    return stores.location(name)


def test_migration_check_names_stranded_instances_and_timers(
    repository: Path, stores: Stores
) -> None:
    """On the SQLite file or the PostgreSQL URL `--store` names."""
    report = check_paths([GOLDEN / "machines" / "entitlement.fsm"])
    old = lower(report.machines[0], others=None)
    to_revoked = next(t.id for _, ts in old.timers for t in ts if t.target == "Revoked")
    database = _store_with(
        stores,
        "live",
        [("a", "Suspended"), ("b", "Suspended"), ("c", "Active"), ("d", "PendingApproval")],
        [("a", to_revoked, "Suspended"), ("b", to_revoked, "Suspended")],
    )
    done = autonomic("diff", "main", "--store", database, "--", "machines", cwd=repository)
    assert done.returncode == 1
    assert "E170" in done.stderr
    assert "2 live instances of Entitlement occupy states the new version drops: " in done.stderr
    assert "2 in Suspended (renamed to OnHold)" in done.stderr
    assert "2 armed timers of Entitlement would fire into nothing" in done.stderr
    # Instances only in kept states: the check passes.
    clean = _store_with(stores, "clean", [("c", "Active"), ("d", "PendingApproval")], [])
    ok = autonomic("diff", "main", "--store", clean, "--", "machines", cwd=repository)
    assert ok.returncode == 0, ok.stderr
    assert "no live instance or armed timer" in ok.stderr


def test_compare_in_process_reports_unreachable_as_well() -> None:
    report = check_paths([GOLDEN / "machines"])
    difference = compare(report.machines, report.machines, report.flows, report.flows)
    assert difference.empty


def test_a_changed_keep_emit_target_or_refusal_notice_is_a_changed_row() -> None:
    before = """machine M {
  data { c: str }
  event E { c: str }
  event F
  initial state A { on E -> B emit F }
  state B { on F -> C }
  final state C
}"""
    after = before.replace("on E -> B emit F", "on E -> B keep c emit F to c if refused F")
    old, _ = parse_text(before, "m.fsm")
    new, _ = parse_text(after, "m.fsm")
    assert old is not None and new is not None
    [machine] = compare([old], [new], [], []).machines
    assert [(c.kind, c.name, c.detail) for c in machine.changes] == [
        ("changed", "A --E--> B", "emit M.F -> keep c emit M.F to c if refused F")
    ]


def test_a_changed_flow_names_each_setting_with_its_old_and_new_value() -> None:
    report = check_paths([ROOT / "machines"])
    edits = {
        "NoisyNeighbour": {"within": "1m", "quorum": "3"},
        "SubscriptionUpgrade": {"doc": "Upgrade."},
    }
    new_flows = []
    for flow in report.flows:
        change = edits.get(flow.name.value, {})
        updates: dict[str, object] = {}
        if "within" in change and flow.within is not None:
            updates["within"] = flow.within.model_copy(update={"text": change["within"]})
        if "quorum" in change and flow.quorum is not None:
            updates["quorum"] = flow.quorum.model_copy(update={"text": change["quorum"]})
        if "doc" in change:
            updates["doc"] = change["doc"]
            updates["inputs"] = flow.inputs[:-1]
        new_flows.append(flow.model_copy(update=updates))
    difference = compare(report.machines, report.machines, report.flows, new_flows)
    [upgrade] = [f for f in report.flows if f.name.value == "SubscriptionUpgrade"]
    dropped = upgrade.inputs[-1].name.value
    assert [(c.kind, c.name, c.detail) for c in difference.flows] == [
        ("changed", "NoisyNeighbour", "within 30s -> 1m, quorum 2 -> 3"),
        ("changed", "SubscriptionUpgrade", f"-input {dropped}, doc"),
    ]
