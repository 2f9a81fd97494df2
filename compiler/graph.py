"""Graph views of a machine as plain adjacency sets: one edge for every way a state can move."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from .errors import SourceSpan
from .model import Machine, Name, RetryLadder, State


@dataclass(frozen=True, slots=True)
class RetryEdge:
    """One move a retry ladder lowers to: `event` in `source` goes to `target` (`by_event`),
    or a timer does (a step's wait ending in its attempt, an attempt's timeout).

    `origin` is the name that creates the move: an entry state, the next step's state,
    the attempt state, or the exhausted target."""

    ladder: RetryLadder
    source: Name
    target: Name
    origin: SourceSpan
    by_event: bool = True


def retry_edges(ladder: RetryLadder) -> Iterator[RetryEdge]:
    """entry -> step 1 -> ... -> step n -> exhausted, as in the lowered transition table. A
    step with an attempt state waits in its own state (the failure event is not taken
    there), moves to the attempt by timer, and the attempt moves on by the failure event or
    its timeout."""
    first_stop = ladder.steps[0].state if ladder.steps else None
    if first_stop is None and ladder.exhausted is not None:
        first_stop = ladder.exhausted.target
    if first_stop is not None:
        for entry in ladder.entry_states:
            yield RetryEdge(ladder, entry, first_stop, entry.span)
    stops: list[Name] = [step.state for step in ladder.steps[1:]]
    if ladder.exhausted is not None:
        stops.append(ladder.exhausted.target)
    for step, following in zip(ladder.steps, stops, strict=False):
        if step.attempt is None:
            yield RetryEdge(ladder, step.state, following, following.span)
        else:
            yield RetryEdge(ladder, step.state, step.attempt, step.attempt.span, by_event=False)
            yield RetryEdge(ladder, step.attempt, following, following.span)
            yield RetryEdge(ladder, step.attempt, following, following.span, by_event=False)
    if ladder.steps and ladder.exhausted is None:
        last = ladder.steps[-1]
        if last.attempt is not None:
            yield RetryEdge(ladder, last.state, last.attempt, last.attempt.span, by_event=False)


def state_moves(state: State) -> set[str]:
    """The state names that the moves written in `state` (transitions, timers, escalation
    ends) lead to, declared or not."""
    targets = {t.target.value for t in state.transitions}
    for timer in state.timers:
        if timer.target is not None:
            targets.add(timer.target.value)
    for escalation in state.escalations:
        if escalation.end is not None:
            targets.add(escalation.end.target.value)
    return targets


def written_moves(
    machine: Machine, moves_of: Callable[[State], set[str]] = state_moves
) -> dict[str, set[str]]:
    """Every declared state (in declaration order) with the names its moves (as `edges`
    lists them) lead to, declared or not. `moves_of` gives those of one state: `state_moves`,
    or what a caller that already walked the states kept of it."""
    moves: dict[str, set[str]] = {state.name.value: set() for state in machine.states}
    for state in machine.states:
        moves[state.name.value] |= moves_of(state)
    for ladder in machine.retries:
        for edge in retry_edges(ladder):
            if edge.source.value in moves:
                moves[edge.source.value].add(edge.target.value)
    for source, target in machine_timer_moves(machine):
        moves[source].add(target.value)
    return moves


def machine_timer_moves(machine: Machine) -> Iterator[tuple[str, Name]]:
    """(declared source state, target) of group and creation timers: a group timer can fire
    in every state of its group, a creation timer in every state that is not final."""
    if not machine.machine_timers:
        return
    groups = {group.name.value: group for group in machine.groups}
    declared = {state.name.value: state for state in machine.states}
    for timer in machine.machine_timers:
        if timer.scope == "creation":
            sources = [name for name, state in declared.items() if not state.final]
        else:
            group = groups.get(timer.group.value) if timer.group is not None else None
            members = [] if group is None else [n.value for n in group.states]
            sources = [name for name in members if name in declared]
        for source in sources:
            yield source, timer.target


def declared_only(moves: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """`moves` without the names that are not declared states (the keys): of
    `written_moves`: the adjacency the checks walk (plain sets: building a networkx graph of a
    large machine cost more than all the walks of the checks together)."""
    declared = moves.keys()
    return {source: targets & declared for source, targets in moves.items()}


def predecessors(moves: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """The reverse of an adjacency: each state with the states that move to it."""
    before: dict[str, set[str]] = {state: set() for state in moves}
    for source, targets in moves.items():
        for target in targets:
            before[target].add(source)
    return before


def closure(moves: Mapping[str, set[str]], starts: Iterable[str]) -> set[str]:
    """`starts` and every state some sequence of moves in `moves` leads to from them."""
    found = set(starts)
    pending = list(found)
    while pending:
        fresh = moves[pending.pop()] - found
        found |= fresh
        pending.extend(fresh)
    return found
