"""The real-world machines of examples/machines/ as the language's acceptance tests: each
checks clean with --strict, builds, and its simulate scripts walk its important paths; and
together they use every construct of the language."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from autonomic.compiler.build import build
from autonomic.compiler.checks import check_paths
from autonomic.compiler.model import Duration, Machine
from autonomic.runtime.simulate import run_simulation
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
MACHINES = ROOT / "examples" / "machines"
SCRIPTS = sorted((ROOT / "examples" / "scripts").glob("*.yaml"))


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("examples")
    result = build([MACHINES], out, svg=False)
    assert result.written, result.report
    return out


def test_examples_check_clean_with_strict() -> None:
    report = check_paths([MACHINES])
    assert len(report.machines) >= 6
    assert report.diagnostics == []
    assert not report.failed(strict=True)
    for machine in report.machines:
        head = Path(machine.path).read_text(encoding="utf-8").split("machine ", 1)[0]
        assert "https://" in head, f"{machine.path} cites no public source"


def machine_of(script: Path) -> str:
    stems = [p.stem for p in MACHINES.glob("*.fsm") if script.stem.startswith(p.stem + "_")]
    assert len(stems) == 1, script
    return stems[0]


def test_every_example_machine_has_a_script() -> None:
    assert {machine_of(s) for s in SCRIPTS} == {p.stem for p in MACHINES.glob("*.fsm")}


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_script_walks_its_path(generated: Path, script: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = run_simulation(str(generated / f"{machine_of(script)}.py"), str(script), out, err)
    assert (code, err.getvalue()) == (0, ""), out.getvalue()
    assert "ledger verified" in out.getvalue()
    assert "expectation failed" not in out.getvalue()


def test_examples_use_every_construct() -> None:
    machines = check_paths([MACHINES]).machines
    states = [s for m in machines for s in m.states]
    timers = [t for s in states for t in s.timers]
    steps = [step for m in machines for r in m.retries for step in r.steps]
    escalation_steps = [st for s in states for e in s.escalations for st in e.steps]
    texts = {d.text for m in machines for d in _durations(m)}
    assert any(s.resting for s in states)
    assert any(s.entries for s in states)
    assert any(t.delay is not None and t.delay.kind == "field" for t in timers)
    assert any(
        t.delay is not None and t.delay.kind == "setting"
        for t in [*timers, *(mt for m in machines for mt in m.machine_timers)]
    )
    assert any(mt.scope == "group" for m in machines for mt in m.machine_timers)
    assert any(mt.scope == "creation" for m in machines for mt in m.machine_timers)
    assert any(st.repeat is not None for st in escalation_steps)
    assert any(st.after.millis == 0 for st in escalation_steps)
    assert any(r.cap is not None for m in machines for r in m.retries)
    assert any(step.attempt is not None and step.timeout is not None for step in steps)
    assert any(step.repeat is not None for step in steps)
    assert any(t.endswith("w") for t in texts)
    assert any(sum(c.isalpha() for c in t) > 1 and not t.endswith("ms") for t in texts)


def _durations(machine: Machine) -> list[Duration]:
    """Every duration written in the machine."""
    found: list[Duration] = []

    def walk(node: object) -> None:
        if isinstance(node, Duration):
            found.append(node)
        elif isinstance(node, tuple):
            for item in node:
                walk(item)
        elif isinstance(node, BaseModel):
            for name in type(node).model_fields:
                walk(getattr(node, name))

    walk(machine)
    return found
