"""Timers: durations, the virtual clock, escalation and retry ladders, exactly-once firing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from autonomic.runtime.dispatch import Governor
from autonomic.runtime.errors import ActionFailed
from autonomic.runtime.keys import Keyring, generate_keypair, load_signer
from autonomic.runtime.ledger import LedgerSealer, verify_ledger
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store import MemoryStore, SQLiteStore
from autonomic.runtime.timers import (
    Scheduler,
    VirtualClock,
    format_duration,
    format_instant,
    parse_duration,
)
from runtime_machines import (
    DAY,
    HOUR,
    Bindings,
    SpecBuilder,
    billing_spec,
    entitlement_spec,
)

START = 1_800_000_000_000  # 2027-01-15T08:00:00Z


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder, valid_from_ms=START - DAY)
    return folder


@pytest.fixture(params=["memory", "sqlite"])
def runtime(request: pytest.FixtureRequest, tmp_path: Path, key_dir: Path) -> Iterator[Runtime]:
    store = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "t.db")
    sealer = LedgerSealer(load_signer(key_dir), "checkpoint")
    rt = Runtime(store, clock=VirtualClock(START), sealer=sealer)
    yield rt
    rt.close()


def clock_of(rt: Runtime) -> VirtualClock:
    assert isinstance(rt.clock, VirtualClock)
    return rt.clock


# -- durations and clocks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [("24h", 24 * HOUR), ("1d12h", 36 * HOUR), ("90s", 90_000), ("500ms", 500), ("1w", 7 * DAY)],
)
def test_durations_round_trip(text: str, ms: int) -> None:
    assert parse_duration(text) == ms
    assert parse_duration(format_duration(ms)) == ms


@pytest.mark.parametrize("bad", ["", "24", "h", "1x", "1h 30", "-1h", "1.5h"])
def test_bad_durations_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_virtual_clock_moves_only_forward() -> None:
    clock = VirtualClock(START)
    assert clock.advance("1h") == START + HOUR
    with pytest.raises(ValueError):
        clock.advance(-1)
    with pytest.raises(ValueError):
        clock.set(START)
    assert format_instant(START) == "2027-01-15T08:00:00Z"
    assert format_instant(START + 5) == "2027-01-15T08:00:00.005Z"


# -- the Entitlement escalation ladder -----------------------------------------------------------


def test_entitlement_ladder_runs_72_hours_in_virtual_time(runtime: Runtime, key_dir: Path) -> None:
    clock = clock_of(runtime)
    spec = entitlement_spec()
    bindings = Bindings()
    ent = runtime.load(spec, *bindings.for_spec(spec))
    ent.create("e1", "alice")
    clock.advance("23h59m")
    assert runtime.fire_due() == []
    clock.advance("1m")
    [step1] = runtime.fire_due()
    assert step1.kind == "escalation" and step1.result.to_state == "PendingApproval"
    [notice] = step1.result.notifications
    assert (notice.recipient, notice.kind, notice.step) == ("manager_review_queue", "queue", 1)
    assert notice.deadline_ms == START + 24 * HOUR + 4 * HOUR
    assert notice.message == "Manual review of pending approval"
    clock.advance("24h")
    [step2] = runtime.fire_due()
    [director] = step2.result.notifications
    assert director.recipient == "director_review_queue"
    assert director.deadline_ms == START + 48 * HOUR + 1 * HOUR
    clock.advance("24h")
    [end] = runtime.fire_due()
    assert end.kind == "escalation" and end.result.to_state == "Active"
    assert "auto_approve" in end.result.action_results
    assert [t.timer_id for t in ent.timers("e1")] == ["Active.after.30d"]
    assert runtime.fire_due() == []
    history = ent.history("e1")
    assert [(e.kind, e.to_state) for e in history] == [
        ("transition", "PendingApproval"),
        ("escalation", "PendingApproval"),
        ("escalation", "PendingApproval"),
        ("escalation", "Active"),
    ]
    assert [e.actor for e in history[1:]] == ["timer"] * 3
    pending = runtime.notifications()
    # The manager's 4h deadline passed unmet at 28h: the due work at 48h said so before the
    # director's notice; at 72h the director's (49h) and the manager's again (52h), before
    # the auto-approval's move: in the order they fell due.
    assert [
        (json.loads(n.body)["recipient"], json.loads(n.body)["message"][:41]) for n in pending
    ] == [
        ("manager_review_queue", "Manual review of pending approval"),
        ("manager_review_queue", "deadline passed (escalation level 1): Man"),
        ("director_review_queue", "Director review required"),
        ("director_review_queue", "deadline passed (escalation level 1): Dir"),
        ("manager_review_queue", "deadline passed (escalation level 2): Man"),
    ]
    runtime.acknowledge(pending[0])
    assert len(runtime.notifications()) == 4
    runtime.checkpoint()  # checkpoint mode: the last commits' entries wait for the next one
    assert runtime.verify(Keyring.from_files([key_dir])).ok


def test_leaving_the_state_cancels_the_rest_of_the_ladder(runtime: Runtime) -> None:
    clock = clock_of(runtime)
    spec = entitlement_spec()
    ent = runtime.load(spec, *Bindings().for_spec(spec))
    ent.create("e1", "alice")
    clock.advance("25h")
    assert len(runtime.fire_due()) == 1
    ent.dispatch("e1", "Approve", {"approver": "bob"}, "bob")
    clock.advance("100h")
    assert runtime.fire_due() == []
    record = ent.get("e1")
    assert record is not None and record.state == "Active"


def test_missed_deadlines_fire_in_order_on_resume(runtime: Runtime) -> None:
    clock = clock_of(runtime)
    spec = entitlement_spec()
    ent = runtime.load(spec, *Bindings().for_spec(spec))
    ent.create("e1", "alice")
    ent.create("e2", "alice")
    clock.advance("80h")  # down for the whole ladder
    fired = runtime.fire_due()
    by_instance = {
        i: [f.timer.timer_id.rsplit(".", 1)[1] for f in fired if f.timer.instance == i]
        for i in ("e1", "e2")
    }
    assert by_instance == {"e1": ["1", "2", "end"], "e2": ["1", "2", "end"]}
    due_order = [f.timer.due_ms for f in fired]
    assert due_order == sorted(due_order)
    # The 30-day timer of Active counts from the due time of the ladder's end, not from now.
    assert [t.due_ms for t in ent.timers("e1")] == [START + 72 * HOUR + 30 * DAY]


def test_a_timer_fires_exactly_once(runtime: Runtime) -> None:
    clock = clock_of(runtime)
    spec = entitlement_spec()
    ent = runtime.load(spec, *Bindings().for_spec(spec))
    ent.create("e1", "alice")
    clock.advance("24h")
    assert len(runtime.fire_due()) == 1
    assert runtime.fire_due() == []
    assert runtime.fire_due(clock.now_ms() + 1) == []
    assert [e.kind for e in ent.history("e1")].count("escalation") == 1


# -- the Billing retry ladder -----------------------------------------------------------------


def test_billing_retry_ladder_then_exhausted(runtime: Runtime) -> None:
    clock = clock_of(runtime)
    spec = billing_spec()
    bindings = Bindings()
    bil = runtime.load(spec, *bindings.for_spec(spec))
    bil.create("b1", "shop")
    bil.dispatch("b1", "StartBilling", actor="shop")
    ladder = [("Retry1", "1h"), ("Retry2", "3h"), ("Retry3", "1d"), ("Collection", "7d")]
    for state, wait in ladder:
        result = bil.dispatch("b1", "PaymentFailed", {"reason": "declined"}, "psp")
        assert result.to_state == state
        [armed] = result.armed
        assert armed.due_ms == clock.now_ms() + parse_duration(wait)
        clock.advance(parse_duration(wait) - 1)
        assert runtime.fire_due() == []
        clock.advance(1)
        [attempt] = runtime.fire_due()
        assert attempt.kind == "timer" and attempt.result.to_state == state
        assert list(attempt.result.action_results) == ["retry_charge"]
    retries = [c for c in bindings.calls if c[1] == "retry_charge"]
    assert len(retries) == 4
    final = bil.dispatch("b1", "PaymentFailed", {"reason": "declined"}, "psp")
    assert final.to_state == "MaxRetriesExceeded"
    assert bil.timers("b1") == []
    clock.advance("30d")
    assert runtime.fire_due() == []


def test_payment_success_leaves_the_ladder(runtime: Runtime) -> None:
    clock = clock_of(runtime)
    spec = billing_spec()
    bil = runtime.load(spec, *Bindings().for_spec(spec))
    bil.create("b1")
    bil.dispatch("b1", "StartBilling")
    bil.dispatch("b1", "PaymentFailed", {})
    assert len(bil.timers("b1")) == 1
    bil.dispatch("b1", "PaymentSucceeded")
    assert bil.timers("b1") == []
    clock.advance("2h")
    assert runtime.fire_due() == []


# -- chains, emits and failures ---------------------------------------------------------------


def test_timer_chains_keep_their_spacing() -> None:
    b = SpecBuilder("Chain", ["A", "B", "C"], ["Go"], "A", finals={"C"})
    b.timer("A", HOUR, target="B")
    b.timer("B", HOUR, target="C", emit=(("Other", "Wake"),))
    spec = b.build()
    rt = Runtime(clock=VirtualClock(START))
    gov = rt.load(spec)
    gov.create("x")
    fired = rt.fire_due(START + 3 * HOUR)
    assert [(f.result.from_state, f.result.to_state) for f in fired] == [("A", "B"), ("B", "C")]
    assert [e.event for e in fired[1].result.emitted] == ["Wake"]
    assert rt.store.outbox()[0].event == "Wake"


def test_a_failing_timer_action_stays_armed_and_others_fire() -> None:
    b = SpecBuilder("Job", ["Waiting", "Done"], ["Finish"], "Waiting")
    b.timer("Waiting", HOUR, do=("flaky",))
    b.on("Waiting", "Finish", "Done")
    spec = b.build()
    attempts: list[str] = []

    def flaky(ctx: object) -> None:
        attempts.append(getattr(ctx, "instance", "?"))
        if len(attempts) == 1:
            raise ConnectionError("backend down")

    rt = Runtime(clock=VirtualClock(START))
    job = rt.load(spec, {}, {"flaky": flaky})
    job.create("j1")
    job.create("j2")
    with pytest.raises(ActionFailed, match="backend down") as failed:
        rt.fire_due(START + HOUR)
    assert "tried again in 217 ms" in str(failed.value.hint)
    assert len(job.timers("j1")) + len(job.timers("j2")) == 1  # one fired, one still armed
    # Not again before its backoff (the first of the jitter backoff: 217 ms), then once.
    assert rt.fire_due(START + HOUR + 216) == []
    assert len(rt.fire_due(START + HOUR + 217)) == 1
    assert job.timers("j1") == job.timers("j2") == []


# -- across restarts and processes -----------------------------------------------------------


def test_timers_fire_once_across_restart(tmp_path: Path, key_dir: Path) -> None:
    path = tmp_path / "t.db"
    clock = VirtualClock(START)
    spec = entitlement_spec()

    def open_runtime() -> tuple[Runtime, Governor]:
        rt = Runtime(SQLiteStore(path), clock=clock, sealer=LedgerSealer(load_signer(key_dir)))
        return rt, rt.load(spec, *Bindings().for_spec(spec))

    rt, ent = open_runtime()
    ent.create("e1", "alice")
    rt.close()
    clock.advance("50h")  # the process was down for two ladder steps
    rt, ent = open_runtime()
    assert [f.timer.timer_id for f in rt.fire_due()] == [
        "PendingApproval.ApprovalLadder.1",
        "PendingApproval.ApprovalLadder.2",
    ]
    rt.close()
    rt, ent = open_runtime()
    assert rt.fire_due() == []
    clock.advance("22h")
    assert [f.result.to_state for f in rt.fire_due()] == ["Active"]
    rt.close()
    rt, ent = open_runtime()
    assert [e.kind for e in ent.history("e1")].count("escalation") == 3
    rt.close()


def test_two_runtimes_on_one_file_fire_each_timer_once(tmp_path: Path, key_dir: Path) -> None:
    path = tmp_path / "t.db"
    clock = VirtualClock(START)
    spec = entitlement_spec()
    runtimes = [
        Runtime(SQLiteStore(path), clock=clock, sealer=LedgerSealer(load_signer(key_dir)))
        for _ in range(2)
    ]
    governors = [rt.load(spec, *Bindings().for_spec(spec)) for rt in runtimes]
    for number in range(20):
        governors[0].create(f"e{number}", "alice")
    clock.advance("73h")
    fired: list[list[object]] = [[], []]

    def fire(index: int) -> None:
        fired[index] = list(runtimes[index].fire_due())

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fired[0]) + len(fired[1]) == 20 * 3
    entries = [e for e in runtimes[0].ledger() if e.kind == "escalation"]
    ids = [e.event_id for e in entries if e.event != "DeadlineMissed"]
    assert len(ids) == len(set(ids)) == 60
    # The notices' deadlines missed while nobody fired (the manager's twice, the director's
    # once) escalated once each, by one runtime or the other.
    missed = [(e.instance, e.to_state) for e in entries if e.event == "DeadlineMissed"]
    assert len(missed) == len(set(missed)) == 20 * 3
    for rt in runtimes:
        rt.close()
    report = verify_ledger(path, Keyring.from_files([key_dir]))
    # genesis, creates, firings, missed deadlines
    assert report.ok and report.count == 1 + 20 + 60 + 60, report.reason


def test_scheduler_fires_in_the_background() -> None:
    spec = entitlement_spec()
    clock = VirtualClock(START)
    rt = Runtime(clock=clock)
    ent = rt.load(spec, *Bindings().for_spec(spec))
    ent.create("e1", "alice")
    clock.advance("72h")
    with Scheduler(rt, interval_s=0.01) as scheduler:
        deadline = time.monotonic() + 5
        while scheduler.fired < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert scheduler.fired == 3 and not scheduler.errors
    record = ent.get("e1")
    assert record is not None and record.state == "Active"
