"""Graph views of a machine as plain adjacency sets: one edge for every way a state can move."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from .errors import SourceSpan
from .model import Machine, Name, RetryLadder, State


@dataclass(frozen=True, slots=True)
class RetryEdge:
    """One move a retry ladder lowers to: `event` in `source` goes to `target`.

    `origin` is the name that creates the move: an entry state, the next step's state,
    or the exhausted target."""

    ladder: RetryLadder
    source: Name
    target: Name
    origin: SourceSpan


def retry_edges(ladder: RetryLadder) -> Iterator[RetryEdge]:
    """entry -> step 1 -> ... -> step n -> exhausted, as in the lowered transition table."""
    first_stop = ladder.steps[0].state if ladder.steps else None
    if first_stop is None and ladder.exhausted is not None:
        first_stop = ladder.exhausted.target
    if first_stop is not None:
        for entry in ladder.entry_states:
            yield RetryEdge(ladder, entry, first_stop, entry.span)
    for before, after in zip(ladder.steps, ladder.steps[1:], strict=False):
        yield RetryEdge(ladder, before.state, after.state, after.state.span)
    if ladder.steps and ladder.exhausted is not None:
        target = ladder.exhausted.target
        yield RetryEdge(ladder, ladder.steps[-1].state, target, target.span)


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
    return moves


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
