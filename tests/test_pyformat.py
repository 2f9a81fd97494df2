# ruff: noqa: E501 - the machine text below is long on purpose
"""Generated modules come out formatted without running ruff: byte-identical to what
`ruff format` makes of the same module, for every machine and flow of the repository, the
examples, random machines and lines built to be long (long names, long enum fields, wide
Unicode text)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from autonomic.compiler.build import render_outputs, render_package_init
from autonomic.compiler.checks import check_paths
from autonomic.compiler.codegen import generate_tables, has_long_lines, render_module
from autonomic.compiler.lower import MachineTables, lower
from autonomic.compiler.parser import parse_text
from autonomic.compiler.pyformat import fit_lines, quote
from hypothesis import HealthCheck, given, settings
from ruff_tool import ruff_format
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


def test_flow_modules_and_the_package_init_with_flows_match_ruff(tmp_path: Path) -> None:
    """Every flow module of the repository as the build writes it, and __init__.py with its
    FLOWS; ruff never runs in the build."""
    outputs = render_outputs_of([ROOT / "machines"])
    flows = [name for name in outputs if name.startswith("flow_") and name.endswith(".py")]
    assert flows
    for name in [*flows, "__init__.py"]:
        text = outputs[name].decode("utf-8")
        assert ruff_format(text) == text, name


FLOW_SHAPES = """
machine Shop { event Order { item_identifier_that_is_long: str, quantity: int } event Cancel { reason: str }
  initial state Open { on Order -> Open on Cancel -> Done } final state Done }
flow OrderingWithAVeryLongNameToMakeTheLinesLonger saga "A saga whose doc string is long enough that its line cannot fit in one hundred columns at all." {
  input { item_identifier_that_is_long: str, quantity: int }
  step first_step_with_a_long_name: Shop.Order(quantity = 3) compensate Shop.Cancel(reason = "a reason that is long enough")
  step second: Shop.Order() irreversible
}
flow Choose conditional on quantity {
  input { quantity: int, item_identifier_that_is_long: str }
  when big { step one: Shop.Order() irreversible }
  when small { step two: await Shop in Done within 1h }
}
"""


def test_flow_shapes_match_ruff(tmp_path: Path) -> None:
    source = tmp_path / "shop.fsm"
    source.write_text(FLOW_SHAPES, encoding="utf-8")
    outputs = render_outputs_of([source])
    flows = [name for name in outputs if name.startswith("flow_") and name.endswith(".py")]
    assert len(flows) == 2
    for name in flows:
        text = outputs[name].decode("utf-8")
        assert ruff_format(text) == text, name


def render_outputs_of(paths: list[Path]) -> dict[str, bytes]:
    report = check_paths(paths)
    assert not report.errors(), report.diagnostics
    return render_outputs(report.machines, draw_svg=False, known=report.known, flows=report.flows)


LONG_SHAPES = [
    # enum fields too long for a line, optional and required
    "machine M { event Go { status: enum(active, inactive, pending_review, suspended_for_fraud,"
    " closed_by_owner)?, s2: enum(active, inactive, pending_review, suspended_for_fraud,"
    " closed_by_owner, a, b, c, d, e, f)?, s3: enum(active, inactive, pending_review,"
    " suspended_for_fraud, closed_by_owner, a, b, c, d, e, f) }"
    " initial state A { on Go -> B } final state B }",
    # wide and combining characters in docs
    'machine M "説明書き説明書き説明書き説明書き説明書き説明書き説明書き説明書き説明書き" {'
    ' event Go "イベントの説明イベントの説明イベントの説明イベントの説明イベントの説明イベント"'
    ' initial state A "状態の説明状態の説明状態の説明状態の説明状態の説明状態の説明状態の説明状態" {'
    ' on Go -> B } final state B "' + "é\u0303" * 46 + '" }',
    *(
        f"machine M {{ event E{'v' * n} {{ f: str }} event Go initial state A {{"
        f" on E{'v' * n} -> B when g_{'x' * (n // 2)} do act_{'y' * (n // 2)} on Go -> A }}"
        " final state B }"
        for n in (40, 55, 70, 85, 100)
    ),
]


@pytest.mark.parametrize("text", LONG_SHAPES, ids=range(len(LONG_SHAPES)))
def test_long_names_and_fields_match_ruff(text: str) -> None:
    machine, diagnostics = parse_text(text, "m.fsm")
    assert machine is not None, diagnostics
    tables = lower(machine, others=[machine])
    assert generate_tables(tables) == via_ruff(tables)
