"""Checks on what callers hand the runtime, made before anything is stored.

Identifiers (instance id, event id, idempotency key, actor) are written to the store and into
the signed ledger, so each must be text that every store and every reader handles the same way:

- a `str`, encodable as UTF-8 (no lone surrogates such as "\\udc00");
- 1 to `MAX_IDENTIFIER_LENGTH` characters (an event id or idempotency key may also be absent);
- no control characters (C0, DEL, C1), no Unicode line or paragraph separators and no
  bidirectional controls, so a stored id can never forge a line in a log or a terminal, nor
  display as another id.

Payloads are bounded: at most `InputLimits.max_depth` levels of nesting, checked before
validation (for a flat model, whose validation walks no nested input and accepts only depth 1,
once validation has failed), and at most `InputLimits.max_payload_bytes` bytes of JSON,
checked on the validated payload. A flat model of strings, string choices and booleans is
validated through a copy of its schema whose strings are capped so that nothing longer passes
(`capped_validator`: no Python per payload); what a cap refuses is validated again and
measured. Other flat models' JSON is measured only when their values' text could exceed the
bound (`payload_size_bound`). The JSON measured is the canonical JSON that the
ledger digest hashes when a ledger or an idempotency key needs the digest; otherwise pydantic's
own JSON of the payload (written without the digest's Python-level encoding), which differs
from it only in how some numbers are written (`100.0` for `100`). Both are configurable per
Runtime; each rejection raises `InputRejected` (code R031) and leaves the store unchanged.
"""

from __future__ import annotations

import datetime
import decimal
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import InputRejected

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_IDENTIFIER_LENGTH",
    "InputLimits",
    "capped_validator",
    "check_identifier",
    "check_payload_depth",
    "check_payload_size",
    "nesting_depth",
    "payload_error_message",
    "payload_is_flat",
    "payload_size_bound",
]

MAX_IDENTIFIER_LENGTH = 256
# C0 controls, DEL, C1 controls, the Unicode line/paragraph separators, and the bidirectional
# controls that make text display in another order than it is stored ("Trojan Source").
_FORBIDDEN = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


@dataclass(frozen=True, slots=True)
class InputLimits:
    """Bounds on payloads: canonical JSON bytes and nesting depth (a flat object is depth 1)."""

    max_payload_bytes: int = 64 * 1024
    max_depth: int = 16

    def __post_init__(self) -> None:
        if self.max_payload_bytes < 2 or self.max_depth < 1:
            raise ValueError("max_payload_bytes must be >= 2 and max_depth >= 1")


DEFAULT_LIMITS = InputLimits()


def check_identifier(what: str, value: object, *, optional: bool = False) -> None:
    """Raise InputRejected unless `value` is a well-formed identifier (see the module doc)."""
    if value is None and optional:
        return
    if type(value) is not str:
        raise InputRejected(
            f"the {what} must be a string, not {type(value).__name__}",
            hint="identifiers are text; convert numbers with str()",
        )
    # The common case (short ASCII without controls) is settled by two C-level calls.
    if value.isascii() and value.isprintable() and 0 < len(value) <= MAX_IDENTIFIER_LENGTH:
        return
    if not value:
        raise InputRejected(f"the {what} is empty", hint=f"give a non-empty {what}")
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise InputRejected(
            f"the {what} has {len(value)} characters, more than {MAX_IDENTIFIER_LENGTH}",
            hint=f"use a shorter {what}, for example a hash of the long one",
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputRejected(
            f"the {what} {value!r} holds a lone surrogate at index {exc.start}, "
            "which is not valid Unicode text",
            hint="decode external bytes with errors='strict' before passing them on",
        ) from None
    bad = _FORBIDDEN.search(value)
    if bad is not None:
        raise InputRejected(
            f"the {what} {value!r} holds the control character U+{ord(bad.group()):04X} "
            f"at index {bad.start()}",
            hint="identifiers may not hold control characters or line separators",
        )


def check_payload_depth(payload: object, limits: InputLimits) -> None:
    """Raise InputRejected when a payload nests dicts and lists deeper than `limits` allow
    (checked before anything walks the payload recursively)."""
    if nesting_depth(payload, limits.max_depth + 1) > limits.max_depth:
        raise InputRejected(
            f"the payload is nested more than {limits.max_depth} levels deep",
            hint="flatten the payload, or raise InputLimits.max_depth",
        )


def check_payload_size(encoded_size: int, limits: InputLimits) -> None:
    """Raise InputRejected when a payload's JSON is longer than `limits` allow."""
    if encoded_size > limits.max_payload_bytes:
        raise InputRejected(
            f"the payload has {encoded_size} bytes of canonical JSON, more than the limit "
            f"of {limits.max_payload_bytes}",
            hint="store large documents elsewhere and pass a reference, or raise "
            "InputLimits.max_payload_bytes",
        )


_STRICT_MESSAGES = {
    "decimal": 'Input should be a decimal: an integer or a string such as "12.50" (never a float)',
    "datetime": 'Input should be a datetime or an ISO 8601 string such as "2025-01-31T09:30:00Z"',
}


def payload_error_message(item: Mapping[str, Any]) -> str:
    """pydantic's message for one strict-validation error, with the accepted text forms
    named for the two types whose default messages do not say what to send."""
    kind = item.get("type")
    if kind == "is_instance_of" and "Decimal" in str(item.get("msg")):
        return _STRICT_MESSAGES["decimal"]
    if kind in ("datetime_type", "datetime_parsing", "datetime_from_date_parsing"):
        return _STRICT_MESSAGES["datetime"]
    return str(item.get("msg"))


# Leaves by exact type: the common payload is a dict of these, and a type lookup is a tenth
# of an isinstance check against the Mapping ABC.
_LEAVES = frozenset({str, int, float, bool, type(None)})


def nesting_depth(value: object, stop: int) -> int:
    """The nesting depth of dicts and lists in `value`, counting no further than `stop`."""
    kind = type(value)
    if kind is dict:
        children: Any = value.values()  # type: ignore[attr-defined]
    elif kind is list or kind is tuple:
        children = value
    elif isinstance(value, Mapping):
        children = value.values()
    elif isinstance(value, list | tuple):
        children = value
    else:
        return 0
    deepest = 0
    leaves = _LEAVES
    for child in children:
        if type(child) in leaves:
            continue
        if isinstance(child, Mapping | list | tuple):
            if deepest + 1 >= stop:
                return stop
            deepest = max(deepest, nesting_depth(child, stop - 1))
    return deepest + 1


# Field types whose values hold no dicts or lists: a model of only these is flat (depth 1),
# and strict validation rejects a nested input for them without walking it.
_SCALARS = (str, int, float, bool, decimal.Decimal, datetime.datetime, datetime.timedelta)
# Those whose JSON is at most 6 bytes per character of their str() plus 2 (a string's
# escapes; an int's str() fails past 4300 digits, so ints are measured exactly).
_BOUNDED = (str, float, bool, decimal.Decimal, datetime.datetime, datetime.timedelta)


def _scalar(annotation: object, kinds: tuple[type, ...]) -> bool:
    if annotation is None or annotation is type(None):
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return all(type(choice) is str for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return all(_scalar(member, kinds) for member in typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return False  # a member's str() need not be its JSON
    return annotation in kinds


def payload_is_flat(model: Any) -> bool:
    """Every field of the pydantic `model` holds a scalar: its payloads have depth 1, and
    validating one walks no nested input, so no depth check is needed before it."""
    return all(_scalar(field.annotation, _SCALARS) for field in model.model_fields.values())


def payload_size_bound(model: Any) -> int | None:
    """For a model whose fields' JSON is bounded by their str(): the JSON bytes of a payload
    other than its values' 6 * len(str(value)), so that

        bound + 6 * sum(len(str(v)) for v in payload.__dict__.values())

    is at least the length of its JSON. None for other models (their JSON is measured)."""
    fields = model.model_fields
    if not all(_scalar(field.annotation, _BOUNDED) for field in fields.values()):
        return None
    # Braces, and per field its quoted name, a colon, a comma and the value's 2 quotes.
    return 2 + sum(len(json.dumps(name, ensure_ascii=False).encode()) + 4 for name in fields)


def capped_validator(model: Any, max_bytes: int) -> Callable[[object], Any] | None:
    """A validator of the pydantic `model` that accepts only payloads whose pydantic JSON is at
    most `max_bytes` long, with no Python per payload: each str field is capped (`max_length`,
    checked inside pydantic-core) at an equal share of the bytes the other fields leave, at most
    6 bytes a character. A payload it refuses may still fit (one long field, short others): the
    caller validates it again with the model's own validator, which reports the real errors,
    and measures its JSON. None when some field's JSON no length caps (a number, a date, a
    nested value) or when the share would be empty: payloads of those models are measured."""
    from pydantic_core import SchemaValidator

    schema = _copied(model.__pydantic_core_schema__)
    fields = schema.get("schema", {})
    if fields.get("type") == "function-before":  # Payload's before-validator (tables.py)
        fields = fields["schema"]
    if schema.get("type") != "model" or fields.get("type") != "model-fields":
        return None
    capped: list[dict[str, Any]] = []
    fixed = 2  # the braces
    for name, field in fields["fields"].items():
        most = _most_bytes(field["schema"], capped)
        if most is None:
            return None
        # The field's name, quoted and escaped, a colon and a comma.
        fixed += 6 * len(name) + 2 + 2 + most
    if not capped:
        return model.__pydantic_validator__.validate_python if fixed <= max_bytes else None
    share = (max_bytes - fixed) // (6 * len(capped))
    if share < 1:
        return None
    for node in capped:
        node["max_length"] = min(node.get("max_length", share), share)
    try:
        # Not the model's own validator, which pydantic-core would reuse for a model schema.
        validator = SchemaValidator(schema, _use_prebuilt=False)
    except TypeError:  # a pydantic-core without the option: measure instead
        return None
    return validator.validate_python


def _copied(value: Any) -> Any:
    """`value` with its dicts and lists copied (a core schema, to change without touching the
    model's own), everything else shared."""
    if type(value) is dict:
        return {key: _copied(item) for key, item in value.items()}
    if type(value) is list:
        return [_copied(item) for item in value]
    return value


def _most_bytes(schema: dict[str, Any], capped: list[dict[str, Any]]) -> int | None:
    """The most bytes of JSON a value of the field `schema` writes, strings counted without
    their characters (their nodes go to `capped`); None if no length bounds it."""
    kind = schema.get("type")
    if kind == "default":
        inner = _most_bytes(schema["schema"], capped)
        default = schema.get("default")
        if inner is None or not (default is None or type(default) in (str, bool)):
            return None
        return max(inner, 6 * len(str(default)) + 2)
    if kind == "nullable":
        inner = _most_bytes(schema["schema"], capped)
        return None if inner is None else max(inner, 4)
    if kind == "bool":
        return 5
    if kind == "literal":
        choices = schema.get("expected", ())
        if not choices or not all(type(choice) is str for choice in choices):
            return None
        return max(6 * len(choice) + 2 for choice in choices)
    if kind == "str":
        capped.append(schema)
        return 2  # the quotes
    return None
