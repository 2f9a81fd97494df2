"""`build`: all-or-nothing writes, `--check` (stale, missing, orphaned), the index files."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from autonomic.compiler.build import (
    build,
    display_path,
    markdown_code,
    markdown_text,
    write_if_changed,
)
from strategies import import_path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_MACHINES = Path(__file__).resolve().parent / "golden" / "machines"
# CI installs Graphviz, so there a missing `dot` fails these tests instead of skipping them.
needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None and not os.environ.get("CI"), reason="Graphviz dot not installed"
)

MODULE_FILES = ("py", "dot", "mmd")


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_build_writes_every_output(tmp_path: Path) -> None:
    result = build([GOLDEN_MACHINES], tmp_path, svg=False)
    assert not result.report.diagnostics
    names = sorted(p.name for p in result.written)
    expected = [f"{m}.{ext}" for m in ("billing", "entitlement") for ext in MODULE_FILES]
    assert names == sorted([*expected, "README.md", "__init__.py"])
    assert not result.stale and not result.missing and not result.orphaned


def test_second_build_writes_nothing(tmp_path: Path) -> None:
    build([GOLDEN_MACHINES], tmp_path, svg=False)
    before = snapshot(tmp_path)
    again = build([GOLDEN_MACHINES], tmp_path, svg=False)
    assert again.written == []
    assert snapshot(tmp_path) == before  # not even rewritten with the same bytes


def test_check_lists_stale_missing_and_orphaned_and_changes_nothing(tmp_path: Path) -> None:
    build([GOLDEN_MACHINES], tmp_path, svg=False)
    assert build([GOLDEN_MACHINES], tmp_path, check_only=True, svg=False).written == []
    (tmp_path / "billing.dot").write_text("digraph {}\n")
    (tmp_path / "entitlement.mmd").unlink()
    (tmp_path / "old_machine.py").write_text("")
    (tmp_path / "py.typed").write_text("")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / ".gitignore").write_text("")
    before = snapshot(tmp_path)
    result = build([GOLDEN_MACHINES], tmp_path, check_only=True, svg=False)
    assert result.stale == [tmp_path / "billing.dot"]
    assert result.missing == [tmp_path / "entitlement.mmd"]
    assert result.orphaned == [tmp_path / "old_machine.py"]
    assert result.written == []
    assert snapshot(tmp_path) == before


def test_check_of_a_missing_folder_creates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = build([GOLDEN_MACHINES], out, check_only=True, svg=False)
    assert not out.exists()
    assert len(result.missing) == 2 * len(MODULE_FILES) + 2


def test_errors_write_nothing(tmp_path: Path) -> None:
    machines = tmp_path / "machines"
    shutil.copytree(GOLDEN_MACHINES, machines)
    (machines / "broken.fsm").write_text("machine Broken { state A { on E -> Nowhere } }\n")
    out = tmp_path / "out"
    result = build([machines], out)
    assert {d.code for d in result.report.errors()} >= {"E101", "E104"}
    assert not out.exists() and result.written == []


def test_strict_build_refuses_warnings(tmp_path: Path) -> None:
    source = tmp_path / "lonely.fsm"
    source.write_text("machine Lonely { event Unused initial state A final state B }\n")
    assert build([source], tmp_path / "lax", svg=False).written
    strict = build([source], tmp_path / "strict", strict=True, svg=False)
    assert strict.report.warnings() and strict.written == []
    assert not (tmp_path / "strict").exists()


def test_ladders_sharing_timer_ids_write_nothing(tmp_path: Path) -> None:
    """Two escalation ladders of one name in a state would share timer ids (the lowering
    refuses them too, should a check ever miss them)."""
    source = tmp_path / "twice.fsm"
    source.write_text(
        "machine Twice { initial state A { escalate L { after 1h notify queue q }"
        " escalate L { after 2h notify queue q } } }\n"
    )
    result = build([source], tmp_path / "out", svg=False)
    assert result.report.errors() and result.written == []
    assert {d.code for d in result.report.errors()} == {"E131"}


def test_writes_are_atomic_and_keep_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    old_umask = os.umask(0o022)
    try:
        assert write_if_changed(target, b"one")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert not write_if_changed(target, b"one")
    assert write_if_changed(target, b"two") and target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # no temporary left


def test_source_paths_are_project_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inside = GOLDEN_MACHINES / "billing.fsm"
    assert display_path(str(inside)) == "tests/golden/machines/billing.fsm"
    monkeypatch.chdir(ROOT / "tests")
    assert display_path("golden/machines/billing.fsm") == "tests/golden/machines/billing.fsm"
    outside = tmp_path / "m.fsm"
    outside.write_text("")
    assert display_path(str(outside)) == "m.fsm"


def test_package_init_lists_modules(tmp_path: Path) -> None:
    build([GOLDEN_MACHINES], tmp_path, svg=False)
    init = import_path(tmp_path / "__init__.py")
    assert init.MODULES == ("billing", "entitlement")
    assert init.__doc__ and "autonomic build" in init.__doc__


def test_readme_embeds_each_mermaid_diagram(tmp_path: Path) -> None:
    build([GOLDEN_MACHINES], tmp_path, svg=False)
    readme = (tmp_path / "README.md").read_text()
    for module in ("billing", "entitlement"):
        diagram = (tmp_path / f"{module}.mmd").read_text()
        assert f"```mermaid\n{diagram}```\n" in readme + "\n"
        assert f"[`{module}.py`]({module}.py)" in readme
    assert readme.count("```mermaid") == 2


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain words", "plain words"),
        ("<img src=x onerror=alert(1)>", "&lt;img src=x onerror=alert(1)&gt;"),
        ("*bold* _it_ [link](x) `code`", "\\*bold\\* \\_it\\_ \\[link\\](x) \\`code\\`"),
        ("- not a list", "\\- not a list"),
        ("1. not a list", "\\1. not a list"),
        ("a | b", "a \\| b"),
        ("two\nlines", "two lines"),
        ("\u202eabc", "<U+202E>abc".replace("<", "&lt;").replace(">", "&gt;")),
        ("```mermaid", "\\`\\`\\`mermaid"),
    ],
)
def test_markdown_text(text: str, shown: str) -> None:
    assert markdown_text(text) == shown


def test_markdown_code() -> None:
    assert markdown_code("machines/a.fsm") == "`machines/a.fsm`"
    assert markdown_code("a`b|c") == "a\\`b\\|c"


@needs_dot
def test_build_draws_svg_when_dot_is_there(tmp_path: Path) -> None:
    result = build([GOLDEN_MACHINES], tmp_path)
    assert {p.name for p in result.written} >= {"billing.svg", "entitlement.svg"}
    assert (tmp_path / "entitlement.svg").read_bytes().lstrip().startswith(b"<?xml")
    (tmp_path / "billing.svg").write_bytes(b"<svg/>")
    assert build([GOLDEN_MACHINES], tmp_path, check_only=True).stale == [tmp_path / "billing.svg"]


def test_machines_folder_builds_and_imports(tmp_path: Path) -> None:
    """The project's own machines: no errors, and every generated module imports."""
    result = build([ROOT / "machines"], tmp_path, svg=False)
    assert not result.report.errors(), result.report.errors()
    modules = sorted(tmp_path.glob("*.py"))
    flows = len(result.report.flows)
    assert len(modules) == len(result.report.machines) + flows + 1  # and __init__.py
    for path in modules:
        if path.name == "__init__.py":
            continue
        module = import_path(path)
        if path.name.startswith("flow_"):
            assert module.FLOW.name in {f.name.value for f in result.report.flows}
            continue
        assert module.MACHINE.name in {m.name.value for m in result.report.machines}
        assert set(module.MACHINE.transitions) or set(module.MACHINE.timers)


def test_committed_generated_tree_is_up_to_date() -> None:
    """`autonomic build --check` on the project itself: generated/ matches machines/."""
    result = build([ROOT / "machines"], ROOT / "generated", check_only=True)
    assert not result.report.errors()
    assert (result.stale, result.missing, result.orphaned) == ([], [], []), (
        "run `autonomic build` and commit generated/"
    )


def test_build_check_counts_the_flows_too(capsys: pytest.CaptureFixture[str]) -> None:
    from autonomic.compiler.cli import main

    assert main(["build", "--check", "--out", str(ROOT / "generated"), str(ROOT / "machines")]) == 0
    out = capsys.readouterr().out
    assert out == f"{ROOT / 'generated'} is up to date (7 machines and 5 flows)\n"
