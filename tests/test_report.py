"""Renderers: text for people, JSON for scripts (round trip), SARIF 2.1.0 validated against
both published schemas."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from autonomic.compiler import __version__
from autonomic.compiler.checks import CheckReport, check_paths
from autonomic.compiler.errors import (
    CODES,
    Diagnostic,
    RelatedLocation,
    Severity,
    SourceSpan,
    format_text,
)
from autonomic.compiler.report import render_json, render_sarif, render_text

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "checks"
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"
SCHEMA_FILES = ["sarif-schema-2.1.0.json", "sarif-schema-2.1.0.schemastore-draft07.json"]


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths, as `autonomic check` is run from the repository root."""
    monkeypatch.chdir(REPO)


def relative_fixture(name: str) -> str:
    return str(Path("tests") / "fixtures" / "checks" / name)


@pytest.fixture
def mixed_report(in_repo: None) -> CheckReport:
    return check_paths(
        [
            relative_fixture("five_mistakes.fsm"),
            relative_fixture("w204_unhandled_event.fsm"),
            relative_fixture("w206_file_name.fsm"),
            relative_fixture("e001_missing_arrow.fsm"),
            relative_fixture("e002_invalid_utf8.fsm"),
            "tests/fixtures/checks/does_not_exist.fsm",
        ]
    )


def load_schema(name: str) -> dict[str, Any]:
    if not SCHEMAS.is_dir():
        pytest.skip(f"{SCHEMAS} is absent: shared/ must sit beside the repository clone")
    schema: dict[str, Any] = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    return schema


def sarif_errors(document: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


# ---------------------------------------------------------------- SARIF


@pytest.mark.parametrize("schema_name", SCHEMA_FILES)
def test_sarif_validates_against_both_schemas(schema_name: str, mixed_report: CheckReport) -> None:
    schema = load_schema(schema_name)
    assert len(mixed_report.diagnostics) > 8
    document = json.loads(render_sarif(mixed_report))
    assert sarif_errors(document, schema) == []


@pytest.mark.parametrize("schema_name", SCHEMA_FILES)
def test_sarif_of_a_clean_run_validates(schema_name: str, in_repo: None) -> None:
    schema = load_schema(schema_name)
    report = check_paths([relative_fixture("e101_no_initial.fsm")])
    report.diagnostics.clear()
    document = json.loads(render_sarif(report))
    assert document["runs"][0]["results"] == []
    assert sarif_errors(document, schema) == []


@pytest.mark.parametrize("schema_name", SCHEMA_FILES)
def test_validation_catches_a_broken_document(schema_name: str, mixed_report: CheckReport) -> None:
    # The schema check is real: a result without a message must be rejected.
    schema = load_schema(schema_name)
    document = json.loads(render_sarif(mixed_report))
    del document["runs"][0]["results"][0]["message"]
    assert sarif_errors(document, schema) != []


def test_sarif_content(mixed_report: CheckReport) -> None:
    document = json.loads(render_sarif(mixed_report))
    assert document["version"] == "2.1.0"
    (run,) = document["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "autonomic"
    assert driver["version"] == __version__
    rules = driver["rules"]
    assert [rule["id"] for rule in rules] == sorted(CODES)
    for rule in rules:
        severity, summary = CODES[rule["id"]]
        assert rule["shortDescription"]["text"] == summary
        assert rule["defaultConfiguration"]["level"] == severity.value
    assert run["columnKind"] == "unicodeCodePoints"
    results = run["results"]
    assert len(results) == len(mixed_report.diagnostics)
    for result, diagnostic in zip(results, mixed_report.diagnostics, strict=True):
        assert result["ruleId"] == diagnostic.code
        assert rules[result["ruleIndex"]]["id"] == diagnostic.code
        assert result["level"] == diagnostic.severity.value
        assert diagnostic.message in result["message"]["text"]
        assert diagnostic.hint is not None and diagnostic.hint in result["message"]["text"]
        (location,) = result["locations"]
        physical = location["physicalLocation"]
        assert physical["artifactLocation"]["uri"] == diagnostic.span.path.replace(os.sep, "/")
        assert "\\" not in physical["artifactLocation"]["uri"]
        span = diagnostic.span
        assert physical["region"] == {
            "startLine": span.line,
            "startColumn": span.column,
            "endLine": span.end_line,
            "endColumn": span.end_column,
        }


def test_sarif_uri_of_an_absolute_path_under_the_working_directory(in_repo: None) -> None:
    report = check_paths([FIXTURES / "w201_unreachable.fsm"])
    document = json.loads(render_sarif(report))
    uri = document["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert uri["artifactLocation"]["uri"] == "tests/fixtures/checks/w201_unreachable.fsm"


def test_sarif_uri_outside_the_working_directory_is_a_file_uri(tmp_path: Path) -> None:
    odd = tmp_path / "with space" / "x.fsm"
    report = check_paths([odd])
    document = json.loads(render_sarif(report))
    physical = document["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    uri = physical["artifactLocation"]["uri"]
    if Path.cwd().resolve() in odd.resolve().parents:
        pytest.skip("the temporary folder lies under the working directory")
    assert uri.startswith("file:///") and "with%20space" in uri


# ---------------------------------------------------------------- JSON


def test_json_round_trip(mixed_report: CheckReport) -> None:
    rendered = render_json(mixed_report)
    document = json.loads(rendered)
    assert document["version"] == 1
    assert document["tool"] == {"name": "autonomic", "version": __version__}
    rebuilt = [
        Diagnostic(
            code=item["code"],
            severity=Severity(item["severity"]),
            message=item["message"],
            hint=item["hint"],
            span=SourceSpan(
                path=item["path"],
                line=item["line"],
                column=item["column"],
                end_line=item["end_line"],
                end_column=item["end_column"],
            ),
            related=tuple(
                RelatedLocation(
                    span=SourceSpan.point(note["path"], note["line"], note["column"]),
                    message=note["message"],
                )
                for note in item["related"]
            ),
        )
        for item in document["diagnostics"]
    ]
    assert rebuilt == mixed_report.diagnostics
    assert document["summary"] == {
        "errors": len(mixed_report.errors()),
        "warnings": len(mixed_report.warnings()),
        "files_checked": 6,
        "files_with_findings": 6,
    }


def test_json_is_stable(in_repo: None) -> None:
    paths = [relative_fixture("five_mistakes.fsm"), relative_fixture("w205_unused_allow.fsm")]
    assert render_json(check_paths(paths)) == render_json(check_paths(list(reversed(paths))))


# ---------------------------------------------------------------- text


def test_text_shows_every_finding_with_source_caret_and_hint(mixed_report: CheckReport) -> None:
    text = render_text(mixed_report)
    for diagnostic in mixed_report.diagnostics:
        source = mixed_report.sources[diagnostic.span.path]
        assert format_text(diagnostic, source.lines) in text
    errors, warnings = len(mixed_report.errors()), len(mixed_report.warnings())
    assert text.endswith(f"{errors} errors, {warnings} warnings in 6 files (6 files checked)\n")
    assert "  = hint: did you mean 'Approved'?" in text
    assert "  13 |     on Approve -> Aproved else\n" in text
    assert "                       ^^^^^^^\n" in text


def test_text_summary_wording(in_repo: None) -> None:
    clean = check_paths([relative_fixture("w201_unreachable.fsm")])
    clean.diagnostics.clear()
    assert render_text(clean) == "1 file checked, no findings\n"
    one = check_paths([relative_fixture("w201_unreachable.fsm")])
    assert render_text(one).endswith("\n\n1 warning in 1 file (1 file checked)\n")
    error = check_paths([relative_fixture("e104_unknown_state.fsm")])
    assert render_text(error).endswith("\n\n1 error in 1 file (1 file checked)\n")


def test_text_of_an_unreadable_file_has_no_source_line(in_repo: None) -> None:
    report = check_paths(["tests/fixtures/checks/does_not_exist.fsm"])
    text = render_text(report)
    assert text.startswith("tests/fixtures/checks/does_not_exist.fsm:1:1: E003 [error]")
    assert " | " not in text


# ---------------------------------------------------------------- related locations


def test_related_locations_in_text_json_and_sarif(in_repo: None) -> None:
    report = check_paths([relative_fixture("mixed_references.fsm")])
    unreachable = next(d for d in report.diagnostics if d.code == "W201")
    assert [(n.span.line, n.span.column) for n in unreachable.related] == [(20, 19)]
    text = render_text(report)
    assert (
        "  = see tests/fixtures/checks/mixed_references.fsm:20:19: 'Review' moves to "
        "'Publishing' here: was 'Published' meant?"
    ) in text
    document = json.loads(render_json(report))
    notes = next(d["related"] for d in document["diagnostics"] if d["code"] == "W201")
    assert notes[0]["line"] == 20
    sarif = json.loads(render_sarif(report))
    result = next(r for r in sarif["runs"][0]["results"] if r["ruleId"] == "W201")
    (location,) = result["relatedLocations"]
    assert location["physicalLocation"]["region"]["startLine"] == 20
    assert "was 'Published' meant?" in location["message"]["text"]
    for name in SCHEMA_FILES:
        assert sarif_errors(sarif, load_schema(name)) == []


def test_summary_of_a_folder_without_machine_files(tmp_path: Path) -> None:
    report = check_paths([tmp_path])
    assert render_text(report).endswith("\n\n1 warning (0 files checked)\n")
