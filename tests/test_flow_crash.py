"""kill -9 at random points of running flows: every run resumes after a restart and ends
completed or compensated, and every step and compensation took effect exactly once, also the
steps and compensations that did not answer at first and were retried from the store."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from autonomic.runtime.keys import Keyring, generate_keypair
from autonomic.runtime.ledger import verify_ledger
from flow_world import check_runs_once

WORKER = Path(__file__).with_name("flow_crash_worker.py")
WAITER = Path(__file__).with_name("flow_wait_worker.py")
CUSTOMERS = 24
KILLS = 8
# A worker killed inside a refund (or a charge) leaves its claim on the key behind; the next
# worker takes it over once the lease runs out. One worker runs at a time, so no live holder is ever
# taken over: a short lease keeps that takeover without waiting the default minute for it.
CLAIM_LEASE_MS = 1000


def worker(db: Path, keys: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(db), str(keys), str(CUSTOMERS), str(CLAIM_LEASE_MS)],
        # Some forward steps do not answer at first: their runs wait, also across the kills.
        env={**os.environ, "FLOW_STEPS_UNANSWERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def acknowledged(lines: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in lines.splitlines():
        record = json.loads(line)
        if "flow_id" in record:
            found[record["flow_id"]] = record["status"]
    return found


def test_flows_killed_at_random_points_finish_exactly_once(tmp_path: Path) -> None:
    db, keys = tmp_path / "flows.db", tmp_path / "keys"
    generate_keypair(keys, valid_from_ms=1_700_000_000_000)
    rng = random.Random(1207)
    acks: dict[str, str] = {}
    killed = 0
    for _ in range(KILLS):
        process = worker(db, keys)
        # Kill once this worker has finished 1-3 flows beyond those already known (a restarted
        # worker reports those again first), a moment into the next one: the kill lands inside
        # some flow's step or write however fast or slow the machine is.
        wanted = len(acks) + rng.randint(1, 3)
        assert process.stdout is not None
        seen: list[str] = []
        while len(acknowledged("".join(seen))) < wanted:
            line = process.stdout.readline()
            if not line:
                break
            seen.append(line)
        time.sleep(rng.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
        out, errors = process.communicate(timeout=30)
        if process.returncode == -signal.SIGKILL:
            killed += 1
        else:
            assert process.returncode == 0, errors  # finished before the kill
        acks.update(acknowledged("".join(seen) + out))
    # 48 flows and at most 3 new ones a worker: every kill but a rare late one lands mid-run.
    assert killed >= KILLS - 1
    final = worker(db, keys)
    out, errors = final.communicate(timeout=300)
    assert final.returncode == 0, errors
    assert '"done": true' in out
    finished = acknowledged(out)
    # What a process acknowledged before it was killed stays as it was.
    for flow_id, status in acks.items():
        assert finished.get(flow_id, status) == status

    assert verify_ledger(db, Keyring.from_files([keys])).ok
    assert check_runs_once(db) == 2 * CUSTOMERS
    with sqlite3.connect(db) as conn:
        refunds = dict(
            conn.execute(
                "SELECT instance, count(*) FROM ledger WHERE machine = 'Billing' "
                "AND event = 'IssueCancellationRefund' GROUP BY instance"
            )
        )
        retried = conn.execute(
            "SELECT count(DISTINCT instance) FROM ledger WHERE event = 'CompensationRetrying'"
        ).fetchone()[0]
        waited = dict(
            conn.execute(
                "SELECT machine, count(DISTINCT instance) FROM ledger "
                "WHERE event = 'StepRetrying' GROUP BY machine"
            )
        )
        # A step unanswered in two processes: its run waited across a kill.
        across = conn.execute(
            "SELECT count(*) FROM (SELECT instance FROM ledger WHERE event = 'StepRetrying' "
            "GROUP BY instance HAVING count(*) > 1)"
        ).fetchone()[0]
        completed = dict(
            conn.execute(
                "SELECT flow, count(*) FROM flows WHERE status = 'completed' GROUP BY flow"
            )
        )
    # Nothing refunded twice: at most one refund per customer, whatever the kills.
    assert all(count == 1 for count in refunds.values())
    # The compensating runs' compensations went unanswered and were retried (the runs ended
    # compensated all the same, each compensation once: check_runs_once).
    assert retried == 4
    # So did the refunds of c1, c4, ... and the identity checks of c2, c5, ... (each run
    # waited for its step and completed, the step once: check_runs_once).
    assert waited == {"SubscriptionCancellation": 8, "CustomerSignup": 8}
    assert completed == {"SubscriptionCancellation": 16, "CustomerSignup": 24}
    assert across >= 1


def test_a_wait_on_the_entitlement_ladder_survives_kill_9(tmp_path: Path) -> None:
    """The upgrade's approval step waits in the store while Entitlement's ladder runs on
    timers (24 h, 48 h reviews, auto-approval at 72 h). Workers are killed with SIGKILL at
    random moments, idle or mid-hour; each new one resumes the wait from the store, and the
    run completes once, charging once, when the ladder approves."""
    db, keys = tmp_path / "wait.db", tmp_path / "keys"
    generate_keypair(keys, valid_from_ms=1_700_000_000_000)
    rng = random.Random(1212)
    hour, waits_killed, last = 0, 0, {"status": "waiting"}
    while last["status"] == "waiting":
        process = subprocess.Popen(
            [sys.executable, str(WAITER), str(db), str(keys), str(hour), str(CLAIM_LEASE_MS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdin is not None and process.stdout is not None
        first = json.loads(process.stdout.readline())
        if first["status"] == "waiting":
            process.stdin.write(f"{rng.randint(5, 20)}\n")
            process.stdin.flush()
            time.sleep(rng.uniform(0.0, 0.02))  # idle, or somewhere inside an hour's work
            process.send_signal(signal.SIGKILL)
        out, errors = process.communicate(timeout=30)
        lines = [first, *(json.loads(line) for line in out.splitlines())]
        last = lines[-1]
        if process.returncode == -signal.SIGKILL:
            waits_killed += last["status"] == "waiting"
        else:
            assert process.returncode == 0, errors  # the run ended before the kill
        # The next worker's clock starts where this one may have got to (an hour it had
        # begun but not reported), so the ledger's time never goes back.
        hour = last["hour"] + 1
    assert last["status"] == "completed"
    assert waits_killed >= 3

    assert verify_ledger(db, Keyring.from_files([keys])).ok
    with sqlite3.connect(db) as conn:

        def count(sql: str) -> int:
            return int(conn.execute(sql).fetchone()[0])

        assert count("SELECT count(*) FROM flows WHERE flow = 'SubscriptionUpgrade'") == 1
        ends = "SELECT count(*) FROM ledger WHERE kind = 'flow' AND event = 'FlowCompleted'"
        assert count(ends + " AND machine = 'SubscriptionUpgrade'") == 1
        approvals = (
            "SELECT count(*) FROM ledger WHERE machine = 'Entitlement' "
            "AND from_state = 'PendingApproval' AND to_state = 'Active'"
        )
        assert count(approvals) == 1  # the ladder's auto-approval, once
        charges = "SELECT count(*) FROM ledger WHERE machine = 'Billing' AND event = '{}'"
        assert count(charges.format("ProcessProrationCharge")) == 1
        waited = count(
            "SELECT count(*) FROM ledger WHERE kind = 'flow' AND event = 'StepSucceeded' "
            "AND from_state = 'approval'"
        )
        assert waited == 1


LATE = Path(__file__).with_name("flow_late_worker.py")


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_late_reply_is_recorded_though_its_process_dies_right_after_its_commit(
    tmp_path: Path, api: str
) -> None:
    """The noisy-neighbour fanout's notification commits after the gather, and its process
    is SIGKILLed the moment the branch learns it is late: the StepLate entry is in the
    ledger all the same (before, it came in a commit of its own that never happened)."""
    db, keys = tmp_path / "late.db", tmp_path / "keys"
    generate_keypair(keys, valid_from_ms=1_700_000_000_000)
    process = subprocess.run(
        [sys.executable, str(LATE), str(db), str(keys), api],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    flow_id, status = process.stdout.split()
    assert status == "completed"
    connection = sqlite3.connect(db)
    rows = connection.execute(  # a flow entry's from_state is its step
        "SELECT machine, event, from_state FROM ledger WHERE instance IN ('late', ?) ORDER BY seq",
        (flow_id,),
    ).fetchall()
    connection.close()
    events = [(machine, event) for machine, event, _ in rows]
    gathered = events.index(("NoisyNeighbour", "FanInGathered"))
    notified = events.index(("CustomerAccount", "NotifyCustomer"))
    assert gathered < notified  # the reply came after the gather
    late = [row for row in rows if row[1] == "StepLate"]
    assert late == [("NoisyNeighbour", "StepLate", "notify")]
    assert verify_ledger(db, Keyring.from_files([keys])).ok
