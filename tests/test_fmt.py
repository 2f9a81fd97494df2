"""`autonomic fmt`: canonical, idempotent, comment-keeping, and never a change of meaning."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from autonomic.compiler.fmt import _tokens, format_source, format_text, meaning
from autonomic.compiler.parser import decode_source, parse_source
from cli_process import autonomic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import MachineCase, machine_cases

ROOT = Path(__file__).resolve().parents[1]
MACHINE_FOLDERS = [ROOT / "machines", ROOT / "examples", ROOT / "tests" / "golden" / "machines"]

MESSY = """# header comment   \r
machine   Shop    "A shop." {\r
\r
\r
      event Go{a:str ,b : enum( x,y ) ?  "why"}   // trailing
event Stop
    # a comment about states

  initial   state Open{
on Go->Done   when  ok do  a,b emit Shop.Stop ( a = "x" , b=$instance )       # aligned
      ignore Stop
        @allow( W204 , "because" )
  after 1d12h  ->Done
}
  final state Done


}
"""

CANONICAL = """# header comment
machine Shop "A shop." {

  event Go { a: str, b: enum(x, y)? "why" }   // trailing
  event Stop
  # a comment about states

  initial state Open {
    on Go -> Done when ok do a, b emit Shop.Stop(a = "x", b = $instance)       # aligned
    ignore Stop
    @allow(W204, "because")
    after 1d12h -> Done
  }
  final state Done

}
"""

CLEAN = """machine Shop "A shop." {
  event Go
  initial state Open {
    on Go -> Done
  }
  final state Done
}
"""


def _meaning_of(text: str) -> object:
    machine, diagnostics = parse_source(decode_source("m.fsm", text.encode("utf-8")))
    assert machine is not None, diagnostics
    return meaning(machine)


def test_canonical_layout_of_a_messy_file_keeps_every_comment() -> None:
    assert format_text(MESSY) == CANONICAL
    assert format_text(CANONICAL) == CANONICAL


def test_every_machine_in_the_repository_is_formatted() -> None:
    files = [f for folder in MACHINE_FOLDERS for f in sorted(folder.rglob("*.fsm"))]
    assert len(files) >= 7
    for file in files:
        result = format_source(str(file), file.read_bytes())
        assert result.text is not None, (file, result.diagnostics)  # flows-only files too
        assert not result.changed, f"{file} is not formatted: run `autonomic fmt {file}`"


@st.composite
def respaced(draw: st.DrawFn, text: str) -> str:
    """The same tokens with other blanks between them: random indentation, runs of spaces
    and tabs, none at all where a punctuation mark stands between two tokens, trailing
    blanks and CRLF line ends. (Blank lines are the author's: fmt only collapses runs.)"""
    lines = []
    for line in text.split("\n"):
        tokens = _tokens(line)
        out = draw(st.sampled_from(["", " ", "\t", "      "]))
        for index, token in enumerate(tokens):
            following = tokens[index + 1] if index + 1 < len(tokens) else None
            glue = following is None or "punct" in (token.kind, following.kind)
            out += token.text + draw(st.sampled_from(["", " ", "  "] if glue else [" ", "\t"]))
        lines.append(out)
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=machine_cases(), data=st.data())
def test_fmt_is_idempotent_and_keeps_the_machine(case: MachineCase, data: st.DataObject) -> None:
    once = format_text(case.text)
    assert format_text(once) == once
    assert _meaning_of(once) == _meaning_of(case.text)
    # Blanks added or removed anywhere between tokens come out as the same canonical text.
    messy = data.draw(respaced(once))
    assert _meaning_of(messy) == _meaning_of(once)
    assert format_text(messy) == once


# ---------------------------------------------------------------- the command, in a git repo


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "machines").mkdir(parents=True)
    (root / "machines" / "shop.fsm").write_text(MESSY, encoding="utf-8")
    (root / "machines" / "neat.fsm").write_text(CANONICAL.replace("Shop", "Neat"), "utf-8")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return root


def test_fmt_check_then_fmt_in_a_repository(repository: Path) -> None:
    shop = repository / "machines" / "shop.fsm"
    checked = autonomic("fmt", "--check", "machines", cwd=repository)
    assert checked.returncode == 1
    assert "would reformat machines/shop.fsm" in checked.stdout
    assert "neat.fsm" not in checked.stdout
    assert shop.read_bytes() == MESSY.encode()  # --check writes nothing
    done = autonomic("fmt", "machines", cwd=repository)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1 reformatted, 1 unchanged"
    assert shop.read_text(encoding="utf-8") == CANONICAL
    again = autonomic("fmt", "--check", "machines", cwd=repository)
    assert again.returncode == 0 and "2 files already formatted" in again.stdout


def test_fmt_refuses_a_file_that_does_not_parse(repository: Path) -> None:
    broken = repository / "machines" / "broken.fsm"
    broken.write_text("machine Broken {\n  initial state A {\n    on Go Done\n", encoding="utf-8")
    done = autonomic("fmt", "machines", cwd=repository)
    assert done.returncode == 1
    assert "machines/broken.fsm:3" in done.stderr and "E001" in done.stderr
    assert "Traceback" not in done.stderr
    assert broken.read_text(encoding="utf-8").endswith("    on Go Done\n")  # untouched


def test_pre_commit_hooks_run_as_declared(repository: Path) -> None:
    """Each hook of .pre-commit-hooks.yaml, run the way pre-commit runs it: its entry, then
    the staged files that match (unless pass_filenames is false)."""

    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    assert {hook["id"] for hook in hooks} == {
        "autonomic-check",
        "autonomic-fmt",
        "autonomic-build-check",
    }
    (repository / "machines" / "neat.fsm").unlink()
    shop = repository / "machines" / "shop.fsm"
    shop.write_text(CLEAN, encoding="utf-8")
    built = autonomic("build", cwd=repository)
    assert built.returncode == 0, built.stderr
    staged = ["machines/shop.fsm", "generated/shop.py"]
    for hook in hooks:
        command = hook["entry"].split()
        assert command[0] == "autonomic"
        files = [f for f in staged if re.search(hook["files"], f)]
        if hook.get("pass_filenames", True):
            command += files
        done = autonomic(*command[1:], cwd=repository)
        assert done.returncode == 0, (hook["id"], done.stdout, done.stderr)
    # And each fails on what it guards against.
    shop.write_text(CLEAN.replace("Go -> Done", "Go  ->  Done"), encoding="utf-8")
    assert autonomic("fmt", "--check", "machines/shop.fsm", cwd=repository).returncode == 1
    shop.write_text(CLEAN.replace("final state Done", "final state Done\n  final state Gone"))
    assert autonomic("build", "--check", cwd=repository).returncode == 1
    shop.write_text("machine Shop {", encoding="utf-8")
    assert autonomic("check", "machines/shop.fsm", cwd=repository).returncode == 1
