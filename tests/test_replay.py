"""Event sourcing: replaying the ledger, with and without snapshots, gives the stored state."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
from autonomic.runtime.errors import RuntimeFailure, StoreIntegrityError, UnknownInstance
from autonomic.runtime.keys import Signer, generate_keypair, load_signer
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import MemoryStore, SQLiteStore, Store
from autonomic.runtime.tables import MachineSpec
from autonomic.runtime.timers import VirtualClock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from runtime_machines import HOUR, Bindings, billing_spec, counter_spec, entitlement_spec

START = 1_800_000_000_000

# One step: ("event", machine index, instance index, event name) or ("advance", hours).
Step = tuple[str, int, int, str]

SPECS: list[MachineSpec] = [entitlement_spec(), billing_spec(), counter_spec()]
PAYLOADS = {
    "Approve": {"approver": "bob"},
    "Reject": {"reason": "no"},
    "Charge": {"amount": "5.00", "currency": "EUR"},
    "PaymentFailed": {},
}


def steps() -> st.SearchStrategy[list[Step]]:
    event = st.tuples(
        st.just("event"),
        st.integers(0, len(SPECS) - 1),
        st.integers(0, 2),
        st.sampled_from(sorted({str(e) for spec in SPECS for e in spec.event_type})),
    )
    advance = st.tuples(
        st.just("advance"), st.just(0), st.just(0), st.sampled_from(["1", "25", "80"])
    )
    return st.lists(st.one_of(event, event, event, advance), max_size=60)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder, valid_from_ms=START)
    return load_signer(folder)


def run_steps(store: Store, signer: Signer, script: list[Step], snapshot_every: int) -> Runtime:
    clock = VirtualClock(START)
    rt = Runtime(store, clock=clock, sealer=LedgerSealer(signer), snapshot_every=snapshot_every)
    governors = [rt.load(spec, *Bindings().for_spec(spec)) for spec in SPECS]
    for gov in governors:
        for number in range(3):
            gov.create(f"i{number}")
    for kind, machine, instance, value in script:
        if kind == "advance":
            clock.advance(int(value) * HOUR)
            rt.fire_due()
            continue
        gov = governors[machine]
        if value not in {str(e) for e in gov.spec.event_type}:
            continue
        with contextlib.suppress(RuntimeFailure):  # rejections are part of the history too
            gov.dispatch(f"i{instance}", value, PAYLOADS.get(value), "tester")
    return rt


def assert_replay_matches(rt: Runtime) -> int:
    compared = 0
    for spec in SPECS:
        for record in rt.store.instances(spec.name):
            full = rt.replay(spec.name, record.instance, use_snapshot=False)
            fast = rt.replay(spec.name, record.instance)
            assert (full.state, full.version) == (record.state, record.version)
            assert (fast.state, fast.version, fast.last_seq) == (
                full.state,
                full.version,
                full.last_seq,
            )
            if fast.snapshot_version is not None:
                assert fast.replayed == full.version - fast.snapshot_version
            compared += 1
    return compared


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=steps(), snapshot_every=st.integers(1, 7))
def test_snapshot_plus_delta_equals_full_replay_in_memory(
    signer: Signer, script: list[Step], snapshot_every: int
) -> None:
    rt = run_steps(MemoryStore(), signer, script, snapshot_every)
    assert assert_replay_matches(rt) == 9


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(script=steps(), snapshot_every=st.integers(1, 5))
def test_snapshot_plus_delta_equals_full_replay_on_sqlite(
    tmp_path: Path, signer: Signer, script: list[Step], snapshot_every: int
) -> None:
    path = tmp_path / f"replay-{abs(hash((tuple(script), snapshot_every)))}.db"
    path.unlink(missing_ok=True)
    rt = run_steps(SQLiteStore(path), signer, script, snapshot_every)
    assert assert_replay_matches(rt) == 9
    rt.close()
    path.unlink()


def test_default_snapshot_every_100_events(signer: Signer) -> None:
    rt = Runtime(clock=VirtualClock(START), sealer=LedgerSealer(signer))
    spec = counter_spec()
    counter = rt.load(spec, *Bindings().for_spec(spec))
    counter.create("c1")
    for _ in range(249):
        counter.dispatch("c1", "Tick")
    snapshot = rt.store.latest_snapshot("Counter", "c1")
    assert snapshot is not None and snapshot.version == 200
    replayed = rt.replay("Counter", "c1")
    assert (replayed.state, replayed.version, replayed.replayed) == ("Counting", 250, 50)


def test_a_tampered_snapshot_is_refused(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "s.db"
    rt = Runtime(
        SQLiteStore(path), clock=VirtualClock(START), sealer=LedgerSealer(signer), snapshot_every=2
    )
    spec = counter_spec()
    counter = rt.load(spec, *Bindings().for_spec(spec))
    counter.create("c1")
    counter.dispatch("c1", "Tick")
    counter.dispatch("c1", "Stop")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE snapshots SET state = 'Holding'")
    with pytest.raises(StoreIntegrityError, match="does not match ledger entry"):
        rt.replay("Counter", "c1")
    assert rt.replay("Counter", "c1", use_snapshot=False).state == "Stopped"
    with sqlite3.connect(path) as db:
        db.execute("UPDATE ledger SET to_state = 'Counting' WHERE seq = 3")
    with pytest.raises(StoreIntegrityError, match="does not match its hash"):
        rt.replay("Counter", "c1", use_snapshot=False)
    rt.store.close()


def test_replay_of_an_unknown_instance(signer: Signer) -> None:
    rt = Runtime(clock=VirtualClock(START), sealer=LedgerSealer(signer))
    with pytest.raises(UnknownInstance):
        rt.replay("Counter", "nobody")
