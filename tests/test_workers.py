"""`autonomic worker` processes sharing one PostgreSQL store: workers killed with SIGKILL while
they hold claimed timers, survivors that take the work over when the leases run out, and every
timer fired exactly once; SIGTERM stops a worker cleanly."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from autonomic.runtime.keys import Keyring, generate_keypair, load_signer, now_ms
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.postgres import PostgresStore, migrate
from autonomic.runtime.timers import VirtualClock
from conftest import Stores
from runtime_machines import Bindings, counter_spec

HOUR = 3_600_000
INSTANCES, KILLS = 150, 3
AUTONOMIC = Path(sys.executable).with_name("autonomic")
TESTS = Path(__file__).parent


def start_worker(url: str, keys: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [
            str(AUTONOMIC),
            "worker",
            "--store",
            url,
            "--keys",
            str(keys),
            "--app",
            "runtime_machines:load_counter",
            "--poll",
            "50ms",
            "--lease",
            "1s",
            "--batch",
            "4",
        ],
        cwd=TESTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().startswith("worker on ")  # loaded, about to claim
    # Held until its turn: the workers are fast enough that, all running, they could fire
    # every timer before a victim is caught holding a claim.
    process.send_signal(signal.SIGSTOP)
    return process


def held_by(process: subprocess.Popen[str], stores: Stores) -> int:
    """Timers claimed by the worker process and not fired (fired ones are deleted)."""
    sql = f"SELECT count(*) FROM timers WHERE lease_owner LIKE '%:{process.pid}:%'"
    return int(stores.rows("s", sql)[0][0])


def kill_holding_a_claim(victim: subprocess.Popen[str], stores: Stores) -> int:
    """SIGKILL the worker while it holds claimed timers: let it run alone (the others are
    stopped), stop it (SIGSTOP) once it holds some, count them frozen, kill it. Returns how
    many claimed timers it left behind."""
    victim.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 10
    held = 0
    while time.monotonic() < deadline and victim.poll() is None:
        if held_by(victim, stores):
            victim.send_signal(signal.SIGSTOP)
            held = held_by(victim, stores)
            if held:
                break
            victim.send_signal(signal.SIGCONT)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=20)
    return held


def test_workers_killed_mid_claim_leave_every_timer_fired_exactly_once(
    postgres_stores: Stores, tmp_path: Path
) -> None:
    start = now_ms() - 2 * HOUR  # every timer armed below is already due
    keys = tmp_path / "keys"
    generate_keypair(keys, valid_from_ms=start - HOUR)
    url = postgres_stores.location()
    migrate(url, partitions=4)
    sealer = LedgerSealer(load_signer(keys))
    rt = Runtime(PostgresStore(url), clock=VirtualClock(start), sealer=sealer)
    counter = rt.load(counter_spec(), *Bindings().for_spec(counter_spec()))
    for n in range(INSTANCES):
        counter.create(f"c{n}")
        counter.dispatch(f"c{n}", "Hold")  # arms a 10 minute step and a 30 minute end
    rt.close()

    rng = random.Random(20260115)
    workers = [start_worker(url, keys) for _ in range(3)]
    orphaned = 0
    for _ in range(KILLS):
        victim = workers.pop(rng.randrange(len(workers)))
        orphaned += kill_holding_a_claim(victim, postgres_stores)
        workers.append(start_worker(url, keys))
    for worker in workers:
        worker.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while postgres_stores.rows("s", "SELECT count(*) FROM timers")[0][0]:
        assert time.monotonic() < deadline, "the survivors did not fire every timer"
        time.sleep(0.1)
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        out, err = worker.communicate(timeout=30)
        assert worker.returncode == 0, err
        assert "worker stopped:" in out

    assert orphaned, "no worker was killed holding a claim; the test would show nothing"
    firings = postgres_stores.rows(
        "s",
        "SELECT event_id FROM ledger WHERE kind NOT IN ('transition', 'genesis') "
        "AND event <> 'DeadlineMissed'",
    )
    assert len(firings) == len({f[0] for f in firings}) == 2 * INSTANCES
    # Each reminder's 5 minute deadline passed before the 30 minute end (the workers came 2 h
    # late): escalated once, before the end's move, whoever was killed.
    missed = postgres_stores.rows(
        "s", "SELECT instance, to_state FROM ledger WHERE event = 'DeadlineMissed'"
    )
    assert len(missed) == len(set(missed)) == INSTANCES
    final = postgres_stores.rows(
        "s", "SELECT state, version, count(*) FROM instances GROUP BY 1, 2"
    )
    assert final == [("Counting", 4, INSTANCES)]  # create, Hold, the step, the end
    report = postgres_stores.verify("s", Keyring.from_files([keys]))
    # + 4 geneses and the missed deadlines
    assert report.ok and report.count == 4 + 5 * INSTANCES, report.reason

    # The ledger the killed workers wrote, tampered as someone with database access would:
    # every partition is checked, and the root catches a chain cut off with its checkpoints.
    keyring = Keyring.from_files([keys])
    for part in range(4):
        postgres_stores.rows(
            "s", f"UPDATE ledger SET actor = actor || 'x' WHERE part = {part} AND seq = 3"
        )
        report = postgres_stores.verify("s", keyring)
        assert not report.ok and str(report.reason).startswith(f"partition {part}: ")
        postgres_stores.rows(
            "s", f"UPDATE ledger SET actor = rtrim(actor, 'x') WHERE part = {part} AND seq = 3"
        )
    assert postgres_stores.verify("s", keyring).ok
    postgres_stores.rows("s", "DELETE FROM ledger WHERE part = 1 AND seq >= 5")
    postgres_stores.rows("s", "DELETE FROM ledger_checkpoints WHERE part = 1 AND size > 5")
    report = postgres_stores.verify("s", keyring)
    assert not report.ok and "entries were removed" in str(report.reason)
