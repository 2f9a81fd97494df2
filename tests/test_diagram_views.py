"""A large machine's diagrams: an overview of its groups and one diagram per group; join bars
in Mermaid; narrow state boxes. Structure only: test_diagram_render.py draws them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from autonomic.compiler.build import render_outputs
from autonomic.compiler.checks import check_paths
from autonomic.compiler.diagram import (
    SPLIT_FROM,
    Diagram,
    DiagramEdge,
    DiagramGroup,
    DiagramNode,
    Line,
    diagram_of,
    diagram_views,
    render_diagram,
    render_dot,
    render_mermaid,
)
from autonomic.compiler.model import Machine
from autonomic.compiler.parser import parse_text

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def machines() -> list[Machine]:
    return list(check_paths([ROOT / "machines"]).machines)


@pytest.fixture(scope="module")
def billing(machines: list[Machine]) -> Machine:
    return next(m for m in machines if m.name.value == "Billing")


def _owner(diagram: Diagram) -> dict[str, str]:
    owner: dict[str, str] = {}
    for group in diagram.groups:
        for member in group.members:
            owner.setdefault(member, group.id)
    return owner


def test_billing_is_an_overview_and_one_diagram_per_group(billing: Machine) -> None:
    whole = diagram_of(billing)
    assert len(whole.nodes) >= SPLIT_FROM and whole.groups
    views = diagram_views(whole, "billing")
    assert [v.stem for v in views] == ["billing"] + [
        f"billing.{re.sub(r'(?<!^)(?=[A-Z])', '_', g.id).lower()}" for g in whole.groups
    ]
    owner = _owner(whole)
    overview = views[0].diagram
    ids = {node.id for node in overview.nodes}
    # No grouped state stands alone in the overview: its group's box does, linked to its view.
    assert ids.isdisjoint(owner)
    boxes = {node.id: node for node in overview.nodes if node.kind == "group"}
    assert set(boxes) == {g.id for g in whole.groups}
    assert {box.link for box in boxes.values()} == {v.stem for v in views[1:]}
    for group in whole.groups:
        assert all(member in boxes[group.id].internal[0].text for member in group.members)
    # Every move between two owners is an overview edge, its lines named by event or timer.
    for edge in whole.edges:
        source, target = owner.get(edge.source, edge.source), owner.get(edge.target, edge.target)
        if source == target:
            continue
        drawn = next(e for e in overview.edges if (e.source, e.target) == (source, target))
        for line in edge.lines:
            if source in boxes or target in boxes:
                assert line.text.startswith(drawn.lines[0].text.split()[0]) or any(
                    line.text.startswith(shown.text) for shown in drawn.lines
                ), (line, drawn)
            else:
                assert line in drawn.lines
    assert len({(e.source, e.target) for e in overview.edges}) == len(overview.edges)


def test_each_state_is_drawn_in_full_once_and_each_line_somewhere(billing: Machine) -> None:
    whole = diagram_of(billing)
    views = diagram_views(whole, "billing")
    full = [n for v in views for n in v.diagram.nodes if n.kind == "state"]
    assert sorted(n.id for n in full) == sorted(n.id for n in whole.nodes)
    assert {n.id: n for n in full} == {n.id: n for n in whole.nodes}
    lines = {line for v in views for e in v.diagram.edges for line in e.lines}
    assert {line for e in whole.edges for line in e.lines} <= lines


def test_a_group_view_names_its_neighbours_and_their_groups(billing: Machine) -> None:
    whole = diagram_of(billing)
    views = {v.stem: v for v in diagram_views(whole, "billing")}
    disputes = views["billing.disputes"].diagram
    owner = _owner(whole)
    stubs = {n.id: n for n in disputes.nodes if n.kind == "stub"}
    full = {n.id for n in disputes.nodes if n.kind == "state"}
    assert full == set(next(g for g in whole.groups if g.id == "Disputes").members)
    # Refunds' seven states meet Disputes alike: one box named Refunds, linked to its diagram.
    assert stubs["Refunds"].link == "billing.refunds"
    assert stubs["Current"].link == "billing" and stubs["Current"].doc is None
    assert not set(stubs) & set(owner)
    assert all(e.source in full or e.target in full for e in disputes.edges)
    assert len({(e.source, e.target) for e in disputes.edges}) == len(disputes.edges)
    dot = render_dot(disputes)
    assert '"Refunds" [' in dot and 'URL="billing.refunds.svg"' in dot
    assert "[*]" not in dot  # no start dot: the initial state is not in this group


def test_small_or_ungrouped_machines_are_drawn_whole() -> None:
    states = tuple(DiagramNode(f"S{i}", None, i == 0) for i in range(SPLIT_FROM))
    edges = tuple(DiagramEdge(f"S{i}", f"S{i + 1}", (Line("Go"),)) for i in range(SPLIT_FROM - 1))
    group = DiagramGroup("Middle", None, ("S3", "S4"))
    ungrouped = Diagram("M", None, states, edges)
    assert [v.stem for v in diagram_views(ungrouped, "m")] == ["m"]
    small = Diagram("M", None, states[:-1], edges[:-1], groups=(group,))
    assert [v.stem for v in diagram_views(small, "m")] == ["m"]
    large = Diagram("M", None, states, edges, groups=(group,))
    assert [v.stem for v in diagram_views(large, "m")] == ["m", "m.middle"]
    # A group named like a state would be two things under one name: drawn whole.
    clash = Diagram("M", None, states, edges, groups=(DiagramGroup("S9", None, ("S3",)),))
    assert [v.stem for v in diagram_views(clash, "m")] == ["m"]


def test_mermaid_meets_alike_edges_at_a_join_bar() -> None:
    nodes = tuple(DiagramNode(n, None, n == "A") for n in ("A", "B", "C", "T"))
    shared = (Line("Cancel / close_ledger"),)
    edges = (
        DiagramEdge("A", "B", (Line("Go"),)),
        DiagramEdge("A", "T", shared),
        DiagramEdge("B", "T", shared),
        DiagramEdge("C", "T", shared),
    )
    lines = render_mermaid(Diagram("M", None, nodes, edges)).splitlines()
    assert "    state join1 <<join>>" in lines
    assert "    join1 --> T : Cancel / close_ledger" in lines
    assert {"    A --> join1", "    B --> join1", "    C --> join1"} <= set(lines)
    assert sum("close_ledger" in line for line in lines) == 1
    # A state named join1 keeps its name; the bar takes another.
    renamed = tuple(DiagramNode("join1" if n.id == "C" else n.id, None, n.initial) for n in nodes)
    moved = tuple(
        DiagramEdge("join1" if e.source == "C" else e.source, e.target, e.lines) for e in edges
    )
    text = render_mermaid(Diagram("M", None, renamed, moved))
    assert "state join1_ <<join>>" in text and "    join1 --> join1_" in text


def test_mermaid_cuts_a_state_line_as_dot_does() -> None:
    text = (
        "machine M { event Go event Done initial state A {\n"
        "  on Go -> B do record_the_first_action\n"
        "  on Done -> A do one_long_action_name, another_long_action_name\n"
        "} final state B }"
    )
    machine, problems = parse_text(text, "m.fsm")
    assert machine is not None and problems == [], problems
    state_lines = [
        line for line in render_mermaid(diagram_of(machine)).splitlines() if line[:8] == "    A : "
    ]
    assert state_lines[:3] == [
        "    A : Done",
        "    A : #160;#160;#160;#160;/ one_long_action_name,",
        "    A : #160;#160;#160;#160;another_long_action_name",
    ]


def test_the_index_shows_each_group_under_its_name(
    billing: Machine, machines: list[Machine]
) -> None:
    outputs = render_outputs([billing], draw_svg=False, known=machines)
    readme = outputs["README.md"].decode()
    for stem, heading in (("billing.disputes", "Disputes"), ("billing.refunds", "Refunds")):
        assert f"### Billing: {heading}" in readme
        assert f"[SVG]({stem}.svg)" in readme and f"{stem}.mmd" in outputs
        assert f"(#billing-{heading.lower()})" in readme
        assert outputs[f"{stem}.mmd"].decode().rstrip("\n") in readme
    assert readme.count("```mermaid") == 1 + len(diagram_of(billing).groups)


def test_graph_draws_a_view_as_build_writes_it(billing: Machine, machines: list[Machine]) -> None:
    outputs = render_outputs([billing], draw_svg=False, known=machines)
    for view, stem in (("overview", "billing"), ("Disputes", "billing.disputes")):
        assert render_diagram(billing, "mermaid", view) == outputs[f"{stem}.mmd"].decode()
        assert render_diagram(billing, "dot", view) == outputs[f"{stem}.dot"].decode()
    assert len(render_diagram(billing, "dot")) > len(outputs["billing.dot"])  # whole
