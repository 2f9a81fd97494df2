"""Diagrams as reviewers see them: laid out by real Graphviz, drawn by real mermaid-cli.

Graphviz: `dot -Tjson` gives the position of every node, edge label, cluster title and the
graph title; no two of these boxes may intersect. mermaid-cli (npm, in headless Debian
chromium): every state name must be text in the SVG, and no node or edge label box of the SVG
may intersect another. Both draw PNG screenshots of every generated diagram into
build/diagrams/ for people to look at.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from autonomic.compiler.checks import check_paths
from autonomic.compiler.diagram import render_diagram
from autonomic.compiler.model import Machine

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "generated"
GOLDEN = ROOT / "tests" / "golden" / "expected"
ARTEFACTS = ROOT / "build" / "diagrams"
DOT_FILES = sorted(GENERATED.glob("*.dot")) + sorted(GOLDEN.glob("*.dot"))
MERMAID_FILES = sorted(GENERATED.glob("*.mmd")) + sorted(GOLDEN.glob("*.mmd"))
# The real-world examples hold the constructs the governors do not use (resting states,
# groups, data-driven timers): their diagrams are drawn at test time and checked the same way.
EXAMPLES = sorted((ROOT / "examples" / "machines").glob("*.fsm"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HOW_TO = (
    "apt-get install chromium graphviz; "
    "PUPPETEER_SKIP_DOWNLOAD=1 npm install --no-save @mermaid-js/mermaid-cli@11 "
    "(in the repository root, as .ci/run does)"
)

Box = tuple[float, float, float, float]
HIDDEN = "hidden"
HIDDEN_SOURCE = "stateDiagram-v2\n    HiddenName : shown\n    [*] --> HiddenName\n"


def _missing(what: str) -> None:
    # CI installs both tools (.ci/run): there a missing one fails instead of skipping.
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed: {HOW_TO}")
    pytest.skip(f"{what} is not installed: {HOW_TO}")


def _dot() -> str:
    found = shutil.which("dot")
    if found is None:
        _missing("Graphviz dot")
    assert found is not None
    return found


def _mermaid_cli() -> tuple[str, str]:
    mmdc = os.environ.get("AUTONOMIC_MMDC") or shutil.which("mmdc")
    local = ROOT / "node_modules" / ".bin" / "mmdc"
    if mmdc is None and local.exists():
        mmdc = str(local)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if mmdc is None:
        _missing("mermaid-cli (mmdc)")
    if chromium is None:
        _missing("chromium")
    assert mmdc is not None and chromium is not None
    return mmdc, chromium


# ---------------------------------------------------------------- Graphviz positions


def _centred(x: float, y: float, width: float, height: float) -> Box:
    return (x - width / 2, y - height / 2, x + width / 2, y + height / 2)


def _point(text: str) -> tuple[float, float]:
    x, y = text.split(",")
    return float(x), float(y)


def text_box(ops: Iterable[dict[str, Any]]) -> Box | None:
    """The box around the text a Graphviz draw list writes (`T` ops; `F` sets the size)."""
    boxes: list[Box] = []
    size = 14.0
    for op in ops:
        if op["op"] == "F":
            size = float(op["size"])
        elif op["op"] == "T":
            x, y = op["pt"]
            width = float(op["width"])
            left = {"l": x, "c": x - width / 2, "r": x - width}[op["align"]]
            # The baseline: descenders go a quarter of the size below it, capitals above.
            boxes.append((left, y - 0.25 * size, left + width, y + 0.75 * size))
    if not boxes:
        return None
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def layout_boxes(layout: dict[str, Any]) -> Iterator[tuple[str, Box]]:
    """Every node, edge label, cluster title and the graph title of a `dot -Tjson` layout."""
    objects = layout.get("objects", [])
    for obj in objects:
        if "nodes" in obj:  # a cluster: its title, not its box (labels may sit inside it)
            if "lp" in obj:
                x, y = _point(obj["lp"])
                size = float(obj["lwidth"]) * 72, float(obj["lheight"]) * 72
                yield f"title of {obj['name']}", _centred(x, y, *size)
            continue
        x, y = _point(obj["pos"])
        size = float(obj["width"]) * 72, float(obj["height"]) * 72
        yield f"node {obj['name']}", _centred(x, y, *size)
    for edge in layout.get("edges", []):
        box = text_box(edge.get("_ldraw_", []))
        if box is not None:
            tail, head = objects[edge["tail"]]["name"], objects[edge["head"]]["name"]
            yield f"label of {tail} -> {head}", box
    title = text_box(layout.get("_ldraw_", []))
    if title is not None:
        yield "graph title", title


def _intersect(a: Box, b: Box, slack: float = 0.5) -> bool:
    return (
        a[0] + slack < b[2] and b[0] + slack < a[2] and a[1] + slack < b[3] and b[1] + slack < a[3]
    )


def overlaps(dot_source: str, *, engine: list[str] | None = None) -> list[tuple[str, str]]:
    command = [_dot(), *(engine or []), "-Tjson"]
    done = subprocess.run(command, input=dot_source.encode(), capture_output=True, check=True)
    boxes = list(layout_boxes(json.loads(done.stdout)))
    return [
        (n1, n2) for (n1, b1), (n2, b2) in itertools.combinations(boxes, 2) if _intersect(b1, b2)
    ]


@pytest.mark.parametrize("path", DOT_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_label_overlaps_a_node_or_another_label(path: Path) -> None:
    assert overlaps(path.read_text(encoding="utf-8")) == []


def test_overlap_check_sees_overlaps() -> None:
    """The check is not vacuous: positions pinned on top of each other (neato -n keeps them)
    and a label over a node are found."""
    pinned = (
        'digraph { node [shape=box]; A [pos="300,170!"]; B [pos="20,10!"]; E [pos="30,15!"]; '
        'C [pos="300,0!"]; D [pos="300,340!"]; C -> D [label="over A"]; }'
    )
    found = overlaps(pinned, engine=["-Kneato", "-n"])
    assert ("node B", "node E") in found
    assert ("node A", "label of C -> D") in found


@pytest.fixture(scope="module")
def example_diagrams() -> dict[str, tuple[str, str, Machine]]:
    """examples/machines: name -> (DOT, Mermaid, checked machine)."""
    report = check_paths(EXAMPLES)
    assert len(report.machines) == len(EXAMPLES) >= 6
    return {
        Path(m.path).stem: (render_diagram(m, "dot"), render_diagram(m, "mermaid"), m)
        for m in report.machines
    }


def test_no_label_overlaps_in_the_example_dot_diagrams(
    example_diagrams: dict[str, tuple[str, str, Machine]],
) -> None:
    for name, (dot, _, _) in example_diagrams.items():
        assert overlaps(dot) == [], name


def test_resting_and_final_states_are_drawn_apart(
    example_diagrams: dict[str, tuple[str, str, Machine]],
) -> None:
    """In the laid-out DOT a resting state has a dashed border and one periphery, a final
    state a double border: a reviewer tells "may stop here" from "ended"."""
    seen = {"resting": 0, "final": 0}
    for dot, _, machine in example_diagrams.values():
        done = subprocess.run([_dot(), "-Tjson"], input=dot.encode(), capture_output=True)
        nodes = {o["name"]: o for o in json.loads(done.stdout)["objects"] if "nodes" not in o}
        for state in machine.states:
            node = nodes[state.name.value]
            if state.resting:
                seen["resting"] += 1
                assert "dashed" in node.get("style", ""), state.name.value
                assert node.get("peripheries", "1") == "1", state.name.value
            if state.final:
                seen["final"] += 1
                assert node.get("peripheries") == "2", state.name.value
                assert "dashed" not in node.get("style", ""), state.name.value
    assert seen["resting"] >= 2 and seen["final"] >= 2, seen


def test_screenshots_of_every_dot_diagram() -> None:
    dot = _dot()
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    for path in sorted(GENERATED.glob("*.dot")):
        png = ARTEFACTS / f"{path.stem}.dot.png"
        subprocess.run([dot, "-Tpng", str(path), "-o", str(png)], check=True)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- mermaid-cli


def _svg_text(svg: str) -> str:
    """All the text a browser would show: element text and attribute-free content."""
    try:
        root = ET.fromstring(svg)
    except ET.ParseError:
        return re.sub(r"<[^>]+>", " ", svg)
    return " ".join(root.itertext())


@pytest.fixture(scope="module")
def mermaid_sources(example_diagrams: dict[str, tuple[str, str, Machine]]) -> dict[str, str]:
    """Every Mermaid chart to draw, by key `folder/file.mmd`, and the hidden-name probe."""
    sources = {f"{p.parent.name}/{p.name}": p.read_text(encoding="utf-8") for p in MERMAID_FILES}
    for name, (_, mermaid, _) in example_diagrams.items():
        sources[f"examples/{name}.mmd"] = mermaid
    sources[HIDDEN] = HIDDEN_SOURCE
    return sources


@pytest.fixture(scope="module")
def mermaid_renders(
    tmp_path_factory: pytest.TempPathFactory, mermaid_sources: dict[str, str]
) -> dict[str, str]:
    """Every chart drawn to SVG, and the generated ones to PNG: two mmdc runs, each over a
    Markdown file of its charts (one browser a run), side by side (each page of a run costs
    about a second, much of it waiting)."""
    mmdc, chromium = _mermaid_cli()
    work = tmp_path_factory.mktemp("mermaid")
    config = work / "puppeteer.json"
    config.write_text(json.dumps({"executablePath": chromium, "args": CHROMIUM_ARGS}))
    keys = list(mermaid_sources)
    pictures = [key for key in keys if key.startswith("generated/")]

    def start(charts: list[str], output: str, *extra: str) -> subprocess.Popen[str]:
        markdown = work / f"{output}.in.md"
        text = "\n".join(f"```mermaid\n{mermaid_sources[key]}```\n" for key in charts)
        markdown.write_text(text, encoding="utf-8")
        command = [mmdc, "-p", str(config), "-i", markdown.name, "-o", output, "-q", *extra]
        return subprocess.Popen(
            command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    runs = [start(keys, "svg.md"), start(pictures, "png.md", "-e", "png", "-w", "2400")]
    try:
        for run in runs:
            _, errors = run.communicate(timeout=300)
            assert run.returncode == 0, errors[-2000:]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    for number, key in enumerate(pictures, start=1):
        picture = ARTEFACTS / f"{Path(key).stem}.mmd.png"
        shutil.copy(work / f"png-{number}.png", picture)
    return {
        key: (work / f"svg-{number}.svg").read_text(encoding="utf-8")
        for number, key in enumerate(keys, start=1)
    }


def test_every_state_name_is_text_in_the_mermaid_svg(
    mermaid_renders: dict[str, str],
    mermaid_sources: dict[str, str],
    example_diagrams: dict[str, tuple[str, str, Machine]],
) -> None:
    sources = {"generated": ROOT / "machines", "expected": ROOT / "tests" / "golden" / "machines"}
    report = check_paths(list(sources.values()))
    states = {
        (Path(m.path).resolve().parent, Path(m.path).stem): [s.name.value for s in m.states]
        for m in report.machines
    }
    for key, svg in mermaid_renders.items():
        if key == HIDDEN:
            continue
        folder, name = key.split("/")
        if folder == "examples":
            names = [s.name.value for s in example_diagrams[Path(name).stem][2].states]
        else:
            names = states.get((sources[folder].resolve(), Path(name).stem)) or []
        if "." in Path(name).stem:  # a group's diagram: its states, and those it meets
            names = re.findall(r'^    state "(\w+)" as', mermaid_sources[key], re.M)
        if not names:  # a flow's diagram: its steps are what must show
            names = re.findall(r"step_(\w+)\[", mermaid_sources[key])
        assert names, key
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", _svg_text(svg)))
        missing = [n for n in names if n not in words]
        assert missing == [], f"{key}: state names not drawn: {missing}"
    assert len(mermaid_renders) == len(MERMAID_FILES) + len(EXAMPLES) + 1 >= 14
    for stem in (p.stem for p in GENERATED.glob("*.mmd")):
        assert (ARTEFACTS / f"{stem}.mmd.png").read_bytes()[:4] == b"\x89PNG"


# Mermaid draws wider than Graphviz (an edge label is a node of its own); GitHub shrinks a
# chart to its ~900 px column, and its viewer zooms. Billing drawn whole was 13552 px wide;
# a flow runs down the page (SubscriptionUpgrade in one row was 3644 px wide).
# Billing's Closing group meets the eight Refunds states' CloseAccount moves, one per state,
# and Refunds meets them from the other side.
MERMAID_WIDTH_PX = {
    "billing": 2900,
    "billing.closing": 2700,
    "billing.refunds": 2300,
    "subscription": 2400,
    "entitlement": 2400,
}
FLOW_MERMAID_WIDTH_PX = 1300


def test_each_generated_mermaid_chart_stays_within_its_width(
    mermaid_renders: dict[str, str],
) -> None:
    widths = {}
    for key, svg in mermaid_renders.items():
        if not key.startswith("generated/"):
            continue
        name = key.removeprefix("generated/")
        view_box = ET.fromstring(svg).get("viewBox") or ""
        widths[Path(name).stem] = float(view_box.split()[2])
    assert len(widths) >= 7 + 5 + 5
    wide = {
        k: w
        for k, w in widths.items()
        if w > (FLOW_MERMAID_WIDTH_PX if k.startswith("flow_") else MERMAID_WIDTH_PX.get(k, 2100))
    }
    assert wide == {}


def test_mermaid_check_sees_a_hidden_name(mermaid_renders: dict[str, str]) -> None:
    """The old `Name : doc` form drew the doc alone: the same word check finds that."""
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", _svg_text(mermaid_renders[HIDDEN])))
    assert "shown" in words and "HiddenName" not in words


# ---------------------------------------------------------------- Mermaid positions

SVG = "{http://www.w3.org/2000/svg}"


def _translate(element: ET.Element) -> tuple[float, float]:
    transform = element.get("transform") or ""
    found = re.fullmatch(r"\s*translate\(\s*([-\d.e]+)[\s,]+([-\d.e]+)\s*\)\s*", transform)
    if transform and found is None:
        raise AssertionError(f"a transform the box reader does not know: {transform!r}")
    return (float(found.group(1)), float(found.group(2))) if found else (0.0, 0.0)


def mermaid_boxes(svg: str) -> list[tuple[str, Box]]:
    """Every node and edge label that mermaid-cli drew, in the SVG's coordinates: Mermaid
    places each with `translate` groups, a node's box is its first rect (or circle), a
    label's is its foreignObject."""
    found: list[tuple[str, Box]] = []

    def walk(element: ET.Element, x: float, y: float) -> None:
        dx, dy = _translate(element)
        x, y = x + dx, y + dy
        classes = (element.get("class") or "").split()
        if element.tag == f"{SVG}g" and "node" in classes:
            rect, circle = element.find(f".//{SVG}rect"), element.find(f".//{SVG}circle")
            if rect is not None and rect.get("width"):
                left, top = x + float(rect.get("x") or 0), y + float(rect.get("y") or 0)
                right = left + float(rect.get("width") or 0)
                bottom = top + float(rect.get("height") or 0)
                found.append((f"node {element.get('id')}", (left, top, right, bottom)))
            elif circle is not None:
                r = float(circle.get("r") or 0)
                cx, cy = x + float(circle.get("cx") or 0), y + float(circle.get("cy") or 0)
                found.append((f"node {element.get('id')}", (cx - r, cy - r, cx + r, cy + r)))
            return
        if element.tag == f"{SVG}g" and "edgeLabel" in classes:
            label = element.find(f"{SVG}g")
            text = None if label is None else label.find(f"{SVG}foreignObject")
            if label is not None and text is not None:
                lx, ly = _translate(label)
                width, height = float(text.get("width") or 0), float(text.get("height") or 0)
                if width and height:
                    left, top = x + lx, y + ly
                    box = (left, top, left + width, top + height)
                    found.append((f"label {label.get('data-id')}", box))
            return
        for child in element:
            walk(child, x, y)

    walk(ET.fromstring(svg), 0.0, 0.0)
    return found


def mermaid_overlaps(svg: str) -> list[tuple[str, str]]:
    boxes = mermaid_boxes(svg)
    return [
        (n1, n2) for (n1, b1), (n2, b2) in itertools.combinations(boxes, 2) if _intersect(b1, b2)
    ]


def test_no_label_overlaps_in_the_mermaid_svg(
    mermaid_renders: dict[str, str], mermaid_sources: dict[str, str]
) -> None:
    for key, svg in mermaid_renders.items():
        if key == HIDDEN:
            continue
        boxes = mermaid_boxes(svg)
        # The reader sees what was drawn: one box per labelled edge, at least one per state.
        labelled = len(re.findall(r"(?:-->|---|==>|-\.->)[^\n]*?(?: : |\|)", mermaid_sources[key]))
        assert sum(name.startswith("label ") for name, _ in boxes) >= labelled, key
        assert sum(name.startswith("node ") for name, _ in boxes) >= 2, key
        assert mermaid_overlaps(svg) == [], key


def test_mermaid_overlap_check_sees_overlaps() -> None:
    """The reader is not vacuous: a node and two labels drawn on top of each other, in the
    nesting Mermaid writes, are found."""
    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg"><g class="root" transform="translate(10, 0)">'
        '<g class="nodes"><g class="node statediagram-state" id="s-A" transform="translate(100,'
        ' 100)"><g><rect x="-50" y="-20" width="100" height="40"/></g></g></g>'
        '<g class="edgeLabels"><g class="edgeLabel" transform="translate(100, 130)">'
        '<g class="label" data-id="edge1" transform="translate(-40, -12)">'
        '<foreignObject width="80" height="24"/></g></g>'
        '<g class="edgeLabel" transform="translate(400, 400)">'
        '<g class="label" data-id="edge2" transform="translate(-40, -12)">'
        '<foreignObject width="80" height="24"/></g></g></g></g></svg>'
    )
    assert mermaid_overlaps(svg) == [("node s-A", "label edge1")]
    moved = svg.replace("translate(400, 400)", "translate(105, 125)")
    assert set(mermaid_overlaps(moved)) == {
        ("node s-A", "label edge1"),
        ("node s-A", "label edge2"),
        ("label edge1", "label edge2"),
    }


def test_each_flow_dot_diagram_fits_a_pull_request_column() -> None:
    """Rendered, a flow's DOT is at most ~11 inches wide and not a ribbon: its steps once
    stood in one row (SubscriptionUpgrade 3225 x 390 pt, PaymentProcessed 2450 x 207 pt),
    a quarter-size text once a PR column shrank them."""
    flows = sorted(GENERATED.glob("flow_*.dot"))
    assert len(flows) == 5
    for path in flows:
        layout = json.loads(
            subprocess.run(
                ["dot", "-Tjson0", str(path)], capture_output=True, text=True, check=True
            ).stdout
        )
        _, _, width, height = (float(v) for v in layout["bb"].split(","))
        assert width <= 800 and width <= 2.5 * height, (path.name, width, height)


# What a pull-request view shows without shrinking the text away: about 1600 px (1250 pt).
# Subscription and Entitlement (since the cancellation saga's changes) are somewhat wider.
# Billing (35 states, 2889 pt wide in one picture) is an overview and one diagram per group.
GOVERNOR_WIDTH_PT = {"subscription": 1500, "entitlement": 1350}


def test_each_governor_dot_diagram_fits_a_pull_request_view() -> None:
    """Governors drawn top-down once spread a rank's edge labels across the page (Compliance
    2734 px, Billing 6429 px wide): labels are cut at their clauses, ladders keep their
    attempt states in their box, and edges of several states with one label meet at a
    junction first."""
    governors = sorted(p for p in GENERATED.glob("*.dot") if not p.name.startswith("flow_"))
    assert len(governors) >= 7 + 5  # Billing's overview and its five groups' diagrams
    for path in governors:
        layout = json.loads(
            subprocess.run(
                [_dot(), "-Tjson0", str(path)], capture_output=True, text=True, check=True
            ).stdout
        )
        _, _, width, _ = (float(v) for v in layout["bb"].split(","))
        assert width <= GOVERNOR_WIDTH_PT.get(path.stem, 1250), (path.name, width)


def test_signup_mermaid_keeps_success_edges_out_of_the_compensations() -> None:
    """The compensations stand in their own subgraph, two ranks from their steps, so `done`
    has a rank of its own: the success edges into it once ran through compensation boxes."""
    text = (GENERATED / "flow_customer_signup.mmd").read_text()
    box = re.search(r"^    subgraph compensations\[.*?\]\n(.*?)^    end$", text, re.S | re.M)
    assert box is not None
    inside = set(box.group(1).split())
    assert inside == {"undo_profile", "undo_trial", "undo_quota", "undo_identity", "undone"}
    for step in ("profile", "trial", "quota", "identity"):
        assert f"    step_{step} -..->|" in text and f"    step_{step} --> done\n" in text
