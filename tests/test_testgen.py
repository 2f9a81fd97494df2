"""`autonomic testgen`: generated model-based tests for the seven governors, run here (so CI
runs them), and the transition-coverage report of a test run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from autonomic.compiler.checks import check_paths
from autonomic.compiler.lower import lower
from autonomic.compiler.testgen import plan
from cli_process import autonomic

ROOT = Path(__file__).resolve().parents[1]
GOVERNORS = [
    "Billing",
    "Compliance",
    "CustomerAccount",
    "Entitlement",
    "ProductCatalog",
    "QuotaSla",
    "Subscription",
]


def pytest_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)


def test_generated_tests_of_the_seven_governors_pass(tmp_path: Path) -> None:
    done = autonomic("testgen", *GOVERNORS, "--out", str(tmp_path), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in tmp_path.glob("test_*_model.py"))
    assert len(written) == 7, written
    run = pytest_run(str(tmp_path), cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    # Every transition, timed exit and rejection of every governor is a test of its own.
    report = check_paths([ROOT / "machines"])
    expected = 7  # one state machine test per governor
    for machine in report.machines:
        p = plan(lower(machine, others=None))
        expected += len(p.transitions) + len(p.exits) + len(p.rejections) + len(p.unguarded_misses)
    summary = run.stdout.strip().splitlines()[-1]
    assert f"{expected} passed" in summary, summary


def test_generated_tests_catch_a_runtime_that_disagrees(tmp_path: Path) -> None:
    """The generated tests compare the runtime with the compiler's model: a model that says
    otherwise (here: a target edited in the written test module) fails them."""
    done = autonomic("testgen", "QuotaSla", "--out", str(tmp_path), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    module = tmp_path / "test_quota_sla_model.py"
    text = module.read_text(encoding="utf-8")
    p = plan(lower(check_paths([ROOT / "machines" / "quota_sla.fsm"]).machines[0], others=None))
    source, event, guard, target = p.transitions[0]
    wrong = next(s for s in p.paths if s != target)
    row = repr((source, event, guard, target))
    assert row in text
    module.write_text(text.replace(row, repr((source, event, guard, wrong)), 1), "utf-8")
    run = pytest_run(str(module), "-k", "test_transition", cwd=tmp_path)
    assert run.returncode == 1 and "1 failed" in run.stdout


def test_transition_coverage_of_a_test_run(tmp_path: Path) -> None:
    autonomic("testgen", "Entitlement", "--out", str(tmp_path), cwd=ROOT)
    full = autonomic("testgen", "Entitlement", "--coverage", "--tests", str(tmp_path), cwd=ROOT)
    assert full.returncode == 0, full.stderr
    head = full.stdout.splitlines()[0]
    p = plan(lower(check_paths([ROOT / "machines" / "entitlement.fsm"]).machines[0], others=None))
    total = len(p.transitions) + len(p.exits)
    assert head == f"Entitlement: {total} of {total} transitions exercised (100%)", full.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "test_nothing.py").write_text("def test_nothing():\n    pass\n", "utf-8")
    none = autonomic("testgen", "Entitlement", "--coverage", "--tests", str(empty), cwd=ROOT)
    assert none.stdout.splitlines()[0] == f"Entitlement: 0 of {total} transitions exercised (0%)"
    assert (
        "not exercised: PendingApproval --Approve [is_authorized_approver]--> Active" in none.stdout
    )
