"""The language's constructs of issue 8 end to end: compiled, generated, loaded and run on the
runtime with a virtual clock (resting states, data and setting delays, group and creation
timers, entry actions, repeated escalation steps, retry attempts that time out)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from autonomic.compiler.checks import check_machines
from autonomic.compiler.codegen import generate_module
from autonomic.compiler.parser import parse_text
from autonomic.runtime.errors import InvalidTransition, PayloadInvalid, SettingsError
from autonomic.runtime.keys import generate_keypair, load_signer
from autonomic.runtime.ledger import LedgerSealer
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.store.memory import MemoryStore
from autonomic.runtime.store.sqlite import SQLiteStore
from autonomic.runtime.tables import MachineSpec
from autonomic.runtime.timers import VirtualClock
from strategies import load_module

HOUR = 3_600_000

SOURCE = """
machine Ticket "A support ticket." {
  event Open
  event Snooze { snooze_for: duration }
  event Work
  event Hold
  event Fail
  event Done
  setting grace between 1h and 2d
  group Active { Triage, Working, Held }
  after 3d in Active -> AutoClosed do auto_close
  after 30d from creation -> Expired
  initial resting state Closed "May rest here for ever, and be reopened." {
    on Open -> Triage
  }
  state Triage {
    entry do page_first emit Work
    on Work -> Working
    on Snooze -> Snoozed
    escalate Pages { after 0m notify role oncall repeat 3 every 30m "page" }
  }
  state Working { on Hold -> Held  on Done -> Closed }
  state Held { on Work -> Working  after setting grace -> Triage }
  state Snoozed { after event.snooze_for -> Triage  on Work -> Working }
  state Waiting { on Done -> Closed }
  state Attempting { on Done -> Closed }
  final state AutoClosed
  final state Expired
  final state GaveUp
  retry Again on Fail at most 2 attempts {
    from Working
    step Waiting after 1h do retry_work attempt Attempting timeout 30m
    exhausted -> GaveUp do give_up
  }
}
"""

ACTIONS = ("auto_close", "page_first", "retry_work", "give_up")


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> MachineSpec:
    machine, diagnostics = parse_text(SOURCE, "ticket.fsm")
    assert machine is not None and diagnostics == []
    assert check_machines([machine]) == []
    module = load_module(generate_module(machine), tmp_path_factory.mktemp("gen"), "ticket")
    spec: MachineSpec = module.MACHINE
    return spec


def runtime_for(
    spec: MachineSpec, store: Any = None, **settings: Any
) -> tuple[Any, VirtualClock, list[str]]:
    clock = VirtualClock(0)
    runtime = Runtime(store or MemoryStore(), clock=clock)
    calls: list[str] = []
    actions = {name: (lambda ctx, name=name: calls.append(name)) for name in ACTIONS}
    governor = runtime.load(spec, {}, actions, settings or {"grace": "4h"})
    return governor, clock, calls


def test_settings_are_required_and_bounded(spec: MachineSpec) -> None:
    runtime = Runtime(MemoryStore(), clock=VirtualClock(0))
    actions = {name: (lambda ctx: None) for name in ACTIONS}
    with pytest.raises(SettingsError) as missing:
        runtime.load(spec, {}, actions)
    assert "R015 setting 'grace' (1h to 2d) was not supplied" in str(missing.value)
    with pytest.raises(SettingsError) as bounds:
        runtime.load(spec, {}, actions, {"grace": "3d", "other": "1h"})
    assert "setting 'grace' is 3d, outside 1h to 2d" in str(bounds.value)
    assert "R017 setting 'other' is not declared" in str(bounds.value)


def test_resting_state_is_a_valid_place_to_stop_that_can_be_left(spec: MachineSpec) -> None:
    assert spec.resting == frozenset({"Closed"}) and "Closed" not in spec.finals
    governor, _, _ = runtime_for(spec)
    governor.create("t1")
    assert governor.dispatch("t1", "Open").to_state == "Triage"


def test_entry_actions_and_repeated_pages_fire_from_entry(spec: MachineSpec) -> None:
    governor, clock, calls = runtime_for(spec)
    governor.create("t1")
    entered = governor.dispatch("t1", "Open")
    # The entry action ran in the transaction that entered Triage, its emit with it.
    assert calls == ["page_first"]
    assert [e.event for e in entered.emitted] == ["Work"]
    assert not [t for t in governor.timers("t1") if t.timer_id.endswith("entry#0")]
    fired = governor.runtime.fire_due()  # t = 0: the first page
    assert [f.result.event for f in fired] == ["Triage/Pages/1"]
    clock.advance("30m")
    clock.advance("30m")
    pages = governor.runtime.fire_due()
    assert [f.result.event for f in pages] == ["Triage/Pages/1.2", "Triage/Pages/1.3"]
    assert all(f.result.notifications for f in pages)
    clock.advance("1h")
    assert governor.runtime.fire_due() == []  # three pages in all
    assert calls == ["page_first"]


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_entry_actions_commit_with_the_entering_transition(
    spec: MachineSpec, store_kind: str, tmp_path: Path
) -> None:
    """One transaction, one ledger entry: a failing entry action leaves nothing of the move;
    a timer that moves into the state runs them in its own firing."""
    store = MemoryStore() if store_kind == "memory" else SQLiteStore(tmp_path / "t.db")
    clock = VirtualClock(0)
    generate_keypair(tmp_path / "keys", valid_from_ms=0)
    runtime = Runtime(store, clock=clock, sealer=LedgerSealer(load_signer(tmp_path / "keys")))
    failing = {"on": True}

    def page_first(ctx: Any) -> str:
        if failing["on"]:
            raise RuntimeError("pager down")
        return "paged"

    actions: dict[str, Any] = {name: (lambda ctx: None) for name in ACTIONS}
    actions["page_first"] = page_first
    governor = runtime.load(spec, {}, actions, {"grace": "4h"})
    governor.create("t1")
    before = len(list(runtime.ledger()))
    with pytest.raises(Exception, match="pager down"):
        governor.dispatch("t1", "Open")
    assert governor.get("t1").state == "Closed"  # type: ignore[union-attr]
    assert len(list(runtime.ledger())) == before and store.outbox(kind="event") == []
    failing["on"] = False
    result = governor.dispatch("t1", "Open")
    assert result.action_results == {"page_first": "paged"}
    assert [e.event for e in result.emitted] == ["Work"]
    ledger = list(runtime.ledger())
    assert len(ledger) == before + 1 and ledger[-1].to_state == "Triage"
    assert [m.event for m in store.outbox(kind="event")] == ["Work"]
    # Held -> Triage by the grace timer: the entry action runs inside the timer's firing.
    governor.dispatch("t1", "Work")
    governor.dispatch("t1", "Hold")
    clock.advance("4h")
    [firing] = [f for f in runtime.fire_due() if f.result.from_state == "Held"]
    assert firing.result.action_results == {"page_first": "paged"}
    assert [e.event for e in firing.result.emitted] == ["Work"]


def test_delay_from_the_entering_events_field(spec: MachineSpec) -> None:
    governor, clock, _ = runtime_for(spec)
    governor.create("t1")
    governor.dispatch("t1", "Open")
    governor.dispatch("t1", "Snooze", {"snooze_for": "PT2H"})
    [armed] = [t for t in governor.timers("t1") if t.state == "Snoozed"]
    assert armed.due_ms == 2 * HOUR
    clock.advance("2h")
    governor.runtime.fire_due()
    assert governor.get("t1").state == "Triage"  # type: ignore[union-attr]


def test_a_duration_field_is_strict(spec: MachineSpec) -> None:
    """A `duration` field takes a timedelta or ISO 8601 duration text, never a bare number or
    the language's own `2h` notation, and a refusal changes nothing."""
    governor, _, _ = runtime_for(spec)
    governor.create("t1")
    governor.dispatch("t1", "Open")
    for bad in (7200, "7200", "2h", True):
        with pytest.raises(PayloadInvalid):
            governor.dispatch("t1", "Snooze", {"snooze_for": bad})
        assert governor.get("t1").state == "Triage"  # type: ignore[union-attr]
    result = governor.dispatch("t1", "Snooze", {"snooze_for": timedelta(minutes=5)})
    assert result.to_state == "Snoozed"


def test_delay_from_a_setting(spec: MachineSpec) -> None:
    governor, _, _ = runtime_for(spec, grace=timedelta(hours=5))
    governor.create("t1")
    governor.dispatch("t1", "Open")
    governor.dispatch("t1", "Work")
    governor.dispatch("t1", "Hold")
    [armed] = [t for t in governor.timers("t1") if t.state == "Held"]
    assert armed.due_ms == 5 * HOUR


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_group_timer_is_kept_inside_the_group_and_cancelled_on_leaving(
    spec: MachineSpec, store_kind: str, tmp_path: Path
) -> None:
    store = MemoryStore() if store_kind == "memory" else SQLiteStore(str(tmp_path / "t.db"))
    governor, clock, calls = runtime_for(spec, store)
    governor.create("t1")
    governor.dispatch("t1", "Open")
    group = [t for t in governor.timers("t1") if t.state == "Active"]
    assert [t.due_ms for t in group] == [3 * 24 * HOUR]
    clock.advance("1d")
    governor.dispatch("t1", "Work")
    governor.dispatch("t1", "Hold")
    governor.dispatch("t1", "Work")  # moving inside the group keeps the deadline
    assert [t for t in governor.timers("t1") if t.state == "Active"] == group
    clock.advance("2d")
    governor.runtime.fire_due()
    assert governor.get("t1").state == "AutoClosed"  # type: ignore[union-attr]
    assert "auto_close" in calls
    # Leaving the group cancels it: a new ticket that is done in time is not auto-closed.
    governor.create("t2")
    governor.dispatch("t2", "Open")
    governor.dispatch("t2", "Work")
    governor.dispatch("t2", "Done")
    assert [t.state for t in governor.timers("t2")] == [""]  # only the creation timer
    store.close()


def test_creation_timer_runs_from_creation_until_the_end(spec: MachineSpec) -> None:
    governor, clock, _ = runtime_for(spec)
    governor.create("t1")
    [created] = governor.timers("t1")
    assert (created.state, created.due_ms) == ("", 30 * 24 * HOUR)
    clock.advance("30d")
    governor.runtime.fire_due()
    assert governor.get("t1").state == "Expired"  # type: ignore[union-attr]


def test_an_unanswered_attempt_times_out_into_the_next_step(spec: MachineSpec) -> None:
    governor, clock, calls = runtime_for(spec)
    governor.create("t1")
    governor.dispatch("t1", "Open")
    governor.dispatch("t1", "Work")
    governor.dispatch("t1", "Fail")
    assert governor.get("t1").state == "Waiting"  # type: ignore[union-attr]
    # Waiting before the attempt: no failure can be reported while nothing runs.
    with pytest.raises(InvalidTransition):
        governor.dispatch("t1", "Fail")
    clock.advance("1h")
    governor.runtime.fire_due()
    assert governor.get("t1").state == "Attempting"  # type: ignore[union-attr]
    assert calls.count("retry_work") == 1
    clock.advance("30m")  # the processor never answers
    governor.runtime.fire_due()
    assert governor.get("t1").state == "GaveUp"  # type: ignore[union-attr]
    assert "give_up" in calls


def test_create_runs_the_initial_states_entry_actions(tmp_path: Path) -> None:
    text = (
        "machine Door { event Knock\n"
        "  initial state Shut { entry do lock emit Knock  on Knock -> Open }\n"
        "  final state Open }"
    )
    machine, diagnostics = parse_text(text, "door.fsm")
    assert machine is not None and diagnostics == []
    module = load_module(generate_module(machine), tmp_path, "door")
    runtime = Runtime(MemoryStore(), clock=VirtualClock(0))
    governor = runtime.load(module.MACHINE, {}, {"lock": lambda ctx: ctx.event})
    created = governor.create("d1")
    assert created.action_results == {"lock": "create"}
    assert [e.event for e in created.emitted] == ["Knock"]
    assert governor.timers("d1") == []
    runtime.deliver_outbox()
    assert governor.get("d1").state == "Open"  # type: ignore[union-attr]


REDELIVERY = """
machine Hook {
  event Deliver
  event Delivered
  event Failed
  initial state Idle { on Deliver -> Sending }
  state Sending { on Delivered -> Done }
  state Wait1 { on Delivered -> Done }
  state Wait2 { on Delivered -> Done }
  state Try2 { on Delivered -> Done }
  final state Done
  final state Dead
  retry Redeliver on Failed at most 6 attempts {
    from Sending
    step Wait1 after 1m do redeliver repeat 3 every 10m
    step Wait2 after 1h do redeliver repeat 3 every 30m attempt Try2 timeout 2h
    exhausted -> Dead
  }
}
"""


def test_repeated_retry_attempts_are_made_again_only_while_unanswered(tmp_path: Path) -> None:
    machine, diagnostics = parse_text(REDELIVERY, "hook.fsm")
    assert machine is not None and diagnostics == []
    assert check_machines([machine]) == []
    module = load_module(generate_module(machine), tmp_path, "hook")
    clock = VirtualClock(0)
    runtime = Runtime(MemoryStore(), clock=clock)
    calls: list[int] = []
    governor = runtime.load(module.MACHINE, {}, {"redeliver": lambda ctx: calls.append(ctx.now_ms)})
    governor.create("h1")
    governor.dispatch("h1", "Deliver")
    governor.dispatch("h1", "Failed")  # into Wait1: attempts at 1m, 11m, 21m while unanswered
    assert [t.due_ms for t in governor.timers("h1")] == [60_000, 660_000, 1_260_000]
    clock.advance("30m")
    runtime.fire_due()
    assert len(calls) == 3
    governor.dispatch("h1", "Failed")  # a failure answers: on to step 2, no more of step 1
    clock.advance("1h")
    runtime.fire_due()  # the attempt at 1h moves into Try2, where it is made again after 30m
    assert governor.get("h1").state == "Try2"  # type: ignore[union-attr]
    clock.advance("30m")
    runtime.fire_due()
    assert len(calls) == 5
    governor.dispatch("h1", "Delivered")  # an answer: the third attempt is never made
    clock.advance("1h")
    assert runtime.fire_due() == [] and len(calls) == 5
    assert governor.get("h1").state == "Done"  # type: ignore[union-attr]
