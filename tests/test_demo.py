"""`autonomic demo`: the generated governors on SQLite with a signed ledger that verifies."""

from __future__ import annotations

import contextlib
import io
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from autonomic.compiler import cli
from autonomic.compiler.build import build
from autonomic.runtime.keys import Keyring
from autonomic.runtime.ledger import verify_ledger

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    assert build([ROOT / "machines"], out, svg=False).written  # the demo runs all seven
    return out


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


def demo(*arguments: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autonomic.compiler.cli", "demo", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_demo_runs_and_its_ledger_verifies(generated: Path, tmp_path: Path) -> None:
    db, keys = tmp_path / "demo.db", tmp_path / "keys"
    first = demo("--db", str(db), "--keys", str(keys), "--generated", str(generated))
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert out.startswith("generated signing key ")
    [private] = keys.glob("*.private.pem")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # Every scenario, named, in order, with its milestones.
    milestones = [
        "== signup (parallel flow, asyncio)",
        "flow CustomerSignup: FlowCompleted -> completed",
        "== escalation",
        "notify queue manager_review_queue: Manual review of pending approval, due within 4h",
        # Missed at 28h, escalated at 48h before the director's notice (the due work runs once
        # a day in the demo), due again 24h after the miss.
        "deadline missed: Entitlement 'Manual review of pending approval' (notify queue "
        "manager_review_queue): escalated to level 1, due again in 4h [ledger #",
        "notify queue director_review_queue",
        # Missed before the auto-approval, escalated before its move, though the due work
        # runs once a day.
        "deadline missed: Entitlement 'Escalated: Director review required' (notify queue "
        "director_review_queue): escalated to level 1, then the instance moved on [ledger #",
        "deadline missed: Entitlement 'Manual review of pending approval' (notify queue "
        "manager_review_queue): escalated to level 2, then the instance moved on [ledger #",
        "escalation PendingApproval/ApprovalLadder/end: Entitlement PendingApproval -> Active",
        "Entitlement deadlines: 3 missed and escalated; still open: 0",
        "== idempotency",
        "outbox Billing.ChargeRequested delivered: Billing Current -> AwaitingPayment",
        "ChargeRequested webhook 1: Billing Current -> AwaitingPayment",
        "(duplicate: stored result returned, nothing run)",
        "ChargeRequested webhook 3 (same key, another amount): refused with R009, nothing run",
        "charges submitted to the processor: 1",
        "== payment outcomes: Success",
        "flow PaymentProcessed: StepWaiting renewed -> waiting",
        "outbox Subscription.RenewalSucceeded delivered: Subscription Renewing -> Active",
        "flow PaymentProcessed completed",
        "== upgrade (sequence flow)",
        "flow SubscriptionUpgrade: StepSucceeded calculate_proration",
        "flow SubscriptionUpgrade: StepWaiting paid -> waiting",
        "proration computed by the flow: 60.00",
        "ProrationPaid: Billing ProrationPending -> Current",
        "Subscription Upgrading -> UpgradePaid",
        "flow SubscriptionUpgrade: StepSucceeded grant_tier",
        "flow SubscriptionUpgrade completed",
        "outbox Subscription.TierChangeCompleted delivered: Subscription UpgradePaid -> Active",
        "== noisy neighbour (fanout flow",
        "flow NoisyNeighbour: FanInGathered -> completed",
        "gathered contention=succeeded, sla_credit=succeeded, notify=succeeded",
        "== payment outcomes: Disputed",
        "ChargeRequested: Billing 'acme-1-buyer' Current -> AwaitingPayment",
        "flow PaymentProcessed: StepSucceeded dispute",
        "Compliance 'case-acme-1-buyer' Investigating -> Resolved",
        # The charge was still unpaid: back to the retry ladder, not to Current.
        "outbox Billing.DisputeRejected delivered: Billing 'acme-1-buyer' DisputedUnpaid -> Retry1",
        "CloseAccount: Billing 'acme-1-buyer' Retry1 -> Closed",
        "== cancellation saga with a failure",
        "StepFailed archive_subscription -> compensating",
        "StepCompensated suspend_entitlements -> compensating",
        "StepCompensated issue_refund -> compensating",
        "CompensationCompleted archive_subscription -> compensated",
        "states: Subscription Active, Billing Current, Entitlement Active",
        "== payment outcomes: Failed",
        "flow PaymentProcessed: StepWaiting settled -> waiting",
        "retry Retry1/PaymentRetry/1",
        "flow PaymentProcessed still waiting (its wait is in the store)",
        "PaymentFailed: Billing CollectionAgencyPending -> MaxRetriesExceeded",
        "outbox Entitlement.Suspend delivered: Entitlement Grace -> Suspended",
        "StepFailed settled -> compensating",
        # The wait ends when the ladder gives up, not when its 9 days run out.
        "flow PaymentProcessed failed (settled: Billing reached MaxRetriesExceeded)",
        "1d pass",
        "== payment outcomes: a late payment",
        "outbox Entitlement.Reinstate delivered: Entitlement Suspended -> Active",
        "== refund",
        "flow SubscriptionCancellation completed",
        "outbox Billing.CloseAccount delivered: Billing CancellationRefunding -> ClosingRefunding",
        "RefundSucceeded: Billing ClosingRefunding -> Closed",
        "states: Subscription Cancelled, Billing Closed, Entitlement Revoked, QuotaSla Released",
        "rejected and recorded",
        "== breaker",
        "BreakerOpened closed -> open",
        "BreakerHalfOpened open -> half_open",
        "BreakerClosed half_open -> closed",
        "the 13 shop accounts close (CloseAccount voids their open invoices): none of them has "
        "a timer left to fire",
        "== bulkhead",
        "tenant acme-1-noisy: 8 charges for its 8 subscriptions: 4 held at the processor, "
        "4 refused at once, nothing written",
        "5 other tenants, meanwhile: 5 of 5 charged [ledger #",
        "ChargeRequested for acme-1-noisy-sub",
        "the 9 shop accounts close (CloseAccount voids their open invoices): none of them has a "
        "timer left to fire",
        "every entry signed; ledger verified:",
    ]
    position = 0
    for milestone in milestones:
        found = out.find(milestone, position)
        assert found >= 0, f"{milestone!r} missing (or out of order) in:\n{out}"
        position = found
    # A week's jump misses the hourly re-escalation of one notice seven times: one line says
    # so, with the level it ends at (each on its own line, the middle ones said "moved on").
    assert (
        "deadline missed: QuotaSla 'SLA breach unresolved' (notify queue sre_oncall_queue): "
        "escalated to levels 2-8, due again in 1h [ledger #"
    ) in out
    assert "sre_oncall_queue): escalated to level 3" not in out
    # All seven governors are loaded, and no outbox delivery fails by accident.
    assert "governor not loaded" not in out
    assert ": failed (" not in out
    count = int(out.rstrip().rsplit("ledger verified: ", 1)[1].split()[0])
    report = verify_ledger(db, Keyring.from_files([keys]))
    assert report.ok and report.count == count
    with sqlite3.connect(db) as conn:
        kinds = dict(conn.execute("SELECT kind, count(*) FROM ledger GROUP BY kind"))
        unsigned = conn.execute("SELECT count(*) FROM ledger WHERE signature = x''").fetchone()[0]
        flows = dict(conn.execute("SELECT status, count(*) FROM flows GROUP BY status"))
        missed = conn.execute(
            "SELECT count(*) FROM ledger WHERE kind = 'escalation' AND event = 'DeadlineMissed'"
        ).fetchone()[0]
        passed = conn.execute(
            "SELECT count(*) FROM outbox WHERE kind = 'notification' "
            "AND body LIKE '%deadline passed (escalation level %'"
        ).fetchone()[0]
    assert unsigned == 0  # every entry signed by default
    assert set(kinds) == {
        "genesis",
        "transition",
        "escalation",
        "timer",
        "rejection",
        "flow",
        "breaker",
        "kept",  # the dispute case keeps its customer's id
    }
    assert kinds["genesis"] == 1 and kinds["breaker"] == 3 and kinds["rejection"] == 1
    # The Failed payment's wait times out: nothing to undo (every step is irreversible).
    assert flows == {"completed": 6, "compensated": 1, "failed": 1}
    # The notices' deadlines, tracked and escalated (all met or ended by the run's end).
    assert missed >= 3 and passed == missed
    # `audit verify` holds every flow run's row to the ledger: the untouched store verifies;
    # a copy whose compensated cancellation reads "completed" does not.
    public = str(next(keys.glob("*.public.json")))
    checked = run_cli("audit", "verify", str(db), "--public-key", public)
    assert checked[0] == 0 and "and 8 flow runs (status, version and inputs)" in checked[1]
    tampered = tmp_path / "tampered.db"
    with sqlite3.connect(db) as source, sqlite3.connect(tampered) as copy:
        source.backup(copy)
        copy.execute("UPDATE flows SET status = 'completed' WHERE status = 'compensated'")
    code, text = run_cli("audit", "verify", str(tampered), "--public-key", public)
    assert code == 1 and "A006 [error] SubscriptionCancellation run 'flw_" in text, text
    # A second run appends to the same store, with the same key, as another customer.
    second = demo("--db", str(db), "--keys", str(keys), "--generated", str(generated))
    assert second.returncode == 0, second.stderr
    assert "customer acme-2" in second.stdout and "generated signing key" not in second.stdout
    assert ": failed (" not in second.stdout
    # Each run settles what it starts: nothing of the first customer's runs in the second.
    assert "acme-1" not in second.stdout
    calls = [line for line in out.splitlines() if line.startswith("recorded action calls")]
    assert calls and calls[0] in second.stdout.splitlines()
    total = int(second.stdout.rstrip().rsplit("ledger verified: ", 1)[1].split()[0])
    assert total > count
    with sqlite3.connect(db) as conn:
        stamps = [ts for (ts,) in conn.execute("SELECT ts_ms FROM ledger ORDER BY seq")]
    assert stamps == sorted(stamps)  # the second run's clock starts after the first run's end


def test_demo_checkpoint_mode_signs_checkpoints(generated: Path, tmp_path: Path) -> None:
    db, keys = tmp_path / "demo.db", tmp_path / "keys"
    done = demo("--db", str(db), "--keys", str(keys), "--generated", str(generated), "--checkpoint")
    assert done.returncode == 0, done.stderr
    assert "; ledger: signed checkpoints by key" in done.stdout
    assert "signed checkpoints; ledger verified:" in done.stdout
    assert verify_ledger(db, Keyring.from_files([keys])).ok


def test_demo_fails_when_the_ledger_does_not_verify(generated: Path, tmp_path: Path) -> None:
    db, keys = tmp_path / "demo.db", tmp_path / "keys"
    assert demo("--db", str(db), "--keys", str(keys), "--generated", str(generated)).returncode == 0
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE ledger SET actor = 'mallory' WHERE seq = 3")
    conn.close()
    before = db.read_bytes()
    again = demo("--db", str(db), "--keys", str(keys), "--generated", str(generated))
    assert again.returncode == 1
    # Checked before anything is added: the tampered store is refused, and left as it was.
    assert again.stderr.startswith(f"{db}:1:1: A003 [error] the store's ledger does not verify")
    assert "seq 3: entry hash mismatch" in again.stderr
    assert "Traceback" not in again.stderr
    assert db.read_bytes() == before


def test_demo_without_generated_modules_is_a_diagnostic(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = demo(
        "--db", str(tmp_path / "d.db"), "--keys", str(tmp_path / "k"), "--generated", str(empty)
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"{empty / 'entitlement.py'}:1:1: S010 [error]")
    assert not (tmp_path / "d.db").exists()


def test_demo_defaults_to_what_autonomic_build_just_wrote(tmp_path: Path) -> None:
    """The README's main job: `autonomic build && autonomic demo --db ... --keys ...`."""
    assert build([ROOT / "machines"], tmp_path / "generated", svg=False).written
    result = demo("--db", "demo/marketplace.db", "--keys", "demo/keys", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "governors Entitlement, Billing, " in result.stdout
    assert "(machines/*.fsm, built by autonomic " in result.stdout
    count = int(result.stdout.rstrip().rsplit("ledger verified: ", 1)[1].split()[0])
    report = verify_ledger(
        tmp_path / "demo/marketplace.db", Keyring.from_files([tmp_path / "demo/keys"])
    )
    assert report.ok and report.count == count
