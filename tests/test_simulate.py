"""`autonomic simulate`: scripted runs of generated governors, traces and script diagnostics."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from autonomic.compiler.build import build
from autonomic.runtime.simulate import load_machine, run_simulation

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    machines = [ROOT / "machines" / "entitlement.fsm", ROOT / "machines" / "billing.fsm"]
    result = build(machines, out, svg=False)
    assert result.written, result.report
    return out


def simulate(machine: str, script: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_simulation(machine, str(script), out, err)
    return code, out.getvalue(), err.getvalue()


def write(tmp_path: Path, text: str, name: str = "script.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


LADDER = """\
instance: ent-1
actor: alice
guards:
  is_authorized_approver: true
steps:
  - dispatch: Approve
    payload: {approver: mallory}
    guards: {is_authorized_approver: false}
    expect: rejected
  - advance: 24h
    expect: PendingApproval
  - advance: 48h
    expect: Active
  - dispatch: Suspend
    payload: {reason: payment_failed}
    actor: billing
    expect: Suspended
  - dispatch: Suspend
    payload: {reason: again}
    expect: Suspended
  - advance: 72h
    expect: Refunded
"""


def test_entitlement_ladder_trace(generated: Path, tmp_path: Path) -> None:
    code, out, err = simulate(str(generated / "entitlement.py"), write(tmp_path, LADDER))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == (
        "simulate Entitlement (machines/entitlement.fsm) instance 'ent-1' from 2026-01-01T00:00:00Z"
    )
    assert "    armed PendingApproval/ApprovalLadder/1 due T+1d (2026-01-02T00:00:00Z)" in lines
    assert any("rejected: R007" in line and "no guard held" in line for line in lines)
    assert "    guard is_authorized_approver -> false (step)" in lines
    assert any(
        line.startswith("  [T+1d] escalation PendingApproval/ApprovalLadder/1 fired")
        for line in lines
    )
    assert (
        '      notify queue manager_review_queue "Manual review of pending approval" '
        "by T+1d4h (2026-01-02T04:00:00Z)" in lines
    )
    assert any("notify queue director_review_queue" in line and "T+2d1h" in line for line in lines)
    # The 48h advance runs the due work once: the deadlines missed meanwhile escalate in time
    # order with the timers, each due again a day after its miss.
    assert [line for line in lines if "deadline of notice" in line] == [
        "  [T+1d4h] deadline of notice PendingApproval/ApprovalLadder/1 missed: escalated to "
        "level 1 (ledger #3), due again T+2d4h",
        "  [T+2d1h] deadline of notice PendingApproval/ApprovalLadder/2 missed: escalated to "
        "level 1 (ledger #5), due again T+3d1h",
        "  [T+2d4h] deadline of notice PendingApproval/ApprovalLadder/1 missed: escalated to "
        "level 2 (ledger #6), due again T+3d4h",
    ]
    assert any("ApprovalLadder/end fired: PendingApproval -> Active" in line for line in lines)
    assert "      do auto_approve" in lines
    assert any("ignored in Suspended (nothing recorded)" in line for line in lines)
    assert any("timer Suspended/after/72h#0 fired: Suspended -> Refunded" in line for line in lines)
    assert any("emit Billing.RefundRequested to 'ent-1'" in line for line in lines)
    assert (
        "  #9 timer      Suspended -> Refunded on Suspended/after/72h#0 by timer hash"
        in "\n".join(lines)
    )
    # the genesis entry (seq 0), the instance's six and the three missed deadlines
    assert lines[-2:] == ["final state: Refunded (v6)", "ledger verified: 10 entries"]


def test_billing_retry_ladder_from_a_json_script(generated: Path, tmp_path: Path) -> None:
    failed = {"customer_id": "c1", "idempotency_key": "k1", "reason": "declined"}
    charge = {"customer_id": "c1", "invoice_id": "i1", "amount": "99.00", "idempotency_key": "k1"}
    steps: list[dict[str, object]] = [
        {"dispatch": "ChargeRequested", "payload": charge, "idempotency_key": "k1"},
        {"dispatch": "ChargeRequested", "payload": charge, "idempotency_key": "k1"},
    ]
    # Each retry waits, then its charge (or the hand-over to the collection agency) is in
    # flight in its own state.
    for state, wait, attempt in (
        ("Retry1", "1h", "Retry1Charging"),
        ("Retry2", "3h", "Retry2Charging"),
        ("Retry3", "1d", "Retry3Charging"),
        ("CollectionAgency", "7d", "CollectionAgencyPending"),
    ):
        steps.append({"dispatch": "PaymentFailed", "payload": failed, "expect": state})
        steps.append({"advance": wait, "expect": attempt})
    steps.append({"dispatch": "PaymentFailed", "payload": failed, "expect": "MaxRetriesExceeded"})
    script = write(tmp_path, json.dumps({"instance": "b1", "steps": steps}), "script.json")
    code, out, err = simulate(str(generated / "billing.py"), script)
    assert (code, err) == (0, "")
    assert "(duplicate: the stored result)" in out
    assert out.count("do submit_charge") == 1
    assert out.count("do retry_charge") == 3 and out.count("do hand_to_collection_agency") == 1
    assert "timer Retry1/PaymentRetry/1 fired: Retry1 -> Retry1Charging" in out
    assert "do mark_max_retries_exceeded" in out
    assert "emit Entitlement.Suspend to 'b1'" in out
    # genesis, create, charge, 4 x (failure + retry attempt), the final failure
    assert out.rstrip().endswith("ledger verified: 12 entries")


def test_the_trace_is_deterministic(generated: Path, tmp_path: Path) -> None:
    script = write(tmp_path, LADDER)
    first = simulate(str(generated / "entitlement.py"), script)
    assert simulate(str(generated / "entitlement.py"), script) == first


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "steps:\n  - dispatch: Aprove\n",
            "script.yaml:2:15: S004 [error] Entitlement has no "
            "event 'Aprove'\n   2 |   - dispatch: Aprove\n                     ^\n"
            "  = hint: did you mean 'Approve'?",
        ),
        (
            "guards:\n  is_authorised_approver: true\nsteps: []\n",
            "script.yaml:2:3: S005 [error] Entitlement has no guard 'is_authorised_approver'",
        ),
        ("steps:\n  - advance: 24 hours\n", "script.yaml:2:14: S006 [error] invalid duration"),
        (
            "steps:\n  - dispatch: Revoke\n    payloads: {}\n",
            "script.yaml:3:5: S003 [error] unknown key 'payloads' in step 1",
        ),
        (
            "steps:\n  - dispatch: Revoke\n    expect: Revokd\n",
            "script.yaml:3:13: S003 [error] Entitlement has no state 'Revokd'",
        ),
        (
            "steps:\n  - dispatch: Revoke\n    advance: 1h\n",
            "script.yaml:2:5: S003 [error] step 1 must have exactly one of",
        ),
        ("steps: [\n", "script.yaml:2:1: S002 [error] syntax error"),
        ("instance: x\n", "script.yaml:1:1: S003 [error] the script has no steps"),
        ("", "script.yaml:1:1: S003 [error] the script is empty"),
        (
            "guards:\n  is_authorized_approver: maybe\nsteps: []\n",
            "script.yaml:2:27: S003 [error] guard 'is_authorized_approver' must be true or false",
        ),
    ],
)
def test_script_problems_are_diagnostics(
    generated: Path, tmp_path: Path, text: str, expected: str
) -> None:
    script = write(tmp_path, text)
    code, out, err = simulate(str(generated / "entitlement.py"), script)
    assert code == 1 and out == ""
    assert err.startswith(str(script.parent) + "/" + expected), err


def test_failed_expectation_reports_the_step(generated: Path, tmp_path: Path) -> None:
    script = write(tmp_path, "steps:\n  - advance: 1h\n  - dispatch: Revoke\n    expect: Active\n")
    code, out, err = simulate(str(generated / "entitlement.py"), script)
    assert code == 1
    assert err.startswith(f"{script}:3:5: S007 [error] step 2 expected Active, got Revoked")
    assert "expectation failed" in out and "ledger verified: 3 entries" in out


def test_unknown_machine_and_missing_script(generated: Path, tmp_path: Path) -> None:
    code, _, err = simulate("entitlemnt", write(tmp_path, "steps: []\n"))
    assert code == 1
    assert err.startswith("entitlemnt:1:1: S010 [error] no generated module")
    code, _, err = simulate(str(tmp_path / "nope.py"), write(tmp_path, "steps: []\n"))
    assert code == 1 and "S010" in err
    code, _, err = simulate(str(generated / "entitlement.py"), tmp_path / "missing.yaml")
    assert code == 1 and err.startswith(f"{tmp_path / 'missing.yaml'}:1:1: S001 [error]")


def test_load_machine_by_path(generated: Path) -> None:
    spec = load_machine(str(generated / "billing.py"))
    assert spec.name == "Billing" and "Retry1" in {str(s) for s in spec.state_type}


def test_command_line(generated: Path, tmp_path: Path) -> None:
    good = subprocess.run(
        [
            sys.executable,
            "-m",
            "autonomic.compiler.cli",
            "simulate",
            str(generated / "entitlement.py"),
            "--script",
            str(write(tmp_path, LADDER)),
        ],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    assert good.stdout.rstrip().endswith("ledger verified: 10 entries")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "autonomic.compiler.cli",
            "simulate",
            str(generated / "entitlement.py"),
            "--script",
            str(write(tmp_path, "steps:\n  - dispatch: Nope\n", "bad.yaml")),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "S004" in bad.stderr and "Traceback" not in bad.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "autonomic.compiler.cli", "simulate", "entitlement"],
        capture_output=True,
        text=True,
    )
    assert usage.returncode == 2 and "--script" in usage.stderr


def test_machine_names_resolve_to_the_local_build_first(
    generated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "generated"
    local.mkdir()
    (local / "billing.py").write_bytes((generated / "billing.py").read_bytes())
    monkeypatch.chdir(tmp_path)
    assert load_machine("billing").name == "Billing"
    assert load_machine("Billing").name == "Billing"
    code, out, _ = simulate("Billing", write(tmp_path, "steps:\n  - advance: 1h\n"))
    assert code == 0 and out.startswith("simulate Billing (machines/billing.fsm)")


def test_payloads_are_strict_in_simulate(tmp_path: Path) -> None:
    """ "no" is no bool and true is no integer: the step is refused at its position (S008)."""
    for payload, field in (
        ('{customer_id: c1, legal_name_changed: "no"}', "legal_name_changed"),
        ("{customer_id: 7, legal_name_changed: false}", "customer_id"),
    ):
        script = write(
            tmp_path,
            f"instance: c1\nsteps:\n  - dispatch: UpdateProfile\n    payload: {payload}\n",
        )
        code, out, err = simulate("autonomic.generated.customer_account", script)
        assert code == 1 and "S008" in err, (out, err)
        assert f"field '{field}'" in err


def test_billing_ladder_does_not_stall_when_the_processor_never_answers(
    generated: Path, tmp_path: Path
) -> None:
    """Issue 12: each retry's charge is in flight in its own state, and an unanswered charge
    counts as failed after 1h, the collection agency's after 12h, so the ladder runs to its
    end on its own."""
    failed = {"customer_id": "c1", "idempotency_key": "k1", "reason": "declined"}
    charge = {"customer_id": "c1", "invoice_id": "i1", "amount": "99.00", "idempotency_key": "k1"}
    steps: list[dict[str, object]] = [
        {"dispatch": "ChargeRequested", "payload": charge, "idempotency_key": "k1"},
        {"dispatch": "PaymentFailed", "payload": failed, "expect": "Retry1"},
        # Nothing is in flight while waiting: a repeated failure report changes nothing.
        {"dispatch": "PaymentFailed", "payload": failed, "expect": "Retry1"},
        {"advance": "1h", "expect": "Retry1Charging"},
        {"advance": "1h", "expect": "Retry2"},
        {"advance": "3h", "expect": "Retry2Charging"},
        {"advance": "1h", "expect": "Retry3"},
        {"advance": "1d", "expect": "Retry3Charging"},
        {"advance": "1h", "expect": "CollectionAgency"},
        {"advance": "7d", "expect": "CollectionAgencyPending"},
        # The agency never answers either: the ladder ends on its own, 12h later.
        {"advance": "12h", "expect": "MaxRetriesExceeded"},
    ]
    script = write(tmp_path, json.dumps({"instance": "b2", "steps": steps}), "stall.json")
    code, out, err = simulate(str(generated / "billing.py"), script)
    assert (code, err) == (0, ""), out
    assert out.count("do retry_charge") == 3 and out.count("do hand_to_collection_agency") == 1
    assert "timer Retry2Charging/PaymentRetry/2/timeout fired: Retry2Charging -> Retry3" in out
    assert "do mark_max_retries_exceeded" in out and "emit Entitlement.Suspend to 'b2'" in out
