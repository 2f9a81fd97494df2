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
    DiagramNote,
    DiagramToolMissing,
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
        nodes=(DiagramNode("A", text, True, False), DiagramNode("B", None, False, True)),
        edges=(DiagramEdge("A", "B", ("Go [ok]", text), "transition"),),
        notes=(DiagramNote("A/escalations", "A", ("L", text)),),
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


def test_edges_are_labelled_event_guard_actions_emits(entitlement: Diagram) -> None:
    labels = {(e.source, e.target, e.lines, e.dashed) for e in entitlement.edges}
    assert (
        "PendingApproval",
        "AwaitingPayment",
        ("Approve [is_approver]", "/ record_approval, notify", "^Billing.StartBilling"),
        False,
    ) in labels
    assert ("PendingApproval", "PendingApproval", ("Approve [else]",), False) in labels
    assert ("Active", "Expired", ("after 30d",), True) in labels
    assert (
        "PendingApproval",
        "AwaitingPayment",
        ("after 72h (ApprovalLadder)", "/ auto_approve"),
        True,
    ) in labels
    assert (
        "Retry1",
        "Retry1",
        ("after 1h (PaymentRetry step 1)", "/ retry_charge"),
        True,
    ) in labels
    assert (
        "Retry2",
        "PaymentAbandoned",
        ("PaymentFailed (PaymentRetry exhausted)", "/ close_account", "^Billing.WriteOff"),
        False,
    ) in labels


def test_escalation_steps_are_notes(entitlement: Diagram) -> None:
    notes = {note.state: note.lines for note in entitlement.notes}
    assert notes == {
        "PendingApproval": (
            "ApprovalLadder",
            "24h: notify queue manager_review_queue (within 4h)",
            "48h: notify role director (within 1h)",
        ),
        "Suspended": ("escalation", "1h: notify queue support_queue"),
    }
    # Notify steps are not edges: only the ladder's end moves.
    assert not any(": notify" in line for e in entitlement.edges for line in e.lines)


def test_each_states_edges_in_source_order(entitlement: Diagram) -> None:
    pending = [e.lines[0] for e in entitlement.edges if e.source == "PendingApproval"]
    assert pending == [
        "Approve [is_approver]",
        "Approve [else]",
        "Reject",
        "after 72h (ApprovalLadder)",
    ]


# ---------------------------------------------------------------- DOT


def test_dot_marks_initial_final_and_dashed(entitlement: Diagram) -> None:
    dot = render_dot(entitlement)
    assert '"[*]" -> "PendingApproval";' in dot
    assert '"Rejected" [peripheries=2];' in dot
    assert '"Active" -> "Expired" [label="after 30d", style=dashed];' in dot
    assert '"Suspended" -> "Active" [label="Resume"];' in dot
    assert "shape=note" in dot


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
    assert len(nodes) == 4  # the start point, A, B and the note
    assert len(edges) == 3  # start -> A, A -> B, A -- note
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
    assert lines[:2] == ["stateDiagram-v2", "    direction LR"]
    assert "    [*] --> PendingApproval" in lines
    assert "    Revoked --> [*]" in lines
    assert "    Active --> Expired : after 30d" in lines
    assert "    note right of PendingApproval" in lines and "    end note" in lines
    body = [line for line in lines[2:] if not line.startswith("        ")]
    statement = re.compile(
        r"    (state \"\w+\" as \w+|\w+ : [^:;\n]+|(\[\*\]|\w+) --> (\[\*\]|\w+)( : [^:;\n]+)?"
        r"|note right of \w+|end note)"
    )
    for line in body:
        # Mermaid swaps entity codes out before its lexer runs.
        assert statement.fullmatch(re.sub(r"#[0-9]+;", "", line)), line


def test_mermaid_keyword_states_get_aliases() -> None:
    nodes = tuple(
        DiagramNode(name, None, name == "State", False) for name in ("State", "Note", "Note_", "Go")
    )
    diagram = Diagram("M", None, nodes, (DiagramEdge("State", "Note", ("E",), "transition"),), ())
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
    assert render_diagram(machine, "mermaid").startswith("stateDiagram-v2\n")
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
