"""A flow's inputs checked at its start against their declared types, before anything is
written: the same strict rules as an event payload's fields (tables.Payload)."""

from __future__ import annotations

import datetime as _datetime
import decimal as _decimal
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from pydantic import ValidationError, create_model

from ..inputs import payload_error_message
from ..tables import FlowSpec, Payload
from .errors import FlowInputsInvalid

_SCALARS: dict[str, Any] = {
    "str": str,
    "int": int,
    "decimal": _decimal.Decimal,
    "bool": bool,
    "datetime": _datetime.datetime,
    "duration": _datetime.timedelta,
}


# id(spec) -> (spec, its model, its plain check): a FlowSpec holds mappings, so it is no dict
# key itself.
_MODELS: dict[int, tuple[FlowSpec, type[Payload] | None, _Plain | None]] = {}
# Input kinds whose valid values are exactly the values of these types (strict mode: no bool
# for an int, no number for a str): their check needs no model when the values are such.
_EXACT: dict[str, type] = {"str": str, "int": int, "bool": bool}


class _Plain(NamedTuple):
    """A flow's inputs when every one is a str, int, bool or enum input with no bounds: what
    the model accepts of values of exactly those types, found without it."""

    names: frozenset[str]
    required: frozenset[str]
    # name -> the one type its values have, or (enum) its literals.
    kinds: Mapping[str, type | frozenset[str]]

    def accepts(self, given: Mapping[str, Any]) -> bool:
        if not (self.required <= given.keys() <= self.names):
            return False
        kinds = self.kinds
        for name, value in given.items():
            kind = kinds[name]
            if value is None:
                if name in self.required:
                    return False
            elif type(kind) is frozenset:
                if type(value) is not str or value not in kind:
                    return False
            elif type(value) is not kind:
                return False
        return True


def _model(spec: FlowSpec) -> tuple[type[Payload] | None, _Plain | None]:
    """The inputs as a payload model, or None if the spec carries no types (a module
    generated before they were); and their plain check, if they have one (`_Plain`)."""
    known = _MODELS.get(id(spec))
    if known is not None and known[0] is spec:
        return known[1], known[2]
    model = _build(spec)
    plain = _plain(spec) if model is not None else None
    _MODELS[id(spec)] = (spec, model, plain)
    return model, plain


def _plain(spec: FlowSpec) -> _Plain | None:
    kinds: dict[str, type | frozenset[str]] = {}
    for name, declared in spec.input_types.items():
        if declared.at_least is not None or declared.at_most is not None:
            return None
        if declared.kind == "enum":
            kinds[name] = frozenset(declared.literals)
        elif declared.kind in _EXACT:
            kinds[name] = _EXACT[declared.kind]
        else:
            return None
    if set(kinds) != set(spec.inputs):
        return None
    required = frozenset(n for n, d in spec.input_types.items() if not d.optional)
    return _Plain(frozenset(kinds), required, kinds)


def _build(spec: FlowSpec) -> type[Payload] | None:
    if not spec.input_types:
        return None
    fields: dict[str, Any] = {}
    for name, declared in spec.input_types.items():
        kind: Any = (
            Literal[declared.literals] if declared.kind == "enum" else _SCALARS[declared.kind]
        )
        fields[name] = (kind | None, None) if declared.optional else (kind, ...)
    return create_model(f"{spec.name}Inputs", __base__=Payload, **fields)


def check_inputs(spec: FlowSpec, given: Mapping[str, Any]) -> None:
    """Raise FlowInputsInvalid unless `given` (the inputs as JSON values) are the flow's:
    no unknown name, every required one, each of its declared type, and within its bounds."""
    model, plain = _model(spec)
    if plain is not None and plain.accepts(given):
        return
    unknown = sorted(set(given) - set(spec.inputs))
    problems = [(name, "not an input of the flow") for name in unknown]
    if model is not None:
        try:
            valid = model.model_validate({k: v for k, v in given.items() if k in spec.inputs})
        except ValidationError as invalid:
            for error in invalid.errors(include_url=False):
                name = ".".join(str(part) for part in error["loc"]) or "(inputs)"
                missing = error["type"] == "missing"
                problems.append((name, "missing" if missing else payload_error_message(error)))
        else:
            problems.extend(_out_of_bounds(spec, valid))
    if problems:
        raise FlowInputsInvalid(spec.name, tuple(problems))


def _out_of_bounds(spec: FlowSpec, valid: Payload) -> list[tuple[str, str]]:
    """The inputs outside their declared bounds; a bound naming an input not given (an
    optional one) bounds nothing."""
    problems = []
    for name, declared in spec.input_types.items():
        value = getattr(valid, name)
        if value is None:
            continue
        for bound, below in ((declared.at_least, True), (declared.at_most, False)):
            if bound is None:
                continue
            named = not (bound[0].isdigit() or bound[0] == "-")
            limit = getattr(valid, bound) if named else _decimal.Decimal(bound)
            if limit is None or (value >= limit if below else value <= limit):
                continue
            side = "less" if below else "more"
            limit_text = f"{bound} ({limit})" if named else bound
            problems.append((name, f"{value} is {side} than {limit_text}"))
    return problems
