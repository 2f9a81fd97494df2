"""The arguments of an emit or a flow step against the fields of the event they send (E141-E143).

The machine checks (emits) and the flow checks (step events and compensations) share these
rules, so both say the same about the same mistake.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from .errors import Diagnostic, did_you_mean, fail
from .lower import CONTEXT_REFS, DATA_REF, REFUSAL_REFS
from .model import EmitValue, Event, EventRef, Field

__all__ = ["emit_payload_findings", "source_misfit"]


def emit_payload_findings(
    ref: EventRef,
    target: Event,
    causing: dict[str, Field],
    *,
    has_cause: bool,
    notice: bool = False,
    data: dict[str, Field] | None = None,
) -> Iterator[Diagnostic]:
    """E141-E143 for `ref`'s arguments; E152 for a $refusal_... reference outside a refusal
    notice's arguments (`notice`). `data`: the emitting machine's data fields
    (`$data.FIELD`); None where there is no instance data (a flow step)."""
    fields = {f.name.value: f for f in target.fields}
    shown = f"{ref.machine.value}.{ref.event.value}" if ref.machine else ref.event.value
    written: set[str] = set()
    for arg in ref.args:
        name, value = arg.field.value, arg.value
        if name in written:
            yield fail(
                "E142",
                f"argument '{name}' is given twice",
                arg.field.span,
                "give each field once",
            )
            continue
        written.add(name)
        wanted = fields.get(name)
        if wanted is None:
            yield fail(
                "E142",
                f"event '{shown}' has no field '{name}'",
                arg.field.span,
                did_you_mean(name, fields) or f"its fields: {', '.join(fields) or 'none'}",
            )
            continue
        if value.kind == "ref" and value.text in REFUSAL_REFS and not notice:
            yield fail(
                "E152",
                f"'${value.text}' is known only to a refusal notice",
                value.span,
                "use it in the arguments of `if refused NOTICE(...)`, which the receiver's "
                "refusal fills in",
            )
        elif value.kind == "ref" and value.text.startswith(DATA_REF):
            finding = _data_finding(name, value, wanted, data)
            if finding is not None:
                yield finding
        elif value.kind == "ref" and value.text not in CONTEXT_REFS:
            refs = [f"${r}" for r in CONTEXT_REFS] + ["$data.FIELD"]
            yield fail(
                "E142",
                f"unknown reference '${value.text}'",
                value.span,
                did_you_mean(f"${value.text}", refs) or f"use one of {', '.join(refs)}",
            )
        elif value.kind == "field" and value.text not in causing:
            if has_cause:
                message = f"the causing event has no field '{value.text}'"
                hint = did_you_mean(value.text, causing) or (
                    "name one of its fields, or write a literal in quotes"
                )
            else:
                message = f"'{value.text}' is not a field: a timer's emit has no causing event"
                hint = 'write a literal ("text", 12, true) or $instance, $actor, $event'
            yield fail("E142", message, value.span, hint)
        else:
            source = causing.get(value.text) if value.kind == "field" else None
            problem = _misfit(value, source, wanted)
            if problem is not None:
                yield fail(
                    "E143",
                    f"argument '{name}': {problem}",
                    value.span,
                    f"the field takes {_shown(wanted)}" + _LITERAL_FORMS.get(wanted.type.kind, ""),
                )
    missing: list[str] = []
    for name, wanted in fields.items():
        if name in written:
            continue
        source = causing.get(name)
        if source is not None:
            problem = source_misfit(source, wanted)
            if problem is not None:
                yield fail(
                    "E143",
                    f"field '{name}' of '{shown}', taken from the causing event: {problem}",
                    ref.event.span,
                    f"pass it explicitly: {name} = ...",
                )
        elif not wanted.type.optional:
            missing.append(name)
    if missing:
        why = "" if has_cause else " (a timer's emit has no causing event)"
        plural = "s" if len(missing) > 1 else ""
        yield fail(
            "E141",
            f"emit of '{shown}' leaves required field{plural} {', '.join(missing)} unsupplied{why}",
            ref.event.span,
            f"pass {'them' if plural else 'it'}: emit {shown}("
            + ", ".join(f"{n} = ..." for n in missing)
            + '), with a causing field, a literal ("text", 12, true) or $instance',
        )


def _data_finding(
    name: str, value: EmitValue, wanted: Field, data: dict[str, Field] | None
) -> Diagnostic | None:
    """E142 for `$data.FIELD` naming no data field (or where there is no instance data),
    E143 for a data field that does not fit the target field."""
    field = value.text[len(DATA_REF) :]
    if data is None:
        return fail(
            "E142",
            f"'${value.text}': a flow step has no instance data to read",
            value.span,
            "pass the value as a flow input, or emit it from the governor that keeps it",
        )
    source = data.get(field)
    if source is None:
        return fail(
            "E142",
            f"'${value.text}': the machine has no data field '{field}'",
            value.span,
            did_you_mean(field, data)
            or f"declare it (data {{ {field}: str }}) and `keep` it on the rows that lead here",
        )
    problem = source_misfit(source, wanted)
    if problem is None:
        return None
    return fail(
        "E143",
        f"argument '{name}': {problem}",
        value.span,
        f"the field takes {_shown(wanted)}" + _LITERAL_FORMS.get(wanted.type.kind, ""),
    )


def _misfit(value: EmitValue, source: Field | None, wanted: Field) -> str | None:
    """Why a written value does not fit the target field, or None."""
    kind = wanted.type.kind
    if source is not None:
        return source_misfit(source, wanted)
    if value.kind == "ref":
        return None if kind == "str" else f"${value.text} is a str, the field is {_shown(wanted)}"
    if value.kind == "string":
        if kind == "str":
            return None
        if kind == "enum":
            members = [lit.value for lit in wanted.type.literals]
            if value.text in members:
                return None
            return f"'{value.text}' is not one of {', '.join(members)}"
        if kind == "datetime":
            try:
                datetime.fromisoformat(value.text)
            except ValueError:
                return f"'{value.text}' is not an ISO 8601 date and time"
            return None
    if value.kind == "number" and (kind == "decimal" or (kind == "int" and "." not in value.text)):
        return None
    if value.kind == "bool" and kind == "bool":
        return None
    written = {"string": "a string", "number": "a number", "bool": "a bool"}[value.kind]
    return f"{written} does not fit {_shown(wanted)}"


def source_misfit(source: Field, wanted: Field) -> str | None:
    """Why a causing field cannot fill the target field, or None: the same kind (an enum's
    members among the target's), or enum into str, or int into decimal; never optional
    into required."""
    have, want = source.type.kind, wanted.type.kind
    if source.type.optional and not wanted.type.optional:
        return f"'{source.name.value}' is optional, the field is required"
    if have == want == "enum":
        members = {lit.value for lit in wanted.type.literals}
        extra = [lit.value for lit in source.type.literals if lit.value not in members]
        return f"'{extra[0]}' of '{source.name.value}' is not a member" if extra else None
    if have == want or (have, want) in (("enum", "str"), ("int", "decimal")):
        return None
    return f"'{source.name.value}' is {_shown(source)}, the field is {_shown(wanted)}"


# How a literal of each kind is written, for hints.
_LITERAL_FORMS = {
    "str": ': "text", $instance, $actor, $event or $data.FIELD',
    "int": ": 12",
    "decimal": ": 12 or 0.50",
    "bool": ": true or false",
    "datetime": ': "2024-05-01T12:00:00+00:00"',
    "enum": ': one of its members in quotes, "name"',
}


def _shown(f: Field) -> str:
    if f.type.kind == "enum":
        return "enum(" + ", ".join(lit.value for lit in f.type.literals) + ")"
    return f.type.kind
