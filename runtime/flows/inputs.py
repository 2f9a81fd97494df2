"""A flow's inputs checked at its start against their declared types, before anything is
written: the same strict rules as an event payload's fields (tables.Payload)."""

from __future__ import annotations

import datetime as _datetime
import decimal as _decimal
from collections.abc import Mapping
from typing import Any, Literal

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


# id(spec) -> (spec, its model): a FlowSpec holds mappings, so it is no dict key itself.
_MODELS: dict[int, tuple[FlowSpec, type[Payload] | None]] = {}


def _model(spec: FlowSpec) -> type[Payload] | None:
    """The inputs as a payload model, or None if the spec carries no types (a module
    generated before they were)."""
    known = _MODELS.get(id(spec))
    if known is not None and known[0] is spec:
        return known[1]
    model = _build(spec)
    _MODELS[id(spec)] = (spec, model)
    return model


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
    unknown = sorted(set(given) - set(spec.inputs))
    problems = [(name, "not an input of the flow") for name in unknown]
    model = _model(spec)
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
