"""`autonomic demo`: the generated governors on SQLite with a signed ledger that verifies."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from autonomic.compiler.build import build
from autonomic.runtime.keys import Keyring
from autonomic.runtime.ledger import verify_ledger

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    assert build([ROOT / "machines"], out, svg=False).written  # the demo runs all seven
    return out


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
    # The scenario's milestones, in order.
    milestones = [
        "notify queue manager_review_queue: Manual review of pending approval, due within 4h",
        "notify queue director_review_queue",
        "escalation PendingApproval/ApprovalLadder/end: Entitlement PendingApproval -> Active",
        "ChargeRequested delivery 2: Billing Current -> AwaitingPayment",
        "ChargeRequested delivery 3 (another amount): refused: R009",
        "charges submitted to the processor: 1",
        "retry Retry1/PaymentRetry/1",
        "PaymentFailed: Billing CollectionAgency -> MaxRetriesExceeded",
        "outbox Subscription.RenewalFailed delivered: Subscription PastDue -> Suspended",
        "outbox Entitlement.Suspend delivered: Entitlement Active -> Suspended",
        "rejected and recorded",
    ]
    position = 0
    for milestone in milestones:
        found = out.find(milestone, position)
        assert found >= 0, f"{milestone!r} missing (or out of order) in:\n{out}"
        position = found
    # All seven governors are loaded: no delivery waits for a governor that is not there.
    assert "governor not loaded" not in out
    count = int(out.rstrip().rsplit("ledger verified: ", 1)[1].split()[0])
    report = verify_ledger(db, Keyring.from_files([keys]))
    assert report.ok and report.count == count == 38
    with sqlite3.connect(db) as conn:
        kinds = dict(conn.execute("SELECT kind, count(*) FROM ledger GROUP BY kind"))
    assert kinds == {"transition": 24, "escalation": 8, "timer": 5, "rejection": 1}
    # A second run appends to the same store, with the same key, as another customer.
    second = demo("--db", str(db), "--keys", str(keys), "--generated", str(generated))
    assert second.returncode == 0, second.stderr
    assert "customer acme-2" in second.stdout and "generated signing key" not in second.stdout
    # acme-1's suspended entitlement is refunded 72h into the second run: one entry more.
    assert "timeout Suspended/after/72h#0: Entitlement 'acme-1' Suspended -> Refunded" in (
        second.stdout
    )
    assert second.stdout.rstrip().endswith("ledger verified: 77 entries")
    with sqlite3.connect(db) as conn:
        stamps = [ts for (ts,) in conn.execute("SELECT ts_ms FROM ledger ORDER BY seq")]
    assert stamps == sorted(stamps)  # the second run's clock starts after the first run's end


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
    assert "governors Entitlement and Billing (machines/entitlement.fsm" in result.stdout
    assert result.stdout.rstrip().endswith("ledger verified: 38 entries")
    report = verify_ledger(
        tmp_path / "demo/marketplace.db", Keyring.from_files([tmp_path / "demo/keys"])
    )
    assert report.ok and report.count == 38
