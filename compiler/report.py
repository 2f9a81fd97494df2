"""Renders a CheckReport as text for people, JSON for scripts and SARIF 2.1.0 for review tools."""

from __future__ import annotations

import json
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import quote

from . import __version__
from .checks import CheckReport
from .errors import CODES, Diagnostic, Severity, SourceSpan, format_text

# Bumped only when the JSON layout changes incompatibly.
JSON_FORMAT_VERSION = 1
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def summary_line(report: CheckReport) -> str:
    """`3 errors, 1 warning in 2 files (7 files checked)` or `7 files checked, no findings`."""
    checked = _plural(len(report.sources), "file")
    if not report.diagnostics:
        return f"{checked} checked, no findings"
    counts = []
    if errors := len(report.errors()):
        counts.append(_plural(errors, "error"))
    if warnings := len(report.warnings()):
        counts.append(_plural(warnings, "warning"))
    # Findings about a folder (W207) are in no checked file.
    affected = len({d.span.path for d in report.diagnostics} & report.sources.keys())
    where = f" in {_plural(affected, 'file')}" if affected else ""
    return f"{', '.join(counts)}{where} ({checked} checked)"


def render_text(report: CheckReport) -> str:
    """Each finding rustc-style (location, source line, caret, hint), then a summary line."""
    blocks = []
    for diagnostic in report.diagnostics:
        source = report.sources.get(diagnostic.span.path)
        blocks.append(format_text(diagnostic, source.lines if source is not None else None))
    blocks.append(summary_line(report))
    return "\n\n".join(blocks) + "\n"


def _summary(report: CheckReport) -> dict[str, int]:
    return {
        "errors": len(report.errors()),
        "warnings": len(report.warnings()),
        "files_checked": len(report.sources),
        "files_with_findings": len({d.span.path for d in report.diagnostics}),
    }


def _diagnostic_json(diagnostic: Diagnostic) -> dict[str, Any]:
    span = diagnostic.span
    return {
        "code": diagnostic.code,
        "severity": diagnostic.severity.value,
        "message": diagnostic.message,
        "hint": diagnostic.hint,
        "path": span.path,
        "line": span.line,
        "column": span.column,
        "end_line": span.end_line,
        "end_column": span.end_column,
        "related": [
            {
                "message": note.message,
                "path": note.span.path,
                "line": note.span.line,
                "column": note.span.column,
            }
            for note in diagnostic.related
        ],
    }


def render_json(report: CheckReport) -> str:
    """A stable document: keys sorted, findings in report order (by position)."""
    document = {
        "version": JSON_FORMAT_VERSION,
        "tool": {"name": "autonomic", "version": __version__},
        "diagnostics": [_diagnostic_json(d) for d in report.diagnostics],
        "summary": _summary(report),
    }
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _artifact_uri(path: str) -> str:
    """A relative URI with forward slashes; absolute paths under the working directory
    become relative to it, others become file:// URIs."""
    pure = PurePath(path)
    if pure.is_absolute():
        try:
            pure = Path(path).resolve().relative_to(Path.cwd().resolve())
        except (ValueError, OSError):
            return Path(path).as_uri()
    return quote(pure.as_posix(), safe="/")


def _sarif_location(span: SourceSpan) -> dict[str, Any]:
    return {
        "physicalLocation": {
            "artifactLocation": {"uri": _artifact_uri(span.path)},
            "region": {
                "startLine": max(span.line, 1),
                "startColumn": max(span.column, 1),
                "endLine": max(span.end_line, span.line, 1),
                "endColumn": max(span.end_column, 1),
            },
        }
    }


def _sarif_related(diagnostic: Diagnostic) -> dict[str, Any]:
    """SARIF `relatedLocations`: where the cause of a finding is, each with its message."""
    if not diagnostic.related:
        return {}
    return {
        "relatedLocations": [
            {"id": number, **_sarif_location(note.span), "message": {"text": note.message}}
            for number, note in enumerate(diagnostic.related)
        ]
    }


def _sarif_level(severity: Severity) -> str:
    return "error" if severity is Severity.ERROR else "warning"


def render_sarif(report: CheckReport) -> str:
    """SARIF 2.1.0 with one rule per code; columns count Unicode code points, as lark does."""
    codes = sorted(CODES)
    rules = [
        {
            "id": code,
            "name": code,
            "shortDescription": {"text": CODES[code][1]},
            "defaultConfiguration": {"level": _sarif_level(CODES[code][0])},
        }
        for code in codes
    ]
    index = {code: position for position, code in enumerate(codes)}
    results = []
    for diagnostic in report.diagnostics:
        span = diagnostic.span
        text = diagnostic.message
        if diagnostic.hint:
            text = f"{text} (hint: {diagnostic.hint})"
        results.append(
            {
                "ruleId": diagnostic.code,
                "ruleIndex": index[diagnostic.code],
                "level": _sarif_level(diagnostic.severity),
                "message": {"text": text},
                "locations": [_sarif_location(span)],
                **_sarif_related(diagnostic),
            }
        )
    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "autonomic",
                        "version": __version__,
                        "rules": rules,
                    }
                },
                "columnKind": "unicodeCodePoints",
                "results": results,
            }
        ],
    }
    return json.dumps(log, indent=2, ensure_ascii=False) + "\n"
