"""SARIF that GitHub code scanning takes as is: complete rules with help, fingerprints that
survive unrelated edits, URIs relative to the repository root from any working directory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from autonomic.compiler.errors import CODES
from autonomic.compiler.rules import REFERENCE_HEADING, render_reference
from cli_process import autonomic
from test_report import SCHEMA_FILES, load_schema, sarif_errors

REPO = Path(__file__).resolve().parents[1]
BROKEN = """machine Shop {
  event Go
  event Stop
  initial state Open {
    on Go -> Nowhere
    on Stop -> Closed
  }
  final state Closed
}
"""
LOST = """machine Lost {
  event Go
  initial state Open {
    on Go -> Closed
  }
  state Lost {
    on Go -> Closed
  }
  final state Closed
}
"""


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A real git repository with one broken machine in machines/."""
    root = tmp_path / "repo"
    (root / "machines").mkdir(parents=True)
    (root / "tools").mkdir()
    (root / "machines" / "shop.fsm").write_text(BROKEN, encoding="utf-8")
    (root / "machines" / "lost.fsm").write_text(LOST, encoding="utf-8")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def sarif_of(repository: Path, *paths: str, cwd: Path | None = None) -> dict[str, Any]:
    done = autonomic("check", "--format", "sarif", *paths, cwd=cwd or repository)
    assert done.returncode == 1, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def github_problems(document: dict[str, Any]) -> list[str]:
    """The properties GitHub's "SARIF support for code scanning" page lists as required or
    used for alerts: a log with $schema, version and runs; a driver with name, version and
    rules; each rule with id, shortDescription, fullDescription, help (text and markdown) and
    a default level; each result with ruleId, message.text, 1-10 locations each with a
    relative artifact URI and a startLine, and partialFingerprints."""
    problems = []
    for key in ("$schema", "version", "runs"):
        if key not in document:
            problems.append(f"log: no {key}")
    for run in document.get("runs", []):
        driver = run["tool"]["driver"]
        for key in ("name", "version", "rules"):
            if not driver.get(key):
                problems.append(f"driver: no {key}")
        for rule in driver.get("rules", []):
            where = f"rule {rule.get('id')}"
            for path in (
                ("id",),
                ("shortDescription", "text"),
                ("fullDescription", "text"),
                ("help", "text"),
                ("help", "markdown"),
                ("helpUri",),
                ("defaultConfiguration", "level"),
            ):
                value: Any = rule
                for part in path:
                    value = value.get(part) if isinstance(value, dict) else None
                if not value:
                    problems.append(f"{where}: no {'.'.join(path)}")
        bases = run.get("originalUriBaseIds", {})
        for result in run.get("results", []):
            where = f"result {result.get('ruleId')}"
            if not result.get("message", {}).get("text"):
                problems.append(f"{where}: no message.text")
            if not result.get("partialFingerprints"):
                problems.append(f"{where}: no partialFingerprints")
            locations = result.get("locations", [])
            if not 1 <= len(locations) <= 10:
                problems.append(f"{where}: {len(locations)} locations")
            for location in locations:
                physical = location["physicalLocation"]
                artifact = physical["artifactLocation"]
                if artifact["uri"].startswith(("/", "..", "file:")):
                    problems.append(f"{where}: uri {artifact['uri']} not repository-relative")
                if artifact.get("uriBaseId") not in bases:
                    problems.append(f"{where}: uriBaseId {artifact.get('uriBaseId')} undefined")
                if not physical.get("region", {}).get("startLine"):
                    problems.append(f"{where}: no startLine")
    return problems


@pytest.mark.parametrize("schema_name", SCHEMA_FILES)
def test_sarif_passes_both_schemas_and_githubs_requirements(
    repository: Path, schema_name: str
) -> None:
    document = sarif_of(repository, "machines")
    assert sarif_errors(document, load_schema(schema_name)) == []
    assert github_problems(document) == []
    assert {r["ruleId"] for r in document["runs"][0]["results"]} >= {"E104", "W201"}


def test_github_check_sees_what_is_missing(repository: Path) -> None:
    document = sarif_of(repository, "machines")
    run = document["runs"][0]
    del run["tool"]["driver"]["rules"][0]["fullDescription"]
    del run["results"][0]["partialFingerprints"]
    run["results"][1]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] = "../x.fsm"
    problems = github_problems(document)
    assert len(problems) == 3, problems


def test_every_rule_links_its_section_of_the_language_reference(repository: Path) -> None:
    rules = sarif_of(repository, "machines")["runs"][0]["tool"]["driver"]["rules"]
    assert sorted(r["id"] for r in rules) == sorted(CODES)
    docs = (REPO / "docs" / "language.md").read_text(encoding="utf-8")
    headings = {line[4:] for line in docs.splitlines() if line.startswith("### ")}
    for rule in rules:
        assert rule["helpUri"].endswith("docs/language.md#" + rule["id"].lower())
        assert rule["id"] in headings  # GitHub's anchor of `### E104` is `#e104`
        assert rule["fullDescription"]["text"] != rule["shortDescription"]["text"]
        assert rule["helpUri"] in rule["help"]["markdown"]


def test_language_reference_holds_the_generated_diagnostic_reference() -> None:
    docs = (REPO / "docs" / "language.md").read_text(encoding="utf-8")
    start = docs.index(REFERENCE_HEADING)
    end = docs.find("\n## ", start + 1)
    section = docs[start : end if end != -1 else len(docs)]
    expected = render_reference()
    assert section.rstrip() == expected.rstrip(), "regenerate it with rules.render_reference()"


def test_uris_are_relative_to_the_repository_root_from_any_directory(repository: Path) -> None:
    from_root = sarif_of(repository, "machines/shop.fsm")
    from_tools = sarif_of(repository, "../machines/shop.fsm", cwd=repository / "tools")
    absolute = sarif_of(repository, str(repository / "machines" / "shop.fsm"), cwd=Path("/"))
    assert from_root["runs"][0]["results"]
    for document in (from_root, from_tools, absolute):
        run = document["runs"][0]
        assert run["originalUriBaseIds"] == {"%SRCROOT%": {"uri": repository.as_uri() + "/"}}
        for result in run["results"]:
            artifact = result["locations"][0]["physicalLocation"]["artifactLocation"]
            assert artifact == {"uri": "machines/shop.fsm", "uriBaseId": "%SRCROOT%"}
    assert from_root["runs"][0]["results"] == from_tools["runs"][0]["results"]


def _fingerprints(document: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {
        next(iter(r["partialFingerprints"].values())): (
            r["ruleId"],
            r["locations"][0]["physicalLocation"]["region"]["startLine"],
        )
        for r in document["runs"][0]["results"]
    }


def test_fingerprints_survive_unrelated_lines_moving(repository: Path) -> None:
    before = _fingerprints(sarif_of(repository, "machines"))
    machine = repository / "machines" / "shop.fsm"
    lost = repository / "machines" / "lost.fsm"
    moved = "# a new header comment\n# and another\n\n" + BROKEN.replace(
        "  event Stop\n", "  event Stop  # unrelated\n"
    )
    machine.write_text(moved, encoding="utf-8")
    lost.write_text("// moved down\n" + LOST, encoding="utf-8")
    after = _fingerprints(sarif_of(repository, "machines"))
    assert sorted(after) == sorted(before)
    assert sorted(code for code, _ in after.values()) == ["E104", "W201"]
    for key, (_, line) in after.items():
        assert line > before[key][1]  # every finding moved, its fingerprint did not
    # The finding itself changing changes its fingerprint.
    machine.write_text(BROKEN.replace("Nowhere", "Elsewhere"), encoding="utf-8")
    changed = _fingerprints(sarif_of(repository, "machines"))
    assert not any(
        changed_key in before and before[changed_key][0] == "E104" for changed_key in changed
    )
