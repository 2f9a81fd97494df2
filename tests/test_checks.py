"""The checker: one fixture per code (expected findings written in the fixture), the
five-mistakes file, and the rules' finer points on small inline machines."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from autonomic.compiler.checks import CheckReport, check_machines, check_paths
from autonomic.compiler.errors import CODES, Diagnostic, Severity
from autonomic.compiler.model import Machine
from autonomic.compiler.parser import parse_text
from autonomic.compiler.report import render_text

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "checks"
FIXTURE_FILES = sorted(FIXTURES.glob("*.fsm"))
EXPECT = re.compile(r"^# expect: ([EW][0-9]{3}) ([0-9]+):([0-9]+)$", re.MULTILINE)

# Codes that no single file can show: a path that does not exist, a folder without files.
# Codes about paths and outputs rather than machine text: tests/test_cli.py covers E006, E007.
# Command problems, not findings in a file: E170 is tested in test_diff (a real store).
CODES_WITHOUT_FIXTURE = {"E003", "E006", "E007", "E170", "W207"}

Finding = tuple[str, int, int]


def expected_findings(path: Path) -> list[Finding]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    return sorted((code, int(line), int(col)) for code, line, col in EXPECT.findall(text))


def findings(diagnostics: Sequence[Diagnostic]) -> list[Finding]:
    return sorted((d.code, d.span.line, d.span.column) for d in diagnostics)


def check_text(text: str, path: str = "inline.fsm", *others: str) -> list[Diagnostic]:
    """Checks `text` (plus other machines that it may emit to) as parsed machines."""
    machines: list[Machine] = []
    parsed_diagnostics: list[Diagnostic] = []
    for index, source in enumerate((text, *others)):
        # Other machines get paths without .fsm, so that W206 does not judge their names.
        machine, diagnostics = parse_text(source, path if index == 0 else f"<other {index}>")
        parsed_diagnostics.extend(diagnostics)
        assert machine is not None, diagnostics
        machines.append(machine)
    assert not parsed_diagnostics, parsed_diagnostics
    return check_machines(machines)


def codes(diagnostics: Sequence[Diagnostic]) -> list[str]:
    return [d.code for d in diagnostics]


# ---------------------------------------------------------------- fixtures


@pytest.mark.parametrize("fixture", FIXTURE_FILES, ids=[p.stem for p in FIXTURE_FILES])
def test_fixture_reports_exactly_its_expected_findings(fixture: Path) -> None:
    expected = expected_findings(fixture)
    assert expected, f"{fixture.name} has no `# expect:` lines"
    report = check_paths([fixture])
    assert findings(report.diagnostics) == expected
    for diagnostic in report.diagnostics:
        assert diagnostic.hint, diagnostic
        assert diagnostic.span.path == str(fixture)
        assert diagnostic.severity is CODES[diagnostic.code][0]


@pytest.mark.parametrize("fixture", FIXTURE_FILES, ids=[p.stem for p in FIXTURE_FILES])
def test_fixture_is_named_after_the_code_it_shows(fixture: Path) -> None:
    prefix = fixture.stem.split("_")[0].upper()
    if prefix in ("FIVE", "MIXED"):
        return  # files of several mistakes
    assert prefix in CODES
    assert prefix in {code for code, _, _ in expected_findings(fixture)}


def test_every_code_has_a_fixture() -> None:
    covered = {p.stem.split("_")[0].upper() for p in FIXTURE_FILES}
    missing = set(CODES) - covered - CODES_WITHOUT_FIXTURE
    assert not missing, f"codes without a fixture in {FIXTURES}: {sorted(missing)}"


def test_five_mistakes_give_five_diagnostics_at_their_positions() -> None:
    fixture = FIXTURES / "five_mistakes.fsm"
    report = check_paths([fixture])
    assert len(report.diagnostics) == 5
    assert len({d.code for d in report.diagnostics}) == 5
    assert findings(report.diagnostics) == expected_findings(fixture)
    text = render_text(report)
    for diagnostic in report.diagnostics:
        head = f"{fixture}:{diagnostic.span.line}:{diagnostic.span.column}: {diagnostic.code}"
        assert head in text
    assert "5 errors in 1 file" in text


def test_findings_come_sorted_by_position() -> None:
    report = check_paths([FIXTURES])
    keys = [d.sort_key() for d in report.diagnostics]
    assert keys == sorted(keys)
    assert len(report.sources) == len(FIXTURE_FILES)


# ---------------------------------------------------------------- the committed machines


def test_committed_machines_pass_strict() -> None:
    machines = REPO / "machines"
    if not any(machines.glob("*.fsm")):
        pytest.skip("machines/ holds no .fsm files yet")
    report = check_paths([machines])
    assert [d for d in report.diagnostics] == []
    assert not report.failed(strict=True)
    machine_files = [p for p in machines.glob("*.fsm") if "\nmachine " in p.read_text()]
    assert len(report.machines) == len(machine_files)
    assert [f.name.value for f in report.flows] == [
        "SubscriptionUpgrade",
        "CustomerSignup",
        "PaymentProcessed",
        "NoisyNeighbour",
        "SubscriptionCancellation",
    ]


# ---------------------------------------------------------------- the report object


def test_report_failed_depends_on_strict() -> None:
    report = check_paths([FIXTURES / "w201_unreachable.fsm"])
    assert report.errors() == []
    assert codes(report.warnings()) == ["W201"]
    assert not report.failed(strict=False)
    assert report.failed(strict=True)
    errors = check_paths([FIXTURES / "e104_unknown_state.fsm"])
    assert errors.failed(strict=False)


def test_machines_with_findings_are_still_in_the_report() -> None:
    report = check_paths([FIXTURES / "e104_unknown_state.fsm", FIXTURES / "e001_missing_arrow.fsm"])
    # The file with a syntax error is read past it (a missing `->` is inserted) and checked.
    assert [m.name.value for m in report.machines] == ["E104UnknownState", "E001MissingArrow"]
    assert set(report.sources) == {
        str(FIXTURES / "e104_unknown_state.fsm"),
        str(FIXTURES / "e001_missing_arrow.fsm"),
    }


# ---------------------------------------------------------------- paths


def test_missing_path_is_e003_not_an_exception(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "gone.fsm"
    report = check_paths([missing])
    assert findings(report.diagnostics) == [("E003", 1, 1)]
    assert report.diagnostics[0].span.path == str(missing)
    assert report.failed(strict=False)


def test_folder_expands_recursively_sorted_and_skips_hidden(tmp_path: Path) -> None:
    good = (FIXTURES / "w201_unreachable.fsm").read_text()
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "w201_unreachable.fsm").write_text(good)
    (tmp_path / ".hidden" / "w201_unreachable.fsm").write_text("garbage")
    (tmp_path / "notes.txt").write_text("not a machine")
    (tmp_path / "a.fsm").write_text("machine A {")
    report = check_paths([tmp_path])
    assert list(report.sources) == [
        str(tmp_path / "a.fsm"),
        str(tmp_path / "b" / "w201_unreachable.fsm"),
    ]
    assert codes(report.diagnostics) == ["E001", "W201"]


def test_the_same_file_twice_is_checked_once(tmp_path: Path) -> None:
    fixture = FIXTURES / "w201_unreachable.fsm"
    report = check_paths([fixture, fixture, FIXTURES / "." / fixture.name])
    assert codes(report.diagnostics) == ["W201"]


def test_folder_without_machine_files_is_w207(tmp_path: Path) -> None:
    report = check_paths([tmp_path])
    assert findings(report.diagnostics) == [("W207", 1, 1)]
    assert report.diagnostics[0].span.path == str(tmp_path)
    assert report.sources == {}


def test_module_name_collision_across_files_is_e131(tmp_path: Path) -> None:
    body = "{ event Go initial state A { on Go -> B } final state B }"
    (tmp_path / "quota_sla.fsm").write_text(f"machine QuotaSla {body}\n")
    (tmp_path / "quota_sla_copy.fsm").write_text(f"\n\nmachine QuotaSLA {body}\n")
    report = check_paths([tmp_path])
    assert findings(report.diagnostics) == [("E131", 3, 9), ("W206", 3, 9)]
    e131 = report.diagnostics[0]
    assert e131.span.path == str(tmp_path / "quota_sla_copy.fsm")
    assert "quota_sla" in e131.message and "QuotaSla" in e131.message


# ---------------------------------------------------------------- emitted events


BILLING = """machine Billing {
  event StartBilling
  initial state Idle { on StartBilling -> Done }
  final state Done
}
"""

EMITTER = """machine Entitlement {
  event Approve
  initial state Pending { on Approve -> Active emit Billing.StartBiling }
  final state Active
}
"""


def test_emit_looks_up_a_sibling_file_quietly(tmp_path: Path) -> None:
    (tmp_path / "billing.fsm").write_text(BILLING)
    (tmp_path / "entitlement.fsm").write_text(EMITTER)
    (tmp_path / "broken.fsm").write_text("machine Broken { state }")
    report = check_paths([tmp_path / "entitlement.fsm"])
    assert findings(report.diagnostics) == [("E140", 3, 61)]
    assert report.diagnostics[0].hint == "did you mean 'StartBilling'?"
    assert list(report.sources) == [str(tmp_path / "entitlement.fsm")]


def test_emit_to_a_correct_sibling_event_is_clean(tmp_path: Path) -> None:
    (tmp_path / "billing.fsm").write_text(BILLING)
    (tmp_path / "entitlement.fsm").write_text(EMITTER.replace("StartBiling", "StartBilling"))
    assert check_paths([tmp_path / "entitlement.fsm"]).diagnostics == []


def test_emit_to_unknown_machine_suggests_a_known_one() -> None:
    text = EMITTER.replace("Billing.StartBiling", "Biling.StartBilling")
    found = check_text(text, "entitlement.fsm", BILLING)
    assert findings(found) == [("E140", 3, 53)]
    assert found[0].hint == "did you mean 'Billing'?"


def test_bare_emit_names_an_event_of_the_same_machine() -> None:
    text = EMITTER.replace("Billing.StartBiling", "Approve")
    assert check_text(text, "entitlement.fsm") == []


def test_emits_of_timers_escalations_and_retry_ends_are_checked() -> None:
    text = """machine Emits {
  event Go
  event Fail
  initial state A {
    on Go -> B
    after 1h -> B emit Nope1
    escalate { after 1h notify queue q  after 2h -> B emit Nope2 }
  }
  state B { on Go -> C }
  state C { on Go -> D }
  final state D
  retry R on Fail { from B step C after 1h exhausted -> D emit Nope3 }
}
"""
    found = check_text(text, "emits.fsm")
    # The escalation end at 2h is beaten by the timer at 1h (W208); its emit is checked anyway.
    assert sorted(findings(found)) == [
        ("E140", 6, 24),
        ("E140", 7, 60),
        ("E140", 12, 64),
        ("W208", 7, 47),
    ]
    assert [d.message for d in found if d.code == "E140"] == [
        "machine 'Emits' has no event 'Nope1'",
        "machine 'Emits' has no event 'Nope2'",
        "machine 'Emits' has no event 'Nope3'",
    ]


# ---------------------------------------------------------------- suppressions


def test_allow_on_an_item_suppresses_findings_inside_it_only() -> None:
    text = """machine Allowed {
  event Go
  initial state Start { on Go -> Done }
  final state Done
  @allow(W201, "kept while the import job is migrated")
  state Orphan { on Go -> Done }
  state Stray { on Go -> Done }
}
"""
    found = check_text(text, "allowed.fsm")
    assert findings(found) == [("W201", 7, 9)]


def test_allow_on_the_machine_covers_the_whole_file() -> None:
    text = """@allow(W201, "states kept for a later issue")
machine Allowed {
  event Go
  initial state Start { on Go -> Done }
  final state Done
  state Orphan { on Go -> Done }
  state Stray { on Go -> Done }
}
"""
    assert check_text(text, "allowed.fsm") == []


def test_allow_of_another_code_does_not_suppress_and_is_unused() -> None:
    text = """machine Allowed {
  event Go
  initial state Start { on Go -> Done }
  final state Done
  @allow(W204, "wrong code")
  state Orphan { on Go -> Done }
}
"""
    assert findings(check_text(text, "allowed.fsm")) == [("W201", 6, 9), ("W205", 5, 3)]


def test_allow_of_a_rule_that_did_not_run_is_not_called_unused() -> None:
    # The misspelled target stops the reachability rules, so W201 could not be judged.
    text = """machine Allowed {
  event Go
  initial state Start { on Go -> Dnoe }
  final state Done
  @allow(W201, "kept for later")
  state Orphan { on Go -> Done }
}
"""
    assert findings(check_text(text, "allowed.fsm")) == [("E104", 3, 34)]


def test_allow_on_an_event_suppresses_w204() -> None:
    text = """machine Allowed {
  event Go
  @allow(W204, "sent by the old API, accepted nowhere on purpose")
  event Legacy
  initial state Start { on Go -> Done }
  final state Done
}
"""
    assert check_text(text, "allowed.fsm") == []


def test_allow_on_a_transition_covers_only_that_row() -> None:
    text = """machine Allowed {
  event Go
  initial state Start {
    @allow(W201, "misplaced")
    on Go -> Done
  }
  final state Done
}
"""
    assert findings(check_text(text, "allowed.fsm")) == [("W205", 4, 5)]


# ---------------------------------------------------------------- transitions


def test_nondeterminism_between_unguarded_rows() -> None:
    text = """machine Rows {
  event Go
  initial state Start {
    on Go -> Done
    on Go -> Failed
  }
  final state Done
  final state Failed
}
"""
    found = check_text(text, "rows.fsm")
    assert findings(found) == [("E108", 5, 8)]
    assert "unguarded" in found[0].message


def test_an_exact_repeat_is_e107_only() -> None:
    text = """machine Rows {
  event Go
  initial state Start {
    on Go -> Done when ready
    on Go -> Failed else
    on Go -> Failed else
    on Go -> Done when ready
  }
  final state Done
  final state Failed
}
"""
    assert findings(check_text(text, "rows.fsm")) == [("E107", 6, 8), ("E107", 7, 8)]


def test_guarded_rows_with_one_else_are_clean() -> None:
    text = """machine Rows {
  event Go
  initial state Start {
    on Go -> Done when ready
    on Go -> Failed when broken
    on Go -> Start else
  }
  final state Done
  final state Failed
}
"""
    assert check_text(text, "rows.fsm") == []


def test_two_retry_ladders_on_one_state_and_event_collide() -> None:
    text = """machine Ladders {
  event Pay
  event Fail
  initial state A { on Pay -> Done }
  state S1 { on Pay -> Done }
  state S2 { on Pay -> Done }
  final state Done
  final state Gave
  retry First on Fail { from A step S1 after 1h exhausted -> Gave }
  retry Second on Fail { from A step S2 after 1h exhausted -> Gave }
}
"""
    found = check_text(text, "ladders.fsm")
    assert findings(found) == [("E108", 10, 31)]
    assert "'First' and 'Second'" in found[0].message


def test_ignoring_a_ladder_event_in_a_ladder_state_is_e112() -> None:
    text = """machine Ladders {
  event Pay
  event Fail
  initial state A { on Pay -> Done }
  state S1 { on Pay -> Done  ignore Fail }
  final state Done
  final state Gave
  retry First on Fail { from A step S1 after 1h exhausted -> Gave }
}
"""
    assert findings(check_text(text, "ladders.fsm")) == [("E112", 5, 37)]


# ---------------------------------------------------------------- final states and timers


def test_final_state_with_escalation_or_as_retry_entry_is_e111() -> None:
    text = """machine Finals {
  event Go
  event Fail
  initial state A { on Go -> Done }
  state S1 { on Go -> Done }
  final state Done { escalate Nag { after 1h notify role owner } }
  final state Gave
  retry R on Fail { from A, Done step S1 after 1h exhausted -> Gave }
}
"""
    assert findings(check_text(text, "finals.fsm")) == [("E111", 6, 31), ("E111", 8, 29)]


def test_timers_due_together_race_across_kinds() -> None:
    text = """machine Timers {
  event Go
  event Fail
  initial state A {
    on Go -> B
    after 2h -> B
    escalate { after 1h notify queue q  after 2h -> Done }
  }
  state B { on Go -> Done  after 1h -> Done }
  final state Done
  final state Gave
  retry R on Fail { from A step B after 1h exhausted -> Gave }
}
"""
    found = check_text(text, "timers.fsm")
    assert findings(found) == [("E115", 7, 47), ("E115", 12, 41)]


def test_escalation_notification_may_share_a_moment_with_a_timer() -> None:
    text = """machine Timers {
  event Go
  initial state A {
    on Go -> Done
    after 1h do remind
    escalate { after 1h notify queue q }
  }
  final state Done
}
"""
    assert check_text(text, "timers.fsm") == []


# ---------------------------------------------------------------- ladders


def test_retry_ladder_mistakes_are_e122() -> None:
    text = """machine Ladders {
  event Go
  event Fail
  initial state A { on Go -> S1 }
  state S1 { on Go -> S2 }
  state S2 { on Go -> Done }
  final state Done
  retry NoSteps on Fail { from S2 exhausted -> Done }
  retry Loops on Fail {
    from A, A step S1 after 1h step S1 after 2h step A after 3h exhausted -> S1 }
  retry Open on Go { from Done }
}
"""
    found = check_text(text, "ladders.fsm")
    e122 = [(d.span.line, d.span.column, d.message) for d in found if d.code == "E122"]
    assert [(line, col) for line, col, _ in e122] == [
        (8, 9),
        (10, 13),
        (10, 37),
        (10, 54),
        (10, 78),
        (11, 9),
        (11, 9),
    ]
    messages = " | ".join(m for _, _, m in e122)
    assert "has no steps" in messages
    assert "listed twice" in messages
    assert "two steps" in messages
    assert "also an entry state" in messages
    assert "exhausted into its own step" in messages
    assert "no `exhausted -> State` end" in messages


def test_retry_steps_must_increase() -> None:
    text = """machine Ladders {
  event Go
  event Fail
  initial state A { on Go -> Done }
  state S1 { on Go -> Done }
  state S2 { on Go -> Done }
  final state Done
  final state Gave
  retry R on Fail { from A step S1 after 3h step S2 after 3h exhausted -> Gave }
}
"""
    assert findings(check_text(text, "ladders.fsm")) == [("E120", 9, 59)]


def test_escalation_deadline_against_the_end_and_without_next_step() -> None:
    text = """machine Ladders {
  event Go
  initial state A {
    on Go -> Done
    escalate One { after 1h notify queue q within 1h  after 2h -> Done }
    escalate Two { after 3h notify role r within 30d }
    escalate Three { after 4h notify role r within 1h  after 270m -> Done }
  }
  final state Done
}
"""
    found = check_text(text, "ladders.fsm")
    deadlines = [d for d in found if d.code != "W208"]
    assert findings(deadlines) == [("E121", 7, 52)]
    assert deadlines[0].hint == "shorten it to at most 30m or move the next step later"


def test_empty_escalation_is_e122() -> None:
    text = """machine Ladders {
  event Go
  initial state A { on Go -> Done  escalate Nothing { } }
  final state Done
}
"""
    assert findings(check_text(text, "ladders.fsm")) == [("E122", 3, 45)]


# ---------------------------------------------------------------- reachability


def test_escalation_ends_and_retry_edges_make_states_reachable() -> None:
    text = """machine Reach {
  event Go
  event Fail
  initial state A { on Go -> Done  escalate { after 1h notify queue q  after 2h -> Late } }
  state Late { on Go -> Done }
  state Retry1 { on Go -> Done }
  state Collections { on Go -> Done }
  final state Done
  retry R on Fail { from Late step Retry1 after 1h exhausted -> Collections }
}
"""
    assert check_text(text, "reach.fsm") == []


def test_perpetual_states_and_machines_need_no_final_state() -> None:
    text = """machine Catalog perpetual {
  event Go
  initial state Draft { on Go -> Listed }
  state Listed { on Go -> Draft }
}
"""
    assert check_text(text, "catalog.fsm") == []
    dead_end = text.replace("state Listed { on Go -> Draft }", "perpetual state Listed")
    assert check_text(dead_end, "catalog.fsm") == []
    trap = text.replace("state Listed { on Go -> Draft }", "state Listed")
    assert findings(check_text(trap, "catalog.fsm")) == [("W203", 4, 9)]


def test_unreachable_states_are_not_also_told_they_cannot_finish() -> None:
    text = """machine Reach {
  event Go
  initial state A { on Go -> Done }
  final state Done
  state Island { on Go -> Island }
  state Rock
}
"""
    assert findings(check_text(text, "reach.fsm")) == [("W201", 5, 9), ("W201", 6, 9)]


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("declaration", "column", "why"),
    [
        ("state mro { on Go -> Done }", 9, "enum"),
        ("state _Hidden { on Go -> Done }", 9, "underscore"),
        ("state match { on Go -> Done }", 9, "soft keyword"),
        ("state None { on Go -> Done }", 9, "keyword"),
    ],
)
def test_state_names_that_break_generated_enums(declaration: str, column: int, why: str) -> None:
    name = declaration.split()[1]
    text = f"""machine Names {{
  event Go
  initial state Start {{ on Go -> Done when even  on Go -> {name} when odd  on Go -> Start else }}
  {declaration}
  final state Done
}}
"""
    found = [d for d in check_text(text, "names.fsm") if d.span.line == 4]
    assert findings(found) == [("E130", 4, column)]
    assert why in found[0].message


@pytest.mark.parametrize("field", ["model_dump", "model_anything", "copy", "datetime", "_private"])
def test_payload_fields_that_break_generated_models(field: str) -> None:
    text = f"""machine Names {{
  event Go {{ {field}: str }}
  initial state Start {{ on Go -> Done }}
  final state Done
}}
"""
    assert findings(check_text(text, "names.fsm")) == [("E130", 2, 14)]


def test_machine_whose_module_name_is_a_keyword() -> None:
    text = """machine Import {
  event Go
  initial state Start { on Go -> Done }
  final state Done
}
"""
    found = check_text(text, "import.fsm")
    assert findings(found) == [("E130", 1, 9)]
    assert "'import'" in found[0].message


def test_guard_and_action_names_are_identifiers() -> None:
    text = """machine Names {
  event Go
  initial state Start {
    on Go -> Done when lambda do pass, __init__
    on Go -> Start else
  }
  final state Done
}
"""
    found = check_text(text, "names.fsm")
    assert findings(found) == [("E130", 4, 24), ("E130", 4, 34), ("E130", 4, 40)]
    assert "protocol" in found[2].message  # each becomes a method of the Bindings protocol


# ---------------------------------------------------------------- misc


def test_w204_is_skipped_while_event_references_are_misspelled() -> None:
    text = """machine Events {
  event Go
  event Stop
  initial state Start { on Go -> Done  on Stpo -> Done }
  final state Done
}
"""
    assert findings(check_text(text, "events.fsm")) == [("E106", 4, 43)]


def test_retry_ladder_event_counts_as_handled() -> None:
    text = """machine Events {
  event Go
  event Fail
  initial state Start { on Go -> Done }
  state S1 { on Go -> Done }
  final state Done
  final state Gave
  retry R on Fail { from Start step S1 after 1h exhausted -> Gave }
}
"""
    assert check_text(text, "events.fsm") == []


def test_severities_follow_the_code_table() -> None:
    report: CheckReport = check_paths(FIXTURE_FILES)
    for diagnostic in report.diagnostics:
        expected = CODES[diagnostic.code][0]
        assert diagnostic.severity is expected
        assert (diagnostic.severity is Severity.WARNING) == diagnostic.code.startswith("W")


def test_a_flows_file_alone_is_checked_against_the_machines_beside_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`autonomic check machines/flows.fsm`: the machines the flows name are read from the
    same folder (not reported on), instead of 32 E160 'unknown machine'."""
    from autonomic.compiler.cli import main

    flows = REPO / "machines" / "flows.fsm"
    report = check_paths([flows])
    assert report.diagnostics == [] and len(report.flows) == 5 and report.machines == []
    named = {"Billing", "Compliance", "CustomerAccount", "Entitlement", "QuotaSla", "Subscription"}
    assert {m.name.value for m in report.known} == named  # the machines the flows name
    assert main(["check", str(flows)]) == 0
    assert capsys.readouterr().out.strip() == "1 file checked, no findings"
    # Without the machines beside it, the unknown names are still reported.
    alone = tmp_path / "flows.fsm"
    alone.write_bytes(flows.read_bytes())
    assert set(codes(check_paths([alone]).diagnostics)) == {"E160"}


def test_always_accept_finds_a_charge_state_without_a_dispute_row(tmp_path: Path) -> None:
    """Billing declares `always accept PaymentDisputed`: with the row dropped from a retry
    attempt in flight (as it was missing before), the check names that state."""
    text = (REPO / "machines" / "billing.fsm").read_text(encoding="utf-8")
    state = 'state Retry2Charging "'
    start = text.index(state)
    row = "    on PaymentDisputed -> DisputedUnpaid do freeze_disputed_funds\n"
    at = text.index(row, start)
    assert at < text.index("  }\n", start)
    for source in (REPO / "machines").glob("*.fsm"):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    assert check_paths([tmp_path]).diagnostics == []
    (tmp_path / "billing.fsm").write_text(text[:at] + text[at + len(row) :], encoding="utf-8")
    (found,) = check_paths([tmp_path]).diagnostics
    assert (found.code, found.span.line) == ("E123", text[:start].count("\n") + 1)
    assert "'Retry2Charging' neither handles nor ignores 'PaymentDisputed'" in found.message


@pytest.mark.parametrize(
    ("file", "written", "duration"),
    [
        ("billing.fsm", "after 1h -> RefundRetry1", "99999999999999999999d"),
        ("flows.fsm", "within 30s quorum", "36501d"),
        ("billing.fsm", "cooldown 1m", "9999999999999w"),
    ],
)
def test_a_duration_beyond_100_years_is_reported_not_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, file: str, written: str, duration: str
) -> None:
    """A timer, a fan-out deadline or a cool-down too long for the runtime's 64-bit
    milliseconds is E124 at its position; `build` writes nothing (it used to generate it, and
    the first dispatch into the state died with OverflowError)."""
    from autonomic.compiler.cli import main

    machines = tmp_path / "machines"
    machines.mkdir()
    for source in (REPO / "machines").glob("*.fsm"):
        (machines / source.name).write_bytes(source.read_bytes())
    path = machines / file
    text = path.read_text(encoding="utf-8")
    keyword, _, *rest = written.split(" ")
    at = text.index(written) + len(keyword) + 1
    path.write_text(text.replace(written, " ".join([keyword, duration, *rest]), 1), "utf-8")
    line = text.count("\n", 0, at) + 1
    column = at - text.rfind("\n", 0, at)
    report = check_paths([machines])
    assert findings(report.diagnostics) == [("E124", line, column)]
    assert main(["build", str(machines), "--out", str(tmp_path / "gen"), "--no-svg"]) == 1
    out = capsys.readouterr()
    assert f"{path}:{line}:{column}: E124" in out.out + out.err
    assert not (tmp_path / "gen" / "billing.py").exists()


def test_a_misspelt_fallback_is_named_at_check_or_at_load(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """W209: a fallback a letter from an action the machine runs is named at check time with
    a did-you-mean; a backup named after the call it backs is not. A misspelling of a backup
    that nothing in the machine names (the only place the right name is written is the
    bindings) is named when the machine is loaded: R011, with the bound name to use."""
    from autonomic.compiler.cli import main
    from autonomic.runtime.errors import BindingError
    from autonomic.runtime.runtime import Runtime
    from autonomic.runtime.simulate import load_machine

    machines = tmp_path / "machines"
    machines.mkdir()
    for source in (REPO / "machines").glob("*.fsm"):
        (machines / source.name).write_bytes(source.read_bytes())
    billing = machines / "billing.fsm"
    text = billing.read_text(encoding="utf-8")
    written = "fallback charge_backup_processor"
    at = text.index(written) + len("fallback ")
    line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)

    def check_with(fallback: str) -> list[Diagnostic]:
        billing.write_text(text.replace(written, f"fallback {fallback}"), encoding="utf-8")
        return list(check_paths([machines]).diagnostics)

    [typo] = check_with("submit_refnd")
    assert (typo.code, typo.span.line, typo.span.column) == ("W209", line, column)
    assert typo.hint is not None and "did you mean 'submit_refund'?" in typo.hint
    assert check_with("submit_charge_backup") == []
    assert check_with("charge_backup_procesor") == []
    assert main(["build", str(machines), "--out", str(tmp_path / "gen"), "--no-svg"]) == 0
    capsys.readouterr()
    spec = load_machine(str(tmp_path / "gen" / "billing.py"))
    actions = {name: (lambda ctx: None) for name in spec.actions}
    actions["charge_backup_processor"] = actions.pop("charge_backup_procesor")
    guards = {name: (lambda ctx: True) for name in spec.guards}
    with pytest.raises(BindingError) as caught:
        Runtime().load(spec, guards, actions)
    problems = "\n".join(caught.value.problems)
    assert f"billing.fsm:{line}:{column}: R011" in problems
    assert "did you mean 'charge_backup_processor'?" in problems
