"""Worst-case time without an outside event: how long an instance can stay before it settles.

The semantics, from the runtime's timer rules:
- a state's timers are armed on entry and measured from it; the first timer that leads to
  another state fires and the others are disarmed. Timers without a target (escalation
  notifications, retry attempts, entry actions) leave the instance where it is;
- a group timer is measured from entering its group and a creation timer from creation
  (armed until a final state): in a state, either may already have run for a while, so it
  fires *at the latest* after its delay, maybe at once;
- a delay from a setting is at most the setting's declared upper bound (and at least its
  lower one); a delay from an event field has no bound: the explanation says so;
- an instance *settles* in a final or resting state. Any other state that no timer leaves
  waits for an outside event for as long as it takes.

So each state has the time by which a timer has surely moved it on (the earliest of its
timers' latest moments) and the states any of its timers can move it to: every one that can
be first (a timer whose earliest moment is not after that time). The bound of a state is that
time plus the largest bound among those next states, and a chain that can come back on
itself never settles, unless a group or creation timer that is armed all round it ends the
cycle from outside it. networkx finds the cycles as strongly connected components; the rest
is one pass in reverse topological order of their condensation. Without group, creation or
data timers every state has at most one next state, its earliest timeout's target.
A retry ladder is bounded apart from that: its steps advance on the failure event that each
attempt provokes, so it ends within the sum of its step delays if every attempt fails.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal

from .lower import MachineTables, RetryStepRow, TimerRow

if TYPE_CHECKING:
    import networkx as nx

StopKind = Literal["final", "resting", "event", "data", "cycle"]

_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1))


def format_duration(millis: int) -> str:
    """`8d 4h`, `0` for nothing: the largest units first."""
    if millis <= 0:
        return "0"
    parts = []
    rest = millis
    for unit, size in _UNITS:
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts)


@dataclass(frozen=True, slots=True)
class StateBound:
    """`within_ms` is the longest time before the instance stops in `stops_in` (0 when the
    state itself is where it stops), None when the chain of timed exits cycles. `stop` says
    why it stops there: a final or resting state, a state only an outside event leaves, or
    ("data") a state only a timer whose delay comes from an event field leaves, which has
    no bound; `data_delay` then names it (`event.snooze_for`)."""

    state: str
    within_ms: int | None
    path: tuple[str, ...]
    stops_in: str
    stop: StopKind
    within_text: str = "0"
    data_delay: str | None = None

    @property
    def settles(self) -> bool:
        return self.stop in ("final", "resting")


@dataclass(frozen=True, slots=True)
class LadderBound:
    """A retry or escalation ladder and when it ends, counted from entry into its first step
    (retry: if every attempt fails; escalation: if nobody acts)."""

    kind: Literal["retry", "escalation"]
    name: str
    states: tuple[str, ...]
    within_ms: int
    delays: tuple[str, ...]
    target: str | None
    within_text: str


@dataclass(frozen=True)
class Explanation:
    machine: str
    states: tuple[StateBound, ...]  # declaration order
    ladders: tuple[LadderBound, ...]
    # How delays known only at run time were counted (settings at their upper bound).
    notes: tuple[str, ...] = ()

    @cached_property
    def _by_state(self) -> dict[str, StateBound]:
        return {b.state: b for b in self.states}

    def bound(self, state: str) -> StateBound:
        # By index: a diagram asks for every state's bound, and a scan each was quadratic.
        return self._by_state[state]

    def waiting(self) -> tuple[str, ...]:
        """States only an outside event can leave, that are neither final nor resting."""
        return tuple(b.state for b in self.states if b.stop == "event" and b.within_ms == 0)

    def unbounded(self) -> tuple[str, ...]:
        """States only a timer with a delay from an event field leaves."""
        return tuple(b.state for b in self.states if b.stop == "data" and b.within_ms == 0)


@dataclass(frozen=True, slots=True)
class _Timed:
    """One timer that can move an instance out of a state: between `earliest` and `latest`
    after entry (`latest` None: no bound, a delay from an event field)."""

    target: str
    earliest: int
    latest: int | None
    text: str
    data: str | None = None  # `event.FIELD` for a delay from an event field


def _timed(timer: TimerRow, settings: dict[str, tuple[int, int]], measured_here: bool) -> _Timed:
    assert timer.target is not None
    if timer.after_field is not None:
        return _Timed(timer.target, 0, None, timer.after_text, f"event.{timer.after_field}")
    low, high = (
        settings[timer.after_setting]
        if timer.after_setting is not None
        else (timer.after_ms, timer.after_ms)
    )
    # A group or creation timer may have run before the instance came here.
    return _Timed(timer.target, low if measured_here else 0, high, timer.after_text)


def timed_exit(state: str, timers: Iterable[TimerRow]) -> TimerRow | None:
    """The fixed-delay timer that takes an instance out of `state` first, if any."""
    leaving = [
        t
        for t in timers
        if t.target is not None and t.after_field is None and t.after_setting is None
    ]
    return min(leaving, key=lambda t: t.after_ms, default=None)


def _exits(tables: MachineTables) -> dict[str, list[_Timed]]:
    """Every timer that can move an instance out of each state that has one."""
    settings = {row.name: (row.min_ms, row.max_ms) for row in tables.settings}
    exits: dict[str, list[_Timed]] = {}
    for state, rows in tables.timers:
        for timer in rows:
            if timer.target is not None:
                exits.setdefault(state, []).append(_timed(timer, settings, True))
    members = dict(tables.groups)
    for group, rows in tables.group_timers:
        for timer in rows:
            if timer.target is not None:
                for state in members.get(group, ()):
                    exits.setdefault(state, []).append(_timed(timer, settings, False))
    for timer in tables.creation_timers:
        if timer.target is not None:
            for row in tables.states:
                if not row.final:
                    exits.setdefault(row.name, []).append(_timed(timer, settings, False))
    return exits


def _moves(timed: list[_Timed]) -> tuple[int | None, list[_Timed]]:
    """When a timer has surely moved the instance on (None: no bound), and the timers that
    can be the one that does."""
    bounded = [t.latest for t in timed if t.latest is not None]
    if not bounded:
        return None, timed
    by = min(bounded)
    return by, [t for t in timed if t.earliest <= by]


def explain(tables: MachineTables) -> Explanation:
    # Imported here: `autonomic check` uses this module's formatting only, and networkx
    # takes a tenth of a second to import.
    import networkx as nx

    finals = set(tables.finals)
    resting = {s.name for s in tables.states if s.resting}
    # Only states a timer leaves, and where it leads, are nodes: the others stop where they
    # are (most states of a large machine).
    graph: nx.DiGraph[str] = nx.DiGraph()
    by: dict[str, int] = {}  # a state's time by which a timer has surely moved it on
    via: dict[str, list[_Timed]] = {}  # ... and the timers that can
    data: dict[str, str] = {}  # states only a delay from an event field leaves
    for left, timed in _exits(tables).items():
        if left in finals or left in resting:
            continue
        latest, moving = _moves(timed)
        if latest is None:
            data[left] = ", ".join(sorted({t.data for t in moving if t.data is not None}))
            continue
        by[left], via[left] = latest, moving
        graph.add_edges_from((left, t.target) for t in moving)
    deadlines = _deadlines(tables)
    condensed = nx.condensation(graph)
    component_of: dict[str, int] = condensed.graph["mapping"]
    # Per state: (bound, next state on the longest way, text of a one-timer bound); None
    # for a state whose timers can go round a cycle for ever.
    bound: dict[str, tuple[int, str | None, str] | None] = {}
    for component in reversed(list(nx.topological_sort(condensed))):
        members: set[str] = condensed.nodes[component]["members"]
        first = next(iter(members))
        if len(members) == 1 and not graph.has_edge(first, first):
            bound[first] = _capped(first, _single(first, by, via, bound), graph, deadlines, bound)
        else:
            _cycle(members, graph, deadlines, component_of, component, bound)
    bounds = []
    for state in tables.states:
        name = state.name
        found = bound.get(name, (0, None, ""))
        if found is None:
            bounds.append(StateBound(name, None, (name,), name, "cycle"))
            continue
        walk = [name]
        while (following := bound.get(walk[-1], _STOPS)) is not None and following[1] is not None:
            walk.append(following[1])
        end = walk[-1]
        stop: StopKind = (
            "final"
            if end in finals
            else "resting"
            if end in resting
            else "data"
            if end in data
            else "event"
        )
        text = found[2] if len(walk) == 2 and found[2] else format_duration(found[0])
        bounds.append(StateBound(name, found[0], tuple(walk), end, stop, text, data.get(end)))
    return Explanation(tables.name, tuple(bounds), _ladders(tables), _notes(tables))


def _notes(tables: MachineTables) -> tuple[str, ...]:
    timers = [
        *(t for _, rows in tables.timers for t in rows),
        *(t for _, rows in tables.group_timers for t in rows),
        *tables.creation_timers,
    ]
    used = {t.after_setting for t in timers if t.after_setting is not None and t.target}
    notes = [
        f"setting {row.name} counts at its upper bound, {row.max_text}"
        for row in tables.settings
        if row.name in used
    ]
    fields = sorted({t.after_field for t in timers if t.after_field is not None and t.target})
    notes += [f"a delay from event.{name} has no upper bound" for name in fields]
    return tuple(notes)


_STOPS: tuple[int, str | None, str] = (0, None, "")  # a state no timer leaves


def _single(
    state: str,
    by: dict[str, int],
    via: dict[str, list[_Timed]],
    bound: dict[str, tuple[int, str | None, str] | None],
) -> tuple[int, str | None, str] | None:
    if state not in by:
        return 0, None, ""
    best: tuple[int, str | None, str] | None = None
    for timed in via[state]:
        after = bound.get(timed.target, _STOPS)
        if after is None:
            return None  # one of the timers that can fire first leads into a cycle
        length = by[state] + after[0]
        if best is None or length > best[0]:
            # One timer of a fixed delay: its duration as the designer wrote it (72h, not 3d).
            one = timed.text if len(via[state]) == 1 and timed.earliest == by[state] else ""
            best = (length, timed.target, one)
    return best


def _deadlines(tables: MachineTables) -> list[tuple[frozenset[str] | None, int, str]]:
    """Group and creation timers that move an instance on (members, or None for every
    state that is not final; latest moment; target): they end a cycle of timers inside
    where they are armed. A delay from a setting counts at its upper bound."""
    settings = {row.name: row.max_ms for row in tables.settings}
    members = dict(tables.groups)
    found: list[tuple[frozenset[str] | None, int, str]] = []
    scoped = [(frozenset(members.get(g, ())), t) for g, rows in tables.group_timers for t in rows]
    for scope, timer in [*scoped, *((None, t) for t in tables.creation_timers)]:
        if timer.target is None or timer.after_field is not None:
            continue
        latest = settings[timer.after_setting] if timer.after_setting else timer.after_ms
        found.append((scope, latest, timer.target))
    return found


def _capped(
    state: str,
    found: tuple[int, str | None, str] | None,
    graph: nx.DiGraph[str],
    deadlines: list[tuple[frozenset[str] | None, int, str]],
    bound: dict[str, tuple[int, str | None, str] | None],
) -> tuple[int, str | None, str] | None:
    """A group or creation deadline armed in `state` keeps running while timers move the
    instance inside its scope: it fires at the latest after its delay *from now*, so the
    stay is at most that delay plus the longest bound of where it leads or of any state the
    timers can leave the scope for first (Snoozed -> Triggered inside Open ends with Open's
    deadline, not a fresh one after it)."""
    if found is not None and found[0] == 0:
        return found
    best = found
    for scope, latest, target in deadlines:
        inside = scope if scope is not None else frozenset(graph.nodes) - {target}
        if state not in inside or target in inside:
            continue
        outside, seen, todo = {target}, {state}, [state]
        while todo:
            here = todo.pop()
            for after in graph.successors(here) if here in graph else ():
                if after in inside and after not in seen:
                    seen.add(after)
                    todo.append(after)
                elif after not in inside:
                    outside.add(after)
        if any(bound.get(after, _STOPS) is None for after in outside):
            continue
        tail = max(sorted(outside), key=lambda after: bound.get(after, _STOPS)[0])  # type: ignore[index]
        length = latest + bound.get(tail, _STOPS)[0]  # type: ignore[index]
        if best is None or length < best[0]:
            best = (length, tail, "")
    return best


def _cycle(
    states: set[str],
    graph: nx.DiGraph[str],
    deadlines: list[tuple[frozenset[str] | None, int, str]],
    component_of: dict[str, int],
    component: int,
    bound: dict[str, tuple[int, str | None, str] | None],
) -> None:
    """States whose timers can go round a cycle: bounded only by the earliest deadline that is
    armed in all of them and leads out of them; then by that deadline plus the longest bound
    of any state the cycle can lead out to."""
    best: tuple[int, str | None, str] | None = None
    for scope, latest, target in deadlines:
        if target in states or (scope is not None and not states <= scope):
            continue
        outside = [target] + [
            after
            for state in states
            for after in graph.successors(state)
            if component_of[after] != component
        ]
        if any(bound.get(after, _STOPS) is None for after in outside):
            continue
        tail = max(outside, key=lambda after: bound.get(after, _STOPS)[0])  # type: ignore[index]
        length = latest + bound.get(tail, _STOPS)[0]  # type: ignore[index]
        if best is None or length < best[0]:
            best = (length, tail, "")
    for state in states:
        bound[state] = best


def _ladders(tables: MachineTables) -> tuple[LadderBound, ...]:
    ladders = []
    for retry in tables.retries:
        ladders.append(
            LadderBound(
                "retry",
                retry.name,
                tuple(step.state for step in retry.steps),
                # An attempt in flight may take up to its timeout before it counts as failed.
                sum(step.after_ms + (step.timeout_ms or 0) for step in retry.steps),
                # The wait before each attempt, then the attempt's own timeout where it has one.
                tuple(_step_delay(step) for step in retry.steps),
                retry.exhausted_target,
                format_duration(
                    sum(step.after_ms + (step.timeout_ms or 0) for step in retry.steps)
                ),
            )
        )
    for escalation in tables.escalations:
        times = [step.after_ms for step in escalation.steps]
        texts = [step.after_text for step in escalation.steps]
        if escalation.end_after_ms is not None and escalation.end_after_text is not None:
            times.append(escalation.end_after_ms)
            texts.append(escalation.end_after_text)
        # Escalation delays are measured from entry into the state, not from the last step.
        last = max(range(len(times)), key=times.__getitem__, default=None)
        ladders.append(
            LadderBound(
                "escalation",
                escalation.name,
                (escalation.state,),
                0 if last is None else times[last],
                tuple(texts),
                escalation.end_target,
                "0" if last is None else texts[last],
            )
        )
    return tuple(ladders)


def _step_delay(step: RetryStepRow) -> str:
    """`1h`, `1h + 2h attempt`; a repeated step's attempts, made only while unanswered, do
    not lengthen a ladder whose every attempt fails: `1h + 2h attempt (x3 every 30m)`."""
    text = step.after_text
    if step.timeout_text is not None:
        text += f" + {step.timeout_text} attempt"
    if step.repeat > 1:
        text += f" (x{step.repeat} every {step.every_text})"
    return text


def state_bound_line(bound: StateBound) -> str | None:
    """The one-line bound a diagram shows inside a state; None for final states."""
    if bound.stop == "final" and bound.within_ms == 0:
        return None
    if bound.stop == "resting" and bound.within_ms == 0:
        return "resting"
    if bound.stop == "cycle":
        return "timers cycle: never settles"
    if bound.stop == "data" and bound.within_ms == 0:
        return f"no bound: delay from {bound.data_delay}"
    if bound.within_ms == 0:
        return "no bound: waits for an event"
    assert bound.within_ms is not None
    if bound.stop == "data":
        return f"within {bound.within_text} -> {bound.stops_in}, then {bound.data_delay}"
    return f"within {bound.within_text} -> {bound.stops_in}"


def ladder_line(ladder: LadderBound) -> str:
    if ladder.kind == "retry":
        steps = " + ".join(ladder.delays)
        return f"ends within {ladder.within_text} if every attempt fails ({steps})"
    return f"ends within {ladder.within_text} if nobody acts"


def render_explanation(explanation: Explanation, path: str) -> str:
    """The text `autonomic check --explain` prints for one machine."""
    out = [f"{explanation.machine} ({path}): longest stay without an outside event"]
    width = max((len(b.state) for b in explanation.states), default=0)
    for bound in explanation.states:
        if bound.stop == "cycle":
            text = "never settles: its timers lead round a cycle"
        elif bound.within_ms == 0:
            text = {
                "final": "final",
                "resting": "resting",
                "event": "no bound: only an outside event can leave it",
                "data": f"no bound: its delay comes from {bound.data_delay}, which has no limit",
            }[bound.stop]
        else:
            assert bound.within_ms is not None
            via = " -> ".join(bound.path)
            where = {
                "final": "final",
                "resting": "resting",
                "event": "then waits for an event",
                "data": f"then a delay from {bound.data_delay}, which has no limit",
            }
            text = (
                f"within {bound.within_text} reaches {bound.stops_in} ({where[bound.stop]}; {via})"
            )
        out.append(f"  {bound.state.ljust(width)}  {text}")
    if explanation.ladders:
        out.append("ladders:")
        for ladder in explanation.ladders:
            states = ", ".join(ladder.states)
            target = f" -> {ladder.target}" if ladder.target else ""
            out.append(f"  {ladder.kind} {ladder.name} ({states}){target}: {ladder_line(ladder)}")
    out.extend(f"note: {note}" for note in explanation.notes)
    waiting = explanation.waiting()
    out.append(
        "only an outside event can leave: " + (", ".join(waiting) if waiting else "no state")
    )
    return "\n".join(out) + "\n"
