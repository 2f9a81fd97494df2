"""The checker: one small function per rule, each reporting every offender, and the driver
that reads files, runs the rules and applies `@allow` suppressions."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import keyword
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter
from pathlib import Path

from .data_checks import check_data_fields, check_emit_targets, check_keeps
from .emit_args import emit_payload_findings
from .errors import CODES, Diagnostic, Severity, SourceSpan, did_you_mean, fail, related
from .explain import format_duration
from .graph import (
    RetryEdge,
    closure,
    declared_only,
    machine_timer_moves,
    predecessors,
    retry_edges,
    state_moves,
    written_moves,
)
from .lower import emit_refs, name_problem, named_things, run_actions
from .model import (
    Delay,
    Duration,
    EmitValue,
    Entry,
    Escalation,
    Event,
    EventRef,
    Field,
    Flow,
    Group,
    Ignore,
    Machine,
    MachineTimer,
    Name,
    Policy,
    PolicyBreaker,
    PolicyBulkhead,
    PolicyFallback,
    PolicyRetry,
    RetryLadder,
    Setting,
    State,
    Suppression,
    Timer,
    Transition,
    snake_case,
)
from .parser import (
    Recovery,
    SourceFile,
    parse_file_recovering,
    parse_source,
    paused_gc,
    read_source,
)
from .refusal_checks import check_refusals

# ---------------------------------------------------------------- the report


@dataclass
class CheckReport:
    """Everything one `check` run found, ready for a renderer."""

    sources: dict[str, SourceFile]
    machines: list[Machine]
    diagnostics: list[Diagnostic]
    # Machines that emits name, found beside the checked files but not checked themselves.
    known: list[Machine] = dataclasses.field(default_factory=list)
    flows: list[Flow] = dataclasses.field(default_factory=list)

    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.ERROR]

    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.WARNING]

    def failed(self, strict: bool) -> bool:
        return bool(self.errors()) or (strict and bool(self.warnings()))


# ---------------------------------------------------------------- what the rules share


class _TransitionWalk:
    """What MachineFacts learns in its one walk over all transitions."""

    def __init__(self) -> None:
        self.events: set[str] = set()  # the event names they use
        # States where rows of one event could disagree: two rows for one event, or `else`.
        self.contested: list[State] = []
        # By state id: the rows that carry an `@allow`, and the rows that emit.
        self.noted: dict[int, list[Transition]] = {}
        self.emitting: dict[int, list[Transition]] = {}
        self.emitters: list[State] = []  # the states with rows that emit
        self.keeping: list[tuple[State, list[Transition]]] = []  # rows that `keep`
        self.moves: dict[int, set[str]] = {}  # by state id: graph.state_moves


class MachineFacts:
    """Indexes of one machine, built once and shared by every rule."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.states: dict[str, State] = {}
        # The few states that rules about markers, timers and ignores look at, in order.
        self.initials: list[State] = []
        self.finals: list[State] = []
        self.timed: list[State] = []  # with timers or escalations
        self.ignoring: list[State] = []
        self.entered: list[State] = []  # with entry actions or emits
        for state in machine.states:
            self.states.setdefault(state.name.value, state)
            if state.initial:
                self.initials.append(state)
            if state.final:
                self.finals.append(state)
            if state.timers or state.escalations:
                self.timed.append(state)
            if state.ignores:
                self.ignoring.append(state)
            if state.entries:
                self.entered.append(state)
        self.events: dict[str, Event] = {}
        for event in machine.events:
            self.events.setdefault(event.name.value, event)
        self.retry_edges = [edge for ladder in machine.retries for edge in retry_edges(ladder)]

    @cached_property
    def state_refs(self) -> list[tuple[Name, str]]:
        """Every name that must be a declared state, with what it is used as."""
        refs: list[tuple[Name, str]] = []
        for state in self.machine.states:
            refs.extend((t.target, "transition target") for t in state.transitions)
            refs.extend((t.target, "timer target") for t in state.timers if t.target is not None)
            for escalation in state.escalations:
                if escalation.end is not None:
                    refs.append((escalation.end.target, "escalation end"))
        for ladder in self.machine.retries:
            refs.extend((entry, "retry entry state") for entry in ladder.entry_states)
            refs.extend((step.state, "retry step state") for step in ladder.steps)
            refs.extend(
                (step.attempt, "retry attempt state")
                for step in ladder.steps
                if step.attempt is not None
            )
            if ladder.exhausted is not None:
                refs.append((ladder.exhausted.target, "retry exhausted target"))
        for group in self.machine.groups:
            refs.extend((name, f"member of group '{group.name.value}'") for name in group.states)
        for timer in self.machine.machine_timers:
            refs.append((timer.target, "timer target"))
        for always in self.machine.always:
            refs.extend((name, "`always accept` exception") for name in always.exceptions)
        return refs

    @cached_property
    def event_refs(self) -> list[tuple[Name, str]]:
        """Every name that must be a declared event of this machine."""
        refs: list[tuple[Name, str]] = []
        for state in self.machine.states:
            refs.extend((t.event, "transition") for t in state.transitions)
            refs.extend((name, "ignore") for i in state.ignores for name in i.events)
        refs.extend((ladder.event, "retry ladder") for ladder in self.machine.retries)
        refs.extend((always.event, "always accept") for always in self.machine.always)
        return refs

    @cached_property
    def written_moves(self) -> dict[str, set[str]]:
        """Each declared state with the state names its moves lead to, declared or not."""
        walk = self._walk
        return written_moves(self.machine, lambda state: walk.moves[id(state)])

    @cached_property
    def _walk(self) -> _TransitionWalk:
        """One walk over the transitions of every state, which are most of a machine (each
        state's rows are looked at while they are in the cache)."""
        walk = _TransitionWalk()
        for state in self.machine.states:
            walk.moves[id(state)] = state_moves(state)
            rows = state.transitions
            if not rows:
                continue
            state_events = {row.event.value for row in rows}
            walk.events |= state_events
            guards = [row.guard for row in rows if row.guard is not None]
            if len(state_events) < len(rows) or any(guard.name is None for guard in guards):
                walk.contested.append(state)
            if noted := [row for row in rows if row.suppressions]:
                walk.noted[id(state)] = noted
            if emitting := [row for row in rows if row.emits]:
                walk.emitting[id(state)] = emitting
                walk.emitters.append(state)
            if keeping := [row for row in rows if row.keeps]:
                walk.keeping.append((state, keeping))
        return walk

    @cached_property
    def transition_events(self) -> set[str]:
        """The names of the events of all transitions."""
        return self._walk.events

    def noted_rows(self, state: State) -> Sequence[Transition]:
        """The transitions of `state` (one of this machine's) that carry an `@allow`."""
        return self._walk.noted.get(id(state), ())

    def emitting_rows(self, state: State) -> Sequence[Transition]:
        """The transitions of `state` (one of this machine's) that emit events."""
        return self._walk.emitting.get(id(state), ())

    @property
    def emitting_states(self) -> Sequence[State]:
        """The states with transitions that emit events, in declaration order."""
        return self._walk.emitters

    @property
    def keeping_rows(self) -> Sequence[tuple[State, list[Transition]]]:
        """Each state with transitions that `keep` data fields, with those transitions."""
        return self._walk.keeping

    @cached_property
    def unknown_state_names(self) -> set[str]:
        """Names used as states but not declared: E104 looks closer only if there are any."""
        used: set[str] = set().union(*self.written_moves.values())
        for ladder in self.machine.retries:
            used.update(entry.value for entry in ladder.entry_states)
            used.update(step.state.value for step in ladder.steps)
            used.update(step.attempt.value for step in ladder.steps if step.attempt is not None)
            if ladder.exhausted is not None:
                used.add(ladder.exhausted.target.value)
        for group in self.machine.groups:
            used.update(name.value for name in group.states)
        for always in self.machine.always:
            used.update(name.value for name in always.exceptions)
        return used - self.states.keys()

    @cached_property
    def unknown_event_names(self) -> set[str]:
        """Names used as events of this machine but not declared (see `event_refs`)."""
        used = set(self.transition_events)
        for state in self.ignoring:
            for ignore in state.ignores:
                used.update(name.value for name in ignore.events)
        used.update(ladder.event.value for ladder in self.machine.retries)
        used.update(always.event.value for always in self.machine.always)
        return used - self.events.keys()

    @cached_property
    def transition_groups(self) -> list[tuple[State, str, list[Transition]]]:
        """(state, event, rows) wherever the rows of one state and event could disagree: two
        or more rows, or a lone `else`. Single plain rows, nearly all of them, need no rule."""
        groups: list[tuple[State, str, list[Transition]]] = []
        for state in self._walk.contested:
            by_event: dict[str, list[Transition]] = {}
            for transition in state.transitions:
                by_event.setdefault(transition.event.value, []).append(transition)
            for event, rows in by_event.items():
                if len(rows) > 1 or _guard_key(rows[0]) == "else":
                    groups.append((state, event, rows))
        return groups

    @cached_property
    def distinct_groups(self) -> list[tuple[State, str, list[Transition]]]:
        """`transition_groups` with exact repeats dropped from the rows (see `_distinct`)."""
        return [(state, event, _distinct(rows)) for state, event, rows in self.transition_groups]

    @cached_property
    def successors(self) -> dict[str, set[str]]:
        """`moves` as plain sets, which is what the rules walk. A move to an unknown name
        (E104's) counts as a move to the state it misspells, if one is close, so that the
        typo does not also make that state unreachable."""
        moves = declared_only(self.written_moves)
        for name in self.unknown_state_names:
            guess = self.state_guesses.get(name)
            if guess is None:
                continue
            for source, targets in self.written_moves.items():
                if name in targets:
                    moves[source].add(guess)
        return moves

    @cached_property
    def state_guesses(self) -> dict[str, str]:
        """Each unknown state name with the declared state it most likely misspells."""
        guesses: dict[str, str] = {}
        for name in self.unknown_state_names:
            matches = difflib.get_close_matches(name, list(self.states), n=1, cutoff=0.6)
            if matches:
                guesses[name] = matches[0]
        return guesses

    @cached_property
    def lost_moves(self) -> set[str]:
        """States with a move to an unknown name that misspells no state: where it leads is
        unknown, so the graph rules assume nothing about it (no dead end, may finish)."""
        lost = self.unknown_state_names - self.state_guesses.keys()
        if not lost:
            return set()
        return {source for source, targets in self.written_moves.items() if targets & lost}

    @cached_property
    def move_sites(self) -> dict[str, list[tuple[str, Name]]]:
        """By target name as written: (source state, the written target) of every move."""
        sites: dict[str, list[tuple[str, Name]]] = defaultdict(list)
        for state in self.machine.states:
            source = state.name.value
            for row in state.transitions:
                sites[row.target.value].append((source, row.target))
            for timer in state.timers:
                if timer.target is not None:
                    sites[timer.target.value].append((source, timer.target))
            for escalation in state.escalations:
                if escalation.end is not None:
                    sites[escalation.end.target.value].append((source, escalation.end.target))
        for edge in self.retry_edges:
            sites[edge.target.value].append((edge.source.value, edge.target))
        for source, target in machine_timer_moves(self.machine):
            sites[target.value].append((source, target))
        return sites

    @cached_property
    def initial(self) -> State | None:
        return self.initials[0] if self.initials else None

    @cached_property
    def reachable(self) -> set[str]:
        """States some sequence of moves leads to from an initial state (every state marked
        initial counts, so a second one is E102's alone, not also unreachable)."""
        found: set[str] = set()
        for state in self.initials:
            if state.name.value not in found:
                found |= closure(self.successors, [state.name.value])
        return found

    @cached_property
    def final_names(self) -> set[str]:
        return {name for name, state in self.states.items() if state.final}

    @cached_property
    def end_names(self) -> set[str]:
        """Where an instance may validly stop: final states, and resting states (which
        can also be left)."""
        return {name for name, state in self.states.items() if state.final or state.resting}

    @cached_property
    def suppression_sites(self) -> list[tuple[Suppression, SourceSpan | None]]:
        return list(_suppression_sites(self.machine, self.noted_rows))


def _at(span: SourceSpan) -> str:
    return f"line {span.line}"


_UNIT_MILLIS = {"w": 604_800_000, "d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}


def _duration_text(millis: int, like: Duration | None = None) -> str:
    """`millis` written in the smallest unit of `like` when it divides evenly, else as a
    compound duration (1d12h)."""
    if like is not None:
        unit = like.text.rstrip("0123456789").lstrip("0123456789")
        unit = unit[-2:] if unit.endswith("ms") else unit[-1:]
        size = _UNIT_MILLIS.get(unit, 1)
        if millis % size == 0 and unit != "w":
            return f"{millis // size}{unit}"
    return duration_text(millis)


def duration_text(millis: int) -> str:
    """The shortest compound text of a duration: 36h -> 1d12h, 0 -> 0s."""
    parts = []
    rest = millis
    for unit, size in _UNIT_MILLIS.items():
        if unit == "w" and rest % size:
            continue  # 10d reads better than 1w3d
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _guard_key(transition: Transition) -> str | None:
    """None for an unguarded row, "else" for the default branch, else `when NAME`."""
    if transition.guard is None:
        return None
    if transition.guard.name is None:
        return "else"
    return "when " + transition.guard.name.value


def _distinct(rows: list[Transition]) -> list[Transition]:
    """Rows minus exact repeats (those are E107's), so each mistake is reported once."""
    seen: set[tuple[str | None, str]] = set()
    kept = []
    for row in rows:
        key = (_guard_key(row), row.target.value)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def _escalation_span(escalation: Escalation) -> SourceSpan:
    """Its name, else its first time; its own span may start at an `@allow`."""
    if escalation.name is not None:
        return escalation.name.span
    if escalation.steps:
        return escalation.steps[0].after.span
    return escalation.end.after.span if escalation.end is not None else escalation.span


# ---------------------------------------------------------------- rules: declarations


def check_initial_state(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E101 no initial state, E102 more than one."""
    machine = facts.machine
    initials = facts.initials
    if not initials:
        yield fail(
            "E101",
            f"machine '{machine.name.value}' has no initial state",
            machine.name.span,
            "mark the state every instance starts in: `initial state Name`",
        )
    for extra in initials[1:]:
        first = initials[0]
        yield fail(
            "E102",
            f"state '{extra.name.value}' is a second initial state",
            extra.name.span,
            f"'{first.name.value}' ({_at(first.name.span)}) is already initial; keep one",
        )


def check_duplicate_states(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E103."""
    if len(facts.states) == len(facts.machine.states):
        return
    for state in facts.machine.states:
        first = facts.states[state.name.value]
        if first is not state:
            yield fail(
                "E103",
                f"state '{state.name.value}' is declared twice",
                state.name.span,
                f"first declared at {_at(first.name.span)}; merge the two or rename one",
                [related(first.name.span, "first declared here")],
            )


def check_duplicate_events(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E105."""
    if len(facts.events) == len(facts.machine.events):
        return
    for event in facts.machine.events:
        first = facts.events[event.name.value]
        if first is not event:
            yield fail(
                "E105",
                f"event '{event.name.value}' is declared twice",
                event.name.span,
                f"first declared at {_at(first.name.span)}; merge the two or rename one",
                [related(first.name.span, "first declared here")],
            )


def check_duplicate_fields(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E113 within one event's payload."""
    for event in facts.machine.events:
        seen: dict[str, Name] = {}
        for field in event.fields:
            first = seen.setdefault(field.name.value, field.name)
            if first is not field.name:
                yield fail(
                    "E113",
                    f"event '{event.name.value}' has two fields named '{field.name.value}'",
                    field.name.span,
                    f"first declared at {_at(first.span)}; rename or remove one",
                )


def check_duplicate_literals(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E117 within one enum(...) type."""
    for event in facts.machine.events:
        for field in event.fields:
            seen: dict[str, Name] = {}
            for literal in field.type.literals:
                first = seen.setdefault(literal.value, literal)
                if first is not literal:
                    yield fail(
                        "E117",
                        f"enum literal '{literal.value}' of field '{field.name.value}' "
                        "is listed twice",
                        literal.span,
                        f"first listed at {_at(first.span)}; remove one",
                    )


def check_initial_and_final(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E116."""
    for state in facts.initials:
        if state.final:
            yield fail(
                "E116",
                f"state '{state.name.value}' is both initial and final",
                state.name.span,
                "an instance would be finished before it starts; drop one of the markers",
            )


def check_timers(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E115: zero durations anywhere, and two timers of one state due at the same moment."""
    timed = facts.timed
    durations: list[tuple[Duration, str]] = []
    for state in timed:
        durations.extend((t.after, "timer") for t in state.timers if t.delay is None)
        for escalation in state.escalations:
            # A step at 0 fires on entry (the first page of an on-call ladder).
            for step in escalation.steps:
                if step.within is not None:
                    durations.append((step.within, "escalation deadline"))
                if step.repeat is not None:
                    durations.append((step.repeat.every, "repeat interval"))
            if escalation.end is not None:
                durations.append((escalation.end.after, "escalation end"))
    for ladder in facts.machine.retries:
        durations.extend((retry.after, "retry step") for retry in ladder.steps)
        durations.extend(
            (retry.repeat.every, "repeat interval") for retry in ladder.steps if retry.repeat
        )
        durations.extend(
            (retry.timeout, "attempt timeout") for retry in ladder.steps if retry.timeout
        )
    durations.extend((t.after, "timer") for t in facts.machine.machine_timers if t.delay is None)
    for duration, what in durations:
        if duration.millis == 0:
            yield fail(
                "E115",
                f"{what} of zero duration ({duration.text})",
                duration.span,
                "a timer fires after a positive duration; for an immediate move use a transition",
            )

    # Timers that move or act; escalation notifications may share a moment with them.
    acting: dict[str, list[tuple[Duration, str]]] = defaultdict(list)
    for state in timed:
        name = state.name.value
        acting[name].extend((t.after, "timer") for t in state.timers if t.delay is None)
        acting[name].extend(
            (e.end.after, "escalation end") for e in state.escalations if e.end is not None
        )
    for ladder in facts.machine.retries:
        for retry in ladder.steps:
            acting[retry.state.value].append((retry.after, f"retry step of '{ladder.name.value}'"))
    for state_name, timers in acting.items():
        seen: dict[int, Duration] = {}
        for duration, what in sorted(timers, key=lambda t: t[0].span.sort_key()):
            if duration.millis == 0:
                continue
            first = seen.setdefault(duration.millis, duration)
            if first is not duration:
                yield fail(
                    "E115",
                    f"{what} in state '{state_name}' fires at {duration.text}, "
                    "like another timer of that state",
                    duration.span,
                    f"the other one is at {_at(first.span)}; two timers due at once "
                    "race, so merge them or change one duration",
                    [related(first.span, "the other timer due at that moment")],
                )


def check_shadowed_timers(facts: MachineFacts) -> Iterator[Diagnostic]:
    """W208: a timer of a state that a shorter timer moving out of the state always beats."""
    due: dict[str, list[tuple[Duration, str, bool]]] = defaultdict(list)
    for state in facts.timed:
        name = state.name.value
        for timer in state.timers:
            if timer.delay is None:
                due[name].append((timer.after, "timer", timer.target is not None))
        for escalation in state.escalations:
            times = [step.after.millis for step in escalation.steps]
            if escalation.end is not None:
                times.append(escalation.end.after.millis)
            if any(later <= earlier for earlier, later in itertools.pairwise(times)):
                continue  # out of order: E120's, whose fix decides what fires
            for step in escalation.steps:
                due[name].append((step.after, "escalation step", False))
            if escalation.end is not None:
                due[name].append((escalation.end.after, "escalation end", True))
    for ladder in facts.machine.retries:
        for retry in ladder.steps:
            due[retry.state.value].append(
                (retry.after, f"retry step of '{ladder.name.value}'", False)
            )
    for state_name, timers in due.items():
        moving = [after for after, _, moves in timers if moves and after.millis > 0]
        if not moving:
            continue
        first = min(moving, key=lambda after: after.millis)
        for after, what, _ in timers:
            if after.millis > first.millis:
                yield fail(
                    "W208",
                    f"{what} at {after.text} in state '{state_name}' can never fire: "
                    f"the timer at {first.text} always leaves the state first",
                    after.span,
                    f"shorten it below {first.text}, or lengthen or remove the earlier timer",
                    [related(first.span, f"this timer leaves '{state_name}' at {first.text}")],
                )


# ---------------------------------------------------------------- rules: data, groups, entries


def check_resting_and_entry(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E116 a state both final and resting; E111 entry actions of a final state."""
    for state in facts.finals:
        if state.resting:
            yield fail(
                "E116",
                f"state '{state.name.value}' is both final and resting",
                state.name.span,
                "final ends the instance; resting is a place to stop that can be left: keep one",
            )
        for entry in state.entries:
            yield fail(
                "E111",
                f"final state '{state.name.value}' has entry actions",
                entry.span,
                "a final state ends the instance; run the actions on the rows into it",
            )


def check_delays(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E144: `after event.F` needs F, a required duration, in the event of every row into the
    state, and no way in without an event (creation, timers, ladders). E145: `after setting
    S` needs a declared setting."""
    settings = {setting.name.value for setting in facts.machine.settings}
    delayed: list[tuple[str, Timer | None, Delay]] = []
    for state in facts.timed:
        delayed.extend((state.name.value, t, t.delay) for t in state.timers if t.delay)
    for mtimer in facts.machine.machine_timers:
        if mtimer.delay is not None:
            delayed.append(("", None, mtimer.delay))
    for state_name, timer, delay in delayed:
        if delay.kind == "setting":
            if delay.name.value not in settings:
                yield fail(
                    "E145",
                    f"unknown setting '{delay.name.value}'",
                    delay.name.span,
                    did_you_mean(delay.name.value, settings)
                    or f"declare it: setting {delay.name.value} between 1h and 30d",
                )
            continue
        if timer is None:
            yield fail(
                "E144",
                f"a group or creation timer has no entering event to take "
                f"'{delay.name.value}' from",
                delay.span,
                "use a fixed duration or a setting",
            )
            continue
        yield from _field_delay_findings(facts, state_name, delay)


def _field_delay_findings(facts: MachineFacts, state: str, delay: Delay) -> Iterator[Diagnostic]:
    field = delay.name.value
    shown = f"event.{field}"
    if facts.initial is not None and facts.initial.name.value == state:
        yield fail(
            "E144",
            f"'{state}' is the initial state: creation has no event to take {shown} from",
            delay.span,
            "use a fixed duration or a setting, or time it in a state entered by an event",
        )
    for other in facts.machine.states:
        for row in other.transitions:
            if row.target.value != state:
                continue
            event = facts.events.get(row.event.value)
            if event is None:
                continue  # E106
            found = next((f for f in event.fields if f.name.value == field), None)
            if found is None or found.type.kind != "duration" or found.type.optional:
                why = (
                    "has no field of that name"
                    if found is None
                    else "declares it optional"
                    if found.type.kind == "duration"
                    else f"declares it {found.type.kind}"
                )
                yield fail(
                    "E144",
                    f"{shown}: event '{row.event.value}', which enters '{state}', {why}",
                    delay.span,
                    f"declare `{field}: duration` in event '{row.event.value}'",
                    [related(row.event.span, f"'{row.event.value}' enters '{state}' here")],
                )
    for source, target in _timed_ways_in(facts):
        if target.value == state:
            yield fail(
                "E144",
                f"{shown}: '{state}' is also entered by a timer or ladder, without an event",
                delay.span,
                "enter the state only by events that carry the duration",
                [related(target.span, f"entered from '{source}' here without an event")],
            )


def _timed_ways_in(facts: MachineFacts) -> Iterator[tuple[str, Name]]:
    """Moves that enter a state without an event: timers, escalation ends, ladder timers."""
    for state in facts.timed:
        for timer in state.timers:
            if timer.target is not None:
                yield state.name.value, timer.target
        for escalation in state.escalations:
            if escalation.end is not None:
                yield state.name.value, escalation.end.target
    for edge in facts.retry_edges:
        if not edge.by_event:
            yield edge.source.value, edge.target
    yield from machine_timer_moves(facts.machine)


def check_settings_and_groups(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E145: settings with sensible bounds, declared once; groups declared once, of
    distinct non-final states, and group timers naming a declared group."""
    seen: dict[str, Name] = {}
    for setting in facts.machine.settings:
        first = seen.setdefault(setting.name.value, setting.name)
        if first is not setting.name:
            yield fail(
                "E145",
                f"setting '{setting.name.value}' is declared twice",
                setting.name.span,
                "declare each setting once",
                [related(first.span, "first declared here")],
            )
        if setting.low.millis <= 0 or setting.high.millis < setting.low.millis:
            yield fail(
                "E145",
                f"setting '{setting.name.value}' has bounds {setting.low.text} to "
                f"{setting.high.text}",
                setting.high.span if setting.low.millis > 0 else setting.low.span,
                "the lower bound is positive and not above the upper one",
            )
    groups: dict[str, Name] = {}
    for group in facts.machine.groups:
        first = groups.setdefault(group.name.value, group.name)
        if first is not group.name:
            yield fail(
                "E145",
                f"group '{group.name.value}' is declared twice",
                group.name.span,
                "declare each group once",
                [related(first.span, "first declared here")],
            )
        members: dict[str, Name] = {}
        for member in group.states:
            if members.setdefault(member.value, member) is not member:
                yield fail(
                    "E145",
                    f"state '{member.value}' is listed twice in group '{group.name.value}'",
                    member.span,
                    "list each state once",
                )
            elif member.value in facts.final_names:
                yield fail(
                    "E145",
                    f"final state '{member.value}' is in group '{group.name.value}'",
                    member.span,
                    "a group timer runs while the instance lives; leave final states out",
                )
    for timer in facts.machine.machine_timers:
        if timer.group is not None and timer.group.value not in groups:
            yield fail(
                "E145",
                f"unknown group '{timer.group.value}'",
                timer.group.span,
                did_you_mean(timer.group.value, groups)
                or f"declare it: group {timer.group.value} {{ StateA, StateB }}",
            )


def check_retry_attempts(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E122: an attempt state is its own (not an entry, a step or another attempt, not
    final); E119: a ladder makes no more attempts than its cap."""
    for ladder in facts.machine.retries:
        label = f"retry ladder '{ladder.name.value}'"
        taken = {n.value for n in ladder.entry_states} | {s.state.value for s in ladder.steps}
        attempts: set[str] = set()
        for step in ladder.steps:
            if step.attempt is None:
                continue
            name = step.attempt.value
            if name in taken or name in attempts:
                yield fail(
                    "E122",
                    f"attempt state '{name}' of {label} is already used by the ladder",
                    step.attempt.span,
                    "an attempt in flight needs a state of its own",
                )
            elif name in facts.final_names:
                yield fail(
                    "E122",
                    f"attempt state '{name}' of {label} is final",
                    step.attempt.span,
                    "an attempt waits for its answer; it cannot be final",
                )
            attempts.add(name)
        yield from _repeats_in_flight(ladder, label)
        made = list(itertools.accumulate(step.attempts for step in ladder.steps))
        if (
            ladder.cap is not None
            and ladder.cap_span is not None
            and made
            and made[-1] > ladder.cap
        ):
            over = next(i for i, total in enumerate(made) if total > ladder.cap)
            yield fail(
                "E119",
                f"{label} makes {made[-1]} attempts"
                + (" (repeats counted)" if made[-1] != len(ladder.steps) else "")
                + f", more than its cap of {ladder.cap}",
                ladder.cap_span,
                "remove steps or repeats, or raise the cap",
                [related(ladder.steps[over].span, "the first step over the cap")],
            )


def _repeats_in_flight(ladder: RetryLadder, label: str) -> Iterator[Diagnostic]:
    """E120: with an attempt state, a step's repeats come before its attempt's timeout (they
    are made while the attempt is in flight, measured from its start)."""
    for number, step in enumerate(ladder.steps, start=1):
        repeat, timeout = step.repeat, step.timeout
        if repeat is None or timeout is None or step.attempt is None:
            continue
        last = (repeat.count - 1) * repeat.every.millis
        if last >= timeout.millis:
            yield fail(
                "E120",
                f"step {number} of {label} repeats its attempt until "
                f"{format_duration(last)} after it starts, not before its timeout {timeout.text}",
                repeat.span,
                "an unanswered attempt fails at its timeout: repeat fewer times or more often, "
                "or lengthen the timeout",
                [related(timeout.span, "the attempt's timeout")],
            )


# ---------------------------------------------------------------- rules: references


def check_unknown_states(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E104, with a did-you-mean hint."""
    if not facts.unknown_state_names:
        return
    for name, what in facts.state_refs:
        if name.value not in facts.states:
            yield fail(
                "E104",
                f"unknown state '{name.value}' ({what})",
                name.span,
                did_you_mean(name.value, facts.states)
                or f"declare it with `state {name.value}` or use a declared state",
            )


def check_unknown_events(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E106, with a did-you-mean hint."""
    if not facts.unknown_event_names:
        return
    for name, what in facts.event_refs:
        if name.value not in facts.events:
            yield fail(
                "E106",
                f"unknown event '{name.value}' ({what})",
                name.span,
                did_you_mean(name.value, facts.events)
                or f"declare it with `event {name.value}` or use a declared event",
            )


def check_unhandled_events(facts: MachineFacts) -> Iterator[Diagnostic]:
    """W204: an event no state moves on (being ignored everywhere is not handling)."""
    handled = set(facts.transition_events)
    handled.update(edge.ladder.event.value for edge in facts.retry_edges)
    # A row on a misspelt event (E106's) handles the event it misspells: no echo of it here.
    for name in facts.unknown_event_names & handled:
        handled.update(difflib.get_close_matches(name, list(facts.events), n=1, cutoff=0.6))
    ignored = {n.value for state in facts.ignoring for i in state.ignores for n in i.events}
    for event in facts.events.values():
        name = event.name.value
        if name not in handled:
            only = " (it is only ever ignored)" if name in ignored else ""
            yield fail(
                "W204",
                f"event '{name}' is declared but no state handles it{only}",
                event.name.span,
                f"add `on {name} -> State` where it should act, or remove the event",
            )


def check_emitted_events(
    facts: Sequence[MachineFacts], directory: Mapping[str, Machine]
) -> Iterator[Diagnostic]:
    """E140: `emit Machine.Event` must name a machine that is checked or beside the file,
    and one of its declared events; a bare `emit Event` means this machine."""
    for fact in facts:
        for ref in emit_refs(fact.machine, fact.emitting_rows):
            target = fact.machine if ref.machine is None else directory.get(ref.machine.value)
            if target is None:
                assert ref.machine is not None
                yield fail(
                    "E140",
                    f"emit to unknown machine '{ref.machine.value}'",
                    ref.machine.span,
                    did_you_mean(ref.machine.value, directory)
                    or "machines are looked up among the checked files "
                    "and the .fsm files beside this one",
                )
                continue
            events = [e.name.value for e in target.events]
            if ref.event.value not in events:
                yield fail(
                    "E140",
                    f"machine '{target.name.value}' has no event '{ref.event.value}'",
                    ref.event.span,
                    did_you_mean(ref.event.value, events)
                    or f"declare `event {ref.event.value}` in {target.path}",
                )


def check_emit_payloads(
    facts: Sequence[MachineFacts], directory: Mapping[str, Machine]
) -> Iterator[Diagnostic]:
    """E141, E142, E143: an emit's arguments, with the target fields that the causing event's
    same-named fields fill in, supply every required field of the target event, name only
    fields and references that exist, and fit the target fields' types. Timers and
    escalation ends have no causing event; a retry ladder's `exhausted` has the ladder's."""
    for fact in facts:
        data = {f.name.value: f for f in fact.machine.data}
        for ref, cause in _emit_sites(fact.machine, fact.emitting_rows):
            machine = fact.machine if ref.machine is None else directory.get(ref.machine.value)
            target = None if machine is None else _event_named(machine, ref.event.value)
            if target is None:
                continue  # E140
            causing: dict[str, Field] = {}
            if cause is not None:
                event = fact.events.get(cause.value)
                if event is None:
                    continue  # E106
                causing = {f.name.value: f for f in event.fields}
            yield from emit_payload_findings(
                ref, target, causing, has_cause=cause is not None, data=data
            )
            notice = ref.refused
            own = notice is not None and (
                notice.machine is None or notice.machine.value == fact.machine.name.value
            )
            if notice is not None and own:
                told = fact.events.get(notice.event.value)
                if told is not None:  # else E150
                    has_cause = cause is not None
                    yield from emit_payload_findings(
                        notice, told, causing, has_cause=has_cause, notice=True, data=data
                    )


def _event_named(machine: Machine, name: str) -> Event | None:
    return next((e for e in machine.events if e.name.value == name), None)


def _emit_sites(
    machine: Machine, emitting_rows: Callable[[State], Sequence[Transition]]
) -> Iterator[tuple[EventRef, Name | None]]:
    """Every `emit` with the event that causes it (None: a timer or escalation end)."""
    for state in machine.states:
        for transition in emitting_rows(state):
            for ref in transition.emits:
                yield ref, transition.event
        for timer in state.timers:
            for ref in timer.emits:
                yield ref, None
        for escalation in state.escalations:
            if escalation.end is not None:
                for ref in escalation.end.emits:
                    yield ref, None
        for entry in state.entries:
            for ref in entry.emits:
                yield ref, None
    for mtimer in machine.machine_timers:
        for ref in mtimer.emits:
            yield ref, None
    for ladder in machine.retries:
        if ladder.exhausted is not None:
            for ref in ladder.exhausted.emits:
                yield ref, ladder.event
                if ladder.steps and ladder.steps[-1].timeout is not None:
                    # An attempt that times out is exhausted without a failure event.
                    yield ref, None


# ---------------------------------------------------------------- rules: transitions


def check_duplicate_transitions(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E107: the same state, event, guard and target written twice."""
    for state, _, rows in facts.transition_groups:
        seen: dict[tuple[str | None, str], Transition] = {}
        for row in rows:
            first = seen.setdefault((_guard_key(row), row.target.value), row)
            if first is not row:
                yield fail(
                    "E107",
                    f"transition on '{row.event.value}' -> '{row.target.value}' "
                    f"in state '{state.name.value}' is written twice",
                    row.event.span,
                    f"the same row is at {_at(first.event.span)}; delete one",
                )


def check_nondeterminism(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E108: one state and event, the same guard (or none), different targets."""
    for state, event, distinct in facts.distinct_groups:
        first_by_guard: dict[str | None, Transition] = {}
        for row in distinct:
            guard = _guard_key(row)
            if guard == "else":
                continue  # several `else` rows are E110's
            first = first_by_guard.setdefault(guard, row)
            if first is not row:
                how = "unguarded" if guard is None else f"both `{guard}`"
                yield fail(
                    "E108",
                    f"state '{state.name.value}' moves on '{event}' to both "
                    f"'{first.target.value}' ({_at(first.event.span)}) and "
                    f"'{row.target.value}' ({how})",
                    row.event.span,
                    "give each row its own `when guard` and one `else`, or remove one",
                    [related(first.event.span, "the competing row")],
                )


def check_retry_collisions(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E108: a retry ladder already decides what its event does in its states."""
    lowered: dict[tuple[str, str], RetryEdge] = {}
    for edge in facts.retry_edges:
        if not edge.by_event:
            continue  # a ladder's timer moves; the event is not taken there
        key = (edge.source.value, edge.ladder.event.value)
        first = lowered.setdefault(key, edge)
        if first is not edge and first.ladder is not edge.ladder:
            yield fail(
                "E108",
                f"retry ladders '{first.ladder.name.value}' and '{edge.ladder.name.value}' "
                f"both move state '{edge.source.value}' on '{key[1]}'",
                edge.origin,
                f"'{first.ladder.name.value}' is at {_at(first.ladder.span)}; "
                "a state can be in one ladder per event",
            )
    if not lowered:
        return
    for state in facts.machine.states:
        for row in state.transitions:
            ladder_edge = lowered.get((state.name.value, row.event.value))
            if ladder_edge is None:
                continue
            ladder = ladder_edge.ladder
            yield fail(
                "E108",
                f"retry ladder '{ladder.name.value}' already moves state "
                f"'{state.name.value}' on '{row.event.value}' to '{ladder_edge.target.value}'",
                row.event.span,
                f"the ladder is at {_at(ladder.span)}; remove this row "
                "or take the state out of the ladder",
            )


def check_unguarded_beside_guarded(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E109: intent must be written down with `else`."""
    for state, event, distinct in facts.distinct_groups:
        if not any(row.guard is not None for row in distinct):
            continue
        for row in distinct:
            if row.guard is None:
                yield fail(
                    "E109",
                    f"unguarded transition on '{event}' in state '{state.name.value}' "
                    "beside guarded ones",
                    row.event.span,
                    "make it the default branch with `else`, or give it a `when guard`",
                )


def check_else_branches(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E110: at most one `else`, and only as the default of guarded rows."""
    for state, event, distinct in facts.distinct_groups:
        elses = [row.guard for row in distinct if row.guard and row.guard.is_else]
        if not elses:
            continue
        has_guarded = any(_guard_key(row) not in (None, "else") for row in distinct)
        if not has_guarded:
            yield fail(
                "E110",
                f"`else` on '{event}' in state '{state.name.value}' "
                "has no guarded row to be the default of",
                elses[0].span,
                "drop `else` (a single row needs no guard) or add a `when guard` row",
            )
        for extra in elses[1:]:
            yield fail(
                "E110",
                f"second `else` on '{event}' in state '{state.name.value}'",
                extra.span,
                f"the first `else` is at {_at(elses[0].span)}; keep one default branch",
            )


def check_always_accepted(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E123: `always accept E`: a state (not final, not an exception) that neither handles
    nor ignores E. Where an event can come at any moment (a chargeback), a state added later
    without a row for it would refuse it at run time; this finds it when the file is checked."""
    ladder_events: dict[str, set[str]] = defaultdict(set)
    for edge in facts.retry_edges:
        if edge.by_event:
            ladder_events[edge.source.value].add(edge.ladder.event.value)
    for always in facts.machine.always:
        event = always.event.value
        if event not in facts.events:
            continue  # E106
        excepted = {name.value for name in always.exceptions}
        for state in facts.machine.states:
            if state.final or state.name.value in excepted:
                continue
            accepted = {t.event.value for t in state.transitions}
            accepted.update(n.value for i in state.ignores for n in i.events)
            if event not in accepted | ladder_events.get(state.name.value, set()):
                yield fail(
                    "E123",
                    f"state '{state.name.value}' neither handles nor ignores '{event}', which "
                    f"the machine always accepts (line {always.span.line})",
                    state.name.span,
                    f"add `on {event} -> ...` or `ignore {event}` to the state, or list it "
                    "after `except`",
                )


def check_handled_and_ignored(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E112: a state cannot both act on an event and ignore it."""
    ladder_events: dict[str, set[str]] = defaultdict(set)
    for edge in facts.retry_edges:
        if edge.by_event:
            ladder_events[edge.source.value].add(edge.ladder.event.value)
    for state in facts.ignoring:
        handled = {t.event.value for t in state.transitions}
        handled |= ladder_events.get(state.name.value, set())
        for ignore in state.ignores:
            for name in ignore.events:
                if name.value in handled:
                    yield fail(
                        "E112",
                        f"state '{state.name.value}' both handles and ignores '{name.value}'",
                        name.span,
                        "remove it from `ignore`, or remove the transition",
                    )


def check_final_states(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E111: nothing leaves a final state."""
    for state in facts.finals:
        name = state.name.value
        hint = f"a final state ends the instance; drop `final` from '{name}' or remove this"
        for transition in state.transitions:
            yield fail(
                "E111", f"final state '{name}' has a transition", transition.event.span, hint
            )
        for timer in state.timers:
            yield fail("E111", f"final state '{name}' has a timer", timer.after.span, hint)
        for escalation in state.escalations:
            yield fail(
                "E111",
                f"final state '{name}' has an escalation",
                _escalation_span(escalation),
                hint,
            )
    for ladder in facts.machine.retries:
        for entry in ladder.entry_states:
            if entry.value in facts.final_names:
                yield fail(
                    "E111",
                    f"final state '{entry.value}' is an entry of retry ladder "
                    f"'{ladder.name.value}'",
                    entry.span,
                    "a final state ends the instance; a failure there cannot be retried",
                )


# ---------------------------------------------------------------- rules: ladders


def check_ladder_order(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E120: steps strictly later than the previous one, the end after the last step."""
    for state in facts.timed:
        for escalation in state.escalations:
            times = [(step.after, step.last) for step in escalation.steps]
            if escalation.end is not None:
                times.append((escalation.end.after, escalation.end.after.millis))
            yield from _not_increasing(times, "escalation")
    for ladder in facts.machine.retries:
        yield from _not_increasing([(s.after, s.after.millis) for s in ladder.steps], "retry")


def _not_increasing(times: list[tuple[Duration, int]], kind: str) -> Iterator[Diagnostic]:
    """`times` are (when a step first fires, when its last repetition fires)."""
    for (before, before_last), (after, _) in itertools.pairwise(times):
        if after.millis <= before_last:
            last = _duration_text(before_last, before)
            repeated = "" if before_last == before.millis else f", repeated until {last}"
            yield fail(
                "E120",
                f"{kind} ladder step at {after.text} is not later than the one before "
                f"({before.text}{repeated})",
                after.span,
                f"each step must come strictly after the previous one ({last})",
                [related(before.span, "the step before")],
            )


def check_escalation_deadlines(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E121: a step's `within` deadline ends before the next step (or the end) fires."""
    for state in facts.timed:
        for escalation in state.escalations:
            times = [step.after for step in escalation.steps]
            if escalation.end is not None:
                times.append(escalation.end.after)
            for index, step in enumerate(escalation.steps):
                if step.within is None or index + 1 >= len(times):
                    continue
                following = times[index + 1]
                if following.millis <= step.last:
                    continue  # the steps are out of order: E120's, and no room to speak of
                due = step.last + step.within.millis
                if due > following.millis:
                    room = following.millis - step.last
                    ends = _duration_text(due, step.within)
                    yield fail(
                        "E121",
                        f"deadline {step.within.text} of the step at {step.after.text} runs "
                        f"to {ends}, past the next step at {following.text}",
                        step.within.span,
                        f"shorten it to at most {_duration_text(max(room, 0), step.within)} "
                        "or move the next step later",
                    )


def check_ladder_states(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E122: ladder ends and steps that cannot work (undeclared names are E104's)."""
    for state in facts.timed:
        for escalation in state.escalations:
            end = escalation.end
            if not escalation.steps and end is None:
                yield fail(
                    "E122",
                    f"escalation in state '{state.name.value}' is empty",
                    _escalation_span(escalation),
                    "add `after D notify queue Q` steps and/or an `after D -> State` end",
                )
            if end is not None and end.target.value == state.name.value:
                yield fail(
                    "E122",
                    f"escalation end returns to its own state '{state.name.value}'",
                    end.target.span,
                    "re-entering the state restarts the ladder forever; end in another state",
                )
    for ladder in facts.machine.retries:
        yield from _retry_ladder_states(facts, ladder)


def _retry_ladder_states(facts: MachineFacts, ladder: RetryLadder) -> Iterator[Diagnostic]:
    label = f"retry ladder '{ladder.name.value}'"
    if not ladder.steps:
        yield fail(
            "E122",
            f"{label} has no steps",
            ladder.name.span,
            "add `step State after D do retry_action` lines",
        )
    if ladder.exhausted is None:
        yield fail(
            "E122",
            f"{label} has no `exhausted -> State` end",
            ladder.name.span,
            "say where a failure in the last step goes: `exhausted -> State`",
        )
    entries: dict[str, Name] = {}
    for entry in ladder.entry_states:
        first = entries.setdefault(entry.value, entry)
        if first is not entry:
            yield fail(
                "E122",
                f"state '{entry.value}' is listed twice in `from` of {label}",
                entry.span,
                "list each entry state once",
            )
    steps: dict[str, Name] = {}
    for step in ladder.steps:
        name = step.state.value
        first = steps.setdefault(name, step.state)
        if first is not step.state:
            yield fail(
                "E122",
                f"state '{name}' is used for two steps of {label}",
                step.state.span,
                f"it is already step at {_at(first.span)}; every step needs its own state",
            )
        elif name in entries:
            yield fail(
                "E122",
                f"step state '{name}' is also an entry state of {label}",
                step.state.span,
                "a step state must be a state of its own, entered only by the ladder",
            )
        elif name in facts.final_names:
            yield fail(
                "E122",
                f"step state '{name}' of {label} is final",
                step.state.span,
                "a step waits for the retry to succeed or fail again; it cannot be final",
            )
    if ladder.exhausted is not None and ladder.exhausted.target.value in steps:
        target = ladder.exhausted.target
        yield fail(
            "E122",
            f"{label} is exhausted into its own step '{target.value}'",
            target.span,
            "exhausted must lead out of the ladder, e.g. to a collections or failed state",
        )


# ---------------------------------------------------------------- rules: reachability


def check_unreachable_states(facts: MachineFacts) -> Iterator[Diagnostic]:
    """W201: no path of transitions, timers, escalation ends or retry steps from initial.
    Related locations say where the way in was lost: moves of reachable states to a state
    named much like this one, and the moves into it from states that are unreachable too."""
    if facts.initial is None:
        return
    start = facts.initial.name.value
    reachable = facts.reachable
    for name, state in facts.states.items():
        if name in reachable:
            continue
        notes = []
        for target, sites in facts.move_sites.items():
            if target == name or target not in facts.states:
                continue
            if not difflib.get_close_matches(name, [target], n=1, cutoff=0.7):
                continue
            for source, written in sites:
                if source in reachable:
                    notes.append(
                        related(
                            written.span,
                            f"'{source}' moves to '{target}' here: was '{name}' meant?",
                        )
                    )
        for source, written in facts.move_sites.get(name, ()):
            if source != name:
                notes.append(
                    related(written.span, f"entered from '{source}', which is unreachable too")
                )
        yield fail(
            "W201",
            f"state '{name}' cannot be reached from the initial state '{start}'",
            state.name.span,
            "add a transition, timer, escalation or retry step into it, or remove it",
            notes[:4],
        )


def check_final_reachability(facts: MachineFacts) -> Iterator[Diagnostic]:
    """W203 dead ends, and W202 states that can never finish (unless `perpetual`)."""
    if facts.initial is None:
        return
    machine, moves = facts.machine, facts.successors
    reachable = facts.reachable
    # A move to an unknown place may finish: no W202 before it (E104 is reported there).
    ends = facts.end_names
    finishing = closure(predecessors(moves), ends | facts.lost_moves)
    if not ends and not machine.perpetual:
        yield fail(
            "W202",
            f"machine '{machine.name.value}' has no final state",
            machine.name.span,
            "mark where instances end with `final state` (or may stop, with `resting "
            "state`), or declare the machine `perpetual` if it runs forever",
        )
    for name, state in facts.states.items():
        if name not in reachable or state.final or state.perpetual or state.resting:
            continue
        if not moves[name] and name not in facts.lost_moves:
            yield fail(
                "W203",
                f"state '{name}' is a dead end: nothing leaves it and it is not final",
                state.name.span,
                "add a transition or timer out of it, or mark it `final` or `perpetual`",
            )
        elif ends and not machine.perpetual and name not in finishing:
            yield fail(
                "W202",
                f"no final or resting state can be reached from state '{name}'",
                state.name.span,
                "add a way out towards a final or resting state, or mark the state `perpetual`",
            )


# ---------------------------------------------------------------- rules: names


# Soft keywords (3.12 adds `type`) are legal identifiers, but generated code reads badly with
# them; lowering's own rule (lower.name_problem) covers everything that would not compile.
_SOFT_KEYWORDS = frozenset(keyword.softkwlist) | {"type"}
_PYTHON_ROLES = frozenset({"machine", "state", "event", "field", "guard", "action"})


def check_python_names(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E130: names that become identifiers, enum members or fields in generated code."""
    verdicts: dict[tuple[str, str], str | None] = {}  # most names are used many times
    for name, role in named_things(facts.machine):
        key = (name.value, role)
        if key in verdicts:
            why = verdicts[key]
        else:
            why = name_problem(name.value, role)
            if why is None and role in _PYTHON_ROLES and name.value in _SOFT_KEYWORDS:
                why = "is a Python soft keyword"
            verdicts[key] = why
        if why is not None:
            yield fail(
                "E130",
                f"{role} name '{name.value}' {why}",
                name.span,
                f"rename it, for example '{name.value.strip('_') or 'x'}_{role}'",
            )


def check_ladder_name_collisions(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E131: generated tables key retry ladders by name, escalations by state and name."""
    groups: list[list[Name]] = [
        [e.name for e in state.escalations if e.name is not None] for state in facts.timed
    ]
    groups.append([ladder.name for ladder in facts.machine.retries])
    for names in groups:
        seen: dict[str, Name] = {}
        for name in names:
            first = seen.setdefault(name.value, name)
            if first is not name:
                yield fail(
                    "E131",
                    f"two ladders are named '{name.value}'",
                    name.span,
                    f"the other is at {_at(first.span)}; generated tables key ladders by name",
                )


def check_module_names(
    facts: Sequence[MachineFacts], directory: Mapping[str, Machine]
) -> Iterator[Diagnostic]:
    """E131: two machines that would generate the same module."""
    seen: dict[str, Machine] = {}
    for fact in sorted(facts, key=lambda f: f.machine.span.sort_key()):
        module = snake_case(fact.machine.name.value)
        first = seen.setdefault(module, fact.machine)
        if first is not fact.machine:
            yield fail(
                "E131",
                f"machine '{fact.machine.name.value}' generates module '{module}', "
                f"like machine '{first.name.value}' in {first.path}",
                fact.machine.name.span,
                "rename one of the machines",
            )


def check_file_name(facts: MachineFacts) -> Iterator[Diagnostic]:
    """W206: machines/quota_sla.fsm holds `machine QuotaSla`."""
    machine = facts.machine
    path = Path(machine.path)
    expected = snake_case(machine.name.value)
    if path.suffix == ".fsm" and path.stem != expected:
        yield fail(
            "W206",
            f"machine '{machine.name.value}' is in '{path.name}', expected '{expected}.fsm'",
            machine.name.span,
            f"rename the file to {expected}.fsm (or the machine to match the file)",
        )


# ---------------------------------------------------------------- suppressions


def _suppressible(code: str) -> bool:
    return code in CODES and CODES[code][0] is Severity.WARNING and code != "W205"


def check_suppression_codes(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E005: only warnings can be allowed; errors must be fixed."""
    for suppression, _ in facts.suppression_sites:
        if suppression.code in CODES and not _suppressible(suppression.code):
            yield fail(
                "E005",
                f"{suppression.code} cannot be suppressed",
                suppression.span,
                "only warnings (W2xx, except W205) can be allowed; errors must be fixed",
            )


# Every item an `@allow` can precede.
_Suppressible = (
    Event
    | RetryLadder
    | Policy
    | State
    | Transition
    | Timer
    | Ignore
    | Escalation
    | Entry
    | Group
    | Setting
    | MachineTimer
)

# A filter that skips, in C, the many items without suppressions.
_suppressing = attrgetter("suppressions")


def _suppression_sites(
    machine: Machine, noted_rows: Callable[[State], Sequence[Transition]] | None = None
) -> Iterator[tuple[Suppression, SourceSpan | None]]:
    """Each `@allow` with the span it covers (None: the whole file); `noted_rows` may say
    which transitions of a state carry one (MachineFacts knows)."""
    for suppression in machine.suppressions:
        yield suppression, None
    groups: list[Sequence[_Suppressible]]
    groups = [
        machine.events,
        machine.retries,
        machine.policies,
        machine.states,
        machine.groups,
        machine.settings,
        machine.machine_timers,
    ]
    for state in machine.states:
        rows = state.transitions if noted_rows is None else noted_rows(state)
        groups.extend((rows, state.timers, state.ignores, state.escalations, state.entries))
    for items in groups:
        for item in filter(_suppressing, items):
            for suppression in item.suppressions:
                yield suppression, item.span


def _contains(outer: SourceSpan, inner: SourceSpan) -> bool:
    return (outer.line, outer.column) <= (inner.line, inner.column) and (
        inner.end_line,
        inner.end_column,
    ) <= (outer.end_line, outer.end_column)


def _apply_suppressions(
    facts: Sequence[MachineFacts], found: Iterable[Diagnostic], skipped: set[tuple[str, str]]
) -> list[Diagnostic]:
    """Drops allowed findings; every `@allow` that matched nothing becomes W205, unless its
    rule was skipped for that file (`skipped` holds (path, code))."""
    sites: dict[tuple[str, str], list[tuple[Suppression, SourceSpan | None]]] = defaultdict(list)
    for fact in facts:
        for suppression, covered in fact.suppression_sites:
            # One without a reason is already E005 and allows nothing.
            if _suppressible(suppression.code) and suppression.reason.strip():
                sites[(fact.machine.path, suppression.code)].append((suppression, covered))
    used: set[int] = set()
    kept: list[Diagnostic] = []
    for diagnostic in found:
        candidates = sites.get((diagnostic.span.path, diagnostic.code), [])
        match = next((s for s, c in candidates if c is None or _contains(c, diagnostic.span)), None)
        if match is None:
            kept.append(diagnostic)
        else:
            used.add(id(match))
    for (path, code), candidates in sites.items():
        if (path, code) in skipped:
            continue
        for suppression, _ in candidates:
            if id(suppression) not in used:
                kept.append(
                    fail(
                        "W205",
                        f"@allow({suppression.code}) matches no finding",
                        suppression.span,
                        "remove it, or move it onto the item that has the finding",
                    )
                )
    return kept


# ---------------------------------------------------------------- resilience policies

# The first wait of the jitter backoff (after failure 1): a `max` below it caps every wait.
_FIRST_JITTER_MS = 217
_MAX_POLICY_ATTEMPTS = 100


def check_policy_actions(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E190: a policy wraps actions that some transition, timer or ladder runs."""
    if not facts.machine.policies:
        return
    ran = {name.value for name in run_actions(facts.machine)}
    for policy in facts.machine.policies:
        for name in policy.actions:
            if name.value not in ran:
                yield fail(
                    "E190",
                    f"policy '{policy.name.value}' names action '{name.value}', which the "
                    "machine never runs",
                    name.span,
                    did_you_mean(name.value, sorted(ran))
                    or "name an action written after `do` in this machine",
                )


def check_policy_overlaps(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E191: one policy per name, one policy per action (the runtime wraps it once)."""
    names: dict[str, Name] = {}
    guarded: dict[str, tuple[Name, Policy]] = {}
    for policy in facts.machine.policies:
        first = names.setdefault(policy.name.value, policy.name)
        if first is not policy.name:
            yield fail(
                "E191",
                f"policy '{policy.name.value}' is declared twice",
                policy.name.span,
                f"the other is at {_at(first.span)}; merge them or rename one",
            )
        for name in policy.actions:
            seen = guarded.setdefault(name.value, (name, policy))
            if seen[0] is not name:
                where = (
                    "this policy already names it"
                    if seen[1] is policy
                    else f"policy '{seen[1].name.value}' already covers it"
                )
                yield fail(
                    "E191",
                    f"action '{name.value}' is under two policies",
                    name.span,
                    f"{where} at {_at(seen[0].span)}; an action runs under one policy",
                )


def _count_problem(value: EmitValue, least: int, most: int | None) -> str | None:
    text = value.text
    if not text.lstrip("-").isdigit():
        return f"'{text}' is not a whole number"
    if int(text) < least:
        return f"{text} is below {least}"
    if most is not None and int(text) > most:
        return f"{text} is above {most}"
    return None


def check_policy_values(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E192: counts are whole numbers in range, durations positive, a `max` that matters."""
    for policy in facts.machine.policies:
        for clause in policy.clauses:
            counts: list[tuple[EmitValue, int, int | None, str]] = []
            if isinstance(clause, PolicyRetry):
                what = "retry attempts (the first call included)"
                counts.append((clause.attempts, 1, _MAX_POLICY_ATTEMPTS, what))
                limit = clause.backoff_max
                if limit is not None and clause.backoff == "exponential":
                    yield fail(
                        "E192",
                        "the exponential backoff has its own 10s cap; `max` applies to jitter",
                        limit.span,
                        "write `backoff jitter max ...`, or drop `max`",
                    )
                elif limit is not None and limit.millis < _FIRST_JITTER_MS:
                    yield fail(
                        "E192",
                        f"backoff max {limit.text} is below the first wait (217ms): every "
                        "wait would be the same",
                        limit.span,
                        "raise `max` to 217ms or more, or use a fixed retry ladder",
                    )
            elif isinstance(clause, PolicyBreaker):
                counts.append((clause.tolerated, 0, None, "tolerated breaker failures"))
                if clause.cooldown.millis < 1:
                    yield fail(
                        "E192",
                        "a breaker's cool-down must be longer than zero",
                        clause.cooldown.span,
                        "write how long the breaker stays open, e.g. `cooldown 30s`",
                    )
            elif isinstance(clause, PolicyBulkhead):
                counts.append((clause.limit, 1, None, "bulkhead calls in flight per tenant"))
            for value, least, most, what in counts:
                why = _count_problem(value, least, most)
                if why is not None:
                    yield fail(
                        "E192",
                        f"invalid {what}: {why}",
                        value.span,
                        f"write a whole number from {least}"
                        + ("" if most is None else f" to {most}"),
                    )


_CLAUSE_WORDS = {
    PolicyRetry: "retry",
    PolicyBreaker: "breaker",
    PolicyFallback: "fallback",
    PolicyBulkhead: "bulkhead",
}


def check_policy_clauses(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E193: each clause at most once per policy, and at least one clause."""
    for policy in facts.machine.policies:
        if not policy.clauses:
            yield fail(
                "E193",
                f"policy '{policy.name.value}' has no clauses",
                policy.name.span,
                "add retry, breaker, fallback or bulkhead, or remove the policy",
            )
        seen: dict[type, SourceSpan] = {}
        for clause in policy.clauses:
            first = seen.setdefault(type(clause), clause.span)
            if first is not clause.span:
                word = _CLAUSE_WORDS[type(clause)]
                yield fail(
                    "E193",
                    f"policy '{policy.name.value}' has two `{word}` clauses",
                    clause.span,
                    f"the first is at {_at(first)}; keep one",
                )


def check_policy_fallbacks(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E194: a fallback must be another action: the backup of a call is not the call."""
    for policy in facts.machine.policies:
        own = {name.value for name in policy.actions}
        for clause in policy.clauses:
            if isinstance(clause, PolicyFallback) and clause.action.value in own:
                yield fail(
                    "E194",
                    f"policy '{policy.name.value}' falls back to '{clause.action.value}', an "
                    "action it guards",
                    clause.action.span,
                    "name the backup's own action, e.g. "
                    f"'{clause.action.value}_backup', and bind it to the backup service",
                )


def check_fallback_spelling(facts: MachineFacts) -> Iterator[Diagnostic]:
    """W209: a fallback that no transition runs is normal (the backup's own action, bound at
    load), but one a letter or two from an action the machine does run, or from another
    policy's fallback, is most likely a misspelling of it."""
    fallbacks = [
        (policy, clause.action)
        for policy in facts.machine.policies
        for clause in policy.clauses
        if isinstance(clause, PolicyFallback)
    ]
    if not fallbacks:
        return
    ran = {name.value for name in run_actions(facts.machine)}
    for policy, action in fallbacks:
        if action.value in ran:
            continue
        # Close, not merely similar: `submit_charge_backup` beside `submit_charge` is a backup.
        known = ran | {other.value for _, other in fallbacks if other.value != action.value}
        close = difflib.get_close_matches(action.value, sorted(known), n=1, cutoff=0.9)
        if close:
            yield fail(
                "W209",
                f"policy '{policy.name.value}' falls back to '{action.value}', which the "
                f"machine never runs; '{close[0]}' is one it knows",
                action.span,
                f"did you mean '{close[0]}'? (a backup of its own is bound when the machine is "
                "loaded: a binding missing for it is R011)",
            )


# ---------------------------------------------------------------- running the rules

MachineRule = Callable[[MachineFacts], Iterable[Diagnostic]]
CrossRule = Callable[[Sequence[MachineFacts], Mapping[str, Machine]], Iterable[Diagnostic]]

MACHINE_RULES: tuple[MachineRule, ...] = (
    check_initial_state,
    check_duplicate_states,
    check_duplicate_events,
    check_duplicate_fields,
    check_duplicate_literals,
    check_initial_and_final,
    check_timers,
    check_shadowed_timers,
    check_resting_and_entry,
    check_delays,
    check_settings_and_groups,
    check_retry_attempts,
    check_unknown_states,
    check_unknown_events,
    check_unhandled_events,
    check_duplicate_transitions,
    check_nondeterminism,
    check_retry_collisions,
    check_unguarded_beside_guarded,
    check_else_branches,
    check_handled_and_ignored,
    check_always_accepted,
    check_final_states,
    check_ladder_order,
    check_escalation_deadlines,
    check_ladder_states,
    check_unreachable_states,
    check_final_reachability,
    check_python_names,
    check_ladder_name_collisions,
    check_file_name,
    check_suppression_codes,
    check_policy_actions,
    check_policy_overlaps,
    check_policy_values,
    check_policy_clauses,
    check_policy_fallbacks,
    check_fallback_spelling,
    check_data_fields,
    check_keeps,
    check_emit_targets,
    check_refusals,
)

CROSS_RULES: tuple[CrossRule, ...] = (
    check_module_names,
    check_emitted_events,
    check_emit_payloads,
)


def check_machines(
    machines: Sequence[Machine], *, known: Sequence[Machine] = ()
) -> list[Diagnostic]:
    """Every rule over `machines`, cross-machine ones included, suppressions applied.

    `known` are further machines that `emit` may name but that are not checked themselves."""
    facts = [MachineFacts(machine) for machine in machines]
    directory: dict[str, Machine] = {}
    for machine in [*machines, *known]:
        directory.setdefault(machine.name.value, machine)
    found: list[Diagnostic] = []
    with paused_gc():
        for fact in facts:
            for rule in MACHINE_RULES:
                found.extend(rule(fact))
        for cross in CROSS_RULES:
            found.extend(cross(facts, directory))
    skipped = {(fact.machine.path, code) for fact in facts for code in _skipped_rules(fact)}
    return sorted(_apply_suppressions(facts, found, skipped), key=Diagnostic.sort_key)


def _skipped_rules(facts: MachineFacts) -> tuple[str, ...]:
    """Codes whose rules did not run, so an `@allow` of them cannot be called unused."""
    if facts.initial is None:
        return ("W201", "W202", "W203")
    return ()


# Findings that text skipped by syntax error recovery (a state, a marker, a row) could cause.
_ECHOES_OF_SKIPPED_TEXT = frozenset(
    {"E101", "E102", "E104", "E106", "E145", "W201", "W202", "W203", "W204", "W205"}
)


def check_paths(paths: Sequence[str | Path]) -> CheckReport:
    """Reads, parses and checks files and folders of *.fsm files; never raises for bad input."""
    sources: dict[str, SourceFile] = {}
    machines: list[Machine] = []
    flows: list[Flow] = []
    diagnostics: list[Diagnostic] = []
    files, expansion_findings = expand_paths(paths)
    diagnostics.extend(expansion_findings)
    lossy: set[str] = set()
    for file in files:
        source = read_source(file)
        sources[source.path] = source
        parsed, recovery = parse_file_recovering(source)
        diagnostics.extend(parsed.diagnostics)
        flows.extend(parsed.flows)
        if parsed.machine is not None:
            machines.append(parsed.machine)
            if recovery is Recovery.LOSSY:
                lossy.add(parsed.machine.path)
    known = _sibling_machines(machines, flows)
    diagnostics.extend(
        d
        for d in check_machines(machines, known=known)
        if not (d.span.path in lossy and d.code in _ECHOES_OF_SKIPPED_TEXT)
    )
    if flows or machines:
        from .flow_checks import check_flows  # the flow rules build on this module's

        diagnostics.extend(check_flows(flows, machines, known=known))
    diagnostics.sort(key=Diagnostic.sort_key)
    return CheckReport(
        sources=sources, machines=machines, diagnostics=diagnostics, known=known, flows=flows
    )


def expand_paths(paths: Sequence[str | Path]) -> tuple[list[str], list[Diagnostic]]:
    """Folders become their *.fsm files (recursively, sorted, hidden folders skipped);
    anything else is read as given, so a missing path becomes E003 when read."""
    files: list[str] = []
    findings: list[Diagnostic] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            files.append(path)

    for raw in paths:
        path = str(raw)
        if not os.path.isdir(path):
            add(path)
            continue
        found = _fsm_files(path)
        if not found:
            findings.append(
                fail(
                    "W207",
                    f"{path} holds no .fsm files",
                    SourceSpan.point(path),
                    "machine files end in .fsm; check the folder name",
                )
            )
        for file in found:
            add(file)
    return files, findings


def _fsm_files(folder: str) -> list[str]:
    found: list[str] = []
    # os.walk does not follow symlinked folders, so a link loop cannot trap it.
    for root, dirs, names in os.walk(folder, onerror=lambda _: None):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(".fsm"))
    return sorted(found)


def _sibling_machines(machines: Sequence[Machine], flows: Sequence[Flow] = ()) -> list[Machine]:
    """Machines that `emit` or a flow names but that were not passed: looked up, quietly,
    among the .fsm files in the folder of the emitting or flow's file (their parse errors are
    not ours to report), so `autonomic check machines/flows.fsm` checks the flows against the
    machines beside them."""
    checked = {machine.name.value for machine in machines}
    by_folder: dict[Path, dict[str, Machine]] = {}
    found: dict[str, Machine] = {}
    wanted_by: list[tuple[str, set[str]]] = [
        (machine.path, {ref.machine.value for ref in emit_refs(machine) if ref.machine})
        for machine in machines
    ]
    wanted_by.extend((flow.path, _flow_machines(flow)) for flow in flows)
    for path, names in wanted_by:
        wanted = names - checked
        if not wanted - set(found):
            continue
        folder = Path(path).parent
        if folder not in by_folder:
            by_folder[folder] = _machines_in(folder)
        for name in sorted(wanted):
            sibling = by_folder[folder].get(name)
            if sibling is not None:
                found.setdefault(name, sibling)
    return list(found.values())


def _flow_machines(flow: Flow) -> set[str]:
    names: set[str] = set()
    for step in flow.all_steps():
        for name in (step.receiver, step.compensate.machine if step.compensate else None):
            if name is not None:
                names.add(name.value)
    return names


def _machines_in(folder: Path) -> dict[str, Machine]:
    machines: dict[str, Machine] = {}
    try:
        candidates = sorted(p for p in folder.iterdir() if p.suffix == ".fsm" and p.is_file())
    except OSError:
        return machines
    for path in candidates:
        machine, _ = parse_source(read_source(path))
        if machine is not None:
            machines.setdefault(machine.name.value, machine)
    return machines
