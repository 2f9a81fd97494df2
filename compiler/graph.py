"""networkx views of a machine: one edge for every way a state can move to another."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import networkx as nx

from .errors import SourceSpan
from .model import Machine, Name, RetryLadder

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
    declared = {state.name.value for state in machine.states}
    kinds: dict[tuple[str, str], set[str]] = {}
    for source, target, kind in edges(machine):
        if source in declared and target in declared:
            kinds.setdefault((source, target), set()).add(kind)
    graph: nx.DiGraph[str] = nx.DiGraph()
    graph.add_nodes_from(state.name.value for state in machine.states)
    graph.add_edges_from((source, target, {"kinds": k}) for (source, target), k in kinds.items())
    return graph


def reachable_from(graph: nx.DiGraph[str], start: str) -> set[str]:
    """`start` and every state some sequence of moves leads to from it."""
    return nx.descendants(graph, start) | {start}


def reaching(graph: nx.DiGraph[str], goals: Iterable[str]) -> set[str]:
    """Every state from which some goal state can be reached (goals included)."""
    sources = [goal for goal in goals if goal in graph]
    if not sources:
        return set()
    layers = nx.bfs_layers(graph.reverse(copy=False), sources)
    return {state for layer in layers for state in layer}
