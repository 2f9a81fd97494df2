"""Code generation: golden files, determinism, mypy --strict, importability, and injection."""

from __future__ import annotations

import ast
import difflib
import os
import shutil
import subprocess
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import pydantic
import pytest
from autonomic.compiler.build import build, render_outputs
from autonomic.compiler.checks import check_paths
from autonomic.compiler.codegen import (
    CONTRACT_MODULE,
    CodegenError,
    generate_module,
    generate_tables,
    has_long_lines,
    template_environment,
)
from autonomic.compiler.lower import LoweringError, lower
from autonomic.compiler.model import Machine, Name
from autonomic.compiler.parser import parse_text
from strategies import load_module, quote

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
GOLDEN_MACHINES = GOLDEN / "machines"
EXPECTED = GOLDEN / "expected"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

# Every call a generated module may make: the contract's constructors and two builtins.
ALLOWED_CALLS = frozenset(
    {
        "Transition",
        "TimerSpec",
        "Notify",
        "Emit",
        "EmitArg",
        "EscalationLadder",
        "EscalationStepSpec",
        "RetryLadderSpec",
        "RetryStepSpec",
        "SourceRef",
        "MachineSpec",
        "frozen_map",
        "frozenset",
    }
)


# What a generated module may take from `typing`.
TYPING_NAMES = frozenset({"Literal", "Protocol", "Unpack", "overload"})


def parse_one(text: str, path: str = "machines/m.fsm") -> Machine:
    machine, diagnostics = parse_text(text, path)
    assert machine is not None, diagnostics
    return machine


def assert_safe_module(source: str) -> ast.Module:
    """The shape every generated module has: a docstring, one import from the contract (and
    typing's own names), assignments and classes; calls only to the contract's constructors."""
    tree = ast.parse(source)
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    contract = [n for n in imports if isinstance(n, ast.ImportFrom) and n.module == CONTRACT_MODULE]
    assert len(contract) == 1 and contract[0].level == 0
    for other in imports:
        if other is not contract[0]:
            assert isinstance(other, ast.ImportFrom) and other.module == "typing", ast.dump(other)
            assert {alias.name for alias in other.names} <= TYPING_NAMES, ast.dump(other)
    typed_face = [
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("Bindings", "Governor")
    ]
    for cls in typed_face:
        assert_typed_face_class(cls)
    for node in ast.walk(tree):
        if node in typed_face:
            continue
        assert not isinstance(
            node,
            ast.Lambda
            | ast.FunctionDef
            | ast.AsyncFunctionDef
            | ast.comprehension
            | ast.Await
            | ast.NamedExpr
            | ast.Global
            | ast.Delete,
        ) or any(node in ast.walk(cls) for cls in typed_face), ast.dump(node)
        if isinstance(node, ast.Call) and not any(node in ast.walk(c) for c in typed_face):
            func = node.func
            if isinstance(func, ast.Subscript):  # dict[K, V](...): the typed empty-or-not map
                assert isinstance(func.value, ast.Name) and func.value.id == "dict"
            else:
                assert isinstance(func, ast.Name) and func.id in ALLOWED_CALLS, ast.dump(func)
    for statement in tree.body[1:]:
        assert isinstance(statement, ast.ImportFrom | ast.Assign | ast.AnnAssign | ast.ClassDef)
        if isinstance(statement, ast.ClassDef) and statement not in typed_face:
            assert [ast.unparse(b) for b in statement.bases] in (["GovernorEnum"], ["Payload"])
            assert not statement.decorator_list and not statement.keywords
            for item in statement.body:
                assert isinstance(item, ast.Expr | ast.Assign | ast.AnnAssign), ast.dump(item)
                if isinstance(item, ast.Expr):
                    assert isinstance(item.value, ast.Constant)
    assert ast.unparse(tree.body[-1]) == "load = Governor.load"
    return tree


def assert_typed_face_class(cls: ast.ClassDef) -> None:
    """Bindings: a Protocol of `...` methods. Governor: the typed handle, whose one statement
    that runs is the call of its base's `_dispatch`."""
    assert not cls.decorator_list and not cls.keywords
    docstring, *members = cls.body
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    if cls.name == "Bindings":
        assert [ast.unparse(b) for b in cls.bases] == ["Protocol"]
    else:
        assert [ast.unparse(b) for b in cls.bases] == ["TypedGovernor[State, Event, Bindings]"]
        assert [ast.unparse(m) for m in members[:2]] == ["MACHINE = MACHINE", "__slots__ = ()"]
        members = members[2:]
    for member in members:
        assert isinstance(member, ast.FunctionDef), ast.dump(member)
        assert [ast.unparse(d) for d in member.decorator_list] in ([], ["overload"])
        body = [ast.unparse(statement) for statement in member.body]
        if body != ["..."]:
            assert cls.name == "Governor" and not member.decorator_list
            assert body == ["return self._dispatch(instance_id, event, payload, options)"]


# ---------------------------------------------------------------- golden files


def test_golden_files(tmp_path: Path) -> None:
    """Build the fixtures (no SVG: its bytes belong to the installed Graphviz) and compare every
    file to tests/golden/expected; UPDATE_GOLDEN=1 rewrites them instead."""
    result = build([GOLDEN_MACHINES], tmp_path, svg=False)
    assert not result.report.diagnostics, result.report.diagnostics
    produced = {p.name: p.read_bytes() for p in sorted(tmp_path.iterdir())}
    if UPDATE:
        shutil.rmtree(EXPECTED, ignore_errors=True)
        EXPECTED.mkdir()
        for name, data in produced.items():
            (EXPECTED / name).write_bytes(data)
    expected = {p.name: p.read_bytes() for p in sorted(EXPECTED.iterdir())}
    assert sorted(produced) == sorted(expected)
    for name, data in produced.items():
        if data != expected[name]:
            diff = difflib.unified_diff(
                expected[name].decode().splitlines(),
                data.decode().splitlines(),
                f"expected/{name}",
                f"produced/{name}",
                lineterm="",
            )
            pytest.fail(f"{name} differs from its golden file:\n" + "\n".join(diff))


def test_golden_module_names_its_source() -> None:
    source = (EXPECTED / "entitlement.py").read_text(encoding="utf-8")
    digest = __import__("hashlib").sha256((GOLDEN_MACHINES / "entitlement.fsm").read_bytes())
    assert "Source: tests/golden/machines/entitlement.fsm\n" in source
    assert f'SOURCE_SHA256 = "{digest.hexdigest()}"' in source
    assert 'SOURCE_PATH = "tests/golden/machines/entitlement.fsm"' in source
    assert_safe_module(source)


# ---------------------------------------------------------------- the imported tables


@pytest.fixture(scope="module")
def entitlement(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    source = (EXPECTED / "entitlement.py").read_text(encoding="utf-8")
    return load_module(source, tmp_path_factory.mktemp("golden"), "entitlement")


def test_enums_hold_declared_names_in_order(entitlement: ModuleType) -> None:
    machine = check_paths([GOLDEN_MACHINES]).machines[1]
    assert machine.name.value == "Entitlement"
    assert [s.value for s in entitlement.State] == [s.name.value for s in machine.states]
    assert [e.value for e in entitlement.Event] == [e.name.value for e in machine.events]
    assert all(member.name == member.value for member in entitlement.State)
    spec = entitlement.MACHINE
    assert spec.state_type is entitlement.State and spec.event_type is entitlement.Event
    assert spec.initial == "PendingApproval"
    assert spec.finals == {"Rejected", "Expired", "Revoked", "PaymentAbandoned"}
    assert spec.doc == "Grants, suspends and revokes access to product features."


def test_guarded_rows_keep_order_with_else_last(entitlement: ModuleType) -> None:
    rows = entitlement.TRANSITIONS["PendingApproval", "Approve"]
    assert [(r.target, r.guard, r.actions) for r in rows] == [
        ("AwaitingPayment", "is_approver", ("record_approval", "notify")),
        ("PendingApproval", "else", ()),
    ]
    assert [(e.machine, e.event) for e in rows[0].emits] == [("Billing", "StartBilling")]
    assert str(rows[0].ref) == "tests/golden/machines/entitlement.fsm:19:5"


def test_retry_ladder_lowered_into_rows_and_timers(entitlement: ModuleType) -> None:
    moves = {
        source: (rows[0].target, rows[0].actions)
        for (source, event), rows in entitlement.TRANSITIONS.items()
        if event == "PaymentFailed"
    }
    assert moves == {
        "AwaitingPayment": ("Retry1", ()),
        "Retry1": ("Retry2", ()),
        "Retry2": ("PaymentAbandoned", ("close_account",)),
    }
    step_timers = [
        (t.id, t.after_ms, t.target, t.actions)
        for state in ("Retry1", "Retry2")
        for t in entitlement.TIMERS[state]
        if t.kind == "retry_step"
    ]
    assert step_timers == [
        ("Retry1/PaymentRetry/1", 3_600_000, None, ("retry_charge",)),
        ("Retry2/PaymentRetry/2", 3 * 3_600_000, None, ("retry_charge", "notify")),
    ]
    ladder = entitlement.RETRIES["PaymentRetry"]
    assert ladder.event == "PaymentFailed" and ladder.entry_states == ("AwaitingPayment",)
    assert [s.state for s in ladder.steps] == ["Retry1", "Retry2"]
    assert ladder.exhausted_target == "PaymentAbandoned"


def test_escalation_ladder_lowered_into_timers(entitlement: ModuleType) -> None:
    timers = entitlement.TIMERS["PendingApproval"]
    assert [(t.id, t.kind, t.after_ms, t.target) for t in timers] == [
        ("PendingApproval/ApprovalLadder/1", "escalation_step", 24 * 3_600_000, None),
        ("PendingApproval/ApprovalLadder/2", "escalation_step", 48 * 3_600_000, None),
        ("PendingApproval/ApprovalLadder/end", "escalation_end", 72 * 3_600_000, "AwaitingPayment"),
    ]
    first = timers[0].notify
    assert (first.kind, first.recipient, first.within_ms) == (
        "queue",
        "manager_review_queue",
        4 * 3_600_000,
    )
    assert first.message == "Manual review of pending approval"
    ladder = entitlement.ESCALATIONS["PendingApproval/ApprovalLadder"]
    assert [s.timer_id for s in ladder.steps] == [t.id for t in timers[:2]]
    assert ladder.end_timer_id == timers[2].id and ladder.end_after_ms == 72 * 3_600_000
    unnamed = entitlement.ESCALATIONS["Suspended/escalate#0"]
    assert [s.notify.recipient for s in unnamed.steps] == ["support_queue"]
    assert unnamed.end_target is None


def test_timers_of_a_state_in_firing_order(entitlement: ModuleType) -> None:
    suspended = entitlement.TIMERS["Suspended"]
    assert [(t.id, t.after_ms) for t in suspended] == [
        ("Suspended/escalate#0/1", 3_600_000),
        ("Suspended/after/72h#0", 72 * 3_600_000),
    ]
    assert suspended[1].target == "Revoked"
    assert [(e.machine, e.event) for e in suspended[1].emits] == [("Billing", "RefundRequested")]


def test_ignored_guards_and_actions(entitlement: ModuleType) -> None:
    assert dict(entitlement.IGNORED) == {"PendingApproval": frozenset({"Suspend", "Resume"})}
    assert set(entitlement.GUARDS) == {"is_approver"}
    assert set(entitlement.ACTIONS) == {
        "auto_approve",
        "close_account",
        "notify",
        "record_approval",
        "record_rejection",
        "record_suspension",
        "remind_customer",
        "retry_charge",
    }
    assert str(entitlement.ACTIONS["retry_charge"]).endswith(":53:29")


def test_payload_models_validate(entitlement: ModuleType) -> None:
    approve = entitlement.PAYLOADS["Approve"]
    good: dict[str, Any] = {
        "approver": "ann",
        "tier": "pro",
        "amount": "12.50",
        "at": "2026-01-05T10:00:00Z",
        "seats": 3,
    }
    payload = approve.model_validate(good)
    assert payload.amount == Decimal("12.50") and isinstance(payload.at, datetime)
    assert payload.note is None and payload.trial is None
    for bad in ({**good, "tier": "gold"}, {**good, "extra": 1}, {k: good[k] for k in ("tier",)}):
        with pytest.raises(pydantic.ValidationError):
            approve.model_validate(bad)
    with pytest.raises(pydantic.ValidationError):
        payload.seats = 4  # frozen
    assert entitlement.PAYLOADS["Suspend"].model_validate({}) is not None
    assert set(entitlement.PAYLOADS) == {e.value for e in entitlement.Event}


def test_tables_are_immutable(entitlement: ModuleType) -> None:
    with pytest.raises(TypeError):
        entitlement.TRANSITIONS["Active", "Resume"] = ()
    with pytest.raises(TypeError):
        entitlement.TIMERS["Active"] = ()


# ---------------------------------------------------------------- mypy and ruff


def test_generated_modules_pass_mypy_strict(tmp_path: Path) -> None:
    """One mypy run over the golden modules and every machine in machines/, against the
    installed layout of autonomic (src/)."""
    packages = {"golden_modules": GOLDEN_MACHINES, "machine_modules": ROOT / "machines"}
    for package, sources in packages.items():
        result = build([sources], tmp_path / package, svg=False)
        assert not result.report.errors(), result.report.errors()
        assert list((tmp_path / package).glob("*.py"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            *packages,
        ],
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")])},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("settings", ["project", "defaults"])
def test_generated_modules_pass_ruff_check(settings: str, tmp_path: Path) -> None:
    """Under this project's settings and under ruff's defaults, as in a user's project that
    configures nothing (`Literal[...]` must be typing's, the long-line exemption must not be
    reported unused). A module with a long doc line is among them."""
    long_doc = "word " * 40
    long = generate_module(parse_one(f'machine M "{long_doc}" {{ initial state A }}'))
    (tmp_path / "long_doc.py").write_text(long)
    config = ["--config", str(ROOT / "pyproject.toml")] if settings == "project" else ["--isolated"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--no-cache",
            *config,
            str(EXPECTED),
            str(ROOT / "generated"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_long_docs_exempt_the_module_from_the_line_limit() -> None:
    short = generate_module(parse_one('machine M "short" { initial state A }'))
    long_doc = "word " * 40
    long = generate_module(parse_one(f'machine M "{long_doc}" {{ initial state A }}'))
    assert not has_long_lines(short) and "# ruff: noqa: E501" not in short
    assert has_long_lines(long) and "# ruff: noqa: E501" in long


# ---------------------------------------------------------------- determinism


def test_same_input_same_bytes(tmp_path: Path) -> None:
    first = build([GOLDEN_MACHINES], tmp_path / "one")
    second = build([GOLDEN_MACHINES], tmp_path / "two")
    assert [p.name for p in first.written] == [p.name for p in second.written]
    for path in first.written:
        assert path.read_bytes() == (tmp_path / "two" / path.name).read_bytes(), path.name


def test_reordering_unrelated_states_changes_only_what_it_should(tmp_path: Path) -> None:
    text = (GOLDEN_MACHINES / "entitlement.fsm").read_text(encoding="utf-8")
    retry1 = "  state Retry1 { on PaymentSucceeded -> Active }\n"
    retry2 = "  state Retry2 { on PaymentSucceeded -> Active }\n"
    swapped = text.replace(retry1 + retry2, retry2 + retry1)
    assert swapped != text
    # Entitlement emits to Billing: lowering completes the emitted payloads from its events.
    billing = parse_one((GOLDEN_MACHINES / "billing.fsm").read_text(encoding="utf-8"))
    before = generate_module(parse_one(text, "machines/entitlement.fsm"), others=[billing])
    after = generate_module(parse_one(swapped, "machines/entitlement.fsm"), others=[billing])
    changed = [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed
    for line in changed:
        body = line[1:].strip()
        assert (
            body.startswith(("Source sha256: ", "SOURCE_SHA256 = "))
            or body in ('Retry1 = "Retry1"', 'Retry2 = "Retry2"')
            or body.startswith("ref=SourceRef(SOURCE_PATH, 4")  # the two swapped lines, 44-45
        ), line
    # The tables themselves, refs aside, are the same.
    one = load_module(before, tmp_path, "before")
    two = load_module(after, tmp_path, "after")
    for table in ("TRANSITIONS", "TIMERS", "IGNORED", "ESCALATIONS", "RETRIES", "GUARDS"):
        assert list(getattr(one, table)) == list(getattr(two, table)), table
    assert [s.value for s in one.State] != [s.value for s in two.State]


# ---------------------------------------------------------------- injection


INJECTIONS = [
    '"""; import os; os.system("x") #',
    "'''; __import__('pathlib').Path('INJECTED').touch() #",
    '"); __import__("pathlib").Path("INJECTED").touch(); ("',
    "\\'; __import__('pathlib').Path('INJECTED').touch() #",
    "line one\n__import__('pathlib').Path('INJECTED').touch()",
    "\u202e\"; __import__('pathlib').Path('INJECTED').touch() #\u202c",
    "\u2028__import__('pathlib').Path('INJECTED').touch()\u2029",
    "{{ 7 * 7 }} {% raw %} ${x} %(x)s",
    "\\",
    "\x0b\x0c\x1c\x85",
]


@pytest.mark.parametrize("payload", INJECTIONS)
def test_text_reaches_generated_code_only_as_data(
    payload: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = quote(payload)
    text = f"""
    machine Target {q} {{
      event Go {q} {{ choice: enum({q}, plain) {q}, note: str? {q} }}
      initial state Start {q} {{
        on Go -> Done
        escalate {{ after 1h notify queue desk within 5m {q} }}
      }}
      final state Done {q}
    }}
    """
    machine = parse_one(text, "machines/target.fsm")
    source = generate_module(machine)
    assert_safe_module(source)
    monkeypatch.chdir(tmp_path)
    module = load_module(source, tmp_path, "target")
    assert not (tmp_path / "INJECTED").exists()
    assert module.MACHINE.doc == payload
    assert module.TIMERS["Start"][0].notify.message == payload
    literals = module.GoPayload.model_fields["choice"].annotation.__args__
    assert literals == (payload, "plain")
    assert module.GoPayload.model_validate({"choice": payload}).choice == payload


@pytest.mark.parametrize(
    "text",
    [
        "machine M { initial state Ünïcode }",  # non-ASCII name: a syntax error
        'machine M { initial state A { on X"); import os #-> B } }',
        "machine M { initial state A } import os",
    ],
)
def test_hostile_names_never_parse(text: str) -> None:
    machine, diagnostics = parse_text(text, "m.fsm")
    assert machine is None and diagnostics and diagnostics[0].code == "E001"


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("machine M { initial state class }", "class"),
        ("machine M { initial state mro }", "mro"),
        ("machine M { initial state upper }", "upper"),
        (
            "machine M { event E { model_config: str } initial state A { on E -> A } }",
            "model_config",
        ),
        ("machine M { event E { datetime: datetime? } initial state A { on E -> A } }", "datetime"),
        ("machine M { event E { _private: str } initial state A { on E -> A } }", "_private"),
        ("machine Class { initial state A }", "Class"),
        ("machine M { initial state A { on E -> A when None } event E }", "None"),
    ],
)
def test_names_unusable_in_python_are_diagnosed(text: str, name: str) -> None:
    machine = parse_one(text)
    with pytest.raises(LoweringError) as caught:
        lower(machine)
    assert [d.code for d in caught.value.diagnostics] == ["E130"]
    assert f"'{name}'" in caught.value.diagnostics[0].message


def test_codegen_rejects_bad_names_even_past_lowering() -> None:
    """Defence in depth: tables built around the checks still cannot smuggle code in."""
    tables = lower(parse_one("machine M { initial state A }"))
    from dataclasses import replace

    bad_state = replace(tables.states[0], name="A = 1; import os; B")
    evil = replace(tables, states=(bad_state,), initial=bad_state.name)
    with pytest.raises(CodegenError, match="state name"):
        generate_tables(evil)
    with pytest.raises(CodegenError, match="sha256"):
        generate_tables(replace(tables, source_sha256='"""; import os'))


def test_templates_cannot_print_unvetted_text() -> None:
    template = template_environment().from_string("x = {{ value }}\n")
    with pytest.raises(CodegenError, match="unfiltered"):
        template.render(value="1; import os")
    assert template.render(value=template_environment().filters["py"]("a'b")) == 'x = "a\'b"\n'


def test_ir_names_forged_around_the_parser_are_rejected() -> None:
    machine = parse_one("machine M { initial state A }")
    state = machine.states[0]
    forged_name = Name.model_construct(span=state.name.span, value="A\nimport os")
    forged = machine.model_copy(
        update={"states": (state.model_copy(update={"name": forged_name}),)}
    )
    with pytest.raises(LoweringError):
        lower(forged)


def test_render_outputs_is_all_or_nothing(tmp_path: Path) -> None:
    good = parse_one("machine M { initial state A }")
    bad = parse_one("machine N { initial state class }")
    with pytest.raises(LoweringError):
        render_outputs([good, bad], draw_svg=False)
