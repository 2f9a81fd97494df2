"""One diagram IR built from the lowered tables, and its renderers: DOT, Mermaid, SVG.

What a reviewer sees, in both renderers: every state by its name, its doc in smaller type
under it (and as a DOT tooltip); below a rule, the state's internal transitions (UML): the
events that leave and re-enter it, its timers that run actions without leaving (retry
attempts) and its escalation notifications; last, how long an instance can stay in it
without an outside event (`explain`). Edges with the same source and target are one edge,
one label line per event or timer; an edge whose every line is a timer is dashed. Initial
states hang off a start dot, final states have a double border, resting states a dashed
one; retry ladders are drawn as clusters, with their steps' attempt states. Output is
deterministic: states in declaration order, edges in the order of their first line in the
source.

Drawn by Graphviz top-down, the labels of a rank stand side by side, so DOT keeps them
narrow for a pull-request view: a long label line is cut at its clauses (actions, each emit,
its arguments and receiver, a refusal notice, a notification's deadline), each indented under
what it belongs to; the edges of two or more states into one state with the same lines meet
at a junction point, and the lines are drawn once, from it.
"""

from __future__ import annotations

import html
import itertools
import re
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from operator import itemgetter
from typing import Literal, NamedTuple, overload

from .explain import Explanation, explain, format_duration, ladder_line, state_bound_line
from .lower import (
    EmitArgRow,
    EmitRow,
    MachineTables,
    NotifyRow,
    TimerRow,
    TransitionRow,
    cycle_collection_paused,
    lower,
)
from .model import Machine, snake_case

DiagramFormat = Literal["dot", "mermaid", "svg"]
FORMATS: tuple[DiagramFormat, ...] = ("dot", "mermaid", "svg")

LineKind = Literal["event", "timer"]
# Past this many states a left-to-right layout grows too wide to read on a review page.
TOP_DOWN_FROM = 0
# From this many states a machine with groups is drawn as an overview and one diagram per
# group: Billing's 31 states in one picture were 3047 px wide in DOT, and its Mermaid, drawn
# 1600 px wide, could not be read at all.
SPLIT_FROM = 16
DOC_WIDTH = 44
# Edge labels and a state's internal lines are cut to these widths, at their clauses first:
# a top-down layout puts the labels of a rank side by side, so every column of a label widens
# the page (Compliance was 2734 px wide with 48-column labels and uncut internal lines).
LABEL_WIDTH = 32
INTERNAL_WIDTH = DOC_WIDTH
TITLE_WIDTH = 70
# States this many or more with the same label line on their edges into one state meet at a
# junction first, which carries the line once (Billing had nine `PaymentDisputed` edges into
# Disputed, Subscription five `CancelRequested` into Cancelled).
JOIN_FROM = 2


class Line(NamedTuple):
    """One label line: an event (with its guard, actions and emits) or a timer. (A named
    tuple: a large diagram makes one per transition, and it is built in a third of the time
    a frozen dataclass takes.)"""

    text: str
    kind: LineKind = "event"


@dataclass(frozen=True, slots=True)
class DiagramNode:
    id: str
    doc: str | None
    initial: bool = False
    final: bool = False
    resting: bool = False
    internal: tuple[Line, ...] = ()
    bound: str | None = None
    cluster: str | None = None
    # "group": a whole group drawn as one box (an overview); "stub": a state outside a
    # group's view, drawn by name only. `link`: the file stem of the view that draws it.
    kind: Literal["state", "group", "stub"] = "state"
    link: str | None = None


@dataclass(frozen=True, slots=True)
class DiagramEdge:
    """All the ways from `source` to `target`, one line each, in source order."""

    source: str
    target: str
    lines: tuple[Line, ...]

    @property
    def dashed(self) -> bool:
        return all(line.kind == "timer" for line in self.lines)


@dataclass(frozen=True, slots=True)
class DiagramCluster:
    """A retry ladder's step states, drawn as one box titled with the ladder."""

    id: str
    title: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DiagramGroup:
    """A `group` of the machine: its members in declaration order."""

    id: str
    doc: str | None
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Diagram:
    name: str
    doc: str | None
    nodes: tuple[DiagramNode, ...]
    edges: tuple[DiagramEdge, ...]
    clusters: tuple[DiagramCluster, ...] = field(default=())
    groups: tuple[DiagramGroup, ...] = field(default=())


class DiagramToolMissing(Exception):
    """Graphviz `dot` is not installed, so SVG cannot be drawn."""


class DiagramToolFailed(Exception):
    """Graphviz `dot` ran and failed."""


# ---------------------------------------------------------------- the diagram IR


def build_diagram(tables: MachineTables, explanation: Explanation | None = None) -> Diagram:
    explanation = explanation or explain(tables)
    rows_by_state: dict[str, list[TransitionRow]] = {}
    for (source, _), rows in tables.transitions:
        rows_by_state.setdefault(source, []).extend(rows)
    timers_by_state = dict(tables.timers)
    clusters: dict[str, str] = {}
    cluster_titles: list[DiagramCluster] = []
    ladders = {ladder.name: ladder for ladder in explanation.ladders if ladder.kind == "retry"}
    for retry in tables.retries:
        title: tuple[str, ...] = (f"retry {retry.name} on {retry.event}",)
        if retry.name in ladders:
            title += (ladder_line(ladders[retry.name]),)
        cluster_titles.append(DiagramCluster(retry.name, title))
        for step in retry.steps:
            clusters.setdefault(step.state, retry.name)
            # A step's attempt state belongs in its box too: outside it, the ladder's chain
            # leaves and re-enters the box at each step, and the box's states end up side
            # by side in one rank (Billing's PaymentRetry was 6429 px wide).
            if step.attempt_state is not None:
                clusters.setdefault(step.attempt_state, retry.name)
    resting = {s.name for s in tables.states if s.resting}
    nodes: list[DiagramNode] = []
    merged: dict[tuple[str, str], list[tuple[tuple[int, int], Line]]] = {}
    own = tables.name
    for state in tables.states:
        name = state.name
        internal: list[tuple[tuple[int, int], Line]] = []
        for row in rows_by_state.get(name, ()):
            # (line, column) of the row: its Ref without the path.
            line = row.ref[1:], Line(_transition_line(row, own))
            if row.target == name:
                internal.append(line)
            else:
                merged.setdefault((name, row.target), []).append(line)
        timers = timers_by_state.get(name, ())
        for timer, repeat in _repeats_folded(timers) if timers else ():
            line = (
                (timer.ref.line, timer.ref.column),
                Line(_timer_line(timer, tables.name, repeat), "timer"),
            )
            if timer.target is None or timer.target == state.name:
                internal.append(line)
            else:
                merged.setdefault((state.name, timer.target), []).append(line)
        if state.initial:
            for timer in tables.creation_timers:
                internal.append(
                    (
                        (timer.ref.line, timer.ref.column),
                        Line(f"{_timer_line(timer, tables.name)} -> {timer.target}", "timer"),
                    )
                )
        if len(internal) > 1:
            internal.sort(key=itemgetter(0))
        nodes.append(
            DiagramNode(
                name,
                state.doc,
                state.initial,
                state.final,
                name in resting,
                tuple([line for _, line in internal]) if internal else (),
                state_bound_line(explanation.bound(name)),
                clusters.get(name),
            )
        )
    # A group timer can fire in each state of its group: one dashed line from each.
    members = dict(tables.groups)
    for group, group_timers in tables.group_timers:
        for timer in group_timers:
            line = (
                (timer.ref.line, timer.ref.column),
                Line(_timer_line(timer, tables.name), "timer"),
            )
            for member in members.get(group, ()):
                if timer.target is not None and timer.target != member:
                    merged.setdefault((member, timer.target), []).append(line)
    order = {node.id: position for position, node in enumerate(nodes)}
    keyed: list[tuple[tuple[int, tuple[int, int]], DiagramEdge]] = []
    for (source, target), lines in merged.items():
        if len(lines) > 1:
            lines.sort(key=itemgetter(0))
        edge = DiagramEdge(source, target, tuple([line for _, line in lines]))
        keyed.append(((order[source], lines[0][0]), edge))
    keyed.sort(key=itemgetter(0))  # by source, then by the edge's first line in the source
    group_docs = dict(tables.group_docs)
    groups = [
        DiagramGroup(group, group_docs.get(group), tuple(sorted(states, key=order.__getitem__)))
        for group, states in tables.groups
    ]
    groups.sort(key=lambda g: order[g.members[0]])
    return Diagram(
        name=tables.name,
        doc=tables.doc,
        nodes=tuple(nodes),
        edges=tuple(edge for _, edge in keyed),
        clusters=tuple(c for c in cluster_titles if c.id in clusters.values()),
        groups=tuple(groups),
    )


# ---------------------------------------------------------------- views of a large machine


class DiagramView(NamedTuple):
    """One file's diagram: `stem` is its file name without the extension; `group` is None
    for the machine's own diagram (whole, or an overview of its groups)."""

    stem: str
    group: DiagramGroup | None
    diagram: Diagram


def diagram_views(diagram: Diagram, stem: str, split_from: int = SPLIT_FROM) -> list[DiagramView]:
    """The machine drawn whole; or, from `split_from` states, when its designer grouped them,
    an overview (each group one box, the edges into and out of it named by their events
    only) followed by one diagram per group (its states in full, the states it meets by
    name only). Every state is drawn in full in exactly one of them, every label line in at
    least one."""
    groups = diagram.groups
    names = {node.id for node in diagram.nodes}
    if len(diagram.nodes) < split_from or not groups or any(g.id in names for g in groups):
        return [DiagramView(stem, None, diagram)]
    owner: dict[str, DiagramGroup] = {}
    for group in groups:
        for member in group.members:
            owner.setdefault(member, group)  # a state in two groups is drawn in the first
    stems = {g.id: f"{stem}.{snake_case(g.id)}" for g in groups}
    views = [DiagramView(stem, None, _overview(diagram, owner, stems))]
    for group in groups:
        members = [m for m in group.members if owner[m] is group]
        if members:
            view = _group_view(diagram, group, frozenset(members), owner, stems, stem)
            views.append(DiagramView(stems[group.id], group, view))
    return views


def _overview(
    diagram: Diagram, owner: Mapping[str, DiagramGroup], stems: Mapping[str, str]
) -> Diagram:
    nodes: list[DiagramNode] = []
    boxed: set[str] = set()
    for node in diagram.nodes:
        group = owner.get(node.id)
        if group is None:
            nodes.append(node)
        elif group.id not in boxed:  # where its first state would stand
            boxed.add(group.id)
            members = [m for m in group.members if owner[m] is group]
            nodes.append(
                DiagramNode(
                    group.id,
                    group.doc,
                    initial=node.initial,
                    internal=(Line(f"{len(members)} states: {', '.join(members)}"),),
                    kind="group",
                    link=stems[group.id],
                )
            )
    merged: dict[tuple[str, str], dict[Line, None]] = {}
    for edge in diagram.edges:
        source = owner[edge.source].id if edge.source in owner else edge.source
        target = owner[edge.target].id if edge.target in owner else edge.target
        if source == target:
            continue  # inside one group: its own diagram draws it
        whole = source == edge.source and target == edge.target
        lines = merged.setdefault((source, target), {})
        lines.update(dict.fromkeys(edge.lines if whole else map(_brief, edge.lines)))
    note = "Overview: a bold box is a group of states, drawn in full in a diagram of its own."
    return Diagram(
        name=diagram.name,
        doc=f"{diagram.doc} {note}" if diagram.doc else note,
        nodes=tuple(nodes),
        edges=tuple(DiagramEdge(s, t, tuple(lines)) for (s, t), lines in merged.items()),
        clusters=tuple(c for c in diagram.clusters if any(n.cluster == c.id for n in nodes)),
        groups=tuple(g for g in diagram.groups if g.id in boxed),
    )


def _group_view(
    diagram: Diagram,
    group: DiagramGroup,
    members: frozenset[str],
    owner: Mapping[str, DiagramGroup],
    stems: Mapping[str, str],
    overview: str,
) -> Diagram:
    """The group's states in full; a state outside it by name only, and the states of
    another group it meets as that group's name (each line once: Disputes met the eleven
    states of two refund groups by one `PaymentDisputed` line each, 4259 px wide)."""

    def seen_as(state: str) -> str:
        return owner[state].id if state not in members and state in owner else state

    merged: dict[tuple[str, str], dict[Line, None]] = {}
    for edge in diagram.edges:
        if edge.source in members or edge.target in members:
            key = (seen_as(edge.source), seen_as(edge.target))
            merged.setdefault(key, {}).update(dict.fromkeys(edge.lines))
    met = {state for pair in merged for state in pair}
    nodes: list[DiagramNode] = []
    placed: set[str] = set()
    for node in diagram.nodes:
        shown = seen_as(node.id)
        if shown not in met or shown in placed:
            continue
        placed.add(shown)
        if node.id in members:
            nodes.append(node)
        elif shown == node.id:
            nodes.append(DiagramNode(node.id, None, final=node.final, kind="stub", link=overview))
        else:
            nodes.append(DiagramNode(shown, None, kind="stub", link=stems[shown]))
    return Diagram(
        name=f"{diagram.name}: {group.id}",
        doc=group.doc,
        nodes=tuple(nodes),
        edges=tuple(DiagramEdge(s, t, tuple(lines)) for (s, t), lines in merged.items()),
        clusters=tuple(c for c in diagram.clusters if any(n.cluster == c.id for n in nodes)),
    )


# An overview's line from or into a group names the event or timer only: the group's own
# diagram has its guard, actions and emits (`PaymentSucceeded [amount_matches] / record_payment`
# and `PaymentSucceeded [else] / hold_mismatched_payment` are one line).
_BRIEF_END = re.compile(r" (?:\[|/ |\^|\(|keep |in \w|from creation)|:|,")


def _brief(line: Line) -> Line:
    return Line(_BRIEF_END.split(line.text, maxsplit=1)[0], line.kind)


def diagram_of(machine: Machine) -> Diagram:
    """The diagram of one machine. Labels name emitted events, not their payloads, so the
    machines they go to are not needed."""
    return build_diagram(lower(machine, others=None))


def _consequences(
    actions: tuple[str, ...], emits: tuple[str, ...], keeps: tuple[tuple[str, str], ...] = ()
) -> str:
    text = ""
    if actions:
        text += " / " + ", ".join(actions)
    if keeps:
        text += " keep " + ", ".join(f if f == c else f"{f} = {c}" for f, c in keeps)
    if emits:
        text += " " + " ".join("^" + e for e in emits)
    return text


def _emit_names(row: TransitionRow | TimerRow, own: str) -> tuple[str, ...]:
    """Each emit as `Machine.Event`, with the arguments that read kept data
    (`(customer_id = $data.customer_id)`), ` to FIELD` when a data field names its receiver and
    ` if refused Notice(...)` when the sender is told of a refused delivery, with the notice's
    arguments (`reason = $refusal_message`: what the sender learns)."""
    return tuple(
        (e.event if e.machine == own else f"{e.machine}.{e.event}")
        + _data_args(e.args)
        + ("" if e.to is None else f" to {e.to}")
        + ("" if e.refused is None else f" if refused {e.refused.event}{_notice_args(e.refused)}")
        for e in row.emits
    )


def _notice_args(notice: EmitRow) -> str:
    """A refusal notice's arguments as written, `(stage = "quota", code = $refusal_code)`;
    a field the notice takes from the causing event's field of the same name is left out."""
    shown = [
        f"{a.field} = {_arg_value(a)}"
        for a in notice.args
        if not (a.source == "field" and a.value == a.field)
    ]
    return f"({', '.join(shown)})" if shown else ""


_DECIMAL = re.compile(r"-?[0-9]+\.[0-9]+")


def _arg_value(arg: EmitArgRow) -> str:
    """An emit argument's value as the machine file writes it."""
    value = arg.value
    if arg.source == "field":
        return str(value)
    if arg.source == "data":
        return f"$data.{value}"
    if arg.source != "literal":
        return f"${arg.source}"  # $instance, $actor, $event, $refusal_code, $refusal_message
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):  # decimals are kept as text
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def _data_args(args: tuple[EmitArgRow, ...]) -> str:
    """The arguments that read kept data, which reviewers should see travel; others are the
    event's ordinary payload."""
    read = [f"{a.field} = $data.{a.value}" for a in args if a.source == "data"]
    return f"({', '.join(read)})" if read else ""


def _transition_line(row: TransitionRow, own: str) -> str:
    """`Approve [is_authorized_approver] / record_approval ^CustomerAccount.NotifyCustomer`"""
    if row.ladder is None and row.guard is None and not row.actions and not row.emits:
        if row.keep:
            return row.event + _consequences((), (), row.keep)
        return row.event  # most rows of a large machine
    if row.ladder is not None:
        step = "exhausted" if row.step is None else f"step {row.step}"
        head = f"{row.event} ({row.ladder} {step})"
    else:
        head = row.event if row.guard is None else f"{row.event} [{row.guard}]"
    return head + _consequences(row.actions, _emit_names(row, own), row.keep)


def _repeats_folded(
    timers: Sequence[TimerRow],
) -> Iterator[tuple[TimerRow, tuple[int, int] | None]]:
    """Each timer once, with a repeated step's firings (one row each, written once at one
    place, evenly spaced) folded into its first: (row, (every ms, count)) or (row, None)."""
    firings: dict[tuple[object, ...], list[TimerRow]] = {}
    for timer in timers:
        key = (timer.ref, timer.kind, timer.ladder, timer.step, timer.notify, timer.target)
        firings.setdefault(key, []).append(timer)
    for rows in firings.values():
        rows.sort(key=lambda row: row.after_ms)
        gaps = {b.after_ms - a.after_ms for a, b in itertools.pairwise(rows)}
        if len(rows) > 1 and len(gaps) == 1:
            yield rows[0], (gaps.pop(), len(rows))
        else:
            yield from ((row, None) for row in rows)


def _timer_line(timer: TimerRow, own: str, repeat: tuple[int, int] | None = None) -> str:
    """`after 72h (ApprovalLadder) / auto_approve`; an escalation step names whom it
    notifies: `after 24h (ApprovalLadder): notify queue manager_review_queue (within 4h)`;
    a repeated step says how often: `after 0m, then every 30m (9 times) (Policy): ...`."""
    head = "on entry" if timer.kind == "entry" else f"after {timer.after_text}"
    if repeat is not None:
        every, count = repeat
        head += f", then every {format_duration(every)} ({count} times)"
    if timer.scope == "group":
        head += f" in {timer.group}"
    elif timer.scope == "creation":
        head += " from creation"
    if timer.kind == "retry_step":
        again = ", again while unanswered" if repeat is not None or timer.attempt > 1 else ""
        head += f" ({timer.ladder} step {timer.step}{again})"
    elif timer.kind == "retry_timeout":
        head += f" ({timer.ladder} step {timer.step} timed out)"
    elif timer.kind in ("escalation_end", "escalation_step"):
        head += f" ({_ladder_title(timer.ladder)})"
    if timer.notify is not None:
        head += ": " + notify_text(timer.notify)
    return head + _consequences(timer.actions, _emit_names(timer, own))


def _ladder_title(name: str | None) -> str:
    # Unnamed ladders are keyed `escalate#0`; a reader only needs to know it is one.
    return "escalation" if name is None or name.startswith("escalate#") else name


def notify_text(notify: NotifyRow) -> str:
    """`notify queue manager_review_queue (within 4h)`"""
    text = f"notify {notify.kind} {notify.recipient}"
    return text + (f" (within {notify.within_text})" if notify.within_text else "")


def notify_line(after_text: str, notify: NotifyRow) -> str:
    """`24h: notify queue manager_review_queue (within 4h)`"""
    return f"{after_text}: {notify_text(notify)}"


def doc_lines(doc: str | None) -> list[str]:
    return wrap(doc, DOC_WIDTH) if doc else []


_WRAP_WHITESPACE = frozenset("\t\n\r\x0b\x0c")


def wrap(text: str, width: int) -> list[str]:
    """`textwrap.wrap` without breaking at hyphens; a short line without tabs, line breaks or
    trailing blanks, which it would return unchanged, skips it (most lines of a large diagram)."""
    if len(text) <= width and text and text[-1] != " " and _WRAP_WHITESPACE.isdisjoint(text):
        return [text]
    return textwrap.wrap(text, width, break_on_hyphens=False)


# ---------------------------------------------------------------- text safety


def visible(text: str) -> str:
    """Control and format characters (bidi overrides, zero-width marks) as `<U+202E>`, so a
    label can neither reorder what a reviewer sees nor hide text."""
    if text.isprintable():  # nearly every label: one C-level scan instead of one per character
        return text
    return "".join(
        ch if ch.isprintable() or ch == " " else f"<U+{ord(ch):04X}>"
        for ch in text.replace("\r\n", "\n").replace("\n", " ")
    )


def dot_quote(lines: tuple[str, ...] | str, *, align: Literal["center", "left"] = "center") -> str:
    """A DOT double-quoted string; lines joined with DOT's own line breaks."""
    if isinstance(lines, str):
        if align == "center" and lines.isprintable() and '"' not in lines and "\\" not in lines:
            return f'"{lines}"'  # a state name, most docs: nothing to escape
        lines = (lines,)
    if not lines:
        return '""'
    # `visible` leaves no line break in a line: the joined text is escaped in one pass each.
    text = "\n".join([visible(line) for line in lines])
    if "\\" in text or '"' in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"')
    if align == "left":
        return '"' + text.replace("\n", "\\l") + '\\l"'
    return '"' + text.replace("\n", "\\n") + '"'


# Characters Mermaid's state lexer reads as syntax in a label (`:` and `;` end a description,
# `%%` starts a comment, `#` begins an entity code), or that HTML labels would interpret.
_MERMAID_ESCAPES = {ch: f"#{ord(ch)};" for ch in ':;#%"<>&{}|`\\'}
_MERMAID_TABLE = str.maketrans(_MERMAID_ESCAPES)
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
    escaped = visible(text).translate(_MERMAID_TABLE)
    return _MERMAID_PHRASES.sub(
        lambda mt: "".join(f"#{ord(g)};" if len(g) == 1 else g for g in mt.groups() if g), escaped
    )


# ---------------------------------------------------------------- renderers

_START = "[*]"


@lru_cache(maxsize=16_384)  # a large machine repeats most of its lines and bounds
def _html(text: str) -> str:
    """Text for a Graphviz HTML-like label: visible, entities escaped."""
    return html.escape(visible(text), quote=True)


def _node_label(node: DiagramNode) -> str:
    rows = [f'<tr><td align="center"><b>{_html(node.id)}</b></td></tr>']
    if node.doc:
        doc = '<br align="center"/>'.join(_html(line) for line in doc_lines(node.doc))
        rows.append(f'<tr><td align="center"><font point-size="9">{doc}</font></td></tr>')
    if node.internal:
        rows.append("<hr/>")
        lines = "".join(
            f'{_html(part)}<br align="left"/>' for part in _wrapped(node.internal, INTERNAL_WIDTH)
        )
        rows.append(f'<tr><td align="left"><font point-size="9">{lines}</font></td></tr>')
    if node.bound:
        rows.append(
            f'<tr><td align="center"><font point-size="9" color="#555555"><i>'
            f"{_html(node.bound)}</i></font></td></tr>"
        )
    return (
        '<<table border="0" cellborder="0" cellspacing="0" cellpadding="2">'
        + "".join(rows)
        + "</table>>"
    )


# How `autonomic diff` marks what changed: added green, removed red, changed amber.
CHANGE_COLOURS = {"added": "#1a7f37", "removed": "#cf222e", "changed": "#bf8700"}
CHANGE_FILLS = {"added": "#dafbe1", "removed": "#ffebe9", "changed": "#fff8c5"}
# An overview's group boxes, and the states a group's diagram names but does not draw.
GROUP_FILL = "#eef3fb"
STUB_FILL = "#f3f3f3"


def _node_statement(node: DiagramNode, indent: str, change: str | None = None) -> str:
    attrs = [f"label={_node_label(node)}"]
    if node.final:
        attrs += ["peripheries=2", 'fillcolor="#eeeeee"']
    elif node.resting:
        attrs += ['style="rounded,dashed,filled"', 'fillcolor="#eef7ee"']
    if node.kind == "group":
        attrs += ['style="filled,bold"', f'fillcolor="{GROUP_FILL}"']
    elif node.kind == "stub":
        attrs += ['style="rounded,dashed,filled"', f'fillcolor="{STUB_FILL}"', "color=gray50"]
    if node.link is not None:
        attrs.append(f"URL={dot_quote(node.link + '.svg')}")
    if change is not None:
        attrs += [
            f'color="{CHANGE_COLOURS[change]}"',
            f'fillcolor="{CHANGE_FILLS[change]}"',
            "penwidth=2",
        ]
    if node.doc:
        attrs.append(f"tooltip={dot_quote(node.doc)}")
    return f"{indent}{dot_quote(node.id)} [{', '.join(attrs)}];"


def render_dot(
    diagram: Diagram,
    *,
    node_colours: Mapping[str, str] | None = None,
    edge_colours: Mapping[tuple[str, str], str] | None = None,
) -> str:
    """DOT; `node_colours`/`edge_colours` mark states and edges added, removed or changed."""
    node_colours = node_colours or {}
    edge_colours = edge_colours or {}
    title = (diagram.name, *wrap(diagram.doc, TITLE_WIDTH)) if diagram.doc else (diagram.name,)
    rankdir = "TB" if len(diagram.nodes) >= TOP_DOWN_FROM else "LR"
    out = [
        f"digraph {dot_quote(diagram.name)} {{",
        f"  graph [rankdir={rankdir}, compound=true, newrank=true, nodesep=0.2, ranksep=0.5,",
        "         labelloc=t,",
        "         fontname=Helvetica,",
        f"         fontsize=16, label={dot_quote(title)}];",
        '  node [shape=box, style="rounded,filled", fillcolor=white, fontname=Helvetica,',
        '        fontsize=11, margin="0.1,0.05"];',
        "  edge [fontname=Helvetica, fontsize=9];",
        "",
    ]
    if any(node.initial for node in diagram.nodes):
        out.append(f'  {dot_quote(_START)} [shape=point, width=0.15, label="", fillcolor=black];')
    clustered = {c.id: [n for n in diagram.nodes if n.cluster == c.id] for c in diagram.clusters}
    for node in diagram.nodes:
        if node.cluster is None:
            out.append(_node_statement(node, "  ", node_colours.get(node.id)))
    for cluster in diagram.clusters:
        out.append(f"  subgraph {dot_quote('cluster_' + cluster.id)} {{")
        out.append(
            f"    graph [label={dot_quote(_title_lines(cluster.title))}, "
            'style="rounded,dashed", '
            "fontsize=10, color=gray50];"
        )
        out.extend(
            _node_statement(node, "    ", node_colours.get(node.id))
            for node in clustered[cluster.id]
        )
        out.append("  }")
    out.append("")
    for node in diagram.nodes:
        if node.initial:
            out.append(f"  {dot_quote(_START)} -> {dot_quote(node.id)};")
    shared = {} if edge_colours else _cluster_edges(diagram)
    plan = {} if edge_colours else _junctions(diagram, shared)
    quoted = {node.id: dot_quote(node.id) for node in diagram.nodes}
    # Edges of a large machine repeat their lines: each distinct label is written once.
    labels: dict[tuple[Line, ...], tuple[str, str]] = {}

    def label_of(lines: tuple[Line, ...]) -> tuple[str, str]:
        written = labels.get(lines)
        if written is None:
            label = dot_quote(tuple(_wrapped(lines, LABEL_WIDTH)), align="left")
            dashed = all(line.kind == "timer" for line in lines)
            written = labels[lines] = (label, ", style=dashed" if dashed else "")
        return written

    drawn: set[str] = set()
    for edge in diagram.edges:
        tail = shared.get(edge) if shared else None
        if tail == "":
            continue  # drawn once from its cluster
        label, style = label_of(edge.lines)
        junction = plan.get(edge) if plan else None
        if junction is not None:
            if junction.id not in drawn:
                drawn.add(junction.id)
                out.append(f'  {junction.id} [shape=point, width=0.08, fillcolor=black, label=""];')
                out.append(f"  {junction.id} -> {quoted[junction.target]} [label={label}{style}];")
            out.append(f"  {quoted[edge.source]} -> {junction.id} [arrowhead=none{style}];")
            continue
        change = edge_colours.get((edge.source, edge.target)) if edge_colours else None
        if change is not None:
            colour = CHANGE_COLOURS[change]
            style += f', color="{colour}", fontcolor="{colour}", penwidth=2'
        if tail:
            style += f", ltail={dot_quote('cluster_' + tail)}"
        out.append(f"  {quoted[edge.source]} -> {quoted[edge.target]} [label={label}{style}];")
    out.append("}")
    return "\n".join(out) + "\n"


def _cluster_edges(diagram: Diagram) -> dict[DiagramEdge, str]:
    """Edges that every state of a ladder has alike (same target, same lines) are drawn once,
    from the ladder's box: edge -> its cluster for the one drawn, "" for the others."""
    members: dict[str, list[str]] = {}
    for node in diagram.nodes:
        if node.cluster is not None:
            members.setdefault(node.cluster, []).append(node.id)
    shared: dict[DiagramEdge, str] = {}
    for cluster, states in members.items():
        if len(states) < 2:
            continue
        alike: dict[tuple[str, tuple[Line, ...]], list[DiagramEdge]] = {}
        for edge in diagram.edges:
            if edge.source in states and edge.target not in states:
                alike.setdefault((edge.target, edge.lines), []).append(edge)
        for edges in alike.values():
            if len(edges) == len(states):
                # From the middle step, so the edge leaves the box near its centre.
                drawn = edges[len(edges) // 2]
                for edge in edges:
                    shared[edge] = cluster if edge is drawn else ""
    return shared


def _title_lines(title: tuple[str, ...]) -> tuple[str, ...]:
    """A ladder's box title, wrapped: as wide as its longest line, the box would be too."""
    return tuple(part for line in title for part in wrap(line, TITLE_WIDTH))


@dataclass(frozen=True, slots=True)
class _Junction:
    """A point where the edges of several states into one state meet, and the lines they
    share: drawn once, on the edge from the junction."""

    id: str  # DOT id, quoted
    target: str
    lines: tuple[Line, ...]


def _junctions(diagram: Diagram, shared: Mapping[DiagramEdge, str]) -> dict[DiagramEdge, _Junction]:
    """Edges of JOIN_FROM or more states into one state with the same lines (events, guards,
    actions, emits) meet at a junction, and the lines are drawn once, from it. (Lines shared
    by only some of the edges are left where they are: junctions for those made Graphviz's
    layouts of the governors wider, not narrower.)"""
    groups: dict[tuple[str, tuple[Line, ...]], list[DiagramEdge]] = {}
    for edge in diagram.edges:
        if edge not in shared:
            groups.setdefault((edge.target, edge.lines), []).append(edge)
    plan: dict[DiagramEdge, _Junction] = {}
    count = 0
    for (target, lines), edges in groups.items():
        if len(edges) >= JOIN_FROM:
            count += 1
            # A space cannot be in a state's name, so the junction's id is nobody's.
            junction = _Junction(dot_quote(f"join {count}"), target, lines)
            plan.update(dict.fromkeys(edges, junction))
    return plan


def _wrapped(lines: tuple[Line, ...], width: int) -> Iterator[str]:
    """A long label line continues, indented, on the next: a left-to-right sentence of
    guard, actions and emits would otherwise stretch its rank across the page. It is cut
    before its actions, each emit and what it keeps (one step in), an emit's arguments,
    receiver and refusal notice, and a notification's deadline (one step further; a notice's
    arguments one more), then wrapped at `width`; no word and no `field = value` is split."""
    for line in lines:
        text = line.text
        if len(text) <= width:
            yield text
            continue
        level, notice = 0, False
        for number, clause in enumerate(_CLAUSE_START.split(text)):
            if number:
                if clause.startswith(_NOTICE):
                    level, notice = 2, True
                elif _CONTINUES.match(clause):
                    level = 3 if notice and _ARGUMENT.match(clause) else 2
                else:
                    level, notice = 1, False
            for index, part in enumerate(_clause_lines(clause, width)):
                yield "    " * (max(level, 1) if index else level) + part


def _clause_lines(clause: str, width: int) -> list[str]:
    """`wrap`, with each `field = value` and each word kept whole (an argument or a name
    longer than a line stays one line rather than being cut inside)."""
    bound = _STEP.sub(_held, clause.replace(" = ", _BOUND))
    lines = textwrap.wrap(bound, width, break_on_hyphens=False, break_long_words=False)
    return [line.replace(_NBSP, " ") for line in lines] or [clause]


def _held(match: re.Match[str]) -> str:
    return match.group().replace(" ", _NBSP)


def _clauses(text: str) -> list[str]:
    """A label line cut before each emit and each `if refused`, when its emits carry
    arguments (kept data, a refusal notice's): else the line itself."""
    return _EMIT_START.split(text) if _EMIT_ARGUMENTS.search(text) else [text]


_NOTICE = "if refused "
# Clauses that go on with the one before (an emit's receiver, arguments or refusal notice; a
# notification's deadline): further in.
_CONTINUES = re.compile(r"to \w|\(within |\w+ = ")
_ARGUMENT = re.compile(r"\w+ = ")
_EMIT_ARGUMENTS = re.compile(r"\^.*\w\(")
_EMIT_START = re.compile(r" (?=\^|if refused )")
# Where a long DOT label line is cut first: before its actions (`/ a, b`), what it keeps,
# each emit, an emit's receiver (`to FIELD`), a refusal notice and a notification.
_CLAUSE_START = re.compile(
    r" (?=/ |\^|keep |to \w|if refused |\(within )|(?<=:) (?=notify )|(?<=\w\()(?=\w+ = )"
)
# Keeps an argument's `field = value` on one line: textwrap breaks only at ASCII whitespace.
_NBSP = "\N{NO-BREAK SPACE}"
_BOUND = f"{_NBSP}={_NBSP}"
# ... and a ladder's step, `(PaymentRetry step 2 timed out)`.
_STEP = re.compile(r"\(\w+ (?:step \d+|exhausted)(?: timed out)?\)")


# Mermaid draws an edge's label where dagre laid it out only if its check finds that point in
# the drawn path; the default B-spline misses it, so labels move to the curve's midpoint and
# land on each other (Entitlement's TenantContention and ContentionResolved did). A curve
# through the layout's own points keeps every label where the layout left room for it.
# State diagrams take their curve from the flowchart setting.
MERMAID_FRONTMATTER = ("---", "config:", "  flowchart:", "    curve: catmullRom", "---")


_MERMAID_KINDS = {
    "group": f"fill:{GROUP_FILL},stroke:#333,stroke-width:2px",
    "stub": f"fill:{STUB_FILL},stroke:#888,stroke-dasharray:3 3,color:#555",
}


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


def render_mermaid(
    diagram: Diagram,
    *,
    node_colours: Mapping[str, str] | None = None,
    edge_colours: Mapping[tuple[str, str], str] | None = None,
) -> str:
    """stateDiagram-v2. `state "Name" as Id` makes Mermaid draw the name as the title and
    every `Id : text` line under a rule (with a single description and no title, it would
    draw the description alone). Mermaid has no dashed transitions: timed lines read
    `after ...`; resting states get a dashed border through a class."""
    ids = mermaid_ids(diagram)
    text = cache(mermaid_text)  # for this diagram: a large machine repeats its labels
    direction = "TB" if len(diagram.nodes) >= TOP_DOWN_FROM else "LR"
    out = [*MERMAID_FRONTMATTER, "stateDiagram-v2", f"    direction {direction}"]
    for node in diagram.nodes:
        sid = ids[node.id]
        out.append(f'    state "{mermaid_text(node.id)}" as {sid}')
        if node.doc:
            for line in doc_lines(node.doc):
                out.append(f"    {sid} : <small>{mermaid_text(line)}</small>")
        # Cut as DOT cuts them: uncut, one long line widened its state, and with it the
        # rank (Compliance's ManualReview was 320 px wide for one notification).
        for part in _wrapped(node.internal, INTERNAL_WIDTH) if node.internal else ():
            body = part.lstrip(" ")
            indent = "#160;" * (len(part) - len(body))
            out.append(f"    {sid} : {indent}{text(body)}")
        if node.bound:
            out.append(f"    {sid} : <i>{text(node.bound)}</i>")
    for node in diagram.nodes:
        if node.initial:
            out.append(f"    [*] --> {ids[node.id]}")
    edge_colours = edge_colours or {}
    labels: dict[tuple[Line, ...], str] = {}
    # As in DOT, edges of several states into one with the same lines meet at a join bar
    # first, which carries the lines once (Billing's retry ladder had eight alike edges into
    # each of Current, Reconciling, DisputedUnpaid and Closed: 6326 px wide).
    plan = {} if edge_colours else _junctions(diagram, {})
    joins: dict[_Junction, str] = {}
    taken = set(ids.values())
    for edge in diagram.edges:
        junction = plan.get(edge) if plan else None
        if junction is not None:
            join = joins.get(junction)
            if join is None:
                join = f"join{len(joins) + 1}"
                while join in taken:
                    join += "_"
                taken.add(join)
                joins[junction] = join
                out.append(f"    state {join} <<join>>")
                out.append(f"    {join} --> {ids[junction.target]} : {_mermaid_label(edge, text)}")
            out.append(f"    {ids[edge.source]} --> {join}")
            continue
        label = labels.get(edge.lines)
        if label is None:
            label = labels[edge.lines] = _mermaid_label(edge, text)
        # Mermaid's state diagrams cannot colour an edge: its label says what happened.
        change = edge_colours.get((edge.source, edge.target)) if edge_colours else None
        if change is not None:
            label = f"({change}) {label}"
        out.append(f"    {ids[edge.source]} --> {ids[edge.target]} : {label}")
    for node in diagram.nodes:
        if node.final:
            out.append(f"    {ids[node.id]} --> [*]")
    resting = [ids[node.id] for node in diagram.nodes if node.resting]
    if resting:
        out.append("    classDef resting stroke-dasharray: 5 5")
        out.append(f"    class {','.join(resting)} resting")
    for kind, style in _MERMAID_KINDS.items():
        marked = [ids[node.id] for node in diagram.nodes if node.kind == kind]
        if marked:
            out.append(f"    classDef {kind} {style}")
            out.append(f"    class {','.join(marked)} {kind}")
    node_colours = node_colours or {}
    for change, colour in CHANGE_COLOURS.items():
        marked = [ids[n.id] for n in diagram.nodes if node_colours.get(n.id) == change]
        if marked:
            fill = CHANGE_FILLS[change]
            out.append(f"    classDef {change} fill:{fill},stroke:{colour},stroke-width:2px")
            out.append(f"    class {','.join(marked)} {change}")
    return "\n".join(out) + "\n"


def _mermaid_label(edge: DiagramEdge, text: Callable[[str], str]) -> str:
    """An edge's lines as one Mermaid label: Mermaid wraps a label to its width itself, so
    only an argument-carrying line is cut (`_clauses`), and `field = value` is held together
    (a no-break space)."""
    return "<br/>".join(
        [
            text(clause).replace(" = ", "#160;=#160;")
            for line in edge.lines
            for clause in _clauses(line.text)
        ]
    )


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


class UnknownView(Exception):
    """`graph --view NAME` names neither `overview` nor a group of the machine."""

    def __init__(self, view: str, known: Sequence[str]) -> None:
        super().__init__(view)
        self.view, self.known = view, tuple(known)


def pick_view(diagram: Diagram, view: str) -> Diagram:
    """`overview`, or a group's diagram, as `build` draws them (whatever the machine's size)."""
    views = diagram_views(diagram, snake_case(diagram.name), split_from=0)
    for drawn in views:
        if (drawn.group.id if drawn.group else "overview") == view and len(views) > 1:
            return drawn.diagram
    raise UnknownView(view, [v.group.id for v in views if v.group])


@overload
def render_diagram(
    machine: Machine, fmt: Literal["dot", "mermaid"], view: str | None = None
) -> str: ...
@overload
def render_diagram(machine: Machine, fmt: Literal["svg"], view: str | None = None) -> bytes: ...
@overload
def render_diagram(machine: Machine, fmt: str, view: str | None = None) -> str | bytes: ...
def render_diagram(machine: Machine, fmt: str, view: str | None = None) -> str | bytes:
    """One diagram of a checked machine: DOT or Mermaid text, or SVG bytes; whole, or with
    `view` its overview or one group's diagram."""
    with cycle_collection_paused():
        diagram = diagram_of(machine)
        if view is not None:
            diagram = pick_view(diagram, view)
        if fmt == "dot":
            return render_dot(diagram)
        if fmt == "mermaid":
            return render_mermaid(diagram)
        if fmt == "svg":
            return render_svg(render_dot(diagram))
    raise ValueError(f"unknown diagram format {fmt!r}: use one of {', '.join(FORMATS)}")
