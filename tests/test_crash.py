"""kill -9: dispatching processes killed at random points lose nothing they acknowledged.

On SQLite one worker at a time; on PostgreSQL three at once on a store of four ledger
partitions, killed together, mid-commit and mid-claim of timers."""

from __future__ import annotations

import contextlib
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
from autonomic.runtime.partitions import partition_of
from conftest import Stores

WORKER = Path(__file__).with_name("runtime_machines.py")
KILLS = 24


def start_worker(db: str, keys: Path, seed: int, run: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), "crash-worker", str(db), str(keys), str(seed), str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def close_a_connection(db: Path) -> None:
    """Another process reads the store and closes it while the worker runs: the close tries
    to checkpoint and delete the WAL, which SQLite does only if no process holds the file."""
    with contextlib.closing(sqlite3.connect(db)) as reader:
        reader.execute("SELECT count(*) FROM ledger").fetchall()


def run_until_killed(
    process: subprocess.Popen[str], rng: random.Random, db: Path | None
) -> list[dict[str, object]]:
    """Read acknowledgements, then SIGKILL the worker at a random point; return every line
    it printed (those still in the pipe too). `db`: an SQLite store another process closes
    while the worker runs."""
    assert process.stdout is not None and process.stderr is not None
    wanted = rng.randrange(1, 40)
    lines: list[dict[str, object]] = []
    deadline = time.monotonic() + 20
    while len(lines) < wanted and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(json.loads(line))
        if db is not None and len(lines) == wanted // 2 + 1:
            close_a_connection(db)
    if rng.random() < 0.5:
        time.sleep(rng.random() * 0.02)  # somewhere inside the next commit, or between two
    process.send_signal(signal.SIGKILL)
    # The stream's own reads: `communicate` would skip what readline has buffered already.
    with process.stdout, process.stderr:
        rest, errors = process.stdout.read(), process.stderr.read()
    process.wait(timeout=20)
    assert process.returncode == -signal.SIGKILL, errors
    lines.extend(json.loads(line) for line in rest.splitlines() if line.strip())
    return lines


def check_store(
    stores: Stores, keyring: Keyring, acknowledged: list[dict[str, object]], partitions: int
) -> None:
    report = stores.verify("crash", keyring)
    assert report.ok, f"{report.index}: {report.reason}"
    rows = stores.rows("crash", "SELECT seq, instance, to_state, kind, event_id FROM ledger")
    # (partition, seq) names an entry: each partition counts its own seq from 0.
    entries = {
        (partition_of(instance, partitions), seq): (instance, to_state, kind, event_id)
        for seq, instance, to_state, kind, event_id in rows
    }
    versions = dict(stores.rows("crash", "SELECT instance, version FROM instances"))
    # A notice's missed deadline escalates in an entry of its own (instance "deadline:..."),
    # which moves no instance: runtime/notice_deadlines.py.
    per_instance = dict(
        stores.rows(
            "crash",
            "SELECT instance, count(*) FROM ledger WHERE kind != 'genesis' "
            "AND NOT (kind = 'escalation' AND actor = 'deadline-tracker') GROUP BY instance",
        )
    )
    for ack in acknowledged:
        instance = ack["instance"]
        assert isinstance(instance, str)
        key = (partition_of(instance, partitions), ack["seq"])
        assert key in entries, f"acknowledged {ack} is missing"
        assert entries[key][:2] == (instance, ack["state"]), ack
        assert versions[instance] >= ack["version"]
    # Every instance's version counts its ledger entries (nothing half-written).
    assert versions == per_instance
    # No timer fired twice: a firing's event id names the timer and the arming it belongs to.
    firings = [
        event_id
        for instance, _, kind, event_id in entries.values()
        if kind not in ("transition", "genesis") and not instance.startswith("deadline:")
    ]
    assert len(firings) == len(set(firings))


def test_kill_9_at_random_points_loses_no_acknowledged_transition(
    tmp_path: Path, stores: Stores
) -> None:
    keys = tmp_path / "keys"
    generate_keypair(keys, valid_from_ms=1_700_000_000_000)
    keyring = Keyring.from_files([keys])
    db = stores.location("crash")
    partitions, together, runs = 1, 1, KILLS
    if stores.kind == "postgres":
        from autonomic.runtime.store.postgres import migrate

        migrate(db, partitions=4)
        partitions, together, runs = 4, 3, KILLS // 6
    rng = random.Random(int(os.environ.get("CRASH_SEED", "20260115")))
    acknowledged: list[dict[str, object]] = []
    fired_ids: list[object] = []
    for run in range(runs):
        workers = [start_worker(db, keys, rng.randrange(1 << 30), run) for _ in range(together)]
        for worker in workers:
            lines = run_until_killed(worker, rng, Path(db) if stores.kind == "sqlite" else None)
            acknowledged.extend(line for line in lines if line["op"] in ("ack", "fired"))
            fired_ids.extend(line["event_id"] for line in lines if line["op"] == "fired")
        check_store(stores, keyring, acknowledged, partitions)
    assert len(fired_ids) == len(set(fired_ids)), "a timer fired twice across restarts"
    assert len(acknowledged) > runs
    assert fired_ids, "no timer came due in the runs; the test would not show exactly-once"


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_a_killed_process_leaves_a_store_that_reopens(tmp_path: Path, synchronous: str) -> None:
    """The WAL of a killed writer is recovered on the next open (both sync settings)."""
    db = tmp_path / "s.db"
    script = (
        "import os, signal\n"
        "from autonomic.runtime.store import SQLiteStore, InstanceRecord\n"
        f"store = SQLiteStore({str(db)!r}, synchronous={synchronous!r})\n"
        "store.run([lambda txn: txn.insert_instance(InstanceRecord('M', 'a', 'S', 1))])\n"
        "store._connection.execute('BEGIN IMMEDIATE')\n"
        'store._connection.execute("INSERT INTO instances (machine, instance, state, version) "\n'
        "    \"VALUES ('M', 'b', 'S', 1)\")\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    from autonomic.runtime.store import SQLiteStore

    store = SQLiteStore(db)
    assert [r.instance for r in store.instances("M")] == ["a"]  # committed kept, open dropped
    store.close()


@pytest.mark.parametrize("again", ["SQLiteStore(db)", "read_ledger(db).close()"])
def test_opening_the_file_again_keeps_the_locks_of_the_process(tmp_path: Path, again: str) -> None:
    """A process with the store open opens the file again; then another process closes it,
    which checkpoints and deletes the WAL if no process holds a lock on the file. Had the
    second open dropped the process's locks, the next commit, acknowledged, would go to the
    deleted WAL and be gone after kill -9."""
    db = tmp_path / "s.db"
    script = (
        "import os, signal, sqlite3, subprocess, sys\n"
        "from autonomic.runtime.ledger import read_ledger\n"
        "from autonomic.runtime.store import SQLiteStore, InstanceRecord\n"
        f"db = {str(db)!r}\n"
        "store = SQLiteStore(db)\n"
        "store.run([lambda txn: txn.insert_instance(InstanceRecord('M', 'a', 'S', 1))])\n"
        f"{again}\n"
        "closer = 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        'c.execute("SELECT count(*) FROM instances").fetchall(); c.close()\'\n'
        "subprocess.run([sys.executable, '-c', closer, db], check=True)\n"
        "store.run([lambda txn: txn.insert_instance(InstanceRecord('M', 'b', 'S', 1))])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert [row[0] for row in conn.execute("SELECT instance FROM instances")] == ["a", "b"]
