"""The documentation runs: every code block of docs/runtime.md and docs/simulate.md is executed.

A doc is read top to bottom in a fresh project folder, as a reader would follow it:
- a block after `<!-- file: PATH -->` is written to PATH;
- a `python` block runs, all of a doc's blocks in one namespace (later blocks use earlier
  names), with the project folder as the working directory and on `sys.path`;
- a `sh` block holds commands after `$ `, run by bash, each followed by the output it prints:
  every expected line must appear in order, `...` standing for any text. `<!-- exit: N -->`
  before the block gives the exit status of its commands (default 0).
Any other block fails the test, so nothing shown can go unchecked. The reference tables are
checked against the codes the code defines.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
DIRECTIVE = re.compile(r"<!--\s*(file|exit):\s*(\S+)\s*-->\s*\Z")


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    text: str
    file: str | None
    exit: int


def blocks(doc: Path) -> list[Block]:
    text = doc.read_text(encoding="utf-8")
    found: list[Block] = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        directive = DIRECTIVE.search(before)
        kind, value = directive.groups() if directive else (None, None)
        found.append(
            Block(
                line=text.count("\n", 0, match.start()) + 1,
                language=match.group(1),
                text=match.group(2),
                file=value if kind == "file" else None,
                exit=int(value) if kind == "exit" and value is not None else 0,
            )
        )
    return found


def _expected_pattern(line: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in line.strip().split("...")))


def run_shell(block: Block, project: Path, env: dict[str, str]) -> None:
    commands: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif line.strip():
            assert commands, f"line {block.line}: output before any `$ command`"
            commands[-1][1].append(line)
    assert commands, f"line {block.line}: a sh block holds `$ command` lines"
    for command, expected in commands:
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        shown = (done.stdout + done.stderr).splitlines()
        where = f"line {block.line}: `{command}` printed:\n{done.stdout}{done.stderr}"
        assert done.returncode == block.exit, where
        position = 0
        for want in expected:
            pattern = _expected_pattern(want)
            while position < len(shown) and not pattern.search(shown[position]):
                position += 1
            assert position < len(shown), f"{where}\nexpected a line like: {want}"
            position += 1


def run_doc(doc: Path, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("NO_COLOR", None)
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    namespace: dict[str, object] = {"__name__": "__tutorial__"}
    before = set(sys.modules)
    try:
        for block in blocks(doc):
            if block.file is not None:
                target = project / block.file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block.text, encoding="utf-8")
            elif block.language == "python":
                code = compile(block.text, f"{doc.name}:{block.line}", "exec")
                exec(code, namespace)
            elif block.language == "sh":
                run_shell(block, project, env)
            else:
                pytest.fail(
                    f"{doc.name}:{block.line}: a `{block.language}` block that nothing runs"
                )
    finally:
        for name in set(sys.modules) - before:
            module = sys.modules[name]
            if str(project) in str(getattr(module, "__file__", "") or ""):
                del sys.modules[name]


@pytest.mark.parametrize("name", ["runtime.md", "simulate.md"])
def test_doc_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_doc(DOCS / name, tmp_path, monkeypatch)


def _table_codes(doc: Path, prefix: str) -> set[str]:
    return set(re.findall(rf"^\| `?({prefix}\d{{3}})`? \|", doc.read_text(encoding="utf-8"), re.M))


def _runtime_failures() -> list[type]:
    """Every RuntimeFailure class of the runtime, with its public API loaded."""
    import autonomic.runtime as runtime

    for name in runtime.__all__:
        getattr(runtime, name)
    found: list[type] = []
    todo: list[type] = [runtime.RuntimeFailure]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("autonomic.") and sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def test_every_runtime_code_is_in_the_reference_table() -> None:
    from autonomic.runtime import bindings

    failures = _runtime_failures()
    codes = [cls.code for cls in failures]  # type: ignore[attr-defined]
    assert len(codes) == len(set(codes)), sorted(codes)  # one code, one meaning
    # The binding problems one BindingError lists, each with its own code.
    defined = set(codes) | {
        bindings.MISSING_GUARD,
        bindings.MISSING_ACTION,
        bindings.UNKNOWN_GUARD,
        bindings.UNKNOWN_ACTION,
        bindings.NOT_CALLABLE,
    }
    assert _table_codes(DOCS / "runtime.md", "[RA]") == defined


def test_every_script_code_is_in_the_reference_table() -> None:
    from autonomic.runtime.simulate import SCRIPT_HINTS

    assert _table_codes(DOCS / "simulate.md", "S") == set(SCRIPT_HINTS)


def test_docs_import_only_the_public_api() -> None:
    """What a user needs comes from `autonomic.runtime` and `autonomic.compiler` themselves."""
    for doc in (DOCS / "runtime.md", DOCS / "simulate.md"):
        private = re.findall(r"(?:from|import) (autonomic\.\w+\.\w+)", doc.read_text())
        assert not private, (doc.name, private)
