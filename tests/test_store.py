"""The store contract, run against every store: SQLite, and PostgreSQL when a server is given
(see conftest.py for how). One set of tests; each store must pass all of them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from autonomic.runtime.dispatch import Governor
from autonomic.runtime.errors import (
    ActionFailed,
    InstanceExists,
    StoreConfigError,
    StoreIntegrityError,
)
from autonomic.runtime.keys import Keyring, generate_keypair, load_signer
from autonomic.runtime.ledger import LedgerMode, LedgerSealer
from autonomic.runtime.resilience.deadlines import DeadlineTracker
from autonomic.runtime.resilience.errors import ServiceFailure
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import InstanceRecord, Transaction
from autonomic.runtime.store.base import BreakerRecord, DeadlineRecord
from autonomic.runtime.timers import VirtualClock
from billing_world import Processor, charge, open_billing
from conftest import Stores
from runtime_machines import Bindings, billing_spec, counter_spec, entitlement_spec

START = 1_800_000_000_000
TABLES = (
    "instances",
    "ledger",
    "ledger_checkpoints",
    "timers",
    "outbox",
    "processed_events",
    "idempotency_keys",
)


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder, valid_from_ms=START - 86_400_000)
    return folder


def open_runtime(
    stores: Stores,
    key_dir: Path,
    mode: LedgerMode = "checkpoint",
    name: str = "s",
    clock: VirtualClock | None = None,
) -> Runtime:
    sealer = LedgerSealer(load_signer(key_dir), mode)
    return Runtime(stores.open(name), clock=clock or VirtualClock(START), sealer=sealer)


def load(rt: Runtime, spec_name: str = "entitlement") -> Governor:
    spec = {"entitlement": entitlement_spec, "billing": billing_spec, "counter": counter_spec}[
        spec_name
    ]()
    return rt.load(spec, *Bindings().for_spec(spec))


def counts(stores: Stores, name: str = "s") -> dict[str, int]:
    return {t: int(stores.rows(name, f"SELECT count(*) FROM {t}")[0][0]) for t in TABLES}


def test_units_of_a_batch_commit_or_roll_back_alone(stores: Stores) -> None:
    store = stores.open()

    def insert(name: str, fail: bool = False) -> object:
        def work(txn: Transaction) -> object:
            txn.insert_instance(InstanceRecord("M", name, "S", 1))
            if fail:
                raise ValueError(name)
            return name

        return work

    # The first unit fails after writing (the SQLite store runs it without a savepoint).
    works = [insert("z", fail=True), insert("a"), insert("b", fail=True), insert("c"), insert("a")]
    outcomes = store.run(works)
    assert [o.value for o in outcomes] == [None, "a", None, "c", None]
    assert isinstance(outcomes[0].error, ValueError)
    assert isinstance(outcomes[2].error, ValueError)
    assert isinstance(outcomes[4].error, InstanceExists)
    assert [r.instance for r in store.instances("M")] == ["a", "c"]
    store.close()


def inject_ledger_failure(stores: Stores) -> None:
    """Make the database itself refuse the ledger row of a transition into Active."""
    if stores.kind == "sqlite":
        stores.rows(
            "s",
            "CREATE TRIGGER refuse BEFORE INSERT ON ledger WHEN NEW.to_state = 'Active' "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        )
    else:
        stores.rows(
            "s",
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.to_state = 'Active' THEN RAISE EXCEPTION 'injected failure'; END IF; "
            "RETURN NEW; END $$",
        )
        stores.rows(
            "s",
            "CREATE TRIGGER refuse BEFORE INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION refuse()",
        )


def test_one_transaction_covers_state_ledger_timers_outbox_and_dedup(
    stores: Stores, key_dir: Path
) -> None:
    rt = open_runtime(stores, key_dir)
    ent = load(rt)
    ent.create("e1", "alice")
    inject_ledger_failure(stores)
    before = counts(stores)
    with pytest.raises(Exception, match="injected failure"):
        ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob", event_id="evt-1")
    assert counts(stores) == before
    record = ent.get("e1")
    assert record is not None and (record.state, record.version) == ("PendingApproval", 1)
    stores.rows("s", "DROP TRIGGER refuse" + (" ON ledger" if stores.kind == "postgres" else ""))
    result = ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob", event_id="evt-1")
    after = counts(stores)
    assert after["ledger"] == before["ledger"] + 1
    assert after["outbox"] == before["outbox"] + 1
    assert after["processed_events"] == before["processed_events"] + 1
    assert after["timers"] == 1 and result.to_state == "Active"
    rt.close()


@pytest.mark.parametrize("mode", ["checkpoint", "sign-each"])
def test_stored_ledger_verifies_offline(stores: Stores, key_dir: Path, mode: LedgerMode) -> None:
    rt = open_runtime(stores, key_dir, mode)
    ent = load(rt)
    for number in range(5):
        ent.create(f"e{number}", "alice")
        ent.dispatch(f"e{number}", "Approve", {"approver": "bob"}, "bob")
    rt.close()
    assert stores.rows("s", "SELECT value FROM ledger_meta WHERE key = 'mode'") == [(mode,)]
    report = stores.verify("s", Keyring.from_files([key_dir]))
    assert report.ok and report.count == 11, report.reason  # the genesis entry and 10
    if mode == "checkpoint":
        # One per commit (each dispatch committed alone, and the genesis entry); on
        # PostgreSQL + the root signed at close.
        roots = 1 if stores.kind == "postgres" else 0
        assert report.checkpoints == 11 + roots


def test_ledger_mode_cannot_change(stores: Stores, key_dir: Path) -> None:
    open_runtime(stores, key_dir, "checkpoint").close()
    with pytest.raises(StoreConfigError, match="in checkpoint mode"):
        open_runtime(stores, key_dir, "sign-each")
    with pytest.raises(StoreConfigError, match="would go unrecorded"):
        Runtime(stores.open())


def test_a_modified_head_is_detected_before_chaining(stores: Stores, key_dir: Path) -> None:
    rt = open_runtime(stores, key_dir)
    ent = load(rt)
    ent.create("e1", "alice")
    stores.rows("s", "UPDATE ledger SET actor = 'mallory' WHERE seq = 1")
    before = counts(stores)
    with pytest.raises(StoreIntegrityError, match=r"ledger head \(seq 1\) does not match its hash"):
        ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob")
    assert counts(stores) == before
    with pytest.raises(StoreIntegrityError):
        rt.close()
    reopened = open_runtime(stores, key_dir)
    with pytest.raises(StoreIntegrityError):
        load(reopened).create("e2", "alice")
    reopened.store.close()


def test_a_removed_tail_is_detected_against_the_checkpoint(stores: Stores, key_dir: Path) -> None:
    rt = open_runtime(stores, key_dir)
    ent = load(rt)
    ent.create("e1", "alice")
    ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob")
    rt.close()
    stores.rows("s", "DELETE FROM ledger WHERE seq = 2")
    rt = open_runtime(stores, key_dir)
    with pytest.raises(StoreIntegrityError, match="checkpoint is signed at size 3"):
        load(rt).create("e2", "alice")
    assert counts(stores)["ledger"] == 2
    rt.store.close()


def test_group_commit_batches_threads_and_acknowledges_after_commit(
    stores: Stores, key_dir: Path
) -> None:
    rt = open_runtime(stores, key_dir)
    counter = load(rt, "counter")
    threads_n, per_thread = 8, 15
    for t in range(threads_n):
        counter.create(f"c{t}")
    batches_before = rt.commit_batches
    errors: list[BaseException] = []
    unseen: list[int] = []

    def worker(number: int) -> None:
        try:
            for _ in range(per_thread):
                result = counter.dispatch(f"c{number}", "Tick", actor=f"t{number}")
                # Another connection sees it: acknowledged only after the commit.
                found = stores.rows("s", f"SELECT instance FROM ledger WHERE seq = {result.seq}")
                if found != [(f"c{number}",)]:
                    unseen.append(result.seq or -1)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors and not unseen
    batches = rt.commit_batches - batches_before
    assert batches < threads_n * per_thread  # some commits carried several dispatches
    for t in range(threads_n):
        record = counter.get(f"c{t}")
        assert record is not None and record.version == per_thread + 1
    rt.close()
    report = stores.verify("s", Keyring.from_files([key_dir]))
    assert report.ok and report.count == 1 + threads_n * (per_thread + 1), report.reason
    # One signed checkpoint per commit batch (+ one per create, each committed alone, + one
    # over the genesis entry; on PostgreSQL + the root signed at close).
    roots = 1 if stores.kind == "postgres" else 0
    assert report.checkpoints == batches + threads_n + 1 + roots


def test_state_survives_reopening(stores: Stores, key_dir: Path) -> None:
    rt = open_runtime(stores, key_dir)
    bil = load(rt, "billing")
    bil.create("b1")
    bil.dispatch("b1", "StartBilling")
    rt.close()
    rt = open_runtime(stores, key_dir)
    bil = load(rt, "billing")
    record = bil.get("b1")
    assert record is not None and (record.state, record.version) == ("AwaitingPayment", 2)
    assert bil.dispatch("b1", "PaymentFailed", {"reason": "nsf"}).seq == 3
    rt.close()


def test_timers_fire_once_across_restart_and_runtimes(stores: Stores, key_dir: Path) -> None:
    clock = VirtualClock(START)
    rt = open_runtime(stores, key_dir, clock=clock)
    ent = load(rt)
    for number in range(10):
        ent.create(f"e{number}", "alice")
    rt.close()
    clock.advance("73h")  # down for the whole ladder: three steps each, in order
    runtimes = [open_runtime(stores, key_dir, clock=clock) for _ in range(2)]
    for each in runtimes:
        load(each)
    fired: list[list[object]] = [[], []]

    def fire(index: int) -> None:
        fired[index] = list(runtimes[index].fire_due())

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fired[0]) + len(fired[1]) == 10 * 3
    for each in runtimes:
        each.close()
    ids = [
        row[0]
        for row in stores.rows(
            "s",
            "SELECT event_id FROM ledger WHERE kind NOT IN ('transition', 'genesis') "
            "AND event <> 'DeadlineMissed'",
        )
    ]
    assert len(ids) == len(set(ids)) == 30
    # The notices' deadlines missed during the outage (the manager's twice, the director's
    # once) escalated once each, in time order with the firings.
    missed = stores.rows(
        "s", "SELECT instance, to_state FROM ledger WHERE event = 'DeadlineMissed'"
    )
    assert len(missed) == len(set(missed)) == 10 * 3
    for number in range(10):
        kinds = stores.rows(
            "s", f"SELECT to_state FROM ledger WHERE instance = 'e{number}' ORDER BY seq"
        )
        assert kinds[-1] == ("Active",)  # the ladder's end came last for every instance
    report = stores.verify("s", Keyring.from_files([key_dir]))
    assert report.ok and report.count == 1 + 10 + 30 + 30, report.reason


def test_a_deadline_waits_for_the_timer_another_worker_leased_before_it(
    postgres_stores: Stores, key_dir: Path
) -> None:
    """PostgreSQL workers share due timers by leases. e0's approval ladder ends at 72 h (the
    move to Active meets the director's deadline, missed at 49 h and due again at 73 h).
    Another worker has leased that 72 h timer and not fired it yet when this worker's due
    work runs at 73 h: the deadline waits for the firing, which then meets it. Before, this
    worker escalated it first, to level 2 (the cause of the 40 misses instead of 30 that
    test_timers_fire_once_across_restart_and_runtimes[postgres] saw once under load)."""
    clock = VirtualClock(START)
    rt = open_runtime(postgres_stores, key_dir, clock=clock)
    load(rt).create("e0", "alice")
    clock.advance("71h")
    rt.fire_due()  # the notices at 24 h and 48 h; their misses at 28 h, 49 h and 52 h
    missed = "SELECT instance, to_state FROM ledger WHERE event = 'DeadlineMissed' ORDER BY seq"
    assert len(postgres_stores.rows("s", missed)) == 3
    clock.advance("2h")
    other = postgres_stores.open("s")  # another worker's store: its own lease owner
    [leased] = other.claim_due_timers(clock.now_ms(), ["Entitlement"], 10)  # type: ignore[attr-defined]
    assert leased.timer_id == "PendingApproval.ApprovalLadder.end"
    assert rt.fire_due() == []  # the 72 h timer is the other worker's to fire
    assert len(postgres_stores.rows("s", missed)) == 3  # and the 73 h deadline waits for it
    # That worker dies; its lease runs out: this one fires the timer, which meets the deadline.
    postgres_stores.rows("s", "UPDATE timers SET lease_until_ms = 0")
    assert [f.timer.timer_id for f in rt.fire_due()] == ["PendingApproval.ApprovalLadder.end"]
    assert len(postgres_stores.rows("s", missed)) == 3
    assert rt.store.deadlines() == []
    other.close()
    rt.close()


def test_replay_from_snapshot_matches_the_row(stores: Stores, key_dir: Path) -> None:
    sealer = LedgerSealer(load_signer(key_dir))
    rt = Runtime(stores.open(), clock=VirtualClock(START), sealer=sealer, snapshot_every=3)
    counter = load(rt, "counter")
    counter.create("c1")
    for _ in range(7):
        counter.dispatch("c1", "Tick")
    replayed = rt.replay("Counter", "c1")
    assert (replayed.state, replayed.version, replayed.snapshot_version) == ("Counting", 8, 6)
    assert rt.replay("Counter", "c1", use_snapshot=False).version == 8
    stores.rows("s", "UPDATE snapshots SET state = 'Holding'")
    with pytest.raises(StoreIntegrityError, match="snapshot"):
        rt.replay("Counter", "c1")
    rt.close()


def test_emitted_events_are_delivered_once(stores: Stores, key_dir: Path) -> None:
    rt = open_runtime(stores, key_dir)
    ent = load(rt)
    ent.create("e1", "alice")
    ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob")
    pending = rt.store.outbox(kind="event")
    assert len(pending) == 1
    deliveries = rt.deliver_outbox()
    assert [d.status for d in deliveries] == ["skipped"]  # its receiver is not loaded here
    rt.close()


def test_breaker_and_deadline_records(stores: Stores) -> None:
    store = stores.open()
    breaker = BreakerRecord("Billing", "PaymentProcessor", "open", 5, START, START + 1)
    due = [
        DeadlineRecord("b", "approval", "Entitlement", START + 5, 0, "review"),
        DeadlineRecord("a", "retry", "Billing", START + 5, 1, "retry"),
        DeadlineRecord("c", "later", "Billing", START + 50, 0, "retry"),
    ]

    def write(txn: Transaction) -> list[DeadlineRecord]:
        txn.save_breaker(breaker)
        txn.save_breaker(BreakerRecord("Billing", "PaymentProcessor", "closed", 0, START, 9))
        for record in due:
            txn.save_deadline(record)
        txn.save_deadline(DeadlineRecord("b", "approval", "Entitlement", START + 5, 2, "review"))
        return txn.due_deadlines(START + 5, 10)

    [outcome] = store.run([write])
    assert [(d.id, d.level) for d in outcome.value or []] == [("a", 1), ("b", 2)]
    assert store.get_breaker("Billing", "PaymentProcessor") == BreakerRecord(
        "Billing", "PaymentProcessor", "closed", 0, START, 9
    )
    assert store.get_breaker("Billing", "Other") is None
    [removed] = store.run([lambda txn: (txn.delete_deadline("c"), txn.delete_deadline("c"))])
    assert removed.value == (True, False)
    assert [d.id for d in store.deadlines()] == ["a", "b"]
    [found] = store.run([lambda txn: (txn.deadline("a"), txn.deadline("c"))])
    assert found.value == (due[1], None)
    store.close()


def test_a_breakers_run_of_failures_is_stored_across_a_restart(
    stores: Stores, key_dir: Path
) -> None:
    """A closed breaker's count of failures is in the store: after 10 failures and a restart
    the 11th opens it, and the opening is stored with its ledger entry."""
    clock = VirtualClock(START)
    primary = Processor()
    primary.failing = ServiceFailure
    rt = open_billing(stores.open(), key_dir, clock, primary)
    for n in range(10):
        with pytest.raises(ActionFailed):
            charge(rt, f"c{n}")
    rt.close()
    rt = open_billing(stores.open(), key_dir, clock, primary)
    breaker = rt.policies.breaker("Billing", "PaymentProcessor")
    assert breaker is not None and (breaker.state, breaker.failures) == ("closed", 10)
    with pytest.raises(ActionFailed):
        charge(rt, "c10")
    stored = rt.store.get_breaker("Billing", "PaymentProcessor")
    assert stored is not None and (stored.state, stored.failures) == ("open", 11)
    assert [e.event for e in rt.ledger() if e.kind == "breaker"] == ["BreakerOpened"]
    rt.close()


def test_deadline_escalations_go_to_their_chains_once(stores: Stores, key_dir: Path) -> None:
    """On PostgreSQL with four ledger partitions: each escalation is signed into the chain of
    its `deadline:<id>` entry, and a second runtime checking afterwards escalates nothing."""
    clock = VirtualClock(START)
    sealer = LedgerSealer(load_signer(key_dir), "sign-each")
    rt = Runtime(stores.open(partitions=4), clock=clock, sealer=sealer)
    tracker = DeadlineTracker(rt)
    for n in range(6):
        tracker.track(f"d{n}", name="n", governor="Billing", due_ms=START + n, action="retry")
    clock.advance("1h")
    assert [e.id for e in tracker.check()] == [f"d{n}" for n in range(6)]
    other = Runtime(stores.open(), clock=clock, sealer=sealer)
    assert DeadlineTracker(other).check() == []
    other.close()
    rt.close()
    report = stores.verify("s", Keyring.from_files([key_dir]))
    genesis = 4 if stores.kind == "postgres" else 1
    assert report.ok and report.count == genesis + 6, report.reason
