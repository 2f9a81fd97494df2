"""Instance data: `data { ... }`, `keep` on rows, `emit ... to FIELD` and `$data.FIELD` in
emit arguments (E146-E149).

An instance keeps, beside its state, the data fields its rows `keep` from their causing
events; an emit may send to the instance whose id a data field holds. A field is *kept on
arrival* in a state when every way into it from the initial state keeps it on the way (a
must-analysis over the machine's moves: a new instance keeps nothing, a row adds its own
`keep`s, timers and ladders add none). An `emit ... to FIELD`, and an emit argument that reads
`$data.FIELD`, need FIELD kept wherever the emit is made: on arrival in the row's, timer's or
entry's state, plus the row's own `keep`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from .emit_args import source_misfit
from .errors import Diagnostic, RelatedLocation, SourceSpan, did_you_mean, fail, related
from .graph import machine_timer_moves
from .lower import DATA_REF
from .model import EmitArgument, EscalationEnd, EventRef, Field, Name, State

if TYPE_CHECKING:
    from .checks import MachineFacts

__all__ = ["check_data_fields", "check_emit_targets", "check_keeps", "kept_on_arrival"]


class _Way(NamedTuple):
    """A move into `target` (a declared state) from `source`, keeping `keeps`."""

    source: str
    keeps: frozenset[str]
    at: Name  # the written target: where a diagnostic points


def check_data_fields(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E146: each data field declared once, and not optional (a field is present where it is
    kept; the checks, not a `?`, say where that is)."""
    seen: set[str] = set()
    for field in facts.machine.data:
        name = field.name.value
        if name in seen:
            yield fail(
                "E146",
                f"data field '{name}' is declared twice",
                field.name.span,
                "declare each data field once",
            )
        seen.add(name)
        if field.type.optional:
            yield fail(
                "E146",
                f"data field '{name}' is marked optional",
                field.type.span,
                "drop the `?`: a data field is there wherever a `keep` has set it, and the "
                "compiler checks that every emit reading it comes after one",
            )


def check_keeps(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E147: `keep F [= C]` names a data field F and a field C of the row's event (C is F
    when not written), whose values fit F; each data field once per row."""
    data = {f.name.value: f for f in facts.machine.data}
    for _, rows in facts.keeping_rows:
        for row in rows:
            event = facts.events.get(row.event.value)
            causing = {} if event is None else {f.name.value: f for f in event.fields}
            kept: set[str] = set()
            for keep in row.keeps:
                name = keep.field.value
                wanted = data.get(name)
                if wanted is None:
                    yield fail(
                        "E147",
                        f"'{name}' is not a data field of '{facts.machine.name.value}'",
                        keep.field.span,
                        did_you_mean(name, data)
                        or f"declare it: data {{ {name}: str }} in the machine",
                    )
                    continue
                if name in kept:
                    yield fail(
                        "E147", f"'{name}' is kept twice on one row", keep.span, "keep it once"
                    )
                    continue
                kept.add(name)
                if event is None:
                    continue  # E106
                source = causing.get(keep.source.value)
                if source is None:
                    yield fail(
                        "E147",
                        f"event '{row.event.value}' has no field '{keep.source.value}' to keep",
                        keep.source.span,
                        did_you_mean(keep.source.value, causing)
                        or f"its fields: {', '.join(causing) or 'none'}; "
                        "write `keep field = causing_field`",
                    )
                    continue
                problem = source_misfit(source, wanted)
                if problem is not None:
                    yield fail(
                        "E147",
                        f"keep '{name}': {problem}",
                        keep.span,
                        "keep a required field of the same type (an enum fits str, int "
                        "fits decimal)",
                    )


def check_emit_targets(facts: MachineFacts) -> Iterator[Diagnostic]:
    """E148: `emit ... to F` names a `str` data field. E149: F, and every data field an
    argument reads (`$data.F`, its own or its refusal notice's), is kept on every way to
    where the emit is made (an argument naming no data field is E142's)."""
    sites = list(_data_emits(facts))
    if not sites:
        return
    data = {f.name.value: f for f in facts.machine.data}
    arrival: dict[str, frozenset[str]] | None = None
    ways: dict[str, list[_Way]] = {}
    for ref, states, extra in sites:
        reads: list[tuple[str, SourceSpan, str]] = []  # (field, where, what reads it)
        if ref.to is not None:
            name = ref.to.value
            field = data.get(name)
            if field is None:
                yield fail(
                    "E148",
                    f"emit to '{name}': '{facts.machine.name.value}' has no data field '{name}'",
                    ref.to.span,
                    did_you_mean(name, data)
                    or f"declare it (data {{ {name}: str }}) and `keep` it on the rows that "
                    "lead here",
                )
            elif field.type.kind != "str" or field.type.optional:
                yield fail(
                    "E148",
                    f"emit to '{name}': the data field is {_kind(field)}, not a str instance id",
                    ref.to.span,
                    f"declare '{name}: str', or send to another field that holds the id",
                )
            else:
                reads.append((name, ref.to.span, f"emit to '{name}'"))
        for arg, value in _data_args(ref):
            if value in data:
                what = f"argument '{arg.field.value}' reads '{value}'"
                reads.append((value, arg.value.span, what))
        if not reads:
            continue
        if arrival is None:
            ways = _ways_in(facts)
            arrival = kept_on_arrival(facts, ways)
        if facts.initial is None:
            continue
        for name, where, what in reads:
            if extra is not None and name in extra:
                continue
            for state in states:
                here = arrival.get(state)
                if here is None or name in here:
                    continue  # unreachable (W201's), or kept
                yield fail(
                    "E149",
                    f"{what} in '{state}': '{name}' is not kept on every way there",
                    where,
                    (f"`keep {name}` on this row, or " if extra is not None else f"`keep {name}` ")
                    + f"on each row that leads to '{state}' (or to a state before it)",
                    list(_missing_at(facts, state, name, arrival, ways)),
                )
                break


def _data_args(ref: EventRef) -> Iterator[tuple[EmitArgument, str]]:
    """Each argument of the emit (and of its refusal notice) that reads `$data.FIELD`, with
    FIELD."""
    for event_ref in (ref, ref.refused):
        if event_ref is None:
            continue
        for arg in event_ref.args:
            value = arg.value
            if value.kind == "ref" and value.text.startswith(DATA_REF):
                yield arg, value.text[len(DATA_REF) :]


def _reads_data(ref: EventRef) -> bool:
    return ref.to is not None or any(True for _ in _data_args(ref))


def kept_on_arrival(
    facts: MachineFacts, ways: dict[str, list[_Way]] | None = None
) -> dict[str, frozenset[str]]:
    """Each reachable state with the data fields kept on every way into it from the initial
    state (the greatest fixed point: start from all fields, narrow along the moves)."""
    everything = frozenset(f.name.value for f in facts.machine.data)
    reachable = facts.reachable
    if ways is None:
        ways = _ways_in(facts)
    out: dict[str, list[tuple[str, frozenset[str]]]] = defaultdict(list)
    for target, ins in ways.items():
        for way in ins:
            if way.source in reachable:
                out[way.source].append((target, way.keeps))
    kept = {state: everything for state in reachable}
    pending = list(reachable)
    if facts.initial is not None:
        kept[facts.initial.name.value] = frozenset()
        pending.append(facts.initial.name.value)
    initial = None if facts.initial is None else facts.initial.name.value
    while pending:
        source = pending.pop()
        have = kept[source]
        for target, keeps in out.get(source, ()):
            if target == initial:
                continue  # a new instance keeps nothing, whatever else enters the state
            narrowed = kept[target] & (have | keeps)
            if narrowed != kept[target]:
                kept[target] = narrowed
                pending.append(target)
    return kept


def _ways_in(facts: MachineFacts) -> dict[str, list[_Way]]:
    """Every move into each declared state: rows (with their `keep`s), timers, escalation
    ends, retry ladders, group and creation timers (these keep nothing)."""
    declared = facts.states
    ways: dict[str, list[_Way]] = defaultdict(list)

    def add(source: str, target: Name, keeps: frozenset[str] = frozenset()) -> None:
        if target.value in declared:
            ways[target.value].append(_Way(source, keeps, target))

    for state in facts.machine.states:
        source = state.name.value
        for row in state.transitions:
            add(source, row.target, frozenset(k.field.value for k in row.keeps))
        for timer in state.timers:
            if timer.target is not None:
                add(source, timer.target)
        for escalation in state.escalations:
            if escalation.end is not None:
                add(source, escalation.end.target)
    for edge in facts.retry_edges:
        add(edge.source.value, edge.target)
    for source, target in machine_timer_moves(facts.machine):
        add(source, target)
    return ways


def _data_emits(
    facts: MachineFacts,
) -> Iterator[tuple[EventRef, list[str], frozenset[str] | None]]:
    """Each emit that reads data (`to F`, or an argument `$data.F`) with the states it can be
    made in and, for a row's emit, the fields the row keeps (a row's `keep` comes before its
    emits); None for other emits."""
    machine = facts.machine
    for state in facts.emitting_states:
        here = [state.name.value]
        for row in facts.emitting_rows(state):
            if any(_reads_data(ref) for ref in row.emits):
                keeps = frozenset(k.field.value for k in row.keeps)
                yield from ((ref, here, keeps) for ref in row.emits if _reads_data(ref))
    for state in facts.timed:
        emits = [end.emits for end in _ends(state)] + [timer.emits for timer in state.timers]
        yield from (
            (ref, [state.name.value], None) for refs in emits for ref in refs if _reads_data(ref)
        )
    for state in facts.entered:
        emits = [entry.emits for entry in state.entries]
        yield from (
            (ref, [state.name.value], None) for refs in emits for ref in refs if _reads_data(ref)
        )
    for mtimer in machine.machine_timers:
        if any(_reads_data(ref) for ref in mtimer.emits):
            # machine_timer_moves yields each timer's own target name: its firing states.
            froms = [s for s, target in machine_timer_moves(machine) if target is mtimer.target]
            yield from ((ref, froms, None) for ref in mtimer.emits if _reads_data(ref))
    for ladder in machine.retries:
        end = ladder.exhausted
        if end is None or not any(_reads_data(ref) for ref in end.emits):
            continue
        if ladder.steps:
            last = ladder.steps[-1]
            froms = [last.state.value] + ([last.attempt.value] if last.attempt else [])
        else:
            froms = [entry.value for entry in ladder.entry_states]
        yield from ((ref, froms, None) for ref in end.emits if _reads_data(ref))


def _ends(state: State) -> Iterator[EscalationEnd]:
    for escalation in state.escalations:
        if escalation.end is not None:
            yield escalation.end


def _missing_at(
    facts: MachineFacts,
    state: str,
    name: str,
    arrival: dict[str, frozenset[str]],
    ways: dict[str, list[_Way]],
) -> Iterator[RelatedLocation]:
    """Where `name` is lost on the way into `state`: its creation, or a way in without it."""
    if facts.initial is not None and facts.initial.name.value == state:
        span = facts.initial.name.span
        yield related(span, f"a new instance starts in '{state}' keeping nothing")
        return
    for way in ways.get(state, ()):
        if way.source in arrival and name not in arrival[way.source] | way.keeps:
            yield related(way.at.span, f"entered from '{way.source}' here without keeping '{name}'")
            return


def _kind(field: Field) -> str:
    return field.type.kind + ("?" if field.type.optional else "")
