"""One diagram IR built from the lowered tables, and its renderers: DOT, Mermaid, SVG.

Nodes are states (initial and final marked); edges are transitions labelled
`Event [guard] / actions ^emits`, timers and retry steps dashed and labelled `after 72h`;
escalation notify steps are note nodes beside their state. Output is deterministic: states
in declaration order, each state's edges in source order, then its timers in firing order.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Literal, overload

from .lower import (
    MachineTables,
    NotifyRow,
    TimerRow,
    TransitionRow,
    cycle_collection_paused,
    lower,
)
from .model import Machine

DiagramFormat = Literal["dot", "mermaid", "svg"]
FORMATS: tuple[DiagramFormat, ...] = ("dot", "mermaid", "svg")

EdgeKind = Literal["transition", "retry", "timeout", "escalation_end", "retry_step"]


@dataclass(frozen=True, slots=True)
class DiagramNode:
    id: str
    doc: str | None
    initial: bool
    final: bool


@dataclass(frozen=True, slots=True)
class DiagramEdge:
    """`lines` is the label, one entry per line; timed edges are drawn dashed."""

    source: str
    target: str
    lines: tuple[str, ...]
    kind: EdgeKind

    @property
    def dashed(self) -> bool:
        return self.kind in ("timeout", "escalation_end", "retry_step")


@dataclass(frozen=True, slots=True)
class DiagramNote:
    """The notify steps of one state's escalation ladders, shown beside the state."""

    id: str
    state: str
    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Diagram:
    name: str
    doc: str | None
    nodes: tuple[DiagramNode, ...]
    edges: tuple[DiagramEdge, ...]
    notes: tuple[DiagramNote, ...]


class DiagramToolMissing(Exception):
    """Graphviz `dot` is not installed, so SVG cannot be drawn."""


class DiagramToolFailed(Exception):
    """Graphviz `dot` ran and failed."""


# ---------------------------------------------------------------- the diagram IR


def build_diagram(tables: MachineTables) -> Diagram:
    rows_by_state: dict[str, list[TransitionRow]] = {}
    for (source, _), rows in tables.transitions:
        rows_by_state.setdefault(source, []).extend(rows)
    timers_by_state = dict(tables.timers)
    edges: list[DiagramEdge] = []
    notes: list[DiagramNote] = []
    for state in tables.states:
        written = sorted(
            rows_by_state.get(state.name, ()), key=lambda r: (r.ref.line, r.ref.column)
        )
        edges.extend(_transition_edge(row, tables.name) for row in written)
        timers = timers_by_state.get(state.name, ())
        edges.extend(_timer_edge(t, tables.name) for t in timers if t.kind != "escalation_step")
        note = _escalation_note(state.name, timers)
        if note is not None:
            notes.append(note)
    return Diagram(
        name=tables.name,
        doc=tables.doc,
        nodes=tuple(DiagramNode(s.name, s.doc, s.initial, s.final) for s in tables.states),
        edges=tuple(edges),
        notes=tuple(notes),
    )


def diagram_of(machine: Machine) -> Diagram:
    """The diagram of one machine. Labels name emitted events, not their payloads, so the
    machines they go to are not needed."""
    return build_diagram(lower(machine, others=None))


def _consequences(actions: tuple[str, ...], emits: tuple[str, ...]) -> list[str]:
    lines = []
    if actions:
        lines.append("/ " + ", ".join(actions))
    if emits:
        lines.append(" ".join("^" + e for e in emits))
    return lines


def _emit_names(row: TransitionRow | TimerRow, own: str) -> tuple[str, ...]:
    return tuple(e.event if e.machine == own else f"{e.machine}.{e.event}" for e in row.emits)


def _transition_edge(row: TransitionRow, own: str) -> DiagramEdge:
    if row.ladder is not None:
        step = "exhausted" if row.step is None else f"step {row.step}"
        head = f"{row.event} ({row.ladder} {step})"
        kind: EdgeKind = "retry"
    else:
        head = row.event if row.guard is None else f"{row.event} [{row.guard}]"
        kind = "transition"
    lines = (head, *_consequences(row.actions, _emit_names(row, own)))
    return DiagramEdge(row.source, row.target, lines, kind)


def _timer_edge(timer: TimerRow, own: str) -> DiagramEdge:
    head = f"after {timer.after_text}"
    if timer.kind == "retry_step":
        head += f" ({timer.ladder} step {timer.step})"
    elif timer.kind == "escalation_end":
        head += f" ({_ladder_title(timer.ladder)})"
    lines = (head, *_consequences(timer.actions, _emit_names(timer, own)))
    target = timer.target if timer.target is not None else timer.state
    return DiagramEdge(timer.state, target, lines, _TIMER_EDGE_KINDS[timer.kind])


_TIMER_EDGE_KINDS: dict[str, EdgeKind] = {
    "timeout": "timeout",
    "escalation_end": "escalation_end",
    "retry_step": "retry_step",
}


def _ladder_title(name: str | None) -> str:
    # Unnamed ladders are keyed `escalate#0`; a reader only needs to know it is one.
    return "escalation" if name is None or name.startswith("escalate#") else name


def notify_line(after_text: str, notify: NotifyRow) -> str:
    """`24h: notify queue manager_review_queue (within 4h)`"""
    line = f"{after_text}: notify {notify.kind} {notify.recipient}"
    return line + (f" (within {notify.within_text})" if notify.within_text else "")


def _escalation_note(state: str, timers: tuple[TimerRow, ...]) -> DiagramNote | None:
    steps = [t for t in timers if t.kind == "escalation_step" and t.notify is not None]
    if not steps:
        return None
    lines: list[str] = []
    ladders: list[str | None] = []
    for timer in sorted(steps, key=lambda t: (t.ref.line, t.ref.column)):
        if timer.ladder not in ladders:
            ladders.append(timer.ladder)
            lines.append(_ladder_title(timer.ladder))
        assert timer.notify is not None
        lines.append(notify_line(timer.after_text, timer.notify))
    return DiagramNote(f"{state}/escalations", state, tuple(lines))


# ---------------------------------------------------------------- text safety


def visible(text: str) -> str:
    """Control and format characters (bidi overrides, zero-width marks) as `<U+202E>`, so a
    label can neither reorder what a reviewer sees nor hide text."""
    return "".join(
        ch if ch.isprintable() or ch == " " else f"<U+{ord(ch):04X}>"
        for ch in text.replace("\r\n", "\n").replace("\n", " ")
    )


def dot_quote(lines: tuple[str, ...] | str, *, align: Literal["center", "left"] = "center") -> str:
    """A DOT double-quoted string; lines joined with DOT's own line breaks."""
    if isinstance(lines, str):
        lines = (lines,)
    escaped = [visible(line).replace("\\", "\\\\").replace('"', '\\"') for line in lines]
    if align == "left":
        return '"' + "".join(line + "\\l" for line in escaped) + '"'
    return '"' + "\\n".join(escaped) + '"'


# Characters Mermaid's state lexer reads as syntax in a label (`:` and `;` end a description,
# `%%` starts a comment, `#` begins an entity code), or that HTML labels would interpret.
_MERMAID_ESCAPES = {ch: f"#{ord(ch)};" for ch in ':;#%"<>&{}|`\\'}
# Mermaid takes any line holding `direction LR` (and TB, BT, RL) as a layout statement, and
# `end note` anywhere as the end of a note: one letter of each becomes an entity code.
_MERMAID_PHRASES = re.compile(r"(d)(irection)|(e)(nd note)", re.IGNORECASE)
# Words Mermaid's case-insensitive lexer takes as keywords where a state id belongs.
_MERMAID_KEYWORDS = frozenset(
    {"default", "state", "note", "class", "classdef", "scale", "direction", "hide", "end"}
    | {"acctitle", "accdescr", "statediagram", "as", "left", "right", "of"}
)


def mermaid_text(text: str) -> str:
    """Label text Mermaid shows as written: syntax characters as entity codes (Mermaid
    decodes them when it draws), control characters made visible, one line."""
    escaped = "".join(_MERMAID_ESCAPES.get(ch, ch) for ch in visible(text))
    return _MERMAID_PHRASES.sub(
        lambda mt: "".join(f"#{ord(g)};" if len(g) == 1 else g for g in mt.groups() if g), escaped
    )


# ---------------------------------------------------------------- renderers

_START = "[*]"


def render_dot(diagram: Diagram) -> str:
    title = (diagram.name, diagram.doc) if diagram.doc else (diagram.name,)
    out = [
        f"digraph {dot_quote(diagram.name)} {{",
        "  graph [rankdir=LR, nodesep=0.5, ranksep=0.9, labelloc=t, fontname=Helvetica,",
        f"         label={dot_quote(title)}];",
        "  node [shape=box, style=rounded, fontname=Helvetica, fontsize=11];",
        "  edge [fontname=Helvetica, fontsize=9];",
        "",
        f'  {dot_quote(_START)} [shape=point, width=0.15, label=""];',
    ]
    for node in diagram.nodes:
        attrs = []
        if node.final:
            attrs.append("peripheries=2")
        if node.doc:
            attrs.append(f"tooltip={dot_quote(node.doc)}")
        out.append(f"  {dot_quote(node.id)}" + (f" [{', '.join(attrs)}];" if attrs else ";"))
    for note in diagram.notes:
        out.append(
            f"  {dot_quote(note.id)} [shape=note, style=dashed, fontsize=9, "
            f"label={dot_quote(note.lines, align='left')}];"
        )
    out.append("")
    for node in diagram.nodes:
        if node.initial:
            out.append(f"  {dot_quote(_START)} -> {dot_quote(node.id)};")
    for edge in _merge_self_loops(diagram.edges):
        style = ", style=dashed" if edge.dashed else ""
        # Left-to-right, edges meet a node from west and east; a loop below stays clear.
        port = ":s" if edge.source == edge.target else ""
        out.append(
            f"  {dot_quote(edge.source)}{port} -> {dot_quote(edge.target)}{port} "
            f"[label={dot_quote(edge.lines)}{style}];"
        )
    for note in diagram.notes:
        state, note_id = dot_quote(note.state), dot_quote(note.id)
        out.append(f"  {state} -> {note_id} [style=dashed, arrowhead=none];")
        # Same rank: the note sits beside its state instead of in the next column.
        out.append(f"  {{ rank=same; {state}; {note_id}; }}")
    out.append("}")
    return "\n".join(out) + "\n"


def _merge_self_loops(edges: tuple[DiagramEdge, ...]) -> list[DiagramEdge]:
    """One loop per state and style, its labels stacked: Graphviz draws many loops on one
    node with overlapping labels. The merged loop stands where the first one was."""
    loops: dict[tuple[str, bool], list[DiagramEdge]] = {}
    for edge in edges:
        if edge.source == edge.target:
            loops.setdefault((edge.source, edge.dashed), []).append(edge)
    merged: list[DiagramEdge] = []
    for edge in edges:
        group = loops.get((edge.source, edge.dashed)) if edge.source == edge.target else None
        if group is None:
            merged.append(edge)
        elif group[0] is edge:
            lines = tuple(line for loop in group for line in loop.lines)
            merged.append(DiagramEdge(edge.source, edge.target, lines, edge.kind))
    return merged


def mermaid_ids(diagram: Diagram) -> dict[str, str]:
    """State name -> Mermaid id: the name itself unless Mermaid would read it as a keyword."""
    taken = {node.id for node in diagram.nodes}
    ids: dict[str, str] = {}
    for node in diagram.nodes:
        alias = node.id
        if alias.lower() in _MERMAID_KEYWORDS:
            alias += "_"
            while alias in taken:
                alias += "_"
            taken.add(alias)
        ids[node.id] = alias
    return ids


def render_mermaid(diagram: Diagram) -> str:
    """stateDiagram-v2; Mermaid has no dashed transitions, so timed edges read `after ...`."""
    ids = mermaid_ids(diagram)
    out = ["stateDiagram-v2", "    direction LR"]
    for node in diagram.nodes:
        if ids[node.id] != node.id:
            out.append(f'    state "{mermaid_text(node.id)}" as {ids[node.id]}')
        if node.doc:
            out.append(f"    {ids[node.id]} : {mermaid_text(node.doc)}")
    for node in diagram.nodes:
        if node.initial:
            out.append(f"    [*] --> {ids[node.id]}")
    for edge in diagram.edges:
        label = mermaid_text(" ".join(edge.lines))
        out.append(f"    {ids[edge.source]} --> {ids[edge.target]} : {label}")
    for node in diagram.nodes:
        if node.final:
            out.append(f"    {ids[node.id]} --> [*]")
    for note in diagram.notes:
        out.append(f"    note right of {ids[note.state]}")
        out.extend(f"        {mermaid_text(line)}" for line in note.lines)
        out.append("    end note")
    return "\n".join(out) + "\n"


def dot_available() -> bool:
    return shutil.which("dot") is not None


def render_svg(dot_source: str) -> bytes:
    """Graphviz `dot -Tsvg` (deterministic for one input and Graphviz version)."""
    executable = shutil.which("dot")
    if executable is None:
        raise DiagramToolMissing("Graphviz `dot` is not installed: install graphviz to draw SVG")
    done = subprocess.run(
        [executable, "-Tsvg"],
        input=dot_source.encode("utf-8"),
        capture_output=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip()
        raise DiagramToolFailed(f"Graphviz `dot` failed: {message}")
    return done.stdout


@overload
def render_diagram(machine: Machine, fmt: Literal["dot", "mermaid"]) -> str: ...
@overload
def render_diagram(machine: Machine, fmt: Literal["svg"]) -> bytes: ...
@overload
def render_diagram(machine: Machine, fmt: str) -> str | bytes: ...
def render_diagram(machine: Machine, fmt: str) -> str | bytes:
    """One diagram of a checked machine: DOT or Mermaid text, or SVG bytes."""
    with cycle_collection_paused():
        diagram = diagram_of(machine)
        if fmt == "dot":
            return render_dot(diagram)
        if fmt == "mermaid":
            return render_mermaid(diagram)
        if fmt == "svg":
            return render_svg(render_dot(diagram))
    raise ValueError(f"unknown diagram format {fmt!r}: use one of {', '.join(FORMATS)}")
