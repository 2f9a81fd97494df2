"""Tables -> Python source of a governor module, through one jinja2 template per construct.

Safety rests on two rules, enforced here rather than trusted to the templates: a value
reaches the output only through a filter, and a filter emits either a name that passes the
identifier rule or a `repr()`. The environment's `finalize` rejects anything a filter did not
vet, so a template that forgets a filter fails loudly instead of pasting raw text.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any, get_args

import jinja2

from . import __version__
from .lower import (
    ELSE,
    EmitArgRow,
    EmitRow,
    EmitSource,
    FieldRow,
    MachineTables,
    NameRole,
    NotifyRow,
    Ref,
    cycle_collection_paused,
    lower,
    name_problem,
)
from .model import Machine
from .pyformat import Unsure, fit_lines_split, quote

COMPILER_VERSION = __version__

# The one module generated code imports from.
CONTRACT_MODULE = "autonomic.runtime.tables"
LINE_LENGTH = 100

_DURATION = re.compile(r"([0-9]+(ms|s|m|h|d|w))+\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_VERSION = re.compile(r"[0-9A-Za-z.+_-]+\Z")
# Paths shown inside the header docstring; anything else is named through SOURCE_PATH only.
_DOC_SAFE_PATH = re.compile(r"[A-Za-z0-9_./@+-]+\Z")

_SCALAR_TYPES = {
    "str": "str",
    "int": "int",
    "decimal": "Decimal",
    "bool": "bool",
    "datetime": "datetime",
    "duration": "timedelta",
}
TIMER_KINDS = (
    "timeout",
    "escalation_step",
    "escalation_end",
    "retry_step",
    "retry_timeout",
    "entry",
)
EMIT_SOURCES = get_args(EmitSource)


class CodegenError(Exception):
    """Generated source failed a safety or syntax check: a compiler bug, never user error."""


class Code(str):
    """Text a filter vetted for the generated module."""

    __slots__ = ()


def _require_name(name: object, role: NameRole) -> str:
    if not isinstance(name, str):
        raise CodegenError(f"{role} name must be a string, got {type(name).__name__}")
    why = name_problem(name, role)
    if why is not None:
        raise CodegenError(f"{role} name {name!r} {why}")
    return name


def py(value: object) -> Code:
    """A Python literal for plain data: str, int, bool, None, or a tuple of those; strings
    quoted as ruff format quotes them."""
    if isinstance(value, str):
        return Code(quote(value))
    if value is None or isinstance(value, bool | int):
        return Code(repr(value))
    if isinstance(value, tuple):
        return _tuple([py(v) for v in value])
    raise CodegenError(f"cannot write a {type(value).__name__} into generated code")


def _tuple(items: list[Code]) -> Code:
    # No trailing comma after several items: ruff would take it as "keep this expanded".
    if len(items) == 1:
        return Code(f"({items[0]},)")
    return Code("(" + ", ".join(items) + ")")


def ident(name: object) -> Code:
    """A bare name: a generated class or constant name built from a checked identifier."""
    return Code(_require_name(name, "name"))


def state_member(name: object) -> Code:
    return Code("State." + _require_name(name, "state"))


def event_member(name: object) -> Code:
    return Code("Event." + _require_name(name, "event"))


def enum_member(name: object, role: NameRole) -> Code:
    return Code(_require_name(name, role))


def payload_class(event: object) -> Code:
    return Code(_require_name(event, "event") + "Payload")


def field_name(name: object) -> Code:
    return Code(_require_name(name, "field"))


def annotation(field: FieldRow) -> Code:
    """The type of one payload field: a fixed type name, or Literal[...] of repr'd strings."""
    if field.kind == "enum":
        text = "Literal[" + ", ".join(py(lit) for lit in field.literals) + "]"
    else:
        text = _SCALAR_TYPES[field.kind]
    return Code(f"{text} | None = None" if field.optional else text)


def source_ref(ref: Ref, path: str) -> Code:
    """A SourceRef; every ref of a module names its SOURCE_PATH constant."""
    if ref.path != path:
        raise CodegenError(f"reference into {ref.path!r} inside a module generated from {path!r}")
    return Code(f"SourceRef(SOURCE_PATH, {int(ref.line)}, {int(ref.column)})")


def emits(rows: tuple[EmitRow, ...]) -> Code:
    return _tuple([_emit(r) for r in rows])


def _emit(row: EmitRow) -> Code:
    target = f"{name_string(row.machine, 'emit')}, {name_string(row.event, 'emit')}"
    if row.args:
        target += f", args={_tuple([emit_arg(a) for a in row.args])}"
    if row.to is not None:
        target += f", to={name_string(row.to, 'field')}"
    if row.refused is not None:
        target += f", refused={_emit(row.refused)}"
    return Code(f"Emit({target})")


def keeps(pairs: tuple[tuple[str, str], ...]) -> Code:
    """A row's `keep`s: (data field, causing field) pairs of checked field names."""
    return _tuple(
        [
            Code(f"({name_string(field, 'field')}, {name_string(source, 'field')})")
            for field, source in pairs
        ]
    )


def emit_arg(arg: EmitArgRow) -> Code:
    """One argument: a checked field name, a known source, and a value that is a checked
    field name, a literal through repr(), or None."""
    if arg.source not in EMIT_SOURCES:
        raise CodegenError(f"unknown emit argument source {arg.source!r}")
    if arg.source in ("field", "data"):
        value = name_string(arg.value, "field")
    elif arg.source == "literal":
        if arg.value is None:
            raise CodegenError(f"emit argument {arg.field!r} has no literal value")
        value = py(arg.value)
    elif arg.value is not None:
        raise CodegenError(f"emit argument {arg.field!r} from ${arg.source} carries a value")
    else:
        value = Code("None")
    return Code(f"EmitArg({name_string(arg.field, 'field')}, {py(arg.source)}, {value})")


def name_string(name: object, role: NameRole) -> Code:
    """A checked name as a string literal (guard and action names, mapping keys)."""
    return py(_require_name(name, role))


def guard(value: object) -> Code:
    if value is None:
        return Code("None")
    if value == ELSE:
        return Code("ELSE")
    return name_string(value, "guard")


def retry_step(step: object) -> Code:
    """Comment text naming the retry step a row enters."""
    if step is None:
        return Code("exhausted")
    if isinstance(step, int) and not isinstance(step, bool):
        return Code(f"step {step}")
    raise CodegenError(f"not a retry step: {step!r}")


def delay_comment(row: object) -> Code:
    """The comment beside a timer's after_ms: its written duration, or where it comes from."""
    field = getattr(row, "after_field", None)
    setting = getattr(row, "after_setting", None)
    if field is not None:
        return Code(f"from the entering event's field {_require_name(field, 'field')}")
    if setting is not None:
        return Code(f"from setting {_require_name(setting, 'ladder')}")
    return duration(getattr(row, "after_text", None))


def optional_state(name: object) -> Code:
    return Code("None") if name is None else state_member(name)


def state_set(values: tuple[str, ...]) -> Code:
    if not values:
        return Code("frozenset()")
    return Code("frozenset({" + ", ".join(state_member(v) for v in values) + "})")


def event_set(values: tuple[str, ...]) -> Code:
    if not values:
        return Code("frozenset()")
    return Code("frozenset({" + ", ".join(event_member(v) for v in values) + "})")


def state_tuple(values: tuple[str, ...]) -> Code:
    return _tuple([state_member(v) for v in values])


def timer_kind(kind: object) -> Code:
    if kind not in TIMER_KINDS:
        raise CodegenError(f"unknown timer kind {kind!r}")
    return py(kind)


def names(values: tuple[str, ...], role: NameRole = "action") -> Code:
    """A tuple of checked names as strings (actions)."""
    return _tuple([name_string(v, role) for v in values])


def notify(row: NotifyRow) -> Code:
    kind = row.kind if row.kind in ("queue", "role") else None
    if kind is None:
        raise CodegenError(f"unknown recipient kind {row.kind!r}")
    recipient = _require_name(row.recipient, "recipient")
    return Code(
        f"Notify(kind={py(kind)}, recipient={py(recipient)}, "
        f"within_ms={py(row.within_ms)}, message={py(row.message)})"
    )


def optional_notify(row: NotifyRow | None) -> Code:
    return Code("None") if row is None else notify(row)


def duration(text: object) -> Code:
    """A duration as written (`72h`), for comments beside millisecond values."""
    if not isinstance(text, str) or not _DURATION.match(text):
        raise CodegenError(f"not a duration: {text!r}")
    return Code(text)


def doc_path(path: object) -> Code:
    """The source path for the header docstring, when it holds no character worth escaping."""
    if isinstance(path, str) and _DOC_SAFE_PATH.match(path):
        return Code(path)
    return Code("(see SOURCE_PATH)")


def sha256(value: object) -> Code:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise CodegenError(f"not a sha256 digest: {value!r}")
    return Code(value)


def version(value: object) -> Code:
    if not isinstance(value, str) or not _VERSION.match(value):
        raise CodegenError(f"not a version: {value!r}")
    return Code(value)


@dataclass(frozen=True, slots=True)
class BindingRow:
    """One member of the generated Bindings protocol: a guard or action name, whether it is a
    guard (it returns bool), and the payload classes of the contexts it receives (None: a
    timer's, or an event's without fields)."""

    name: str
    guard: bool
    payloads: tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class DispatchRow:
    """One overload of the generated Governor.dispatch: the event, and whether its payload may
    be left out (no field is required)."""

    event: str
    optional: bool


def binding_rows(tables: MachineTables) -> list[BindingRow]:
    """Every guard and action, sorted by name, with the contexts the runtime passes it: the
    payload of each event whose rows name it, None for timers (which carry no payload)."""
    with_fields = {p.event for p in tables.payloads if p.fields}
    seen: dict[str, set[str | None]] = {
        name: set() for name, _ in (*tables.guards, *tables.actions)
    }
    for _, rows in tables.transitions:
        for row in rows:
            payload = row.event if row.event in with_fields else None
            for name in (row.guard, *row.actions):
                if name is not None and name in seen:
                    seen[name].add(payload)
    for _, timers in tables.timers:
        for timer in timers:
            for name in timer.actions:
                seen[name].add(None)
    for retry in tables.retries:
        for step in retry.steps:
            for name in step.actions:
                seen[name].add(None)
    guards = {name for name, _ in tables.guards}
    return [
        BindingRow(
            name,
            name in guards,
            # No known use (a fallback of an action policy): any payload or None, written ().
            tuple(sorted(e for e in events if e is not None)) + ((None,) if None in events else ()),
        )
        for name, events in sorted(seen.items())
    ]


def dispatch_rows(tables: MachineTables) -> list[DispatchRow]:
    """One overload per event, in declaration order."""
    optional = {p.event: all(f.optional for f in p.fields) for p in tables.payloads}
    return [DispatchRow(event, optional.get(event, True)) for event in tables.events]


def context_type(row: BindingRow) -> Code:
    """`TransitionContext[...]` of the payload classes a binding receives."""
    if not row.payloads:
        return Code("TransitionContext")
    parts = [Code("None") if p is None else payload_class(p) for p in row.payloads]
    return Code("TransitionContext[" + " | ".join(parts) + "]")


def _only_vetted(value: Any) -> Any:
    if isinstance(value, Code):
        return value
    raise CodegenError(f"template printed an unfiltered {type(value).__name__}: {value!r:.60}")


FILTERS: dict[str, Callable[..., Code]] = {
    "py": py,
    "ident": ident,
    "state": state_member,
    "event": event_member,
    "member": enum_member,
    "payload_class": payload_class,
    "field_name": field_name,
    "annotation": annotation,
    "source_ref": source_ref,
    "emits": emits,
    "names": names,
    "name_string": name_string,
    "guard": guard,
    "retry_step": retry_step,
    "optional_state": optional_state,
    "optional_notify": optional_notify,
    "state_set": state_set,
    "event_set": event_set,
    "state_tuple": state_tuple,
    "timer_kind": timer_kind,
    "notify": notify,
    "duration": duration,
    "delay_comment": delay_comment,
    "doc_path": doc_path,
    "sha256": sha256,
    "version": version,
    "context_type": context_type,
}


@cache
def template_environment() -> jinja2.Environment:
    """The one environment: strict about undefined names, filters registered, no escaping
    (the output is Python, and the filters are its escaping)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("autonomic.compiler", "templates"),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=_only_vetted,
    )
    env.filters.update(FILTERS)
    return env


def contract_imports(tables: MachineTables) -> list[str]:
    """Names the module imports from the contract, sorted the way ruff's isort sorts them."""
    used = {
        "EscalationLadder",
        "GovernorEnum",
        "MachineSpec",
        "Payload",
        "RetryLadderSpec",
        "SourceRef",
        "TimerSpec",
        "Transition",
        "TypedGovernor",
        "frozen_map",
    }
    if tables.guards or tables.actions:
        used.add("TransitionContext")
    if tables.events:
        used.update(("DispatchOptions", "Outcome"))
    rows = [row for _, group in tables.transitions for row in group]
    timers = [t for _, group in tables.timers for t in group]
    if any(r.guard == ELSE for r in rows):
        used.add("ELSE")
    timers += [t for _, group in tables.group_timers for t in group]
    timers += tables.creation_timers
    emitted = [e for r in rows for e in r.emits] + [e for t in timers for e in t.emits]
    emitted += [e.refused for e in emitted if e.refused is not None]  # their arguments too
    if emitted:
        used.add("Emit")
    if any(e.args for e in emitted):
        used.add("EmitArg")
    if any(t.notify is not None for t in timers):
        used.add("Notify")
    if any(ladder.steps for ladder in tables.escalations):
        used.add("EscalationStepSpec")
    if any(retry.steps for retry in tables.retries):
        used.add("RetryStepSpec")
    if tables.policies:
        used.add("ActionPolicy")
    if tables.settings:
        used.add("SettingSpec")
    kinds = {f.kind for p in tables.payloads for f in p.fields}
    if "duration" in kinds:
        used.add("timedelta")
    if "decimal" in kinds:
        used.add("Decimal")
    if "datetime" in kinds:
        used.add("datetime")
    return sorted(used, key=_isort_key)


def typing_imports(tables: MachineTables) -> list[str]:
    """Names the module imports from `typing` itself: a linter knows `typing.Literal` without
    being told, so `Literal["a", "b"]` is never taken for forward references (ruff's F821)."""
    used = {"Protocol"}
    if tables.events:
        used.update(("Literal", "Unpack"))
    if len(tables.events) > 1:
        used.add("overload")
    return sorted(used, key=_isort_key)


def _isort_key(name: str) -> tuple[int, str]:
    # ruff's default order-by-type: CONSTANTS, then Classes, then functions and variables.
    if name.isupper():
        return 0, name
    if name[0].isupper():
        return 1, name
    return 2, name


def render_module(tables: MachineTables, *, long_lines: bool = False) -> str:
    """The module source as rendered by the templates, before formatting. `long_lines`
    exempts the module from the line-length rule (docs and messages are never split)."""
    template = template_environment().get_template("module.py.j2")
    return template.render(
        t=tables,
        imports=contract_imports(tables),
        typing_imports=typing_imports(tables),
        bindings=binding_rows(tables),
        dispatches=dispatch_rows(tables),
        compiler_version=COMPILER_VERSION,
        long_lines=long_lines,
        transition_rows=transition_rows(tables),
        timer_rows=timer_rows(tables),
        state_members=state_members(tables),
    )


def state_members(tables: MachineTables) -> Code:
    """The members of the State enum, `    Name = "Name"` each: written here rather than in
    the template, where a large machine's states cost two filter calls each."""
    lines = []
    for state in tables.states:
        name = enum_member(state.name, "state")
        lines.append(f"    {name} = {quote(name)}\n")
    return Code("".join(lines))


# ---------------------------------------------------------------- the two large tables
#
# Written here rather than in templates: they are most of a large module, and jinja's per-row
# cost (a filter call per value) was most of a large build. The text is the one the
# templates would give, through the same filters.


def transition_rows(tables: MachineTables) -> Code:
    """The entries of TRANSITIONS, one `(State.S, Event.E): (Transition(...), ...),` each."""
    path = tables.source_path
    # Each distinct name is checked and written once (a 10k-state machine has 150k uses).
    states = {s.name: state_member(s.name) for s in tables.states}
    events = {e: event_member(e) for e in tables.events}
    # Guards and action lists repeat from row to row: each distinct one is written once.
    guards: dict[str, Code] = {}
    actions: dict[tuple[str, ...], Code] = {}
    out: list[str] = []
    add = out.append
    for (source, event), rows in tables.transitions:
        add(f"            ({states[source]}, {events[event]}): (\n")
        for r in rows:
            if r.ladder is not None:
                add(f"                # retry ladder {ident(r.ladder)}: {retry_step(r.step)}\n")
            ref = r.ref
            if ref.path != path:
                source_ref(ref, path)  # raises
            written_guard = "None"
            if r.guard is not None:
                written_guard = guards.get(r.guard) or guards.setdefault(r.guard, guard(r.guard))
            written_actions = "()"
            if r.actions:
                written_actions = actions.get(r.actions) or actions.setdefault(
                    r.actions, names(r.actions)
                )
            add(
                "                Transition(\n"
                f"                    source={states[r.source]},\n"
                f"                    event={events[r.event]},\n"
                f"                    target={states[r.target]},\n"
                f"                    guard={written_guard},\n"
                f"                    actions={written_actions},\n"
                f"                    emits={emits(r.emits) if r.emits else '()'},\n"
                # `:d` refuses anything but a whole number, as int() would, and costs less.
                f"                    ref=SourceRef(SOURCE_PATH, {ref.line:d}, {ref.column:d}),\n"
            )
            if r.keep:
                add(f"                    keep={keeps(r.keep)},\n")
            add("                ),\n")
        add("            ),\n")
    return Code("".join(out))


def timer_rows(tables: MachineTables) -> Code:
    """The entries of TIMERS, one `State.S: (TimerSpec(...), ...),` each."""
    path = tables.source_path
    out: list[str] = []
    add = out.append
    for state, rows in tables.timers:
        add(f"            {state_member(state)}: (\n")
        for r in rows:
            add(
                "                TimerSpec(\n"
                f"                    id={py(r.id)},\n"
                f"                    state={state_member(r.state)},\n"
                f"                    after_ms={py(r.after_ms)},  # {delay_comment(r)}\n"
                f"                    kind={timer_kind(r.kind)},\n"
                f"                    target={optional_state(r.target)},\n"
                f"                    actions={names(r.actions)},\n"
                f"                    emits={emits(r.emits)},\n"
                f"                    notify={optional_notify(r.notify)},\n"
                f"                    ladder={py(r.ladder)},\n"
                f"                    step={py(r.step)},\n"
                f"                    ref={source_ref(r.ref, path)},\n"
            )
            if r.scope != "state":
                add(f"                    scope={py(r.scope)},\n")
            if r.group is not None:
                add(f"                    group={name_string(r.group, 'ladder')},\n")
            if r.after_field is not None:
                add(f"                    after_field={name_string(r.after_field, 'field')},\n")
            if r.after_setting is not None:
                add(
                    f"                    after_setting={name_string(r.after_setting, 'ladder')},\n"
                )
            add("                ),\n")
        add("            ),\n")
    return Code("".join(out))


def has_long_lines(source: str) -> bool:
    """Whether ruff's E501 would flag a line: wider than the limit and not a single word."""
    lines = source.split("\n")
    if source.isascii():
        if max(map(len, lines)) <= LINE_LENGTH:
            return False  # the common case, decided in C
        return any(len(line) > LINE_LENGTH and " " in line.strip() for line in lines)
    for line in lines:
        width = sum(
            0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
            for c in line
        )
        if width > LINE_LENGTH and any(c.isspace() for c in line.strip()):
            return True
    return False


def generate_tables(tables: MachineTables) -> str:
    """The formatted source of one generated module, as `ruff format` would write it (see
    pyformat; a test holds the two byte-identical), without running ruff. Every name in it
    passed the identifier rule and every other value went through `py`, so it parses; the
    build's tests import every generated module."""
    with cycle_collection_paused():
        formatted, split = _formatted(render_module(tables))
        if split and has_long_lines(formatted):
            formatted, _ = _formatted(render_module(tables, long_lines=True))
    return formatted


def _formatted(source: str) -> tuple[str, bool]:
    """`source` as ruff formats it, and whether a line had to be split. pyformat knows every
    line shape the templates write; a line it does not know stays as written (valid Python,
    and the test that compares the output with ruff's would name it)."""
    try:
        return fit_lines_split(source)
    except Unsure:
        return fit_lines_split(source, strict=False)


def generate_module(
    machine: Machine, source_path: str | None = None, *, others: Iterable[Machine] = ()
) -> str:
    """Machine -> formatted module source (lowering included); `others` are the machines
    its emits name."""
    return generate_tables(lower(machine, source_path, others=others))
