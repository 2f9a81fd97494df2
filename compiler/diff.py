"""`autonomic diff`: what a change to machine files means, not which lines moved.

Two versions of a set of machine files (two files, two folders, or a git revision and the
working tree) are read into their models and compared machine by machine (by name) and flow by
flow: states, events and their fields, transitions, guards, timers, ladder steps, ignores and
flows added, removed or changed. A removed state (or event) and an added one that play the same
part are reported as a rename: each pair is scored by how much of its surroundings (doc,
transitions in and out, timers; an event's fields and where it is handled) the two share, and
networkx's maximum weight matching picks the renames, so two similar pairs are never crossed.

The same comparison drives the migration check: states that live instances occupy and that the
new version removes (or renames, or makes unreachable), and armed timers whose state or target
it removes, are errors that name the states and how many instances or timers are affected.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import networkx as nx

from .diagram import Diagram, DiagramEdge, DiagramNode, build_diagram
from .lower import MachineTables, TimerRow, TransitionRow, lower
from .model import Duration, EmitValue, Flow, Machine, Name

ChangeKind = Literal["added", "removed", "changed", "renamed"]
Status = Literal["added", "removed", "changed"]
RENAME_THRESHOLD = 0.5
SIGNS: dict[str, str] = {"added": "+", "removed": "-", "changed": "~", "renamed": "~"}


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    what: str  # state, event, field, transition, guard, timer, ladder step, ignore, flow, ...
    name: str
    detail: str = ""

    def text(self) -> str:
        tail = f": {self.detail}" if self.detail else ""
        return f"{SIGNS[self.kind]} {self.kind} {self.what} {self.name}{tail}"


@dataclass
class MachineChange:
    """The changes of one machine, with both versions' tables (None: absent there)."""

    name: str
    path: str
    old: MachineTables | None
    new: MachineTables | None
    changes: list[Change] = field(default_factory=list)
    state_renames: dict[str, str] = field(default_factory=dict)  # old -> new
    event_renames: dict[str, str] = field(default_factory=dict)


@dataclass
class Difference:
    machines: list[MachineChange]
    flows: list[Change]

    @property
    def empty(self) -> bool:
        return not self.flows and not any(m.changes for m in self.machines)


# ---------------------------------------------------------------- comparing


def _rows(tables: MachineTables) -> list[TransitionRow]:
    return [row for _, rows in tables.transitions for row in rows]


def _timers(tables: MachineTables) -> list[TimerRow]:
    return [timer for _, timers in tables.timers for timer in timers]


def _row_text(row: TransitionRow) -> str:
    text = f"{row.source} --{row.event}"
    if row.guard is not None:
        text += f" [{row.guard}]"
    return text + f"--> {row.target}"


def _consequence(
    actions: tuple[str, ...], emits: Iterable[Any], keeps: tuple[tuple[str, str], ...] = ()
) -> str:
    parts = []
    if actions:
        parts.append("do " + ", ".join(actions))
    if keeps:
        parts.append("keep " + ", ".join(f if f == c else f"{f} = {c}" for f, c in keeps))
    # Where an emit goes and what tells its sender of a refusal change its meaning too.
    names = [
        f"{e.machine}.{e.event}"
        + ("" if e.to is None else f" to {e.to}")
        + ("" if e.refused is None else f" if refused {e.refused.event}")
        for e in emits
    ]
    if names:
        parts.append("emit " + ", ".join(names))
    return " ".join(parts) or "nothing"


def _state_neighbourhood(tables: MachineTables, state: str, renames: dict[str, str]) -> set[str]:
    """What surrounds a state, in the new version's names, with the state itself as `@`."""

    def name(other: str) -> str:
        other = renames.get(other, other)
        return "@" if other == state else other

    marks: set[str] = set()
    for row in _rows(tables):
        if row.source == state:
            marks.add(f"out {row.event} {row.guard} {name(row.target)}")
        if row.target == state:
            marks.add(f"in {name(row.source)} {row.event}")
    for timer in _timers(tables):
        if timer.state == state:
            marks.add(f"timer {timer.kind} {timer.after_ms} {timer.target and name(timer.target)}")
    doc = next((s.doc for s in tables.states if s.name == state), None)
    if doc:
        marks.add(f"doc {doc}")
    return marks


def _event_neighbourhood(machine: Machine, event: str) -> set[str]:
    marks: set[str] = set()
    for declared in machine.events:
        if declared.name.value == event:
            marks |= {f"field {f.name.value} {f.type.kind}" for f in declared.fields}
            if declared.doc:
                marks.add(f"doc {declared.doc}")
    for state in machine.states:
        for transition in state.transitions:
            if transition.event.value == event:
                marks.add(f"on {state.name.value} {transition.target.value}")
    return marks


def _similarity(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 0.0
    return len(a & b) / len(a | b)


def match_renames(
    removed: Sequence[str], added: Sequence[str], score: Any, threshold: float = RENAME_THRESHOLD
) -> dict[str, str]:
    """Pairs (removed -> added) of one maximum weight matching over the scores at or above
    `threshold`: each name is in at most one pair."""
    graph: nx.Graph[tuple[str, str]] = nx.Graph()
    for old, new in itertools.product(removed, added):
        weight = score(old, new)
        if weight >= threshold:
            graph.add_edge(("old", old), ("new", new), weight=weight)
    pairs: dict[str, str] = {}
    for a, b in nx.max_weight_matching(graph):
        old_end, new_end = (a, b) if a[0] == "old" else (b, a)
        pairs[old_end[1]] = new_end[1]
    return dict(sorted(pairs.items()))


def compare_machines(old: Machine | None, new: Machine | None, path: str) -> MachineChange:
    old_tables = lower(old, others=None) if old is not None else None
    new_tables = lower(new, others=None) if new is not None else None
    name = (new or old).name.value if (new or old) is not None else "?"  # type: ignore[union-attr]
    result = MachineChange(name, path, old_tables, new_tables)
    if old_tables is None or new_tables is None:
        result.changes.append(Change("added" if old is None else "removed", "machine", name))
        return result
    assert old is not None and new is not None
    _compare_events(old, new, result)
    _compare_states(old_tables, new_tables, result)
    _compare_transitions(old_tables, new_tables, result)
    _compare_timers(old_tables, new_tables, result)
    _compare_ladders(old_tables, new_tables, result)
    _compare_ignores(old_tables, new_tables, result)
    if old.doc != new.doc:
        result.changes.append(Change("changed", "doc of machine", name))
    return result


def _compare_events(old: Machine, new: Machine, result: MachineChange) -> None:
    old_events = {e.name.value: e for e in old.events}
    new_events = {e.name.value: e for e in new.events}
    removed = [e for e in old_events if e not in new_events]
    added = [e for e in new_events if e not in old_events]
    renames = match_renames(
        removed,
        added,
        lambda a, b: _similarity(_event_neighbourhood(old, a), _event_neighbourhood(new, b)),
    )
    result.event_renames = renames
    for before, after in renames.items():
        result.changes.append(Change("renamed", "event", before, f"now {after}"))
    for event in removed:
        if event not in renames:
            result.changes.append(Change("removed", "event", event))
    for event in added:
        if event not in renames.values():
            result.changes.append(Change("added", "event", event))
    for before, declared in old_events.items():
        now = new_events.get(renames.get(before, before))
        if now is None:
            continue
        old_fields = {f.name.value: _field_text(f) for f in declared.fields}
        new_fields = {f.name.value: _field_text(f) for f in now.fields}
        for name in sorted(old_fields.keys() | new_fields.keys()):
            where = f"{now.name.value}.{name}"
            if name not in new_fields:
                result.changes.append(Change("removed", "field", where, old_fields[name]))
            elif name not in old_fields:
                result.changes.append(Change("added", "field", where, new_fields[name]))
            elif old_fields[name] != new_fields[name]:
                detail = f"{old_fields[name]} -> {new_fields[name]}"
                result.changes.append(Change("changed", "field", where, detail))


def _field_text(field_: Any) -> str:
    kind: str = field_.type.kind
    if kind == "enum":
        kind = "enum(" + ", ".join(lit.value for lit in field_.type.literals) + ")"
    return kind + ("?" if field_.type.optional else "")


def _compare_states(old: MachineTables, new: MachineTables, result: MachineChange) -> None:
    old_states = {s.name: s for s in old.states}
    new_states = {s.name: s for s in new.states}
    removed = [s for s in old_states if s not in new_states]
    added = [s for s in new_states if s not in old_states]
    # Score with the other renames applied: first without any (the neighbourhoods name the
    # kept states, which anchor the match).
    renames = match_renames(
        removed,
        added,
        lambda a, b: _similarity(
            _state_neighbourhood(old, a, {a: b}), _state_neighbourhood(new, b, {})
        ),
    )
    result.state_renames = renames
    for before, after in renames.items():
        result.changes.append(Change("renamed", "state", before, f"now {after}"))
    for state in removed:
        if state not in renames:
            result.changes.append(Change("removed", "state", state))
    for state in added:
        if state not in renames.values():
            result.changes.append(Change("added", "state", state))
    for before, old_row in old_states.items():
        new_row = new_states.get(renames.get(before, before))
        if new_row is None:
            continue
        for flag in ("initial", "final", "perpetual", "resting"):
            was, now = getattr(old_row, flag, False), getattr(new_row, flag, False)
            if was != now:
                detail = f"{'now' if now else 'no longer'} {flag}"
                result.changes.append(Change("changed", "state", new_row.name, detail))
        if old_row.doc != new_row.doc:
            result.changes.append(Change("changed", "state", new_row.name, "doc"))


def _renamed_row(
    row: TransitionRow, states: dict[str, str], events: dict[str, str]
) -> tuple[str, str, str | None]:
    return (states.get(row.source, row.source), events.get(row.event, row.event), row.guard)


def _compare_transitions(old: MachineTables, new: MachineTables, result: MachineChange) -> None:
    states, events = result.state_renames, result.event_renames
    # Rows lowered from retry ladders are compared as ladder steps.
    old_rows = {_renamed_row(r, states, events): r for r in _rows(old) if r.ladder is None}
    new_rows = {(r.source, r.event, r.guard): r for r in _rows(new) if r.ladder is None}
    gone = [key for key in old_rows if key not in new_rows]
    came = [key for key in new_rows if key not in old_rows]
    # Same state, event and target, another guard: the guard changed.
    for key in list(gone):
        row = old_rows[key]
        target = states.get(row.target, row.target)
        match = next((k for k in came if k[:2] == key[:2] and new_rows[k].target == target), None)
        if match is not None:
            gone.remove(key)
            came.remove(match)
            detail = f"[{key[2] or 'none'}] -> [{match[2] or 'none'}]"
            name = f"{match[0]} --{match[1]}--> {target}"
            result.changes.append(Change("changed", "guard", name, detail))
    for key in gone:
        result.changes.append(Change("removed", "transition", _row_text(old_rows[key])))
    for key in came:
        result.changes.append(Change("added", "transition", _row_text(new_rows[key])))
    for key, row in old_rows.items():
        after = new_rows.get(key)
        if after is None:
            continue
        target = states.get(row.target, row.target)
        details = []
        if target != after.target:
            details.append(f"target {target} -> {after.target}")
        before_c = _consequence(row.actions, row.emits, row.keep)
        after_c = _consequence(after.actions, after.emits, after.keep)
        if before_c != after_c:
            details.append(f"{before_c} -> {after_c}")
        if details:
            result.changes.append(
                Change("changed", "transition", _row_text(after), "; ".join(details))
            )


def _timer_key(
    timer: TimerRow, states: dict[str, str]
) -> tuple[str, str, str | None, int | None, int]:
    # Plain timers of a state are told apart by when they fire; ladder timers by their step.
    moment = timer.after_ms if timer.kind == "timeout" else 0
    return (states.get(timer.state, timer.state), timer.kind, timer.ladder, timer.step, moment)


def _timer_text(timer: TimerRow) -> str:
    target = f" -> {timer.target}" if timer.target else ""
    ladder = f" ({timer.ladder} step {timer.step})" if timer.ladder and timer.step else ""
    if timer.ladder and timer.kind == "escalation_end":
        ladder = f" ({timer.ladder} end)"
    return f"{timer.state} after {timer.after_text}{ladder}{target}"


def _compare_timers(old: MachineTables, new: MachineTables, result: MachineChange) -> None:
    states = result.state_renames
    kinds = ("timeout", "escalation_step", "escalation_end")
    old_timers = {_timer_key(t, states): t for t in _timers(old) if t.kind in kinds}
    new_timers = {_timer_key(t, {}): t for t in _timers(new) if t.kind in kinds}
    what = {
        "timeout": "timer",
        "escalation_step": "escalation step",
        "escalation_end": "escalation end",
    }
    # A plain timer whose duration changed: same state, one timer gone and one come.
    gone = [k for k in old_timers if k not in new_timers]
    came = [k for k in new_timers if k not in old_timers]
    for key in list(gone):
        match = next((k for k in came if k[:4] == key[:4]), None)
        if match is not None:
            gone.remove(key)
            came.remove(match)
            old_timers[match] = old_timers.pop(key)
    for key in gone:
        timer = old_timers[key]
        result.changes.append(Change("removed", what[timer.kind], _timer_text(timer)))
    for key in came:
        timer = new_timers[key]
        result.changes.append(Change("added", what[timer.kind], _timer_text(timer)))
    for key, timer in old_timers.items():
        after = new_timers.get(key)
        if after is None:
            continue
        details = []
        if timer.after_ms != after.after_ms:
            details.append(f"after {timer.after_text} -> {after.after_text}")
        target = states.get(timer.target, timer.target) if timer.target else None
        if target != after.target:
            details.append(f"target {target or 'none'} -> {after.target or 'none'}")
        if _consequence(timer.actions, timer.emits) != _consequence(after.actions, after.emits):
            before_c = _consequence(timer.actions, timer.emits)
            details.append(f"{before_c} -> {_consequence(after.actions, after.emits)}")
        if timer.notify != after.notify and timer.notify and after.notify:
            details.append("notification")
        if details:
            result.changes.append(
                Change("changed", what[after.kind], _timer_text(after), "; ".join(details))
            )


def _compare_ladders(old: MachineTables, new: MachineTables, result: MachineChange) -> None:
    states = result.state_renames
    old_ladders = {r.name: r for r in old.retries}
    new_ladders = {r.name: r for r in new.retries}
    for name in sorted(old_ladders.keys() - new_ladders.keys()):
        result.changes.append(Change("removed", "retry ladder", name))
    for name in sorted(new_ladders.keys() - old_ladders.keys()):
        result.changes.append(Change("added", "retry ladder", name))
    for name in sorted(old_ladders.keys() & new_ladders.keys()):
        before, after = old_ladders[name], new_ladders[name]
        old_steps = [(states.get(s.state, s.state), s.after_text, s.actions) for s in before.steps]
        new_steps = [(s.state, s.after_text, s.actions) for s in after.steps]
        for index in range(max(len(old_steps), len(new_steps))):
            label = f"{name} step {index + 1}"
            was = old_steps[index] if index < len(old_steps) else None
            now = new_steps[index] if index < len(new_steps) else None
            if was == now:
                continue
            if was is None:
                assert now is not None
                result.changes.append(
                    Change("added", "ladder step", label, f"{now[0]} after {now[1]}")
                )
            elif now is None:
                result.changes.append(
                    Change("removed", "ladder step", label, f"{was[0]} after {was[1]}")
                )
            else:
                detail = f"{was[0]} after {was[1]} -> {now[0]} after {now[1]}"
                if was[:2] == now[:2]:
                    before_do, after_do = ", ".join(was[2]), ", ".join(now[2])
                    detail = f"do {before_do or 'nothing'} -> do {after_do or 'nothing'}"
                result.changes.append(Change("changed", "ladder step", label, detail))
        before_end = states.get(before.exhausted_target or "", before.exhausted_target)
        if before_end != after.exhausted_target:
            detail = f"{before_end} -> {after.exhausted_target}"
            result.changes.append(Change("changed", "ladder end", name, detail))
        if set(states.get(s, s) for s in before.entry_states) != set(after.entry_states):
            detail = f"{', '.join(before.entry_states)} -> {', '.join(after.entry_states)}"
            result.changes.append(Change("changed", "ladder entry", name, detail))


def _compare_ignores(old: MachineTables, new: MachineTables, result: MachineChange) -> None:
    states, events = result.state_renames, result.event_renames
    old_ignored = {(states.get(s, s), events.get(e, e)) for s, evs in old.ignored for e in evs}
    new_ignored = {(s, e) for s, evs in new.ignored for e in evs}
    for state, event in sorted(old_ignored - new_ignored):
        result.changes.append(Change("removed", "ignore", f"{state} ignores {event}"))
    for state, event in sorted(new_ignored - old_ignored):
        result.changes.append(Change("added", "ignore", f"{state} ignores {event}"))


def _flow_meaning(node: Any) -> Any:
    from .fmt import without_positions

    return without_positions(node.model_dump(exclude={"path"}))


def compare_flows(old: Sequence[Flow], new: Sequence[Flow]) -> list[Change]:
    before = {f.name.value: f for f in old}
    after = {f.name.value: f for f in new}
    changes = []
    for name in sorted(before.keys() - after.keys()):
        changes.append(Change("removed", "flow", name))
    for name in sorted(after.keys() - before.keys()):
        changes.append(Change("added", "flow", name, after[name].kind))
    for name in sorted(before.keys() & after.keys()):
        was, now = before[name], after[name]
        if _flow_meaning(was) == _flow_meaning(now):
            continue
        old_steps = {s.name.value: _flow_meaning(s) for s in was.all_steps()}
        new_steps = {s.name.value: _flow_meaning(s) for s in now.all_steps()}
        parts = [f"+{s}" for s in new_steps if s not in old_steps]
        parts += [f"-{s}" for s in old_steps if s not in new_steps]
        parts += [f"~{s}" for s in new_steps if s in old_steps and old_steps[s] != new_steps[s]]
        if was.kind != now.kind:
            parts.insert(0, f"{was.kind} -> {now.kind}")
        parts += _flow_settings(was, now)
        changes.append(Change("changed", "flow", name, ", ".join(parts) or "settings"))
    return changes


def _flow_settings(was: Flow, now: Flow) -> list[str]:
    """What changed in a flow beside its steps, each with its old and new value: `quorum 2 ->
    3`, `within 30s -> 1m`, `on outcome -> result`, `+input x` / `-input x` / `~input x`,
    `doc`, `branches`, `suppressions`."""
    parts = []
    clauses = {
        "on": (_written(was.on), _written(now.on)),
        "within": (_written(was.within), _written(now.within)),
        "quorum": (_written(was.quorum), _written(now.quorum)),
    }
    for clause, (before, after) in clauses.items():
        if before != after:
            parts.append(f"{clause} {before} -> {after}")
    old_inputs = {f.name.value: _flow_meaning(f) for f in was.inputs}
    new_inputs = {f.name.value: _flow_meaning(f) for f in now.inputs}
    parts += [f"+input {n}" for n in new_inputs if n not in old_inputs]
    parts += [f"-input {n}" for n in old_inputs if n not in new_inputs]
    parts += [
        f"~input {n}" for n in new_inputs if old_inputs.get(n, new_inputs[n]) != new_inputs[n]
    ]
    if was.doc != now.doc:
        parts.append("doc")
    if [b.case.value for b in was.branches] != [b.case.value for b in now.branches]:
        parts.append("branches")
    if _flow_meaning(was).get("suppressions") != _flow_meaning(now).get("suppressions"):
        parts.append("suppressions")
    return parts


def _written(value: Name | Duration | EmitValue | None) -> str:
    if value is None:
        return "(none)"
    return value.value if isinstance(value, Name) else value.text


def compare(
    old: Sequence[Machine],
    new: Sequence[Machine],
    old_flows: Sequence[Flow] = (),
    new_flows: Sequence[Flow] = (),
) -> Difference:
    before = {m.name.value: m for m in old}
    after = {m.name.value: m for m in new}
    machines = []
    for name in sorted(before.keys() | after.keys()):
        path = (after.get(name) or before[name]).path
        machines.append(compare_machines(before.get(name), after.get(name), path))
    return Difference(machines, compare_flows(old_flows, new_flows))


# ---------------------------------------------------------------- reports


def render_text(difference: Difference) -> str:
    if difference.empty:
        return "no semantic change\n"
    out = []
    for machine in difference.machines:
        if not machine.changes:
            continue
        out.append(f"{machine.name} ({machine.path})")
        out.extend(f"  {change.text()}" for change in machine.changes)
    if difference.flows:
        out.append("flows")
        out.extend(f"  {change.text()}" for change in difference.flows)
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def render_markdown(difference: Difference) -> str:
    """A pull request comment: a summary line, then a table of changes per machine."""
    if difference.empty:
        return "**autonomic diff**: no semantic change.\n"
    total = sum(len(m.changes) for m in difference.machines) + len(difference.flows)
    touched = [m.name for m in difference.machines if m.changes]
    out = [
        f"**autonomic diff**: {total} change{'s' if total != 1 else ''} in "
        + ", ".join(f"`{name}`" for name in touched)
        + (" and flows" if difference.flows else "")
        + ".",
    ]
    sections = [
        (f"`{m.name}` ({_md(m.path)})", m.changes) for m in difference.machines if m.changes
    ]
    if difference.flows:
        sections.append(("Flows", difference.flows))
    for title, changes in sections:
        out += ["", f"### {title}", "", "| | What | Name | Detail |", "|---|---|---|---|"]
        marks = {
            "added": "🟢 added",
            "removed": "🔴 removed",
            "changed": "🟠 changed",
            "renamed": "🟠 renamed",
        }
        for change in changes:
            name, detail = _md(change.name), _md(change.detail)
            out.append(f"| {marks[change.kind]} | {change.what} | `{name}` | {detail} |")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- coloured diagrams


def diff_diagram(
    machine: MachineChange,
) -> tuple[Diagram, dict[str, Status], dict[tuple[str, str], Status]]:
    """The new version's diagram with the removed states and edges of the old one put back;
    each node and edge that changed marked added, removed or changed."""
    new_d = build_diagram(machine.new) if machine.new is not None else None
    old_d = build_diagram(machine.old) if machine.old is not None else None
    renames = machine.state_renames
    nodes_status: dict[str, Status] = {}
    edges_status: dict[tuple[str, str], Status] = {}
    if new_d is None:
        assert old_d is not None
        return (
            old_d,
            {n.id: "removed" for n in old_d.nodes},
            {(e.source, e.target): "removed" for e in old_d.edges},
        )
    if old_d is None:
        return (
            new_d,
            {n.id: "added" for n in new_d.nodes},
            {(e.source, e.target): "added" for e in new_d.edges},
        )
    old_nodes = {renames.get(n.id, n.id): n for n in old_d.nodes}
    old_edges = {
        (renames.get(e.source, e.source), renames.get(e.target, e.target)): e for e in old_d.edges
    }
    nodes = list(new_d.nodes)
    for node in new_d.nodes:
        before = old_nodes.get(node.id)
        if before is None:
            nodes_status[node.id] = "added"
        elif node.id in renames.values() or _node_view(before) != _node_view(node):
            nodes_status[node.id] = "changed"
    for name, node in old_nodes.items():
        if name not in {n.id for n in new_d.nodes}:
            nodes.append(node)
            nodes_status[name] = "removed"
    edges = list(new_d.edges)
    for edge in new_d.edges:
        key = (edge.source, edge.target)
        before_e = old_edges.get(key)
        if before_e is None:
            edges_status[key] = "added"
        elif [line.text for line in before_e.lines] != [line.text for line in edge.lines]:
            edges_status[key] = "changed"
    new_keys = {(e.source, e.target) for e in new_d.edges}
    for key, edge in old_edges.items():
        if key not in new_keys:
            edges.append(DiagramEdge(key[0], key[1], edge.lines))
            edges_status[key] = "removed"
    diagram = Diagram(new_d.name, new_d.doc, tuple(nodes), tuple(edges), new_d.clusters)
    return diagram, nodes_status, edges_status


def _node_view(node: DiagramNode) -> tuple[Any, ...]:
    return (node.doc, node.initial, node.final, node.resting, [line.text for line in node.internal])


def render_diff_dot(machine: MachineChange) -> str:
    from .diagram import render_dot

    diagram, nodes, edges = diff_diagram(machine)
    return render_dot(diagram, node_colours=nodes, edge_colours=edges)


def render_diff_mermaid(machine: MachineChange) -> str:
    from .diagram import render_mermaid

    diagram, nodes, edges = diff_diagram(machine)
    return render_mermaid(diagram, node_colours=nodes, edge_colours=edges)


# ---------------------------------------------------------------- the migration check


class InstanceRecordLike(Protocol):
    machine: str
    instance: str
    state: str


class ArmedTimerLike(Protocol):
    machine: str
    timer_id: str
    state: str


class StoreLike(Protocol):
    """What the migration check reads from a runtime store."""

    def instances(self, machine: str) -> Sequence[InstanceRecordLike]: ...

    def armed_timers(
        self, machine: str | None = None, instance: str | None = None
    ) -> Sequence[ArmedTimerLike]: ...


@dataclass(frozen=True, slots=True)
class MigrationProblem:
    machine: str
    message: str
    hint: str


def _reachable(tables: MachineTables) -> set[str]:
    graph: nx.DiGraph[str] = nx.DiGraph()
    graph.add_nodes_from(s.name for s in tables.states)
    for row in _rows(tables):
        graph.add_edge(row.source, row.target)
    for timer in _timers(tables):
        if timer.target is not None:
            graph.add_edge(timer.state, timer.target)
    return {tables.initial} | nx.descendants(graph, tables.initial)


def migration_problems(difference: Difference, store: StoreLike) -> list[MigrationProblem]:
    """Live instances in states the new version removes, renames or cannot reach, and armed
    timers whose state or target it removes."""
    problems = []
    for machine in difference.machines:
        if machine.old is None:
            continue
        new_states = {s.name for s in machine.new.states} if machine.new is not None else set()
        reachable = _reachable(machine.new) if machine.new is not None else set()
        counts: dict[str, int] = {}
        for record in store.instances(machine.name):
            counts[record.state] = counts.get(record.state, 0) + 1
        lost = []
        for state, count in sorted(counts.items()):
            if state in machine.state_renames:
                why = f"renamed to {machine.state_renames[state]}"
            elif state not in new_states:
                why = "removed"
            elif state not in reachable:
                why = "unreachable"
            else:
                continue
            lost.append(f"{count} in {state} ({why})")
        if lost:
            total = sum(int(item.split(" ", 1)[0]) for item in lost)
            problems.append(
                MigrationProblem(
                    machine.name,
                    f"{total} live instance{'s' if total != 1 else ''} of {machine.name} "
                    f"occupy states the new version drops: {'; '.join(lost)}",
                    "keep the states until the instances leave them, or migrate the instances "
                    "first",
                )
            )
        old_timers = {t.id: t for t in _timers(machine.old)}
        new_timer_ids = {t.id for t in _timers(machine.new)} if machine.new is not None else set()
        broken: dict[str, int] = {}
        for armed in store.armed_timers(machine.name):
            timer = old_timers.get(armed.timer_id)
            if timer is None:
                continue
            gone = [s for s in (timer.state, timer.target) if s is not None and s not in new_states]
            if gone or armed.timer_id not in new_timer_ids:
                where = gone[-1] if gone else timer.state
                label = (
                    f"{timer.id} (to {where}, which the new version removes)"
                    if gone
                    else (f"{timer.id} (which the new version removes)")
                )
                broken[label] = broken.get(label, 0) + 1
        if broken:
            total = sum(broken.values())
            listed = "; ".join(f"{count} x {label}" for label, count in sorted(broken.items()))
            problems.append(
                MigrationProblem(
                    machine.name,
                    f"{total} armed timer{'s' if total != 1 else ''} of {machine.name} would "
                    f"fire into nothing: {listed}",
                    "keep the timers' states and targets until the armed timers have fired",
                )
            )
    return problems
