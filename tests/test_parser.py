"""The front end: each construct parses into the right IR with the right spans, and each
syntax mistake gives a friendly message at its exact line and column."""

from __future__ import annotations

from pathlib import Path

import pytest
from autonomic.compiler import parser
from autonomic.compiler.errors import Diagnostic, SourceSpan
from autonomic.compiler.model import Machine, Name, snake_case
from autonomic.compiler.parser import (
    _EXAMPLES,
    decode_source,
    parse_recovering,
    parse_source,
    parse_text,
    read_source,
    source_lines,
)

FIXTURES = Path(__file__).parent / "fixtures" / "checks"


def parse_ok(text: str, path: str = "m.fsm") -> Machine:
    machine, diagnostics = parse_text(text, path)
    assert diagnostics == []
    assert machine is not None
    return machine


def parse_error(text: str) -> Diagnostic:
    machine, diagnostics = parse_text(text, "bad.fsm")
    assert machine is None
    assert len(diagnostics) == 1
    return diagnostics[0]


def at(span: SourceSpan) -> tuple[int, int, int, int]:
    return (span.line, span.column, span.end_line, span.end_column)


def name_at(name: Name | None) -> tuple[str, int, int, int]:
    assert name is not None
    return (name.value, name.span.line, name.span.column, name.span.end_column)


# ---------------------------------------------------------------- constructs


def test_machine_name_doc_perpetual_and_span() -> None:
    text = 'machine Catalog perpetual "The product catalog." {\n  initial state Draft\n}\n'
    machine = parse_ok(text)
    assert name_at(machine.name) == ("Catalog", 1, 9, 16)
    assert machine.doc == "The product catalog."
    assert machine.perpetual is True
    assert at(machine.span) == (1, 1, 3, 2)
    assert machine.path == "m.fsm"
    assert len(machine.source_sha256) == 64


def test_machine_without_doc_is_not_perpetual() -> None:
    machine = parse_ok("machine M { }")
    assert machine.doc is None
    assert machine.perpetual is False
    assert machine.states == () and machine.events == () and machine.retries == ()


def test_annotations_become_suppressions_inside_their_item_span() -> None:
    text = (
        '@allow(W206, "named for the seed")\n'
        "machine M {\n"
        '  @allow(W204, "kept")  event E\n'
        '  @allow(W201, "later") initial state A\n'
        "}\n"
    )
    machine = parse_ok(text)
    (allow,) = machine.suppressions
    assert (allow.code, allow.reason) == ("W206", "named for the seed")
    assert at(allow.span) == (1, 1, 1, 35)
    assert at(machine.span)[:2] == (1, 1)  # the machine item starts at its annotation
    event = machine.events[0]
    assert [(s.code, s.reason) for s in event.suppressions] == [("W204", "kept")]
    assert at(event.span) == (3, 3, 3, 32)
    state = machine.states[0]
    assert [s.code for s in state.suppressions] == ["W201"]
    assert at(state.span)[:2] == (4, 3)


def test_event_fields_of_every_type() -> None:
    text = """machine M {
  event Approve "An approver decided." {
    approver: str "Who decided",
    note: str?,
    tier: enum(basic, "pro plan", gold,),
    amount: decimal, at: datetime
    count: int
    ok: bool?
  }
}
"""
    event = parse_ok(text).events[0]
    assert name_at(event.name) == ("Approve", 2, 9, 16)
    assert event.doc == "An approver decided."
    fields = {f.name.value: f for f in event.fields}
    assert list(fields) == ["approver", "note", "tier", "amount", "at", "count", "ok"]
    assert [(f.type.kind, f.type.optional) for f in event.fields] == [
        ("str", False),
        ("str", True),
        ("enum", False),
        ("decimal", False),
        ("datetime", False),
        ("int", False),
        ("bool", True),
    ]
    assert fields["approver"].doc == "Who decided"
    assert at(fields["approver"].span) == (3, 5, 3, 32)
    assert at(fields["approver"].type.span) == (3, 15, 3, 18)
    tier = fields["tier"].type
    assert [lit.value for lit in tier.literals] == ["basic", "pro plan", "gold"]
    assert name_at(tier.literals[1]) == ("pro plan", 5, 23, 33)
    assert at(tier.span) == (5, 11, 5, 41)


def test_optional_enum_field() -> None:
    event = parse_ok("machine M { event E { t: enum(a, b)? } }").events[0]
    assert event.fields[0].type.kind == "enum"
    assert event.fields[0].type.optional is True


def test_event_without_body_or_doc() -> None:
    event = parse_ok("machine M { event Ping }").events[0]
    assert event.fields == () and event.doc is None


def test_state_flags_and_doc() -> None:
    text = """machine M {
  initial state A "Start here."
  final state B
  perpetual state C { }
  initial final state D
}
"""
    states = parse_ok(text).states
    assert [(s.name.value, s.initial, s.final, s.perpetual) for s in states] == [
        ("A", True, False, False),
        ("B", False, True, False),
        ("C", False, False, True),
        ("D", True, True, False),
    ]
    assert states[0].doc == "Start here."
    assert name_at(states[0].name) == ("A", 2, 17, 18)
    assert at(states[2].span) == (4, 3, 4, 24)


def test_transition_with_guard_actions_and_emits() -> None:
    text = """machine M {
  state A {
    on Approve -> Active when is_approver do record, notify emit Billing.StartBilling, Done
    on Approve -> Rejected else
    on Suspend -> A
  }
}
"""
    first, second, third = parse_ok(text).states[0].transitions
    assert name_at(first.event) == ("Approve", 3, 8, 15)
    assert name_at(first.target) == ("Active", 3, 19, 25)
    assert first.guard is not None and not first.guard.is_else
    assert name_at(first.guard.name) == ("is_approver", 3, 31, 42)
    assert at(first.guard.span) == (3, 26, 3, 42)
    assert [a.value for a in first.actions] == ["record", "notify"]
    assert name_at(first.actions[1]) == ("notify", 3, 54, 60)
    billing, done = first.emits
    assert name_at(billing.machine) == ("Billing", 3, 66, 73)
    assert name_at(billing.event) == ("StartBilling", 3, 74, 86)
    assert at(billing.span) == (3, 66, 3, 86)
    assert done.machine is None and done.event.value == "Done"
    assert at(first.span) == (3, 5, 3, 92)
    assert second.guard is not None and second.guard.is_else
    assert at(second.guard.span) == (4, 28, 4, 32)
    assert third.guard is None and third.actions == () and third.emits == ()


def test_emit_arguments_of_every_kind() -> None:
    text = """machine M {
  state A {
    on Go -> B emit Billing.Charge(amount = amount, note = "a \\"b\\"", fee = 0.50, n = -3,
                                   ok = true, off = false, who = $instance, by = $actor,)
    after 1h emit Done(), Billing.Charge(cause = $event)
  }
}
"""
    state = parse_ok(text).states[0]
    (charge,) = state.transitions[0].emits
    assert name_at(charge.event) == ("Charge", 3, 29, 35)
    assert at(charge.span) == (3, 21, 4, 90)
    written = [(a.field.value, a.value.kind, a.value.text) for a in charge.args]
    assert written == [
        ("amount", "field", "amount"),
        ("note", "string", 'a "b"'),
        ("fee", "number", "0.50"),
        ("n", "number", "-3"),
        ("ok", "bool", "true"),
        ("off", "bool", "false"),
        ("who", "ref", "instance"),
        ("by", "ref", "actor"),
    ]
    first = charge.args[0]
    assert name_at(first.field) == ("amount", 3, 36, 42)
    assert at(first.value.span) == (3, 45, 3, 51)
    assert at(first.span) == (3, 36, 3, 51)
    assert at(charge.args[2].value.span) == (3, 77, 3, 81)
    assert at(charge.args[6].value.span) == (4, 66, 4, 75)  # the `$` is part of the token
    done, again = state.timers[0].emits
    assert done.machine is None and done.args == ()
    assert [(a.field.value, a.value.kind, a.value.text) for a in again.args] == [
        ("cause", "ref", "event")
    ]


def test_emit_without_arguments_has_none() -> None:
    machine = parse_ok("machine M { state A { on Go -> A emit Billing.Charge } }")
    (transition,) = machine.states[0].transitions
    assert transition.emits[0].args == ()


@pytest.mark.parametrize(
    ("bad", "offending", "expected"),
    [
        ("emit X(a b)", "b", "'='"),
        ("emit X(a = 1h)", "1h", "a number such as 12 or 0.50"),  # a duration is no value
        ("emit X(a = 1.)", "1.", "a number"),  # a number needs digits after its point
        # a reference needs a name
        ("emit X(a = $)", "$", "$instance, $actor, $event or $data.FIELD"),
        ("emit X(= 1)", "=", "a name"),  # the field name comes first
        ("emit X(a = b.c)", ".", "','"),  # one name, not a path
    ],
)
def test_malformed_emit_arguments_are_syntax_errors(
    bad: str, offending: str, expected: str
) -> None:
    text = f"machine M {{ state A {{ on Go -> A {bad} }} }}"
    diagnostic = parse_error(text)
    assert diagnostic.code == "E001"
    column = text.index(bad) + bad.index(offending, bad.index("(")) + 1
    assert (diagnostic.span.line, diagnostic.span.column) == (1, column)
    assert diagnostic.hint is not None and expected in diagnostic.hint


def test_timers_with_and_without_target_and_every_unit() -> None:
    text = """machine M {
  state A {
    after 72h -> B emit Billing.Refund
    after 1h do remind, log
    after 250ms -> B
    after 30s -> B
    after 15m -> B
    after 30d -> B
  }
}
"""
    timers = parse_ok(text).states[0].timers
    assert [(t.after.text, t.after.millis) for t in timers] == [
        ("72h", 72 * 3_600_000),
        ("1h", 3_600_000),
        ("250ms", 250),
        ("30s", 30_000),
        ("15m", 900_000),
        ("30d", 30 * 86_400_000),
    ]
    assert at(timers[0].after.span) == (3, 11, 3, 14)
    assert name_at(timers[0].target) == ("B", 3, 18, 19)
    assert [e.event.value for e in timers[0].emits] == ["Refund"]
    assert timers[1].target is None
    assert [a.value for a in timers[1].actions] == ["remind", "log"]


def test_ignore_lists_events() -> None:
    (ignore,) = parse_ok("machine M { state A { ignore Ping, Pong } }").states[0].ignores
    assert [name_at(n) for n in ignore.events] == [("Ping", 1, 30, 34), ("Pong", 1, 36, 40)]
    assert at(ignore.span) == (1, 23, 1, 40)


def test_escalation_ladder() -> None:
    text = """machine M {
  state Pending {
    escalate ApprovalLadder {
      after 24h notify queue manager_review_queue within 4h "Manual review"
      after 48h notify role director
      after 72h -> Active do auto_approve emit Billing.Start
    }
    escalate { after 1h notify queue q }
  }
}
"""
    named, unnamed = parse_ok(text).states[0].escalations
    assert name_at(named.name) == ("ApprovalLadder", 3, 14, 28)
    first, second = named.steps
    assert (first.recipient_kind, first.recipient.value) == ("queue", "manager_review_queue")
    assert first.within is not None and first.within.millis == 4 * 3_600_000
    assert at(first.within.span) == (4, 58, 4, 60)
    assert first.message == "Manual review"
    assert at(first.span) == (4, 7, 4, 76)
    assert (second.recipient_kind, second.within, second.message) == ("role", None, None)
    assert named.end is not None
    assert named.end.after.millis == 72 * 3_600_000
    assert name_at(named.end.target) == ("Active", 6, 20, 26)
    assert [a.value for a in named.end.actions] == ["auto_approve"]
    assert [(e.machine.value if e.machine else None, e.event.value) for e in named.end.emits] == [
        ("Billing", "Start")
    ]
    assert unnamed.name is None and unnamed.end is None and len(unnamed.steps) == 1


def test_retry_ladder() -> None:
    text = """machine M {
  retry PaymentRetry on PaymentFailed {
    from AwaitingPayment, Renewing
    step Retry1 after 1h do retry_charge
    step Retry2 after 3h
    exhausted -> MaxRetriesExceeded do give_up emit Subscription.RenewalFailed
  }
}
"""
    (ladder,) = parse_ok(text).retries
    assert name_at(ladder.name) == ("PaymentRetry", 2, 9, 21)
    assert name_at(ladder.event) == ("PaymentFailed", 2, 25, 38)
    assert [n.value for n in ladder.entry_states] == ["AwaitingPayment", "Renewing"]
    assert [(s.state.value, s.after.text, [a.value for a in s.actions]) for s in ladder.steps] == [
        ("Retry1", "1h", ["retry_charge"]),
        ("Retry2", "3h", []),
    ]
    assert at(ladder.steps[0].span) == (4, 5, 4, 41)
    assert ladder.exhausted is not None
    assert name_at(ladder.exhausted.target) == ("MaxRetriesExceeded", 6, 18, 36)
    assert [a.value for a in ladder.exhausted.actions] == ["give_up"]
    assert ladder.exhausted.emits[0].event.value == "RenewalFailed"


def test_retry_ladder_without_steps_or_end_still_parses() -> None:
    (ladder,) = parse_ok("machine M { retry R on E { from A } }").retries
    assert ladder.steps == () and ladder.exhausted is None


def test_comments_and_string_escapes() -> None:
    text = (
        "# hash comment\n"
        "// slash comment\n"
        'machine M "say \\"hi\\"\\n\\tand \\\\ bye" { # trailing\n'
        "  event E // another\n"
        "}\n"
    )
    machine = parse_ok(text)
    assert machine.doc == 'say "hi"\n\tand \\ bye'
    assert name_at(machine.name) == ("M", 3, 9, 10)
    assert [e.name.value for e in machine.events] == ["E"]


def test_keywords_are_names_where_a_name_is_expected() -> None:
    machine = parse_ok("machine M { event on state when { on on -> after } state after }")
    assert [s.name.value for s in machine.states] == ["when", "after"]
    transition = machine.states[0].transitions[0]
    assert (transition.event.value, transition.target.value) == ("on", "after")


def test_members_may_come_in_any_order() -> None:
    machine = parse_ok("machine M { state A event E retry R on E { from A } state B event F }")
    assert [s.name.value for s in machine.states] == ["A", "B"]
    assert [e.name.value for e in machine.events] == ["E", "F"]


def test_crlf_line_endings_keep_columns() -> None:
    machine = parse_ok("machine M {\r\n  state A {\r\n    on E -> B\r\n  }\r\n}\r\n")
    transition = machine.states[0].transitions[0]
    assert name_at(transition.target) == ("B", 3, 13, 14)


def test_bom_is_ignored() -> None:
    source = decode_source("m.fsm", b"\xef\xbb\xbfmachine M { }")
    machine, diagnostics = parse_source(source)
    assert diagnostics == [] and machine is not None
    assert name_at(machine.name) == ("M", 1, 9, 10)


def test_snake_case_module_names() -> None:
    assert snake_case("QuotaSla") == "quota_sla"
    assert snake_case("QuotaSLA") == "quota_sla"
    assert snake_case("CustomerAccount") == "customer_account"
    assert snake_case("HTTPGateway") == "http_gateway"
    assert snake_case("E104UnknownState") == "e104_unknown_state"
    assert snake_case("billing") == "billing"


# ---------------------------------------------------------------- transform-time findings


def test_unknown_payload_type_is_e114_with_suggestion() -> None:
    machine, diagnostics = parse_text("machine M { event E { n: integer } }")
    assert machine is not None
    assert [(d.code, d.span.line, d.span.column, d.hint) for d in diagnostics] == [
        ("E114", 1, 26, "did you mean 'int'?")
    ]


def test_bad_annotations_are_e005() -> None:
    machine, diagnostics = parse_text('@allow(W999, "x") @allow(W201, "  ") machine M { }')
    assert machine is not None
    assert [(d.code, d.span.column) for d in diagnostics] == [("E005", 8), ("E005", 32)]


# ---------------------------------------------------------------- syntax errors


EXAMPLE_CASES = [(label, snippet) for label, snippets in _EXAMPLES.items() for snippet in snippets]


@pytest.mark.parametrize(("label", "snippet"), EXAMPLE_CASES)
def test_every_known_mistake_gets_its_friendly_message(
    label: tuple[str, str], snippet: str
) -> None:
    diagnostic = parse_error(snippet)
    assert diagnostic.code == "E001"
    assert diagnostic.message.startswith(label[0])
    assert diagnostic.hint == label[1]


@pytest.mark.parametrize(("label", "snippet"), EXAMPLE_CASES)
def test_known_mistakes_are_recognised_in_a_real_context(
    label: tuple[str, str], snippet: str
) -> None:
    # The same mistake inside a machine with more around it (markers, other members,
    # annotations, line breaks) must still get the friendly message.
    if snippet.startswith("machine M {"):
        body = snippet.removeprefix("machine M {")
        snippet = (
            '@allow(W201, "r")\nmachine Real "doc" {\n  event Before\n'
            '  @allow(W204, "r") initial state Start { on Before -> Start }\n' + body
        )
    diagnostic = parse_error(snippet)
    assert diagnostic.message.startswith(label[0]), diagnostic.message


@pytest.mark.parametrize(
    ("text", "line", "column", "message"),
    [
        (
            "machine M {\n  initial state A {\n    on Go B\n  }\n}\n",
            3,
            11,
            "a transition needs '->' between the event and the target state (unexpected 'B')",
        ),
        (
            "machine M {\n  state A {\n    after 24 -> B\n  }\n}\n",
            3,
            11,
            "a duration needs a unit ('24' has none)",
        ),
        (
            "machine M {\n  @allow(W201) state A\n}\n",
            2,
            14,
            "a suppression is written @allow(CODE, \"reason\") (unexpected ')')",
        ),
        (
            "machine M {\n  state A initial\n}\n",
            3,
            1,
            'a state is declared `[initial|final|perpetual] state Name "doc" { ... }` '
            "(unexpected '}')",
        ),
        (
            "machine M { state A { escalate { after 24h notify q } } }",
            1,
            51,
            "an escalation step names whom it notifies (unexpected 'q')",
        ),
        (
            "stat A",
            1,
            1,
            "the file must start with `machine Name {` or `flow Name kind {` (unexpected 'stat')",
        ),
        (
            "machine M {\n  event E { amount decimal }\n}",
            2,
            20,
            "a payload field is written `name: type` (unexpected 'decimal')",
        ),
    ],
)
def test_friendly_messages_point_at_the_offending_token(
    text: str, line: int, column: int, message: str
) -> None:
    diagnostic = parse_error(text)
    assert (diagnostic.span.line, diagnostic.span.column) == (line, column)
    assert diagnostic.message == message


def test_unexpected_token_names_what_was_expected() -> None:
    diagnostic = parse_error("machine M {\n  state A { on E -> }\n}\n")
    assert (diagnostic.span.line, diagnostic.span.column) == (2, 21)
    assert diagnostic.message == "syntax error: unexpected '}'"
    assert diagnostic.hint == "expected a name"


def test_end_of_file_points_after_the_last_character() -> None:
    diagnostic = parse_error("machine M {\n  state A {\n\n\n")
    assert (diagnostic.span.line, diagnostic.span.column) == (2, 12)
    assert diagnostic.message == "syntax error: unexpected end of file"
    assert diagnostic.hint is not None and "'}'" in diagnostic.hint


def test_unterminated_string() -> None:
    diagnostic = parse_error('machine M "never closed {\n}\n')
    assert (diagnostic.span.line, diagnostic.span.column) == (1, 11)
    assert diagnostic.message == "syntax error: unterminated or invalid string"
    assert diagnostic.hint is not None and "close the string" in diagnostic.hint


def test_non_ascii_name_gets_a_hint() -> None:
    diagnostic = parse_error("machine M { state Café }")
    assert (diagnostic.span.line, diagnostic.span.column) == (1, 22)
    assert diagnostic.hint is not None and "ASCII" in diagnostic.hint


def test_token_width_becomes_the_span_width() -> None:
    diagnostic = parse_error("machine M { bogus }")
    assert at(diagnostic.span) == (1, 13, 1, 18)


def test_compound_durations_and_weeks() -> None:
    machine = parse_ok("machine M { state A { after 1d12h -> B after 2w -> B after 1m30s -> B } }")
    assert [t.after.millis for t in machine.states[0].timers] == [
        36 * 3_600_000,
        14 * 86_400_000,
        90_000,
    ]


def test_compound_duration_with_units_out_of_order_is_e118() -> None:
    _, diagnostics = parse_text("machine M { state A { after 30m1h -> B after 1h1h -> B } }")
    assert [(d.code, d.span.column) for d in diagnostics] == [("E118", 29), ("E118", 46)]


def test_empty_file_and_two_machines_are_e004() -> None:
    for text in ("", "  \n# only a comment\n"):
        machine, diagnostics = parse_text(text)
        assert machine is None
        assert [(d.code, d.span.line, d.span.column) for d in diagnostics] == [("E004", 1, 1)]
    machine, diagnostics = parse_text("machine A { }\n\n  machine B { }")
    assert machine is None
    assert [(d.code, d.span.line, d.span.column) for d in diagnostics] == [("E004", 3, 3)]


# ---------------------------------------------------------------- reading files


def test_invalid_utf8_is_e002_at_the_byte() -> None:
    source = decode_source("x.fsm", "machine M {\n  state Ä".encode() + b" \xc3\x28 }")
    assert source.text is None
    (diagnostic,) = source.diagnostics
    assert (diagnostic.code, diagnostic.span.line, diagnostic.span.column) == ("E002", 2, 12)
    assert diagnostic.message == "invalid UTF-8 (byte 0xc3)"


def test_nul_bytes_are_e002() -> None:
    source = decode_source("x.fsm", b"machine M {\n\x00}")
    (diagnostic,) = source.diagnostics
    assert (diagnostic.code, diagnostic.span.line, diagnostic.span.column) == ("E002", 2, 1)
    assert parse_source(source) == (None, [diagnostic])


def test_reading_a_directory_or_a_missing_file_is_e003(tmp_path: Path) -> None:
    for path, why in ((tmp_path, "is a directory"), (tmp_path / "no.fsm", "no such file")):
        source = read_source(path)
        assert source.text is None
        (diagnostic,) = source.diagnostics
        assert diagnostic.code == "E003"
        assert why in diagnostic.message
        assert diagnostic.span.path == str(path)


def test_read_source_keeps_path_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "m.fsm"
    path.write_bytes(b"machine M { }")
    source = read_source(path)
    assert source.path == str(path) and source.text == "machine M { }"
    machine, _ = parse_source(source)
    assert machine is not None and machine.source_sha256 == source.sha256


def test_source_lines_split_only_on_newlines() -> None:
    # A form feed or U+2028 inside a doc string is not a line break for the lexer.
    text = 'machine M "a\x0cb\u2028c" {\r\n  state A { on E -> B }\n}'
    assert source_lines(text) == ['machine M "a\x0cb\u2028c" {', "  state A { on E -> B }", "}"]
    machine = parse_ok(text)
    target = machine.states[0].transitions[0].target
    assert source_lines(text)[target.span.line - 1][target.span.column - 1] == "B"


# ---------------------------------------------------------------- recovery and precise messages


def syntax_findings(text: str) -> list[tuple[int, int, str, str | None]]:
    _, diagnostics, _ = parse_recovering(decode_source("m.fsm", text.encode()))
    return [(d.span.line, d.span.column, d.message, d.hint) for d in diagnostics]


def test_several_syntax_errors_are_reported_in_one_run() -> None:
    text = (
        "machine M {\n"
        "  event E\n"
        "  inital state A {\n"
        "    on E B\n"
        "    after 1.5h -> B\n"
        "    escalation { after 1h notify queue q }\n"
        "    on E -> B when\n"
        "  }\n"
        "  state B { after 48 h -> C }\n"
        "  final state C\n"
        "}\n"
    )
    found = syntax_findings(text)
    assert [(line, column) for line, column, _, _ in found] == [
        (3, 3),
        (4, 10),
        (5, 11),
        (6, 5),
        (7, 19),
        (9, 19),
    ]
    messages = [message for _, _, message, _ in found]
    assert messages[0] == "syntax error: unknown keyword 'inital'"
    assert found[0][3] is not None and found[0][3].startswith("did you mean 'initial'?")
    assert messages[2] == "a duration cannot have a fraction ('1.5h')"
    assert found[3][3] is not None and found[3][3].startswith("did you mean 'escalate'?")
    assert messages[4] == "syntax error: the line ends after 'when'"
    assert messages[5] == "a duration is written without a space before its unit ('48 h')"


@pytest.mark.parametrize(
    ("duration", "message", "hint"),
    [
        ("1.5h", "a duration cannot have a fraction ('1.5h')", "e.g. 1h30m"),
        ("48 h", "a duration is written without a space before its unit ('48 h')", "write 48h"),
        ("2y", "unknown duration unit 'y' in '2y'", "w (weeks)"),
        ("3weeks", "unknown duration unit 'weeks' in '3weeks'", "write 3w (weeks)"),
        ("24", "a duration needs a unit ('24' has none)", "1d12h"),
    ],
)
def test_each_duration_mistake_gets_its_own_message(duration: str, message: str, hint: str) -> None:
    ((line, column, got, got_hint),) = syntax_findings(
        f"machine M {{ initial state A {{ after {duration} -> B }} final state B }}"
    )
    assert (line, column, got) == (1, 37, message)
    assert got_hint is not None and hint in got_hint


def test_expected_tokens_are_listed_in_full() -> None:
    ((_, _, _, hint),) = syntax_findings("machine M { initial state A { on E -> B when x y } }")
    assert hint is not None and "..." not in hint
    assert hint == (
        "expected '@allow', 'after', 'do', 'emit', 'entry', 'escalate', 'ignore', 'keep', 'on' "
        "or '}'"
    )


def test_when_without_a_guard_is_reported_after_when() -> None:
    found = syntax_findings("machine M {\n  initial state A {\n    on E -> B when\n  }\n}\n")
    assert found == [
        (3, 19, "syntax error: the line ends after 'when'", "expected a name after 'when'")
    ]


SEVERAL_MISTAKES = (
    "machine M {\n"
    "  event E\n"
    "  inital state A {\n"
    "    on E B\n"
    "    after 1.5h -> B\n"
    "    escalation { after 1h notify queue q }\n"
    "    on E -> B when\n"
    "  }\n"
    "  state B { after 48 h -> C }\n"
    "  final state C\n"
    "}\n"
)


def test_large_file_recovery_reports_what_lark_recovery_reports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above the size limit the repairs are tried on the LALR table over a window: the same
    findings, in the same words, as lark's re-parses give on a small file."""
    texts = [
        SEVERAL_MISTAKES,
        *(p.read_text(encoding="utf-8") for p in sorted(FIXTURES.glob("*syntax*.fsm"))),
        *(p.read_text(encoding="utf-8") for p in sorted(FIXTURES.glob("e001*.fsm"))),
    ]
    small = [syntax_findings(text) for text in texts]
    monkeypatch.setattr(parser, "_MAX_RECOVERY_BYTES", 0)
    assert [syntax_findings(text) for text in texts] == small
    assert all(small)


def test_every_syntax_error_of_a_large_file_is_reported() -> None:
    lines = synthetic_text(2400).split("\n")  # about 300 KB, over the lark-recovery limit
    rows = [i for i, line in enumerate(lines) if line.startswith("    on ")]
    broken = {rows[100]: " -> ", rows[4000]: "    on ", rows[9000]: ""}
    lines[rows[100]] = lines[rows[100]].replace(" -> ", " ", 1)
    lines[rows[4000]] = lines[rows[4000]].replace("    on ", "    onn ", 1)
    lines[rows[9000]] += " )"
    text = "\n".join(lines)
    assert len(text) > parser._MAX_RECOVERY_BYTES
    found = syntax_findings(text)
    assert sorted({line for line, *_ in found}) == sorted(i + 1 for i in broken)
    assert any(message == "syntax error: unknown keyword 'onn'" for _, _, message, _ in found)


def synthetic_text(n: int) -> str:
    """A valid machine of `n` states, five rows each."""
    lines = ["machine Big {", *(f"  event E{k}" for k in range(5))]
    for i in range(n - 1):
        lines.append(f"  {'initial state' if i == 0 else 'state'} S{i} {{")
        lines += [f"    on E{k} -> S{min(i + 1 + k, n - 1)}" for k in range(5)]
        lines.append("  }")
    return "\n".join([*lines, f"  final state S{n - 1}", "}", ""])
