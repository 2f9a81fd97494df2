"""Several processes and threads on one store (SQLite file, PostgreSQL database): optimistic
retries lose no update."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from autonomic.runtime.errors import ConcurrentUpdateDetected
from autonomic.runtime.keys import Keyring, generate_keypair, load_signer
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import MemoryStore, SQLiteStore
from conftest import Stores
from runtime_machines import Bindings, SpecBuilder, counter_spec

WORKER = Path(__file__).with_name("runtime_machines.py")
PROCESSES, INCREMENTS, INSTANCES = 4, 100, 3


def test_four_processes_on_one_store_lose_no_update(tmp_path: Path, stores: Stores) -> None:
    keys = tmp_path / "keys"
    generate_keypair(keys)
    db = stores.location("shared")
    rt = Runtime(stores.open("shared"), sealer=LedgerSealer(load_signer(keys), "sign-each"))
    spec = counter_spec()
    counter = rt.load(spec, *Bindings().for_spec(spec))
    for number in range(INSTANCES):
        counter.create(f"c{number}")
    rt.close()
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "counter-worker",
                str(db),
                str(keys),
                str(INSTANCES),
                str(INCREMENTS),
                str(seed),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(PROCESSES)
    ]
    for worker in workers:  # all loaded and ready: let them go at once
        assert worker.stdout is not None
        assert json.loads(worker.stdout.readline()) == {"op": "ready"}
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    acks: list[dict[str, object]] = []
    conflicts = 0
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines[-1]["op"] == "done"
        conflicts += int(lines[-1]["conflicts"])
        acks.extend(line for line in lines if line["op"] == "ack")
    total = PROCESSES * INCREMENTS
    assert len(acks) == total
    versions = dict(stores.rows("shared", "SELECT instance, version FROM instances"))
    seqs = {row[0] for row in stores.rows("shared", "SELECT seq FROM ledger")}
    # Every increment is there exactly once: versions add up, every acknowledged seq exists.
    assert sum(versions.values()) == INSTANCES + total
    assert {ack["seq"] for ack in acks} <= seqs and len({ack["seq"] for ack in acks}) == total
    for name in versions:
        mine = sorted(int(a["version"]) for a in acks if a["instance"] == name)  # type: ignore[call-overload]
        assert mine == list(range(2, versions[name] + 1))  # no version acknowledged twice
    report = stores.verify("shared", Keyring.from_files([keys]))
    assert report.ok and report.count == 1 + INSTANCES + total, report.reason  # + genesis
    assert conflicts > 0  # the workers did contend, and retried


def test_threads_with_stale_versions_are_refused_not_lost(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keypair(keys)
    rt = Runtime(SQLiteStore(tmp_path / "t.db"), sealer=LedgerSealer(load_signer(keys)))
    spec = counter_spec()
    counter = rt.load(spec, *Bindings().for_spec(spec))
    counter.create("c0")
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def contend() -> None:
        barrier.wait()
        try:
            counter.dispatch("c0", "Tick", expected_version=1)
            outcomes.append("won")
        except ConcurrentUpdateDetected as exc:
            assert exc.expected == 1 and exc.actual == 2
            outcomes.append("refused")

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["refused"] * 5 + ["won"]
    record = counter.get("c0")
    assert record is not None and record.version == 2
    rt.close()


def test_a_second_thread_on_a_memory_store_excludes_the_owner() -> None:
    # The first thread owns the store and applies Tick without a lock. While a second thread
    # is inside a unit of work (its Tock action runs), the owner's next Tick must wait for it.
    b = SpecBuilder("Loop", ["On"], ["Tick", "Tock"], "On")
    b.on("On", "Tick", "On")
    b.on("On", "Tock", "On", do=("pause",))
    inside, owner_done = threading.Event(), threading.Event()
    overlapped: list[bool] = []

    def pause(ctx: object) -> None:
        inside.set()
        overlapped.append(owner_done.wait(0.2))  # the owner's Tick finished meanwhile?

    rt = Runtime(MemoryStore())
    loop = rt.load(b.build(), actions={"pause": pause})
    loop.create("l1")
    loop.dispatch("l1", "Tick")  # this thread owns the store now
    other = threading.Thread(target=loop.dispatch, args=("l1", "Tock"))
    other.start()
    assert inside.wait(10)
    loop.dispatch("l1", "Tick")
    owner_done.set()
    other.join()
    assert overlapped == [False]
    record = loop.get("l1")
    assert record is not None and record.version == 4
    assert rt.store.owner is None  # type: ignore[attr-defined]


def test_only_the_owning_thread_is_told_it_owns_the_memory_store() -> None:
    # Dispatch's short path asks `mine()` before it touches the store without the lock.
    store = MemoryStore()
    assert store.mine() is False  # nobody owns it yet
    store.instances("M")  # this thread enters first: it owns the store
    assert store.mine() is True
    seen: list[bool] = []

    def second() -> None:
        seen.append(store.mine())
        store.instances("M")  # revokes the ownership for good
        seen.append(store.mine())

    other = threading.Thread(target=second)
    other.start()
    other.join()
    assert seen == [False, False]
    assert store.mine() is False and store.owner is None
