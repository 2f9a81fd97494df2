"""Graph views of a machine (plain sets, networkx): one edge for every way a state can move."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import SourceSpan
from .model import Machine, Name, RetryLadder, State

if TYPE_CHECKING:
    import networkx as nx  # imported where used: it takes a tenth of a second to load

EdgeKind = Literal["transition", "timeout", "escalation_end", "retry"]


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


def edges(machine: Machine) -> Iterator[tuple[str, str, EdgeKind]]:
    """(source, target, kind) for every move written in or lowered from the machine."""
    for state in machine.states:
        source = state.name.value
        for transition in state.transitions:
            yield source, transition.target.value, "transition"
        for timer in state.timers:
            if timer.target is not None:
                yield source, timer.target.value, "timeout"
        for escalation in state.escalations:
            if escalation.end is not None:
                yield source, escalation.end.target.value, "escalation_end"
    for ladder in machine.retries:
        for edge in retry_edges(ladder):
            yield edge.source.value, edge.target.value, "retry"


def machine_graph(machine: Machine) -> nx.DiGraph[str]:
    """States as nodes (first declaration of a name wins); edges to undeclared states are
    left out. Each edge carries `kinds`, the set of EdgeKind values that produce it."""
    import networkx as nx

    declared = {state.name.value for state in machine.states}
    kinds: dict[tuple[str, str], set[str]] = {}
    for source, target, kind in edges(machine):
        if source in declared and target in declared:
            kinds.setdefault((source, target), set()).add(kind)
    graph: nx.DiGraph[str] = nx.DiGraph()
    graph.add_nodes_from(state.name.value for state in machine.states)
    graph.add_edges_from((source, target, {"kinds": k}) for (source, target), k in kinds.items())
    return graph


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
    `written_moves`, machine_graph's adjacency as plain sets, which is what the checks walk
    (building a networkx graph of a large machine costs more than all their walks)."""
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


def reachable_from(graph: nx.DiGraph[str], start: str) -> set[str]:
    """`start` and every state some sequence of moves leads to from it."""
    import networkx as nx

    return nx.descendants(graph, start) | {start}


def reaching(graph: nx.DiGraph[str], goals: Iterable[str]) -> set[str]:
    """Every state from which some goal state can be reached (goals included)."""
    import networkx as nx

    sources = [goal for goal in goals if goal in graph]
    if not sources:
        return set()
    layers = nx.bfs_layers(graph.reverse(copy=False), sources)
    return {state for layer in layers for state in layer}
