"""Diagrams as reviewers see them: laid out by real Graphviz, drawn by real mermaid-cli.

Graphviz: `dot -Tjson` gives the position of every node, edge label, cluster title and the
graph title; no two of these boxes may intersect. mermaid-cli (npm, in headless Debian
chromium): every state name must be text in the SVG. Both draw PNG screenshots of every
generated diagram into build/diagrams/ for people to look at.
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

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "generated"
GOLDEN = ROOT / "tests" / "golden" / "expected"
ARTEFACTS = ROOT / "build" / "diagrams"
DOT_FILES = sorted(GENERATED.glob("*.dot")) + sorted(GOLDEN.glob("*.dot"))
MERMAID_FILES = sorted(GENERATED.glob("*.mmd")) + sorted(GOLDEN.glob("*.mmd"))
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
def mermaid_renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every .mmd file drawn to SVG (and the generated ones to PNG) in one mmdc run each:
    a Markdown file of all of them starts the browser once."""
    mmdc, chromium = _mermaid_cli()
    work = tmp_path_factory.mktemp("mermaid")
    config = work / "puppeteer.json"
    config.write_text(json.dumps({"executablePath": chromium, "args": CHROMIUM_ARGS}))
    sources = [p.read_text(encoding="utf-8") for p in MERMAID_FILES] + [HIDDEN_SOURCE]
    charts = "\n".join(f"```mermaid\n{source}```\n" for source in sources)
    (work / "all.md").write_text(charts, encoding="utf-8")

    def run(output: str, *extra: str) -> None:
        command = [mmdc, "-p", str(config), "-i", "all.md", "-o", output, "-q", *extra]
        done = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    run("svg.md")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    run("png.md", "-e", "png", "-w", "2400")
    renders = {}
    for number, path in enumerate(MERMAID_FILES, start=1):
        key = f"{path.parent.name}/{path.name}"
        renders[key] = (work / f"svg-{number}.svg").read_text(encoding="utf-8")
        if path.parent == GENERATED:
            shutil.copy(work / f"png-{number}.png", ARTEFACTS / f"{path.stem}.mmd.png")
    renders[HIDDEN] = (work / f"svg-{len(MERMAID_FILES) + 1}.svg").read_text(encoding="utf-8")
    return renders


def test_every_state_name_is_text_in_the_mermaid_svg(mermaid_renders: dict[str, str]) -> None:
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
        names = states.get((sources[folder].resolve(), Path(name).stem))
        if names is None:  # a flow's diagram: its steps are what must show
            written = (GENERATED if folder == "generated" else GOLDEN) / name
            names = re.findall(r"step_(\w+)\[", written.read_text(encoding="utf-8"))
        assert names, key
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", _svg_text(svg)))
        missing = [n for n in names if n not in words]
        assert missing == [], f"{key}: state names not drawn: {missing}"
    assert len(mermaid_renders) == len(MERMAID_FILES) + 1 >= 8
    for stem in (p.stem for p in GENERATED.glob("*.mmd")):
        assert (ARTEFACTS / f"{stem}.mmd.png").read_bytes()[:4] == b"\x89PNG"


def test_mermaid_check_sees_a_hidden_name(mermaid_renders: dict[str, str]) -> None:
    """The old `Name : doc` form drew the doc alone: the same word check finds that."""
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", _svg_text(mermaid_renders[HIDDEN])))
    assert "shown" in words and "HiddenName" not in words
