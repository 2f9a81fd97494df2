"""`autonomic build`: check every machine, then write its module and diagrams, or (--check)
compare what would be written with what is there, changing nothing."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .checks import CheckReport, check_paths
from .codegen import COMPILER_VERSION, LINE_LENGTH, generate_tables
from .diagram import (
    DiagramToolFailed,
    DiagramView,
    build_diagram,
    diagram_views,
    dot_available,
    render_dot,
    render_mermaid,
    render_svg,
    visible,
)
from .errors import Diagnostic
from .flow_codegen import flow_dot, flow_mermaid, flow_module, generate_flow
from .lower import LoweringError, MachineTables, cycle_collection_paused, lower
from .model import Flow, Machine
from .pyformat import quote

# Files in the output folder that the build neither writes nor calls orphaned.
KEPT_NAMES = frozenset({"py.typed", "__pycache__"})
PROJECT_MARKERS = ("pyproject.toml", ".git")


@dataclass
class BuildResult:
    report: CheckReport
    written: list[Path] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)
    missing: list[Path] = field(default_factory=list)
    orphaned: list[Path] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def build(
    sources: Sequence[str | Path],
    out: Path,
    *,
    check_only: bool = False,
    svg: bool = True,
    strict: bool = False,
) -> BuildResult:
    """Checks all machines first; any error (any finding with `strict`) means nothing is
    written. Otherwise writes, atomically and only where the bytes changed, or with
    `check_only` lists stale, missing and orphaned files instead."""
    report = check_paths(sources)
    result = BuildResult(report)
    if report.failed(strict):
        return result
    draw_svg = svg and dot_available()
    if svg and not draw_svg:
        result.notices.append(
            "Graphviz `dot` not found: SVG diagrams skipped (install graphviz to draw them)"
        )
    try:
        outputs = render_outputs(
            report.machines,
            draw_svg=draw_svg,
            notices=result.notices,
            known=report.known,
            flows=report.flows,
        )
    except LoweringError as exc:
        _add_findings(report, exc.diagnostics)
        return result
    out = Path(out)
    # Without dot, SVGs are neither produced nor judged: a reviewer without Graphviz can
    # still run `build --check` on a tree whose SVGs were drawn elsewhere.
    unjudged = set() if draw_svg else {".svg"}
    result.orphaned = _orphans(out, outputs, unjudged)
    if check_only:
        for name, data in outputs.items():
            path = out / name
            if not path.is_file():
                result.missing.append(path)
            elif path.read_bytes() != data:
                result.stale.append(path)
        return result
    out.mkdir(parents=True, exist_ok=True)
    for name, data in outputs.items():
        path = out / name
        if write_if_changed(path, data):
            result.written.append(path)
    result.notices.extend(
        f"{path} is not produced by this build: delete it if it is left over"
        for path in result.orphaned
    )
    return result


def render_outputs(
    machines: Sequence[Machine],
    *,
    draw_svg: bool,
    notices: list[str] | None = None,
    known: Sequence[Machine] = (),
    flows: Sequence[Flow] = (),
) -> dict[str, bytes]:
    """Every file of the output folder by name, in a stable order. `known` are further
    machines that emits name but that are not built here."""
    with cycle_collection_paused():
        outputs = _render_outputs(machines, draw_svg=draw_svg, notices=notices, known=known)
        if flows:
            _render_flows(outputs, flows, [*machines, *known], draw_svg=draw_svg, notices=notices)
        return outputs


def _render_flows(
    outputs: dict[str, bytes],
    flows: Sequence[Flow],
    machines: Sequence[Machine],
    *,
    draw_svg: bool,
    notices: list[str] | None,
) -> None:
    """Each flow's module and diagrams, a section for each in README.md, and FLOWS in
    __init__.py."""
    ordered = sorted(flows, key=flow_module)
    mermaid: dict[str, str] = {}
    for flow in ordered:
        module = flow_module(flow)
        dot = flow_dot(flow)
        mermaid[module] = flow_mermaid(flow)
        outputs[f"{module}.py"] = generate_flow(flow, display_path(flow.path), machines).encode()
        _add_diagram(outputs, module, dot, mermaid[module], draw_svg=draw_svg, notices=notices)
    lines = [
        "",
        "# Flows",
        "",
        "| Flow | Kind | Source | Module | Diagrams | Steps |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for flow in ordered:
        module = flow_module(flow)
        lines.append(
            f"| {flow.name.value} | {flow.kind} | {markdown_code(display_path(flow.path))} "
            f"| [`{module}.py`]({module}.py) "
            f"| [DOT]({module}.dot), [SVG]({module}.svg), [Mermaid]({module}.mmd) "
            f"| {len(flow.all_steps())} |"
        )
    for flow in ordered:
        module = flow_module(flow)
        lines += ["", f"## {flow.name.value}", ""]
        if flow.doc:
            lines += [markdown_text(flow.doc), ""]
        lines += ["```mermaid", mermaid[module].rstrip("\n"), "```"]
    outputs["README.md"] += ("\n".join(lines) + "\n").encode("utf-8")
    init = outputs["__init__.py"].decode("utf-8")
    flows_line = _names_tuple("FLOWS", [flow_module(f) for f in ordered])
    outputs["__init__.py"] = (init + flows_line + "\n").encode("utf-8")


def _render_outputs(
    machines: Sequence[Machine],
    *,
    draw_svg: bool,
    notices: list[str] | None,
    known: Sequence[Machine],
) -> dict[str, bytes]:
    others = [*machines, *known]
    tables = sorted(
        (lower(m, display_path(m.path), others=others) for m in machines), key=lambda t: t.module
    )
    outputs: dict[str, bytes] = {}
    views: dict[str, list[DiagramView]] = {}
    for t in tables:
        outputs[f"{t.module}.py"] = generate_tables(t).encode("utf-8")
        views[t.module] = diagram_views(build_diagram(t), t.module)
        for view in views[t.module]:
            dot, mermaid = render_dot(view.diagram), render_mermaid(view.diagram)
            _add_diagram(outputs, view.stem, dot, mermaid, draw_svg=draw_svg, notices=notices)
    outputs["README.md"] = render_index(tables, views, outputs)
    outputs["__init__.py"] = render_package_init(tables).encode("utf-8")
    return outputs


def _add_diagram(
    outputs: dict[str, bytes],
    stem: str,
    dot: str,
    mermaid: str,
    *,
    draw_svg: bool,
    notices: list[str] | None,
) -> None:
    """`stem`.dot, .mmd and (with Graphviz) .svg; an SVG Graphviz fails to draw is a notice."""
    outputs[f"{stem}.dot"] = dot.encode("utf-8")
    outputs[f"{stem}.mmd"] = mermaid.encode("utf-8")
    if draw_svg:
        try:
            outputs[f"{stem}.svg"] = render_svg(dot)
        except DiagramToolFailed as exc:
            if notices is not None:
                notices.append(f"{stem}.svg not drawn: {exc}")


def display_path(path: str) -> str:
    """How generated files name a source: relative to the project (the nearest folder above
    it holding pyproject.toml or .git), with forward slashes, so the bytes do not depend on
    where the build runs. Outside any project: the path as given, or its name if absolute."""
    given = Path(path)
    absolute = given.resolve()
    for folder in absolute.parents:
        if any((folder / marker).exists() for marker in PROJECT_MARKERS):
            return absolute.relative_to(folder).as_posix()
    return given.name if given.is_absolute() else given.as_posix()


def render_package_init(tables: Sequence[MachineTables]) -> str:
    """The package's __init__.py, laid out as ruff format lays it out."""
    return (
        '"""Generated governor modules, one per machine file: written by `autonomic build`,'
        ' do not edit."""\n\n' + _names_tuple("MODULES", [t.module for t in tables]) + "\n"
    )


def _names_tuple(name: str, items: Sequence[str]) -> str:
    """`NAME: tuple[str, ...] = (...)` as ruff lays it out: on one line if it fits, else one
    item per line."""
    quoted = [quote(item) for item in items]
    head = f"{name}: tuple[str, ...] = "
    one_line = head + "(" + ", ".join(quoted) + ("," if len(quoted) == 1 else "") + ")"
    if len(one_line) <= LINE_LENGTH or len(quoted) == 1:
        return one_line
    return head + "(\n" + "".join(f"    {m},\n" for m in quoted) + ")"


def render_index(
    tables: Sequence[MachineTables],
    views: Mapping[str, Sequence[DiagramView]],
    outputs: Mapping[str, bytes],
) -> bytes:
    """README.md: a table of the machines, then each machine's Mermaid diagram, which GitHub
    renders in place (a machine drawn as an overview: then each group's, under its name)."""
    lines = [
        "# Generated governors",
        "",
        f"Written by `autonomic build` (autonomic {COMPILER_VERSION}) from the machine files"
        " below. Do not edit these files: change the machine file and run `autonomic build`.",
        "",
        "| Machine | Source | Module | Diagrams | States | Events |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for t in tables:
        lines.append(
            f"| {t.name} | {markdown_code(t.source_path)} | [`{t.module}.py`]({t.module}.py) "
            f"| [DOT]({t.module}.dot), [SVG]({t.module}.svg), [Mermaid]({t.module}.mmd) "
            f"| {len(t.states)} | {len(t.events)} |"
        )
    for t in tables:
        lines += ["", f"## {t.name}", ""]
        if t.doc:
            lines += [markdown_text(t.doc), ""]
        lines += [f"Source {markdown_code(t.source_path)}, sha256 `{t.source_sha256}`.", ""]
        shown = views[t.module]
        if len(shown) > 1:
            links = ", ".join(
                f"[{v.group.id}](#{_anchor(t.name, v.group.id)})" for v in shown if v.group
            )
            lines += [f"An overview, then one diagram per group of states: {links}.", ""]
        for view in shown:
            if view.group is not None:
                lines += ["", f"### {t.name}: {view.group.id}", ""]
                if view.group.doc:
                    lines += [markdown_text(view.group.doc), ""]
                lines += [
                    f"[DOT]({view.stem}.dot), [SVG]({view.stem}.svg), "
                    f"[Mermaid]({view.stem}.mmd); states outside the group are drawn by name only.",
                    "",
                ]
            mermaid = outputs[f"{view.stem}.mmd"].decode("utf-8").rstrip("\n")
            lines += ["```mermaid", mermaid, "```"]
    return ("\n".join(lines) + "\n").encode("utf-8")


# Characters Markdown (or the HTML inside it) reads anywhere in a line; `|` splits table cells.
_MARKDOWN_ESCAPES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"} | {
    ch: "\\" + ch for ch in "\\`*_[]|~#"
}
_MARKDOWN_LINE_START = re.compile(r"[-+=]|[0-9]+[.)]")


def _anchor(*words: str) -> str:
    """GitHub's anchor of a heading made of these words: `### Billing: Disputes` ->
    `billing-disputes`."""
    return "-".join(w.lower() for w in words)


def markdown_text(text: str) -> str:
    """Plain text for Markdown: one line, control characters made visible, and every
    character Markdown or HTML would read escaped."""
    escaped = "".join(_MARKDOWN_ESCAPES.get(ch, ch) for ch in visible(text))
    if _MARKDOWN_LINE_START.match(escaped):  # a list item or heading underline otherwise
        escaped = "\\" + escaped
    return escaped


def markdown_code(text: str) -> str:
    """A code span, unless the text holds what a code span cannot (backticks, table pipes,
    invisible characters): then escaped plain text."""
    if "`" in text or "|" in text or visible(text) != text:
        return markdown_text(text)
    return f"`{text}`"


def _orphans(out: Path, outputs: dict[str, bytes], unjudged: set[str]) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(
        entry
        for entry in out.iterdir()
        if entry.name not in outputs
        and entry.name not in KEPT_NAMES
        and not entry.name.startswith(".")
        and entry.suffix not in unjudged
    )


def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return False
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return True


def _add_findings(report: CheckReport, found: list[Diagnostic]) -> None:
    report.diagnostics.extend(found)
    report.diagnostics.sort(key=Diagnostic.sort_key)
