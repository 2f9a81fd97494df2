"""Random valid machines go text -> IR -> generated module -> import; the imported tables equal
both the IR and the expectations drawn with the machine."""

from __future__ import annotations

import tempfile
import typing
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from types import ModuleType, NoneType
from typing import Any

from autonomic.compiler.checks import check_machines
from autonomic.compiler.codegen import generate_module
from autonomic.compiler.model import Machine, snake_case
from autonomic.compiler.parser import parse_text
from hypothesis import HealthCheck, given, settings
from strategies import (
    FieldExpectation,
    MachineCase,
    NotifyExpectation,
    TimerExpectation,
    load_module,
    machine_cases,
)

SCALARS: dict[str, type] = {
    "str": str,
    "int": int,
    "decimal": Decimal,
    "bool": bool,
    "datetime": datetime,
}


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=machine_cases())
def test_generated_tables_equal_the_machine(case: MachineCase) -> None:
    path = f"machines/{snake_case(case.name)}.fsm"
    machine, diagnostics = parse_text(case.text, path)
    assert machine is not None, (case.text, diagnostics)
    errors = [d for d in check_machines([machine]) if d.severity == "error"]
    assert not errors, (case.text, errors)
    source = generate_module(machine)
    with tempfile.TemporaryDirectory() as folder:
        module = load_module(source, Path(folder), snake_case(case.name))
    assert_matches_case(module, case)
    assert_matches_ir(module, machine)


def assert_matches_case(module: ModuleType, case: MachineCase) -> None:
    spec = module.MACHINE
    assert spec.name == case.name and spec.doc == case.doc
    assert [s.value for s in module.State] == list(case.states)
    assert [e.value for e in module.Event] == list(case.events)
    assert spec.initial == case.initial and spec.finals == case.finals
    assert spec.source_path == f"machines/{snake_case(case.name)}.fsm"

    assert set(module.TRANSITIONS) == set(case.transitions)
    for (state, event), rows in module.TRANSITIONS.items():
        assert all(r.source == state and r.event == event for r in rows)
        got = [
            (r.target, r.guard, r.actions, tuple((e.machine, e.event) for e in r.emits))
            for r in rows
        ]
        want = [(r.target, r.guard, r.actions, r.emits) for r in case.transitions[state, event]]
        assert got == want, (state, event)

    assert set(module.TIMERS) == set(case.timers)
    for state, timers in module.TIMERS.items():
        assert all(t.state == state for t in timers)
        assert [t.after_ms for t in timers] == sorted(t.after_ms for t in timers)
        assert frozenset(_timer(t) for t in timers) == case.timers[state]

    assert dict(module.IGNORED) == case.ignored
    assert set(module.GUARDS) == case.guards
    assert set(module.ACTIONS) == case.actions
    assert {
        name: (r.event, r.entry_states, tuple(s.state for s in r.steps), r.exhausted_target)
        for name, r in module.RETRIES.items()
    } == case.retries
    assert {
        key: tuple(s.after_ms for s in ladder.steps) for key, ladder in module.ESCALATIONS.items()
    } == case.escalations
    assert set(module.PAYLOADS) == set(case.events)
    for event, fields in case.fields.items():
        assert_payload(module.PAYLOADS[event], fields)


def _timer(t: Any) -> TimerExpectation:
    notify = None
    if t.notify is not None:
        notify = NotifyExpectation(
            t.notify.kind, t.notify.recipient, t.notify.within_ms, t.notify.message
        )
    return TimerExpectation(
        t.id,
        t.after_ms,
        t.kind,
        t.target,
        t.actions,
        tuple((e.machine, e.event) for e in t.emits),
        notify,
        t.ladder,
        t.step,
    )


def assert_payload(model: Any, fields: tuple[FieldExpectation, ...]) -> None:
    """Field names in order, their types, and a payload built from them validates."""
    assert list(model.model_fields) == [f.name for f in fields]
    sample: dict[str, Any] = {}
    for expected in fields:
        info = model.model_fields[expected.name]
        annotation = info.annotation
        if expected.optional:
            assert typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType)
            args = typing.get_args(annotation)
            assert NoneType in args and not info.is_required()
            (annotation,) = (a for a in args if a is not NoneType)
        else:
            assert info.is_required()
        if expected.kind == "enum":
            assert typing.get_origin(annotation) is typing.Literal
            assert typing.get_args(annotation) == expected.literals
            sample[expected.name] = expected.literals[-1]
        else:
            assert annotation is SCALARS[expected.kind]
            sample[expected.name] = {
                "str": "text",
                "int": 7,
                "decimal": "1.25",
                "bool": True,
                "datetime": "2026-01-01T00:00:00Z",
            }[expected.kind]
    required_only = {f.name: sample[f.name] for f in fields if not f.optional}
    assert model.model_validate(sample).model_dump().keys() == sample.keys()
    assert model.model_validate(required_only) is not None


def assert_matches_ir(module: ModuleType, machine: Machine) -> None:
    """Every row, timer and field written in the IR is in the imported tables as written."""
    assert [s.value for s in module.State] == [s.name.value for s in machine.states]
    assert [e.value for e in module.Event] == [e.name.value for e in machine.events]
    for state in machine.states:
        for t in state.transitions:
            rows = module.TRANSITIONS[state.name.value, t.event.value]
            guard = None if t.guard is None else (t.guard.name.value if t.guard.name else "else")
            matching = [
                r
                for r in rows
                if r.target == t.target.value
                and r.guard == guard
                and r.actions == tuple(a.value for a in t.actions)
                and (r.ref.line, r.ref.column) == (t.span.line, t.span.column)
            ]
            assert len(matching) == 1, (state.name.value, t.event.value)
        timers = module.TIMERS.get(state.name.value, ())
        for timer in state.timers:
            assert any(
                x.kind == "timeout"
                and x.after_ms == timer.after.millis
                and x.target == (timer.target.value if timer.target else None)
                and (x.ref.line, x.ref.column) == (timer.span.line, timer.span.column)
                for x in timers
            )
        for event in machine.events:
            if event.name.value in module.IGNORED.get(state.name.value, ()):
                assert any(
                    event.name.value in {n.value for n in clause.events} for clause in state.ignores
                )
    for event in machine.events:
        model = module.PAYLOADS[event.name.value]
        assert list(model.model_fields) == [f.name.value for f in event.fields]
