"""Diagrams: the IR, the DOT and Mermaid renderers and their escaping, SVG through Graphviz."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from autonomic.compiler.checks import check_paths
from autonomic.compiler.diagram import (
    Diagram,
    DiagramEdge,
    DiagramNode,
    DiagramToolMissing,
    Line,
    diagram_of,
    dot_quote,
    mermaid_ids,
    mermaid_text,
    render_diagram,
    render_dot,
    render_mermaid,
    render_svg,
    visible,
)
from autonomic.compiler.parser import parse_text

GOLDEN_MACHINES = Path(__file__).resolve().parent / "golden" / "machines"
SVG = "{http://www.w3.org/2000/svg}"
# CI installs Graphviz, so there a missing `dot` fails these tests instead of skipping them.
needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None and not os.environ.get("CI"), reason="Graphviz dot not installed"
)

TRICKY = [
    'say "hi"',
    "back\\slash\\",
    "two\nlines",
    "<b>bold</b> & <script>x</script>",
    "a | b # c ; d : e % f",
    "\u202egnp.exe\u202c",
    "zero\u200bwidth",
    '"]; "X" -> "Y"; "Z" [label="',
    "end note",
    "direction LR",
    "%% comment",
    "\\N \\G \\E \\l \\n",
    "{{x}} `tick`",
]


@pytest.fixture(scope="module")
def entitlement() -> Diagram:
    report = check_paths([GOLDEN_MACHINES])
    machine = next(m for m in report.machines if m.name.value == "Entitlement")
    return diagram_of(machine)


def _one_edge_diagram(text: str) -> Diagram:
    return Diagram(
        name="M",
        doc=text,
        nodes=(
            DiagramNode("A", text, True, False, internal=(Line(text),), bound=text),
            DiagramNode("B", None, False, True),
        ),
        edges=(DiagramEdge("A", "B", (Line("Go [ok]"), Line(text))),),
    )


# ---------------------------------------------------------------- the diagram IR


def test_states_are_nodes_in_declaration_order(entitlement: Diagram) -> None:
    assert [n.id for n in entitlement.nodes][:4] == [
        "PendingApproval",
        "AwaitingPayment",
        "Active",
        "Suspended",
    ]
    assert [n.id for n in entitlement.nodes if n.initial] == ["PendingApproval"]
    assert {n.id for n in entitlement.nodes if n.final} == {
        "Rejected",
        "Expired",
        "Revoked",
        "PaymentAbandoned",
    }


def test_edges_are_merged_one_line_per_event(entitlement: Diagram) -> None:
    edges = {(e.source, e.target): e for e in entitlement.edges}
    assert len(edges) == len(entitlement.edges)  # one edge per source and target
    approved = edges["PendingApproval", "AwaitingPayment"]
    assert approved.lines == (
        Line("Approve [is_approver] / record_approval, notify ^Billing.StartBilling"),
        Line("after 72h (ApprovalLadder) / auto_approve", "timer"),
    )
    assert not approved.dashed  # an event among its lines: solid
    assert edges["Active", "Expired"].lines == (Line("after 30d", "timer"),)
    assert edges["Active", "Expired"].dashed
    assert edges["Retry2", "PaymentAbandoned"].lines == (
        Line("PaymentFailed (PaymentRetry exhausted) / close_account ^Billing.WriteOff"),
    )


def test_self_transitions_and_notifications_are_internal(entitlement: Diagram) -> None:
    assert not any(e.source == e.target for e in entitlement.edges)
    nodes = {n.id: n for n in entitlement.nodes}
    assert nodes["PendingApproval"].internal == (
        Line("Approve [else]"),
        Line("after 24h (ApprovalLadder): notify queue manager_review_queue (within 4h)", "timer"),
        Line("after 48h (ApprovalLadder): notify role director (within 1h)", "timer"),
    )
    assert nodes["Retry1"].internal == (
        Line("after 1h (PaymentRetry step 1) / retry_charge", "timer"),
    )
    assert nodes["Active"].internal == ()


def test_bounds_and_ladder_clusters(entitlement: Diagram) -> None:
    nodes = {n.id: n for n in entitlement.nodes}
    assert nodes["PendingApproval"].bound == "within 72h -> AwaitingPayment"
    assert nodes["AwaitingPayment"].bound == "no bound: waits for an event"
    assert nodes["Rejected"].bound is None
    assert {n.id for n in entitlement.nodes if n.cluster == "PaymentRetry"} == {"Retry1", "Retry2"}
    (cluster,) = entitlement.clusters
    assert cluster.title == (
        "retry PaymentRetry on PaymentFailed",
        "ends within 4h if every attempt fails (1h + 3h)",
    )


def test_each_states_edges_in_source_order(entitlement: Diagram) -> None:
    pending = [e.target for e in entitlement.edges if e.source == "PendingApproval"]
    assert pending == ["AwaitingPayment", "Rejected"]


# ---------------------------------------------------------------- DOT


def test_dot_marks_initial_final_resting_and_dashed(entitlement: Diagram) -> None:
    dot = render_dot(entitlement)
    assert '"[*]" -> "PendingApproval";' in dot
    assert '"Rejected" [label=<<table' in dot and "peripheries=2" in dot
    assert '"Active" -> "Expired" [label="after 30d\\l", style=dashed];' in dot
    assert '"Suspended" -> "Active" [label="Resume\\l"];' in dot
    assert "<b>PendingApproval</b>" in dot and 'tooltip="Waiting for an approver."' in dot
    assert 'subgraph "cluster_PaymentRetry"' in dot
    # Retry1 and Retry2 both go to Active on PaymentSucceeded: one edge from the ladder's box.
    assert dot.count('-> "Active" [label="PaymentSucceeded\\l"') == 1
    assert 'ltail="cluster_PaymentRetry"' in dot
    resting = Diagram("M", None, (DiagramNode("A", None, True, False, resting=True),), ())
    assert "rounded,dashed,filled" in render_dot(resting)
    assert "class A resting" in render_mermaid(resting)


def test_dot_quote_escapes() -> None:
    assert dot_quote('a"b') == '"a\\"b"'
    assert dot_quote("a\\b") == '"a\\\\b"'
    assert dot_quote(("one", "two")) == '"one\\ntwo"'
    assert dot_quote(("one",), align="left") == '"one\\l"'
    assert dot_quote("x\ny") == '"x y"'
    assert dot_quote("\u202e") == '"<U+202E>"'


@needs_dot
@pytest.mark.parametrize("text", TRICKY)
def test_dot_labels_reach_graphviz_as_written(text: str) -> None:
    """Graphviz draws the text (made visible) and nothing else: no extra nodes or edges."""
    svg = render_svg(render_dot(_one_edge_diagram(text)))
    root = ET.fromstring(svg)
    nodes = root.findall(f".//{SVG}g[@class='node']")
    edges = root.findall(f".//{SVG}g[@class='edge']")
    assert len(nodes) == 3  # the start point, A and B
    assert len(edges) == 2  # start -> A, A -> B
    drawn = [t.text or "" for t in root.iter(f"{SVG}text")]
    shown = visible(text)
    # Graphviz collapses runs of spaces and trims lines; compare what it keeps.
    squeeze = " ".join(shown.split())
    assert any(" ".join(line.split()) == squeeze for line in drawn), (drawn, squeeze)
    assert all(not any(ord(c) in (0x202E, 0x200B) for c in line) for line in drawn)


# ---------------------------------------------------------------- Mermaid


def _decode_entities(text: str) -> str:
    return re.sub(r"#([0-9]+);", lambda m: chr(int(m.group(1))), text)


@pytest.mark.parametrize("text", TRICKY)
def test_mermaid_text_is_inert_and_lossless(text: str) -> None:
    escaped = mermaid_text(text)
    # A description runs to the first ':', ';' or newline in Mermaid's state lexer.
    assert re.fullmatch(r"[^:\n;]*", re.sub(r"#[0-9]+;", "", escaped))
    for forbidden in ('"', "<", ">", "{", "}", "|", "%", "`", "\\", "&"):
        assert forbidden not in re.sub(r"#[0-9]+;", "", escaped)
    assert not re.search(r"direction\s|end note", escaped, re.IGNORECASE)
    assert _decode_entities(escaped) == visible(text)


def test_mermaid_diagram_shape(entitlement: Diagram) -> None:
    lines = render_mermaid(entitlement).splitlines()
    # Front matter first: a curve through the layout's points keeps labels where dagre put them.
    assert lines[:7] == [
        "---",
        "config:",
        "  flowchart:",
        "    curve: catmullRom",
        "---",
        "stateDiagram-v2",
        "    direction TB",
    ]
    assert "    [*] --> PendingApproval" in lines
    assert "    Revoked --> [*]" in lines
    assert "    Active --> Expired : after 30d" in lines
    assert '    state "PendingApproval" as PendingApproval' in lines
    assert "    PendingApproval : <small>Waiting for an approver.</small>" in lines
    assert "    PendingApproval : Approve [else]" in lines
    assert "    PendingApproval : <i>within 72h -#62; AwaitingPayment</i>" in lines
    assert (
        "    PendingApproval --> AwaitingPayment : Approve [is_approver] / record_approval, "
        "notify ^Billing.StartBilling<br/>after 72h (ApprovalLadder) / auto_approve"
    ) in lines
    statement = re.compile(
        r"    (state \"\w+\" as \w+|state \w+ <<join>>|\w+ : [^:;\n]+"
        r"|(\[\*\]|\w+) --> (\[\*\]|\w+)( : [^:;\n]+)?)"
    )
    for line in lines[7:]:
        # Mermaid swaps entity codes out before its lexer runs.
        assert statement.fullmatch(re.sub(r"#[0-9]+;", "", line)), line


def test_mermaid_keyword_states_get_aliases() -> None:
    nodes = tuple(
        DiagramNode(name, None, name == "State", False) for name in ("State", "Note", "Note_", "Go")
    )
    diagram = Diagram("M", None, nodes, (DiagramEdge("State", "Note", (Line("E"),)),))
    ids = mermaid_ids(diagram)
    assert ids == {"State": "State_", "Note": "Note__", "Note_": "Note_", "Go": "Go"}
    text = render_mermaid(diagram)
    assert '    state "State" as State_' in text and "    State_ --> Note__ : E" in text


# ---------------------------------------------------------------- SVG


@needs_dot
def test_svg_is_deterministic_and_complete() -> None:
    report = check_paths([GOLDEN_MACHINES / "entitlement.fsm"])
    machine = report.machines[0]
    first = render_diagram(machine, "svg")
    second = render_diagram(machine, "svg")
    assert isinstance(first, bytes) and first == second
    root = ET.fromstring(first)
    titles = {t.text for t in root.iter(f"{SVG}title")}
    assert {s.name.value for s in machine.states} <= titles


def test_render_diagram_formats() -> None:
    machine, _ = parse_text("machine M { initial state A { on E -> B } final state B event E }")
    assert machine is not None
    assert render_diagram(machine, "dot").startswith('digraph "M" {')
    assert render_diagram(machine, "mermaid").startswith("---\nconfig:\n")
    assert "\nstateDiagram-v2\n" in render_diagram(machine, "mermaid")
    with pytest.raises(ValueError, match="unknown diagram format"):
        render_diagram(machine, "png")


def test_svg_without_dot_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    machine, _ = parse_text("machine M { initial state A }")
    assert machine is not None
    with pytest.raises(DiagramToolMissing, match="install graphviz"):
        render_diagram(machine, "svg")


@needs_dot
def test_build_without_dot_notices_and_builds_the_rest(tmp_path: Path) -> None:
    """A real run with `dot` off the PATH: one notice, no SVG, and `--check` does not call the
    SVGs drawn elsewhere stale or orphaned."""
    out = tmp_path / "out"
    script = (
        "import sys; from pathlib import Path; from autonomic.compiler.build import build\n"
        "r = build([sys.argv[1]], Path(sys.argv[2]), check_only=sys.argv[3] == 'check')\n"
        "print('|'.join(r.notices)); print(sorted(p.name for p in r.written))\n"
        "print(len(r.stale), len(r.missing), len(r.orphaned))\n"
    )
    no_dot = {**os.environ, "PATH": str(tmp_path / "bin")}
    run = [sys.executable, "-c", script, str(GOLDEN_MACHINES), str(out)]
    done = subprocess.run([*run, "write"], env=no_dot, capture_output=True, text=True, check=True)
    notices, written, _ = done.stdout.splitlines()
    assert notices.startswith("Graphviz `dot` not found") and "|" not in notices
    assert ".svg" not in written and "entitlement.py" in written
    # Now draw the SVGs with dot, then check again without it: still up to date.
    with_dot = subprocess.run([*run, "write"], capture_output=True, text=True, check=True)
    assert "entitlement.svg" in with_dot.stdout
    checked = subprocess.run(
        [*run, "check"], env=no_dot, capture_output=True, text=True, check=True
    )
    assert checked.stdout.splitlines()[2] == "0 0 0"


NOTICE_MACHINE = """
machine Pinger {
  event Ping { customer_id: str }
  event Refused { customer_id: str, stage: str, code: str, why: str, count: int, flag: bool }
  initial state Idle {
    on Ping -> Waiting emit Ping if refused Refused(stage = "first step",
      code = $refusal_code, why = $refusal_message, count = 3, flag = true)
  }
  state Waiting { on Refused -> Told }
  final state Told
}
"""
NOTICE_TEXT = (
    'if refused Refused(stage = "first step", code = $refusal_code, why = $refusal_message, '
    "count = 3, flag = true)"
)


def test_a_refusal_notice_is_drawn_with_its_arguments() -> None:
    """The edge names the notice and its arguments as written; a long line is cut before
    each emit, its notice and the notice's arguments, and never inside a `field = value`
    (DOT wraps, Mermaid is given the cuts and a no-break space on each side of `=`)."""
    machine, problems = parse_text(NOTICE_MACHINE)
    assert machine is not None, problems
    (edge,) = [e for e in diagram_of(machine).edges if e.source == "Idle"]
    assert edge.lines[0].text == f"Ping ^Ping {NOTICE_TEXT}"
    dot = render_diagram(machine, "dot")
    label = next(line for line in dot.splitlines() if '"Idle" -> "Waiting"' in line)
    lines = label.split('label="', 1)[1].split("\\l")[:-1]
    assert lines[:4] == [
        "Ping",
        "    ^Ping",
        "        if refused Refused(",
        '            stage = \\"first step\\",',
    ]
    assert all(not line.endswith(" =") and not line.lstrip().startswith("= ") for line in lines)
    shown = " ".join(line.strip() for line in lines[2:]).replace('\\"', '"').replace("( ", "(")
    assert shown == NOTICE_TEXT
    mermaid = render_diagram(machine, "mermaid")
    assert (
        "Idle --> Waiting : Ping<br/>^Ping<br/>if refused Refused(stage#160;=#160;#34;first step"
        "#34;, code#160;=#160;$refusal_code, why#160;=#160;$refusal_message, count#160;=#160;3, "
        "flag#160;=#160;true)"
    ) in mermaid


def test_the_generated_diagrams_show_the_downgrades_notices() -> None:
    generated = Path(__file__).resolve().parent.parent / "generated"
    dot = (generated / "subscription.dot").read_text()
    assert 'TierChangeFailed(\\l            stage = \\"entitlement\\",\\l' in dot
    assert "refusal_code = $refusal_code)" in dot
    mermaid = (generated / "subscription.mmd").read_text()
    assert "<br/>if refused TierChangeFailed(stage#160;=#160;#34;quota#34;, " in mermaid


def _flow_edges(text: str, arrow: str) -> set[tuple[str, str, str]]:
    """(from, to, label) of each edge of a generated flow diagram (DOT or Mermaid)."""
    found: set[tuple[str, str, str]] = set()
    for line in text.splitlines():
        if arrow == "->":
            match = re.match(r"\s*(\w+) -> (\w+)(?: \[.*?label=\"([^\"]*)\")?", line)
        else:
            match = re.match(r"\s*(\w+) -\.?-?\.?->(?:\|\"([^\"]*)\"\|)? (\w+)$", line)
            if match:
                found.add((match.group(1), match.group(3), match.group(2) or ""))
            continue
        if match:
            found.add((match.group(1), match.group(2), match.group(3) or ""))
    return found


def test_flow_diagrams_draw_compensation_as_it_runs() -> None:
    """A failed step leads to the compensation of the newest completed step before it, each
    compensation to the one before, down to `compensated`: never from a step to its own
    compensation (which reads "if this step fails, run X") in a sequence or saga. A parallel
    flow's steps are each undone by their own; a fan-out shows its quorum and deadline."""
    generated = Path(__file__).resolve().parents[1] / "generated"
    for suffix, arrow in ((".dot", "->"), (".mmd", "-->")):
        upgrade = _flow_edges((generated / f"flow_subscription_upgrade{suffix}").read_text(), arrow)
        assert {
            ("step_charge_proration", "undo_create_order", "fails"),
            ("step_paid", "undo_charge_proration", "fails"),
            ("step_grant_tier", "undo_charge_proration", "fails"),
            ("step_allocate_quota", "undo_grant_tier", "fails"),
            ("undo_grant_tier", "undo_charge_proration", "then"),
            ("undo_charge_proration", "undo_create_order", "then"),
            ("undo_create_order", "undone", "then"),
        } <= upgrade, suffix
        assert not [e for e in upgrade if e[0].startswith("step_") and e[1] == "undo_" + e[0][5:]]
        # Nothing to undo before the first send: no failure edge from the steps before it.
        assert ("step_create_order", "failed", "") in upgrade
        assert ("undo_create_order", "undone", "then") in upgrade
        signup = _flow_edges((generated / f"flow_customer_signup{suffix}").read_text(), arrow)
        assert ("step_trial", "undo_trial", "undo") in signup
        neighbour = (generated / f"flow_noisy_neighbour{suffix}").read_text()
        assert "quorum 2 of 3 within 30s" in neighbour


def test_every_node_of_each_flow_diagram_is_reached_from_its_start() -> None:
    """Each drawn step and compensation is reached from `start` along the drawn edges: no
    compensation drawn that no failure leads to (the upgrade's last step once had one)."""
    generated = Path(__file__).resolve().parents[1] / "generated"
    diagrams = sorted(generated.glob("flow_*.dot")) + sorted(generated.glob("flow_*.mmd"))
    assert len(diagrams) == 10
    for path in diagrams:
        text = path.read_text()
        dot = path.suffix == ".dot"
        pattern = r"^    (\w+) \[" if dot else r"^    (\w+)[\[(\{]"
        nodes = set(re.findall(pattern, text, re.MULTILINE)) - {"graph", "node", "edge"}
        assert {"start", "done"} <= nodes, path.name
        edges = _flow_edges(text, "->" if dot else "-->")
        reached, frontier = {"start"}, ["start"]
        while frontier:
            node = frontier.pop()
            for source, target, _ in edges:
                if source == node and target not in reached:
                    reached.add(target)
                    frontier.append(target)
        assert nodes - reached == set(), path.name
