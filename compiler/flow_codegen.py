"""Flow -> generated module (a FlowSpec of checked names and repr()'d values) and its DOT and
Mermaid diagrams: the steps in their order, and the compensations a failure runs."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable, Sequence

from .codegen import COMPILER_VERSION, CONTRACT_MODULE, has_long_lines
from .diagram import dot_quote, visible
from .flow_checks import flow_module, never_undone
from .lower import _emit_arg
from .model import EmitValue, Event, EventRef, Field, Flow, FlowStep, Machine
from .pyformat import fit_lines, quote

__all__ = ["flow_dot", "flow_mermaid", "flow_module", "generate_flow"]


def _events(machines: Iterable[Machine]) -> dict[tuple[str, str], Event]:
    return {(m.name.value, e.name.value): e for m in machines for e in m.events}


def _tuple(items: Sequence[str]) -> str:
    # No trailing comma after several items: ruff would take it as "keep this expanded".
    return f"({items[0]},)" if len(items) == 1 else "(" + ", ".join(items) + ")"


def _emit(ref: EventRef, events: dict[tuple[str, str], Event], inputs: set[str]) -> str:
    """`Emit(...)` source for a step's send or compensation: written arguments, then the
    target's other fields from same-named inputs (as an emit takes causing fields)."""
    assert ref.machine is not None  # E160 otherwise, and nothing is generated
    machine, event = ref.machine.value, ref.event.value
    target = events[(machine, event)]
    written = {arg.field.value: arg for arg in ref.args}
    args: list[str] = []
    for field in target.fields:
        name = field.name.value
        arg = written.get(name)
        if arg is not None:
            row = _emit_arg(name, arg.value)
            args.append(f"EmitArg({quote(row.field)}, {quote(row.source)}, {_value(row.value)})")
        elif name in inputs:
            args.append(f"EmitArg({quote(name)}, {quote('field')}, {quote(name)})")
    return f"Emit({quote(machine)}, {quote(event)}, {_tuple(args)})"


def _value(value: str | int | bool | None) -> str:
    return quote(value) if isinstance(value, str) else repr(value)


def _step(step: FlowStep, events: dict[tuple[str, str], Event], inputs: set[str]) -> str:
    parts = [f"name={quote(step.name.value)}", f"kind={quote(step.kind)}"]
    if step.kind == "send" and step.target is not None:
        assert step.target.machine is not None
        parts.append(f"machine={quote(step.target.machine.value)}")
        parts.append(f"send={_emit(step.target, events, inputs)}")
        if step.to is not None:
            parts.append(f"to={quote(step.to.value)}")
        if step.compensate is not None:
            parts.append(f"compensate={_emit(step.compensate, events, inputs)}")
    elif step.kind == "await" and step.machine is not None:
        parts.append(f"machine={quote(step.machine.value)}")
        states = [quote(s) for s in sorted({s.value for s in step.states})]
        parts.append(f"states=frozenset({_tuple(states)})")
        if step.unless:
            fails = [quote(s) for s in sorted({s.value for s in step.unless})]
            parts.append(f"fails=frozenset({_tuple(fails)})")
        if step.within is not None:
            parts.append(f"within_ms={step.within.millis!r}")
    elif step.function is not None:
        parts.append(f"function={quote(step.function.value)}")
    if step.irreversible:
        parts.append("irreversible=True")
    return f"FlowStepSpec({', '.join(parts)})"


def _input_type(field: Field) -> str:
    """`"name": FlowInput(...)`: an input's declared type, every text through quote()."""
    kind = field.type
    parts = [quote(kind.kind)]
    if kind.literals:
        parts.append(_tuple([quote(lit.value) for lit in kind.literals]))
    if kind.optional:
        parts.append("optional=True")
    for side, bound in (("at_least", field.at_least), ("at_most", field.at_most)):
        if bound is not None:
            text = bound.text if isinstance(bound, EmitValue) else bound.value
            parts.append(f"{side}={quote(text)}")
    return f"{quote(field.name.value)}: FlowInput({', '.join(parts)})"


def generate_flow(flow: Flow, source_path: str, machines: Sequence[Machine]) -> str:
    """The formatted source of one flow's generated module, as `ruff format` writes it: the
    statements are written on one line each and `fit_lines` splits them as ruff does (a test
    holds the two byte-identical). Names passed the checks; every other value is quoted."""
    events = _events(machines)
    inputs = {f.name.value for f in flow.inputs}
    inputs |= {s.name.value for s in flow.all_steps() if s.kind == "compute"}

    def steps(of: Sequence[FlowStep]) -> str:
        return _tuple([_step(s, events, inputs) for s in of]) if of else "()"

    branches = ", ".join(f"{quote(b.case.value)}: {steps(b.steps)}" for b in flow.branches)
    quorum = None if flow.quorum is None else int(flow.quorum.text)
    declared = [quote(f.name.value) for f in flow.inputs]
    name = flow.name.value
    fields = [
        f"name={quote(name)}",
        f"kind={quote(flow.kind)}",
        f"doc={_value(flow.doc)}",
        "source_path=SOURCE_PATH",
        f"source_sha256={quote(flow.source_sha256)}",
        f"compiler_version={quote(COMPILER_VERSION)}",
        f"inputs={_tuple(declared) if declared else '()'}",
        f"steps={steps(flow.steps)}",
        f"on={_value(None if flow.on is None else flow.on.value)}",
        f"branches=frozen_map({{{branches}}})",
        f"within_ms={None if flow.within is None else flow.within.millis!r}",
        f"quorum={quorum!r}",
        f"input_types=frozen_map({{{', '.join(_input_type(f) for f in flow.inputs)}}})",
    ]
    body = f"""\
from {CONTRACT_MODULE} import (
    Emit,
    EmitArg,
    FlowInput,
    FlowSpec,
    FlowStepSpec,
    frozen_map,
)

SOURCE_PATH = {quote(source_path)}

FLOW = FlowSpec({", ".join(fields)})
"""
    header = f'''"""Flow tables of {name}, generated by autonomic {COMPILER_VERSION}: do not edit.

Source sha256: {flow.source_sha256}
Change the flow in its machine file and run `autonomic build` instead.
"""

'''
    formatted = fit_lines(header + body, strict=False)
    if has_long_lines(formatted):  # a long doc string: it stays on its line
        formatted = fit_lines(header + "# ruff: noqa: E501, RUF100\n\n" + body, strict=False)
    return formatted


# ---------------------------------------------------------------- diagrams


def _label(step: FlowStep) -> str:
    if step.kind == "send" and step.target is not None and step.target.machine is not None:
        what = f"{step.target.machine.value}.{step.target.event.value}"
        if step.to is not None:
            what += f" to {step.to.value}"
    elif step.kind == "await" and step.machine is not None:
        states = ", ".join(s.value for s in step.states)
        what = f"await {step.machine.value} in {states}"
        if step.unless:
            what += f" unless {', '.join(s.value for s in step.unless)}"
        if step.within is not None:
            what += f" within {step.within.text}"
    else:
        what = f"compute {step.function.value if step.function else ''}"
    marker = " (irreversible)" if step.irreversible else ""
    return visible(f"{step.name.value}: {what}{marker}")


def _compensation(step: FlowStep) -> str | None:
    ref = step.compensate
    if ref is None or ref.machine is None:
        return None
    return visible(f"{ref.machine.value}.{ref.event.value}")


def _lanes(flow: Flow) -> list[tuple[str | None, tuple[FlowStep, ...]]]:
    """Runs of steps drawn as chains: one per branch, or one per step of a parallel flow."""
    if flow.kind == "conditional":
        return [(b.case.value, b.steps) for b in flow.branches]
    if flow.kind in ("parallel", "fanout"):
        return [(None, (s,)) for s in flow.steps]
    return [(None, flow.steps)]


def _title(flow: Flow) -> str:
    title = f"{flow.name.value} ({flow.kind})"
    if flow.kind == "fanout":
        title += " " + _gathering(flow)
    return title


def _gathering(flow: Flow) -> str:
    quorum = flow.quorum.text if flow.quorum else str(len(flow.steps))
    within = f" within {flow.within.text}" if flow.within else ""
    return f"quorum {quorum} of {len(flow.steps)}{within}"


class _Drawing:
    """A flow as nodes and edges, drawn the same in DOT and Mermaid. Compensation reads as
    the runtime runs it: a failed step leads to the compensation of the newest completed
    step before it, and each compensation to the one before that, down to `compensated`
    (a sequence, a saga and each branch of a conditional flow; a failure with nothing
    before it to undo ends the run `failed`; nothing undoes the last step, whose success
    completes the run); in a parallel flow, where the finished branches are undone when
    another fails, each step points to its own compensation with `undo`; a fan-out that
    misses its quorum ends `failed`. `beside` pairs each compensation with the step it
    undoes, so a top-to-bottom layout can draw them side by side."""

    def __init__(self, flow: Flow) -> None:
        self.nodes: list[tuple[str, str, str]] = []  # id, label, kind
        self.edges: list[tuple[str, str, str | None, str]] = []  # from, to, label, kind
        self.beside: list[tuple[str, str]] = []  # step, its compensation
        self._draw(flow)

    def _draw(self, flow: Flow) -> None:
        self.nodes.append(("start", "", "start"))
        self.nodes.append(("done", "", "done"))
        undone = failed = False
        end = "done"
        if flow.kind == "fanout":
            end = "gather"
            self.nodes.append(("gather", visible(f"fan-in: {_gathering(flow)}"), "gather"))
            self.edges.append(("gather", "done", None, "next"))
            self.edges.append(("gather", "failed", "quorum missed", "fail"))
            failed = True
        spared = {step.name.value for step in never_undone(flow)}  # E165 if compensated
        for case, steps in _lanes(flow):
            previous, label = "start", case
            undo_before = "failed"  # where a failure here ends: nothing to undo yet
            for step in steps:
                node = f"step_{step.name.value}"
                self.nodes.append((node, _label(step), "step"))
                self.edges.append((previous, node, label, "next"))
                undo = None if step.name.value in spared else _compensation(step)
                if flow.kind == "parallel":
                    if undo is not None:
                        target = f"undo_{step.name.value}"
                        self.nodes.append((target, f"compensate: {undo}", "undo"))
                        self.edges.append((node, target, "undo", "undo"))
                        self.edges.append((target, "undone", None, "undo"))
                        undone = True
                elif flow.kind != "fanout":
                    # Into `failed` the red end says it: unlabelled, six such edges stay legible.
                    fails = None if undo_before == "failed" else "fails"
                    self.edges.append((node, undo_before, fails, "fail"))
                    failed = failed or undo_before == "failed"
                    if undo is not None:
                        undone = True
                        target = f"undo_{step.name.value}"
                        self.nodes.append((target, f"compensate: {undo}", "undo"))
                        then = "undone" if undo_before == "failed" else undo_before
                        self.edges.append((target, then, "then", "undo"))
                        self.beside.append((node, target))
                        undo_before = target
                previous, label = node, None
            self.edges.append((previous, end, label, "next"))
        if undone:
            self.nodes.append(("undone", "compensated", "undone"))
        if failed:
            self.nodes.append(("failed", "failed", "failed"))


# Wide enough for `Machine.Event`, narrow enough that a top-to-bottom column fits a PR.
_FLOW_LABEL_WIDTH = 30


def _lines(label: str) -> tuple[str, ...]:
    """A step's `name:` on its own line, the rest wrapped (never inside a dotted name)."""
    head, colon, rest = label.partition(": ")
    if not colon:
        head, rest = "", label
    lines = textwrap.wrap(rest, _FLOW_LABEL_WIDTH, break_on_hyphens=False, break_long_words=False)
    return (head + colon.strip(), *lines) if colon else tuple(lines) or ("",)


_RED = "firebrick"
_DOT_NODES = {
    "start": 'shape=point, width=0.15, label="", fillcolor=black',
    "done": 'shape=doublecircle, label="", width=0.15, style=filled, fillcolor=black',
    "undone": f"shape=doublecircle, color={_RED}, fontcolor={_RED}",
    "failed": f"shape=doublecircle, color={_RED}, fontcolor={_RED}, style=filled, "
    'fillcolor="#ffebe9"',
    "gather": "shape=hexagon",
    "step": "",
    "undo": f'style="rounded,dashed", color={_RED}, fontcolor={_RED}',
}
_DOT_EDGES = {
    "next": "",
    # A failure or compensation edge must not pull the steps out of their column; its label
    # is an xlabel, set beside the edge after layout, not a node of the rank between.
    "fail": f"style=dashed, color={_RED}, fontcolor={_RED}, constraint=false",
    "undo": f"style=dashed, color={_RED}, fontcolor={_RED}, constraint=false",
}


def flow_dot(flow: Flow) -> str:
    """Steps as boxes from start down to done (branches labelled with their case, a
    fan-out's replies gathered), compensations as dashed red boxes beside the steps they
    undo, failures as dashed red edges (see _Drawing); governor diagrams' fonts."""
    name = flow.name.value
    # A parallel flow's steps stand in one column, their compensations in another beyond
    # `done`; every other flow runs down the page (one row was four pages wide in a PR).
    rankdir = "LR" if flow.kind == "parallel" else "TB"
    lines = [
        f"digraph {dot_quote(name)} {{",
        f"    graph [rankdir={rankdir}, nodesep=0.4, ranksep=0.35, labelloc=t, fontname=Helvetica,",
        f"           fontsize=16, forcelabels=true, label={dot_quote(_title(flow))}];",
        '    node [shape=box, style="rounded,filled", fillcolor=white, fontname=Helvetica,',
        '          fontsize=11, margin="0.1,0.05"];',
        "    edge [fontname=Helvetica, fontsize=9];",
    ]
    drawing = _Drawing(flow)
    for node, label, kind in drawing.nodes:
        attributes = [a for a in (_DOT_NODES[kind],) if a]
        if kind != "start" and kind != "done":
            attributes.insert(0, f"label={dot_quote(_lines(label))}")
        lines.append(f"    {node} [{', '.join(attributes)}];")
    for step, undo in drawing.beside:
        lines.append(f"    {{ rank=same; {step}; {undo}; }}")
    kinds = {kind for _, _, kind in drawing.nodes}
    if "failed" in kinds and "undone" not in kinds:
        # Nothing compensated: the run's two ends side by side at the foot of the drawing
        # (with compensations, `failed` sits at the top beside `compensated`, nearer the
        # early steps that lead to it).
        lines.append("    { rank=max; done; failed; }")
    for source, target, edge_label, kind in drawing.edges:
        attributes = [a for a in (_DOT_EDGES[kind],) if a]
        if flow.kind == "parallel" and kind == "undo":
            # Past `done`'s column, so no success edge meets a compensation box.
            minlen = "minlen=1" if target == "undone" else "minlen=2"
            attributes = [_DOT_EDGES["fail"].replace("constraint=false", minlen)]
        if edge_label:
            key = "label" if kind == "next" else "xlabel"
            attributes.append(f"{key}={dot_quote(edge_label)}")
        suffix = f" [{', '.join(attributes)}]" if attributes else ""
        lines.append(f"    {source} -> {target}{suffix};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mermaid_text(text: str) -> str:
    escaped = "".join(f"#{ord(ch)};" if ch in '"#;<>{}[]()|' else ch for ch in text)
    return f'"{escaped}"'


_MERMAID_NODES = {
    "start": "((start))",
    "done": "(((done)))",
    "undone": "((({label})))",
    "failed": "((({label})))",
    "gather": "{{{{{label}}}}}",
    "step": "[{label}]",
    "undo": "[{label}]",
}


def flow_mermaid(flow: Flow) -> str:
    """The same drawing as flow_dot, with the flow's title (a fan-out's quorum and deadline)
    as the diagram's title."""
    # The title is names, a kind, a count and a duration: a JSON string is a YAML one.
    # Down the page, as in DOT: a sequence of seven steps in one row was 3644 px wide.
    direction = "LR" if flow.kind == "parallel" else "TB"
    lines = ["---", f"title: {json.dumps(_title(flow))}", "---", f"flowchart {direction}"]
    drawing = _Drawing(flow)
    undos: list[str] = []
    for node, label, kind in drawing.nodes:
        shape = _MERMAID_NODES[kind].format(label=_mermaid_text(label))
        lines.append(f"    {node}{shape}")
        if kind in ("undo", "undone", "failed"):
            undos.append(node)
    # The compensations in a box of their own: the layout keeps other nodes, and so the
    # success edges into `done`, out of it (they once ran through the compensations).
    inside = [node for node, _, kind in drawing.nodes if kind in ("undo", "undone")]
    if inside:
        lines.append(f"    subgraph compensations[{_mermaid_text('on failure')}]")
        lines.extend(f"        {node}" for node in inside)
        lines.append("    end")
    red: list[str] = []
    for number, (source, target, edge_label, kind) in enumerate(drawing.edges):
        arrow = "-->" if kind == "next" else "-.->"
        if flow.kind == "parallel" and kind == "undo" and target != "undone":
            arrow = "-..->"  # two ranks: `done` alone in the one between (see flow_dot)
        text = f"|{_mermaid_text(edge_label)}|" if edge_label else ""
        lines.append(f"    {source} {arrow}{text} {target}")
        if kind != "next":
            red.append(str(number))
    if undos:
        lines.append("    classDef undo stroke:#b22222,color:#b22222,stroke-dasharray:4 3")
        lines.append(f"    class {','.join(undos)} undo")
    if red:
        lines.append(f"    linkStyle {','.join(red)} stroke:#b22222")
    return "\n".join(lines) + "\n"
