"""`autonomic testgen`: a pytest module that drives a generated governor through its model.

The module holds the compiler's view of the machine as plain data (every row, ignore, timed
exit, and a path from the initial state to each state) and checks the generated runtime
against it, three ways:
- one test per transition: reach its source along the path, make its guard hold (and the
  guards of the rows before it fail), dispatch, and land in its target; the same for every
  timed exit, by moving a virtual clock to the timer's due time;
- one test per rejection: every (state, event) pair that is neither handled nor ignored is
  refused with InvalidTransition and the instance stays put; a pair whose rows are all
  guarded is refused with NoGuardHeld when no guard holds;
- a hypothesis RuleBasedStateMachine whose rules are the machine's events (with guards drawn
  at random) and its timers, and whose invariants are the machine's rules: the instance is
  always in a declared state, a final state is never left, an accepted event adds one version
  and a refused one none.

Guards are bound to a switchboard the tests set; actions do nothing. Names reach the module
as checked identifiers, everything else through repr().
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .explain import timed_exit
from .lower import ELSE, MachineTables, TimerRow

# A sample value per field kind, as Python source for the generated module.
_SAMPLES = {
    "str": "'x'",
    "int": "1",
    "decimal": "Decimal('1')",
    "bool": "True",
    "datetime": "datetime(2026, 1, 1, tzinfo=UTC)",
}

Step = tuple[str, str, str | None]  # ("event", event, guard to hold) or ("timer", timer id, None)


@dataclass(frozen=True, slots=True)
class TestPlan:
    rows: dict[tuple[str, str], list[tuple[str | None, str]]]
    ignored: dict[str, list[str]]
    exits: dict[str, tuple[str, str]]  # state -> (timer id, target)
    paths: dict[str, list[Step]]
    transitions: list[tuple[str, str, str | None, str]]
    rejections: list[tuple[str, str]]
    unguarded_misses: list[tuple[str, str]]  # (state, event) with only named guards


def plan(tables: MachineTables) -> TestPlan:
    rows: dict[tuple[str, str], list[tuple[str | None, str]]] = {}
    for (source, event), written in tables.transitions:
        rows[(source, event)] = [(row.guard, row.target) for row in written]
    ignored = {state: sorted(events) for state, events in tables.ignored}
    timers: dict[str, tuple[TimerRow, ...]] = dict(tables.timers)
    exits: dict[str, tuple[str, str]] = {}
    for state in tables.states:
        if state.final:
            continue
        exit_timer = timed_exit(state.name, timers.get(state.name, ()))
        if exit_timer is not None and exit_timer.target is not None:
            exits[state.name] = (exit_timer.id, exit_timer.target)
    # Breadth first from the initial state: the shortest way to each state.
    paths: dict[str, list[Step]] = {tables.initial: []}
    queue = deque([tables.initial])
    while queue:
        here = queue.popleft()
        moves: list[tuple[Step, str]] = []
        for (source, event), options in rows.items():
            if source != here:
                continue
            for guard, target in options:
                moves.append((("event", event, None if guard == ELSE else guard), target))
        if here in exits:
            timer_id, target = exits[here]
            moves.append((("timer", timer_id, None), target))
        for step, target in moves:
            if target not in paths:
                paths[target] = [*paths[here], step]
                queue.append(target)
    transitions = [
        (source, event, guard, target)
        for (source, event), options in rows.items()
        if source in paths
        for guard, target in options
    ]
    rejections = [
        (state.name, event)
        for state in tables.states
        if state.name in paths
        for event in tables.events
        if (state.name, event) not in rows and event not in ignored.get(state.name, ())
    ]
    unguarded_misses = [
        key
        for key, options in rows.items()
        if key[0] in paths and all(g is not None and g != ELSE for g, _ in options)
    ]
    return TestPlan(rows, ignored, exits, paths, transitions, rejections, unguarded_misses)


def _payload_source(tables: MachineTables) -> str:
    lines = ["PAYLOADS: dict[str, dict[str, Any]] = {"]
    for payload in tables.payloads:
        values = []
        for field in payload.fields:
            if field.optional:
                continue
            value = repr(field.literals[0]) if field.kind == "enum" else _SAMPLES[field.kind]
            values.append(f"{field.name!r}: {value}")
        lines.append(f"    {payload.event!r}: {{{', '.join(values)}}},")
    lines.append("}")
    return "\n".join(lines)


def render_tests(tables: MachineTables) -> str:
    """The pytest module for one machine (formatted, deterministic)."""
    p = plan(tables)
    guard_names = sorted({name for name, _ in tables.guards})
    action_names = sorted({name for name, _ in tables.actions})
    rules = "\n".join(
        f"    @rule(held=HELD)\n"
        f"    def on_{event}(self, held: frozenset[str]) -> None:\n"
        f"        self.send({event!r}, held)\n"
        for event in tables.events
    )
    data = "\n".join(
        [
            f"MACHINE = {tables.name!r}",
            f"INITIAL = {tables.initial!r}",
            f"STATES = {tuple(s.name for s in tables.states)!r}",
            f"FINALS = frozenset({sorted(tables.finals)!r})",
            f"GUARDS = {tuple(guard_names)!r}",
            f"ACTIONS = {tuple(action_names)!r}",
            "# (state, event) -> the rows the runtime tries in order: (guard, target); a guard",
            "# of None always holds, 'else' holds when no named guard of the pair does.",
            f"ROWS: dict[tuple[str, str], list[tuple[str | None, str]]] = {p.rows!r}",
            f"IGNORED: dict[str, list[str]] = {p.ignored!r}",
            "# state -> the timer that takes an instance out of it first, and where to",
            f"EXITS: dict[str, tuple[str, str]] = {p.exits!r}",
            "# state -> how to get there from the initial state",
            f"PATHS: dict[str, list[tuple[str, str, str | None]]] = {p.paths!r}",
            f"TRANSITIONS = {p.transitions!r}",
            f"REJECTIONS = {p.rejections!r}",
            f"GUARDED_ONLY = {p.unguarded_misses!r}",
            _payload_source(tables),
        ]
    )
    return _TEMPLATE.format(
        name=tables.name,
        path=tables.source_path,
        module=tables.module,
        data=data,
        rules=rules,
    )


_TEMPLATE = '''"""Model-based tests of the {name} governor ({path}), written by `autonomic testgen`.

Regenerate them with `autonomic testgen {name}`; do not edit by hand.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from autonomic.generated import {module} as generated
from autonomic.runtime.errors import InvalidTransition, NoGuardHeld
from autonomic.runtime.runtime import Runtime
from autonomic.runtime.timers import VirtualClock
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

{data}

START_MS = 1_800_000_000_000
HELD = st.frozensets(st.sampled_from(GUARDS)) if GUARDS else st.just(frozenset[str]())


class Harness:
    """One runtime with the governor loaded: guards read a switchboard, actions do nothing."""

    def __init__(self) -> None:
        self.clock = VirtualClock(start_ms=START_MS)
        self.runtime = Runtime(clock=self.clock)
        self.held: frozenset[str] = frozenset()
        guards = {{name: self._guard(name) for name in GUARDS}}
        actions = {{name: self._action for name in ACTIONS}}
        self.governor = self.runtime.load(generated.MACHINE, guards, actions)
        self.events = 0

    def _guard(self, name: str) -> Any:
        return lambda context: name in self.held

    @staticmethod
    def _action(context: Any) -> None:
        return None

    def state(self, instance: str) -> str:
        record = self.governor.get(instance)
        assert record is not None
        return str(record.state)

    def version(self, instance: str) -> int:
        record = self.governor.get(instance)
        assert record is not None
        return record.version

    def send(self, instance: str, event: str, held: frozenset[str]) -> Any:
        self.held = held
        self.events += 1
        return self.governor.dispatch(
            instance, event, PAYLOADS[event], event_id=f"{{instance}}-{{self.events}}"
        )

    def fire_exit(self, instance: str) -> None:
        """Move the clock to the due time of the state's timed exit and fire what is due."""
        timer_id, _ = EXITS[self.state(instance)]
        due = [t.due_ms for t in self.governor.timers(instance) if t.timer_id == timer_id]
        assert due, f"timer {{timer_id}} is not armed"
        self.clock.set(max(due[0], self.clock.now_ms()))
        self.runtime.fire_due()

    def reach(self, instance: str, state: str) -> None:
        self.governor.create(instance)
        for kind, what, guard in PATHS[state]:
            if kind == "event":
                self.send(instance, what, frozenset([guard]) if guard else frozenset())
            else:
                self.fire_exit(instance)
        assert self.state(instance) == state


def expected(state: str, event: str, held: frozenset[str]) -> str | None:
    """Where the model says the event leads: a state, the same state if ignored, or None
    if the runtime must refuse it."""
    for guard, target in ROWS.get((state, event), ()):
        if guard is None or guard == "else" or guard in held:
            return target
    if event in IGNORED.get(state, ()):
        return state
    return None


@pytest.mark.parametrize(("source", "event", "guard", "target"), TRANSITIONS)
def test_transition(source: str, event: str, guard: str | None, target: str) -> None:
    harness = Harness()
    harness.reach("i", source)
    held = frozenset([guard]) if guard not in (None, "else") else frozenset[str]()
    result = harness.send("i", event, held)
    assert str(result.to_state) == target == harness.state("i")


@pytest.mark.parametrize("source", sorted(s for s in EXITS if s in PATHS))
def test_timed_exit(source: str) -> None:
    harness = Harness()
    harness.reach("i", source)
    harness.fire_exit("i")
    assert harness.state("i") == EXITS[source][1]


@pytest.mark.parametrize(("state", "event"), REJECTIONS)
def test_rejection(state: str, event: str) -> None:
    harness = Harness()
    harness.reach("i", state)
    version = harness.version("i")
    with pytest.raises(InvalidTransition):
        harness.send("i", event, frozenset(GUARDS))
    assert (harness.state("i"), harness.version("i")) == (state, version)


@pytest.mark.parametrize(("state", "event"), GUARDED_ONLY)
def test_no_guard_held(state: str, event: str) -> None:
    harness = Harness()
    harness.reach("i", state)
    with pytest.raises(NoGuardHeld):
        harness.send("i", event, frozenset())
    assert harness.state("i") == state


class {name}Model(RuleBasedStateMachine):
    """Random runs of events and timers against the model; the invariants are the
    machine's rules."""

    def __init__(self) -> None:
        super().__init__()
        self.harness = Harness()
        self.model = INITIAL
        self.version = 1
        self.ended: str | None = None

    @initialize()
    def create(self) -> None:
        self.harness.governor.create("i")

    def send(self, event: str, held: frozenset[str]) -> None:
        target = expected(self.model, event, held)
        before = self.harness.version("i")
        if target is None:
            with pytest.raises(InvalidTransition):
                self.harness.send("i", event, held)
            assert self.harness.version("i") == before  # a refused event changes nothing
            return
        result = self.harness.send("i", event, held)
        if not result.ignored:
            assert self.harness.version("i") == before + 1
        self.model = target

    @precondition(lambda self: self.model in EXITS)
    @rule()
    def timer(self) -> None:
        before = self.harness.version("i")
        self.harness.fire_exit("i")
        self.model = EXITS[self.model][1]
        assert self.harness.version("i") > before

{rules}
    @invariant()
    def in_step_with_the_model(self) -> None:
        assert self.harness.state("i") == self.model
        assert self.model in STATES
        # Versions only grow (notifications and retry attempts count as changes too).
        assert self.harness.version("i") >= self.version
        self.version = self.harness.version("i")

    @invariant()
    def a_final_state_is_never_left(self) -> None:
        if self.ended is not None:
            assert self.model == self.ended
        if self.model in FINALS:
            self.ended = self.model


test_{module}_model = {name}Model.TestCase
test_{module}_model.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)
'''


# ---------------------------------------------------------------- transition coverage


def coverage_report(machines: Sequence[MachineTables], taken: Iterable[Sequence[str]]) -> str:
    """Which transitions and timed exits of each machine a test run took (from the records
    of runtime.transition_coverage: machine, from, event, to)."""
    seen = {tuple(row) for row in taken}
    out = []
    for tables in machines:
        p = plan(tables)
        events = set(tables.events)
        moves = {(m, a, b) for m, a, e, b in seen if m == tables.name and e not in events}
        items = [
            (
                f"{source} --{event}{f' [{guard}]' if guard else ''}--> {target}",
                (tables.name, source, event, target) in seen,
            )
            for source, event, guard, target in p.transitions
        ]
        items += [
            (f"{source} --after {tid}--> {target}", (tables.name, source, target) in moves)
            for source, (tid, target) in sorted(p.exits.items())
        ]
        done = sum(1 for _, hit in items if hit)
        share = 100 * done // len(items) if items else 100
        out.append(f"{tables.name}: {done} of {len(items)} transitions exercised ({share}%)")
        out.extend(f"  not exercised: {text}" for text, hit in items if not hit)
    return "\n".join(out) + "\n"
