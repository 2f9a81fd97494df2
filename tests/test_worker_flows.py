"""`autonomic worker` drives flows: a process running flows is killed with SIGKILL mid-run,
and a worker (given the application's FlowRunner by `--app`) finishes every run it left,
each step and compensation exactly once; nothing else resumes them."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from autonomic.runtime.keys import Keyring, generate_keypair
from autonomic.runtime.ledger import verify_ledger
from flow_world import check_runs_once

TESTS = Path(__file__).parent
DRIVER = TESTS / "flow_crash_worker.py"
AUTONOMIC = Path(sys.executable).with_name("autonomic")
CUSTOMERS = 6


def unfinished(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT flow_id FROM flows WHERE status IN ('running', 'waiting', 'compensating')"
        ).fetchall()
    return [flow_id for (flow_id,) in rows]


def kill_mid_run(db: Path, keys: Path, where: str, customers: int = CUSTOMERS, **env: str) -> str:
    """Run the flows' process until it reaches `where` (INSTANCE:STEP, the earlier steps of
    that run committed) and SIGKILL it there; the run's id."""
    process = subprocess.Popen(
        [sys.executable, str(DRIVER), str(db), str(keys), str(customers), "300"],
        env={**os.environ, "FLOW_HANG_AT": where, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        hung = json.loads(line).get("hang")
        if hung is not None:
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=30)
            return str(hung)
    raise AssertionError(process.communicate(timeout=30)[1])


def test_the_worker_finishes_the_runs_of_a_killed_process_exactly_once(tmp_path: Path) -> None:
    db, keys = tmp_path / "flows.db", tmp_path / "keys"
    generate_keypair(keys, valid_from_ms=1_700_000_000_000)
    # The saga of c1 killed after its refund, before suspending the entitlements.
    killed = kill_mid_run(db, keys, "c1:suspend_entitlements")
    left = unfinished(db)
    assert left == [killed]
    finish(db, keys, left, CUSTOMERS)
    assert check_runs_once(db) == 4  # c0 and c1: the signup and the saga


def test_the_worker_finishes_runs_killed_while_a_step_waits(tmp_path: Path) -> None:
    """c1's refund and c2's identity check do not answer at first: their runs wait in the
    store when the process is killed (in c2's saga); the worker sends each again, once."""
    db, keys = tmp_path / "flows.db", tmp_path / "keys"
    generate_keypair(keys, valid_from_ms=1_700_000_000_000)
    kill_mid_run(db, keys, "c2:suspend_entitlements", 3, FLOW_STEPS_UNANSWERED="1")
    with sqlite3.connect(db) as conn:
        waiting = conn.execute("SELECT count(*) FROM flows WHERE status = 'waiting'").fetchone()
    assert waiting == (2,)
    finish(db, keys, unfinished(db), 3, FLOW_STEPS_UNANSWERED="1")
    assert check_runs_once(db) == 6
    with sqlite3.connect(db) as conn:
        retried = conn.execute(
            "SELECT count(*) FROM ledger WHERE event = 'StepRetrying' GROUP BY instance"
        ).fetchall()
    assert retried == [(2,), (2,)]  # unanswered in each process, answered by the worker's retry


def finish(db: Path, keys: Path, left: list[str], customers: int, **env: str) -> None:
    """Run `autonomic worker` until it has finished the runs `left`, then stop it."""
    worker = subprocess.Popen(
        [
            str(AUTONOMIC),
            "worker",
            "--store",
            str(db),
            "--keys",
            str(keys),
            "--app",
            "flow_crash_worker:load",
            "--poll",
            "50ms",
            "--lease",
            "300ms",
        ],
        cwd=TESTS,
        env={**os.environ, "FLOW_CUSTOMERS": str(customers), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    guard = threading.Timer(120, worker.kill)  # a worker that never finishes fails the test
    guard.start()
    assert "flows CustomerSignup" in worker.stdout.readline()
    finished: list[str] = []
    while len(finished) < len(left):  # one line per run it finishes
        line = worker.stdout.readline()
        assert line, worker.communicate(timeout=30)[1]
        if line.startswith("flow "):
            finished.append(line.split()[1])
    worker.send_signal(signal.SIGTERM)
    out, errors = worker.communicate(timeout=60)
    guard.cancel()
    assert worker.returncode == 0, errors
    assert f"{len(left)} flow runs finished" in out
    assert sorted(finished) == sorted(left) and unfinished(db) == []
    assert verify_ledger(db, Keyring.from_files([keys])).ok
