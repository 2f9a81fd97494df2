"""Worst-case time without an outside event: how long an instance can stay before it settles.

The semantics, from the runtime's timer rules:
- a state's timers are armed on entry and measured from it; the first timer that leads to
  another state (a timeout, an escalation's end) fires and the others are disarmed, so a state
  has at most one *timed exit*: the earliest one;
- timers without a target (escalation notifications, retry attempts) run their actions and
  leave the instance where it is;
- an instance *settles* in a final or resting state. Any other state without a timed exit
  waits for an outside event for as long as it takes: it has no bound.

So the bound of a state is the length of the chain of timed exits from it to a state where it
stops, and a chain that comes back on itself never settles. networkx finds both: the cycles as
strongly connected components, the chain length as the longest weighted path of the acyclic
rest. A retry ladder is bounded apart from that: its steps advance on the failure event that
each attempt provokes, so it ends within the sum of its step delays if every attempt fails.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import networkx as nx

from .lower import MachineTables, TimerRow

StopKind = Literal["final", "resting", "event", "cycle"]

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
    why it stops there: a final or resting state, or a state only an outside event leaves."""

    state: str
    within_ms: int | None
    path: tuple[str, ...]
    stops_in: str
    stop: StopKind
    within_text: str = "0"

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

    @cached_property
    def _by_state(self) -> dict[str, StateBound]:
        return {b.state: b for b in self.states}

    def bound(self, state: str) -> StateBound:
        # By index: a diagram asks for every state's bound, and a scan each was quadratic.
        return self._by_state[state]

    def waiting(self) -> tuple[str, ...]:
        """States only an outside event can leave, that are neither final nor resting."""
        return tuple(b.state for b in self.states if b.stop == "event" and b.within_ms == 0)


def _resting(tables: MachineTables) -> set[str]:
    return {s.name for s in tables.states if s.resting}


def timed_exit(state: str, timers: Iterable[TimerRow]) -> TimerRow | None:
    """The timer that takes an instance out of `state` first, if any."""
    # A delay from an event field or a setting is known only at run time: no bound from it.
    leaving = [
        t
        for t in timers
        if t.target is not None and t.after_field is None and t.after_setting is None
    ]
    return min(leaving, key=lambda t: t.after_ms, default=None)


def explain(tables: MachineTables) -> Explanation:
    finals, resting = set(tables.finals), _resting(tables)
    timers = dict(tables.timers)
    graph: nx.DiGraph[str] = nx.DiGraph()
    graph.add_nodes_from(s.name for s in tables.states)
    exits: dict[str, TimerRow] = {}
    for state in tables.states:
        if state.name in finals or state.name in resting:
            continue
        exit_timer = timed_exit(state.name, timers.get(state.name, ()))
        if exit_timer is not None and exit_timer.target is not None:
            exits[state.name] = exit_timer
            graph.add_edge(state.name, exit_timer.target, weight=exit_timer.after_ms)
    cyclic: set[str] = set()
    for component in nx.strongly_connected_components(graph):
        first = next(iter(component))
        if len(component) > 1 or graph.has_edge(first, first):
            cyclic |= component
    # Every state that leads into a cycle never stops either: one walk back from all of them
    # (an `ancestors` query per cyclic state was quadratic on large machines).
    never = set(cyclic)
    pending = list(cyclic)
    while pending:
        for before in graph.predecessors(pending.pop()):
            if before not in never:
                never.add(before)
                pending.append(before)
    acyclic = graph.subgraph(n for n in graph if n not in never)
    # The longest weighted path from every state at once, in reverse topological order (a
    # longest-path query per state was quadratic): its length and the next state on it.
    longest: dict[str, tuple[int, str | None]] = {}
    for node in reversed(list(nx.topological_sort(acyclic))):
        best: tuple[int, str | None] = (0, None)
        for after in acyclic.successors(node):
            length = acyclic[node][after]["weight"] + longest[after][0]
            if best[1] is None or length > best[0]:
                best = (length, after)
        longest[node] = best
    bounds = []
    for state in tables.states:
        name = state.name
        if name in never:
            bounds.append(StateBound(name, None, (name,), name, "cycle"))
            continue
        within = longest[name][0]
        walk = [name]
        while (following := longest[walk[-1]][1]) is not None:
            walk.append(following)
        path = tuple(walk)
        end = path[-1]
        stop: StopKind = "final" if end in finals else "resting" if end in resting else "event"
        # One timer: its duration as the designer wrote it (72h, not 3d).
        text = exits[name].after_text if len(path) == 2 else format_duration(within)
        bounds.append(StateBound(name, within, path, end, stop, text))
    return Explanation(tables.name, tuple(bounds), _ladders(tables))


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
                tuple(
                    step.after_text
                    if step.timeout_text is None
                    else f"{step.after_text} + {step.timeout_text} attempt"
                    for step in retry.steps
                ),
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


def state_bound_line(bound: StateBound) -> str | None:
    """The one-line bound a diagram shows inside a state; None for final states."""
    if bound.stop == "final" and bound.within_ms == 0:
        return None
    if bound.stop == "resting" and bound.within_ms == 0:
        return "resting"
    if bound.stop == "cycle":
        return "timers cycle: never settles"
    if bound.within_ms == 0:
        return "no bound: waits for an event"
    assert bound.within_ms is not None
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
            }[bound.stop]
        else:
            assert bound.within_ms is not None
            via = " -> ".join(bound.path)
            where = {"final": "final", "resting": "resting", "event": "then waits for an event"}
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
    waiting = explanation.waiting()
    out.append(
        "only an outside event can leave: " + (", ".join(waiting) if waiting else "no state")
    )
    return "\n".join(out) + "\n"
