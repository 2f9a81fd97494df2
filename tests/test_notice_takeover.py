"""A released refusal notice whose worker dies before delivering it: `autonomic worker`
processes on SQLite and PostgreSQL; the first is killed (SIGKILL) right after the unit that
marked the refused delivery and released the notice committed (on PostgreSQL the notice is
leased to it); another worker takes the notice over and delivers it exactly once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from autonomic.runtime.keys import generate_keypair, load_signer, now_ms
from autonomic.runtime.timers import VirtualClock
from conftest import Stores
from flow_world import marketplace
from pipe_lines import PipeLines
from test_flows import active_customer
from test_refusal_notices import DOWNGRADE

AUTONOMIC = Path(sys.executable).with_name("autonomic")
TESTS = Path(__file__).parent
CUSTOMER = "down-kill"


def worker(location: str, keys: Path, app: str) -> tuple[subprocess.Popen[str], PipeLines]:
    """An `autonomic worker` process running `app`, loaded; and its output's lines."""
    process = subprocess.Popen(
        [
            *(str(AUTONOMIC), "worker", "--store", location, "--keys", str(keys)),
            *("--app", app, "--poll", "50ms", "--lease", "1s"),
        ],
        cwd=TESTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = PipeLines(process.stdout)
    first = lines.line(60, "the worker")
    assert first is not None and first.startswith("worker on "), process.stderr
    return process, lines


def test_a_released_notice_whose_worker_was_killed_is_delivered_once(
    stores: Stores, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    start = now_ms()  # the workers run on the wall clock: no timer armed here is due
    generate_keypair(keys, valid_from_ms=start - 60_000)
    store = stores.open("s", partitions=2) if stores.kind == "postgres" else stores.open()
    runtime, runner, _ = marketplace(store, signer=load_signer(keys), clock=VirtualClock(start))
    with runtime:
        active_customer(runtime, runner, CUSTOMER)
        runtime.governor("Entitlement").dispatch(CUSTOMER, "Suspend", {"reason": "fraud check"})
        request = {"customer_id": CUSTOMER, **DOWNGRADE}
        runtime.governor("Subscription").dispatch(CUSTOMER, "DowngradeRequested", request)
    location = stores.location()

    victim, said = worker(location, keys, "notice_worker:victim")
    try:
        line = (said.line(60, "the victim") or "").split()
        assert line[:1] == ["released"], victim.stderr
        event_id = line[1]
        notice = f"SELECT status, event FROM outbox WHERE event_id = '{event_id}'"
        assert stores.rows("s", notice) == [("pending", "TierChangeFailed")]
        if stores.kind == "postgres":
            lease = f"SELECT lease_owner FROM outbox WHERE event_id = '{event_id}'"
            assert f":{victim.pid}:" in stores.rows("s", lease)[0][0]
    finally:
        victim.kill()  # SIGKILL, stopped where it released the notice
        victim.communicate(timeout=30)

    survivor, survivor_said = worker(location, keys, "notice_worker:load")
    try:
        for _ in range(1200):  # until delivered: on PostgreSQL, once the victim's lease ran out
            if stores.rows("s", notice)[0][0] != "pending":
                break
            assert survivor.poll() is None, survivor.stderr
            time.sleep(0.05)
    finally:
        survivor.send_signal(signal.SIGTERM)
        out, err = survivor.communicate(timeout=30)
    assert survivor.returncode == 0, err
    assert "worker stopped:" in survivor_said.unread() + out
    assert stores.rows("s", notice) == [("delivered", "TierChangeFailed")]

    told = stores.rows(
        "s",
        "SELECT count(*) FROM ledger WHERE machine = 'Subscription' "
        f"AND instance = '{CUSTOMER}' AND event = 'TierChangeFailed'",
    )
    assert told == [(1,)]
    state = (
        f"SELECT state FROM instances WHERE machine = 'Subscription' AND instance = '{CUSTOMER}'"
    )
    assert stores.rows("s", state) == [("Active",)]
    restores = stores.rows(
        "s",
        "SELECT count(*) FROM outbox WHERE event = 'RestorePreviousTier' "
        f"AND target_instance = '{CUSTOMER}'",
    )
    assert restores == [(1,)]
