"""Renders a CheckReport as text for people, JSON for scripts and SARIF 2.1.0 for review tools."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import __version__
from .checks import CheckReport
from .errors import Diagnostic, Severity, SourceSpan, format_text
from .rules import DOCS_URL, RuleHelp, all_rules

# Bumped only when the JSON layout changes incompatibly.
JSON_FORMAT_VERSION = 1
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SRCROOT = "%SRCROOT%"
FINGERPRINT_KEY = "autonomicFinding/v1"


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


def render_text(report: CheckReport, *, colour: bool = False) -> str:
    """Each finding rustc-style (location, source line, caret, hint), then a summary line."""
    blocks = []
    for diagnostic in report.diagnostics:
        source = report.sources.get(diagnostic.span.path)
        lines = source.lines if source is not None else None
        blocks.append(format_text(diagnostic, lines, colour=colour))
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


def _git_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / ".git").exists():  # a folder, or a file in a worktree
            return folder
    return None


def repository_root(paths: list[str]) -> Path:
    """The root SARIF URIs are relative to, as code scanning wants: the git repository that
    holds the reported files (found from the files, so the working directory does not
    matter), else the one holding the working directory, else the working directory."""
    roots = {_git_root(Path(path).resolve().parent) for path in paths}
    if len(roots) == 1 and None not in roots:
        (root,) = roots
        assert root is not None
        return root
    cwd = Path.cwd().resolve()
    return _git_root(cwd) or cwd


def _artifact_location(path: str, root: Path) -> dict[str, str]:
    """`{"uri": "machines/x.fsm", "uriBaseId": "%SRCROOT%"}` for a file under the repository
    root, whatever the working directory; an absolute file URI for one outside it."""
    absolute = Path(path).resolve()
    try:
        relative = absolute.relative_to(root)
    except ValueError:
        return {"uri": absolute.as_uri()}
    return {"uri": quote(relative.as_posix(), safe="/"), "uriBaseId": SRCROOT}


def _sarif_location(span: SourceSpan, root: Path) -> dict[str, Any]:
    return {
        "physicalLocation": {
            "artifactLocation": _artifact_location(span.path, root),
            "region": {
                "startLine": max(span.line, 1),
                "startColumn": max(span.column, 1),
                "endLine": max(span.end_line, span.line, 1),
                "endColumn": max(span.end_column, 1),
            },
        }
    }


def _sarif_related(diagnostic: Diagnostic, root: Path) -> dict[str, Any]:
    """SARIF `relatedLocations`: where the cause of a finding is, each with its message."""
    if not diagnostic.related:
        return {}
    return {
        "relatedLocations": [
            {"id": number, **_sarif_location(note.span, root), "message": {"text": note.message}}
            for number, note in enumerate(diagnostic.related)
        ]
    }


def _sarif_level(severity: Severity) -> str:
    return "error" if severity is Severity.ERROR else "warning"


# Positions in a message ("declared at line 12") move with unrelated edits; a fingerprint
# must not.
_POSITIONS = re.compile(r"(:\d+)+\b|\bline \d+|\bcolumn \d+")


def fingerprint(diagnostic: Diagnostic, source_line: str, relative_uri: str) -> str:
    """What a finding is, not where: its code, file, message (positions removed) and the
    text of its line without surrounding blanks."""
    message = _POSITIONS.sub("", diagnostic.message)
    key = "\0".join((diagnostic.code, relative_uri, message, source_line.strip()))
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _rule(rule: RuleHelp) -> dict[str, Any]:
    return {
        "id": rule.code,
        "name": rule.code,
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": rule.meaning},
        "help": {"text": rule.text, "markdown": rule.markdown},
        "helpUri": rule.help_uri,
        "defaultConfiguration": {"level": _sarif_level(rule.severity)},
        "properties": {
            "tags": ["state-machine", "correctness"],
            "precision": "very-high",
            "problem.severity": "error" if rule.severity is Severity.ERROR else "warning",
        },
    }


def render_sarif(report: CheckReport, root: Path | None = None) -> str:
    """SARIF 2.1.0 for GitHub code scanning: a rule per code with its help, URIs relative to
    the repository root (`%SRCROOT%`), and fingerprints that survive unrelated edits.
    Columns count Unicode code points, as lark does."""
    if root is None:
        spans = [s for d in report.diagnostics for s in (d.span, *(n.span for n in d.related))]
        root = repository_root(sorted({span.path for span in spans}))
    root = root.resolve()
    rules = all_rules()
    index = {rule.code: position for position, rule in enumerate(rules)}
    results = []
    seen: dict[str, int] = {}
    for diagnostic in report.diagnostics:
        span = diagnostic.span
        text = diagnostic.message
        if diagnostic.hint:
            text = f"{text} (hint: {diagnostic.hint})"
        location = _artifact_location(span.path, root)
        source = report.sources.get(span.path)
        lines = (source.lines if source is not None else None) or ()
        line_text = lines[span.line - 1] if 1 <= span.line <= len(lines) else ""
        key = fingerprint(diagnostic, line_text, location["uri"])
        # Identical findings on identical lines are told apart by their order in the file.
        seen[key] = seen.get(key, 0) + 1
        results.append(
            {
                "ruleId": diagnostic.code,
                "ruleIndex": index[diagnostic.code],
                "level": _sarif_level(diagnostic.severity),
                "message": {"text": text},
                "locations": [_sarif_location(span, root)],
                **_sarif_related(diagnostic, root),
                "partialFingerprints": {FINGERPRINT_KEY: f"{key}:{seen[key]}"},
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
                        "semanticVersion": __version__,
                        "informationUri": DOCS_URL,
                        "rules": [_rule(rule) for rule in rules],
                    }
                },
                "originalUriBaseIds": {SRCROOT: {"uri": root.as_uri() + "/"}},
                "columnKind": "unicodeCodePoints",
                "results": results,
            }
        ],
    }
    return json.dumps(log, indent=2, ensure_ascii=False) + "\n"
