# ruff: noqa: E501 - the machine text below is long on purpose
"""Generated modules come out formatted without running ruff: byte-identical to what
`ruff format` makes of the same module, for every machine of the repository, the examples,
random machines and lines built to be long."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from autonomic.compiler.build import render_package_init
from autonomic.compiler.checks import check_paths
from autonomic.compiler.codegen import generate_tables, has_long_lines, render_module, ruff_format
from autonomic.compiler.lower import MachineTables, lower
from autonomic.compiler.parser import parse_text
from autonomic.compiler.pyformat import fit_lines, quote
from hypothesis import HealthCheck, given, settings
from strategies import MachineCase, machine_cases

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = [
    ROOT / "machines",
    ROOT / "examples" / "machines",
    ROOT / "tests" / "golden" / "machines",
]


def via_ruff(tables: MachineTables) -> str:
    """What generation gave when it ran ruff: the rendered module through `ruff format`."""
    formatted = ruff_format(render_module(tables))
    if has_long_lines(formatted):
        formatted = ruff_format(render_module(tables, long_lines=True))
    return formatted


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.parent.name + "/" + f.name for f in FOLDERS])
def test_repository_machines_match_ruff(folder: Path) -> None:
    report = check_paths([folder])
    machines = [*report.machines, *report.known]
    assert report.machines
    for machine in report.machines:
        tables = lower(machine, others=machines)
        assert generate_tables(tables) == via_ruff(tables), machine.name.value


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(machine_cases())
def test_random_machines_match_ruff(case: MachineCase) -> None:
    machine, diagnostics = parse_text(case.text, "random.fsm")
    assert machine is not None, diagnostics
    tables = lower(machine, others=[machine])
    assert generate_tables(tables) == via_ruff(tables)


LONG = """
machine LongLines "A doc string that is long enough to need its line kept whole by the formatter, and then some more words." {
  event Go { note: str, amount: decimal, reason_for_the_very_long_field_name: str }
  event Back
  initial state Start {
    on Go -> Finished when a_guard_with_a_rather_long_name_to_push_the_line do first_action_with_a_long_name, second_action_with_a_long_name, third_action emit Back, Back, Back, Back, Back
    on Go -> Start else emit Other.Ping(text = "a literal that is long enough to split the emit argument tuple", count = 12, note = note)
    on Back -> Finished
    escalate { after 1h notify queue a_queue_with_a_name_long_enough_to_matter within 30m "A message that is really rather long, long enough to split the notify call" }
  }
  final state Finished
}
"""
OTHER = "machine Other { event Ping { text: str, count: int, note: str } initial state A { on Ping -> A } }"


def test_long_lines_are_split_like_ruff() -> None:
    machine, diagnostics = parse_text(LONG, "long_lines.fsm")
    other, _ = parse_text(OTHER, "other.fsm")
    assert machine is not None and other is not None, diagnostics
    tables = lower(machine, others=[machine, other])
    generated = generate_tables(tables)
    assert generated == via_ruff(tables)
    assert "# ruff: noqa: E501" in generated  # the doc line cannot be split


@pytest.mark.parametrize(
    "text",
    ["plain", "it's", 'say "hi"', "both ' and \"", "a\\b", "tab\there", "\u202e", "''\""],
)
def test_quotes_as_ruff_normalizes_them(text: str) -> None:
    source = f"X = {quote(text)}\n"
    assert ruff_format(source) == source
    assert eval(quote(text)) == text


def test_lines_within_the_limit_are_left_alone() -> None:
    text = "A = frozen_map(\n    dict[str, int](\n        {\n            'a': 1,\n        }\n    )\n)\n"
    assert fit_lines(text) == text


@pytest.mark.parametrize(
    "modules", [[], ["a"], ["a", "b"], [f"module_number_{n}" for n in range(9)]]
)
def test_package_init_matches_ruff(modules: list[str]) -> None:
    tables = [SimpleNamespace(module=module) for module in modules]
    source = render_package_init(tables)  # type: ignore[arg-type]
    assert ruff_format(source) == source
