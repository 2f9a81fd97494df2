"""A dispatch's inputs, checked before its unit of work: identifiers, the event, the payload
validated with the generated model and held to the size and depth limits, and its digest."""

from __future__ import annotations

import difflib
import hashlib
import sys
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, final

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from .errors import PayloadEncodingError, PayloadInvalid, UnknownEvent
from .inputs import (
    InputLimits,
    capped_validator,
    check_identifier,
    check_payload_depth,
    check_payload_size,
    payload_error_message,
    payload_is_flat,
    payload_size_bound,
)
from .ledger import (
    _JSON_STRING,
    EMPTY_PAYLOAD_DIGEST,
    PAYLOAD_TAG,
    _jcs,
    _sort_keys,
    canonical_json,
)
from .results import _request_digest
from .tables import Payload, _text_kind

if TYPE_CHECKING:
    from .dispatch import Governor
    from .unit import _UnitInputs

__all__ = [
    "DEFAULT_ACTOR",
    "DispatchRequest",
    "check_inputs",
    "refuse_payload",
    "refused",
    "unknown_event",
]

DEFAULT_ACTOR = "system"
# Up to this many zeros, a canonical decimal is written out (30, 0.005); past it, with an
# exponent, so a huge exponent costs no huge text.
_PLAIN_ZEROS = 30


class DispatchRequest(NamedTuple):
    """One event for `Governor.dispatch_many`: `dispatch`'s arguments."""

    instance_id: str
    event: str
    payload: Mapping[str, Any] | Payload | None = None
    actor: str = DEFAULT_ACTOR
    event_id: str | None = None
    idempotency_key: str | None = None
    expected_version: int | None = None


def _json_size(payload: Payload) -> int:
    """The length of pydantic's JSON of a validated payload."""
    try:
        return len(payload.__pydantic_serializer__.to_json(payload))
    except PydanticSerializationError as exc:  # a lone surrogate in a string, say
        raise PayloadEncodingError(f"the payload cannot be written as JSON: {exc}") from None


def _validation_problems(error: ValidationError) -> tuple[tuple[str, str], ...]:
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(payload)"
        problems.append((where, payload_error_message(item)))
    return tuple(problems)


def _takes_no_payload(payload: object) -> Payload:
    raise AssertionError("an event without a model validates nothing")


def _dumps_nothing(payload: Payload) -> dict[str, Any]:
    raise AssertionError("an event without a model dumps nothing")


def _dumper(model: type[Payload]) -> Callable[[Payload], dict[str, Any]]:
    """`model_dump(mode="json")` of the model's payloads, without model_dump's Python frame,
    which only passes its defaults on to the serializer (half the cost of a flat dump)."""
    if model.model_dump is not BaseModel.model_dump:  # a model that dumps its own way
        return partial(model.model_dump, mode="json")
    return partial(model.__pydantic_serializer__.to_python, mode="json")


def _canonical_fields(names: Sequence[str]) -> Callable[[Mapping[str, Any]], bytes]:
    """`canonical_json` of a dict keyed by exactly `names` (a flat model's dump), the same
    bytes: its keys' order and their quoted text found once, not for every payload. Anything
    else (another set of keys, a value it cannot encode) is left to canonical_json itself,
    which raises what it raises."""
    keys = list(names)
    _sort_keys(keys, "".join(keys))
    fields = tuple((key, _JSON_STRING(key) + ":") for key in keys)
    count = len(fields)

    def canonical(dumped: Mapping[str, Any]) -> bytes:
        if len(dumped) != count:
            return canonical_json(dumped)
        try:
            return (
                "{"
                + ",".join(
                    [
                        quoted
                        + (
                            _JSON_STRING(value)
                            if type(value := dumped[key]) is str
                            else _jcs(value)
                        )
                        for key, quoted in fields
                    ]
                )
                + "}"
            ).encode("utf-8")
        except (KeyError, UnicodeEncodeError, RecursionError):
            return canonical_json(dumped)

    return canonical


@final
class _EventInput:
    """How dispatch checks one event's payload, decided at load time: the plain event name,
    the generated model (None: the event takes no payload), its validator, whether the model
    is flat (no depth check needed), and how the JSON size limit is kept (see inputs.py):
    `capped`, the validator refuses what could exceed it (what it refuses is validated again
    by `exact`, the model's own, and measured); else its JSON size bound, or None (measured)."""

    __slots__ = (
        "bound",
        "canonical",
        "capped",
        "decimals",
        "dump",
        "exact",
        "flat",
        "model",
        "name",
        "validate",
    )

    def __init__(self, name: str, model: type[Payload] | None, limits: InputLimits) -> None:
        self.name = sys.intern(name)
        self.model = model
        self.validate: Callable[[object], Payload] = _takes_no_payload
        self.exact: Callable[[object], Payload] = _takes_no_payload
        self.capped = False
        self.flat = False
        self.bound: int | None = None
        # The payload's JSON-mode dump and that dump's canonical JSON (the digest's bytes).
        self.dump: Callable[[Payload], dict[str, Any]] = _dumps_nothing
        self.canonical: Callable[[Mapping[str, Any]], bytes] = canonical_json
        # The Decimal fields: an idempotency key's request compares them by value.
        self.decimals: tuple[str, ...] = ()
        if model is not None:
            self.decimals = tuple(
                name
                for name, info in model.model_fields.items()
                if _text_kind(info.annotation) is Decimal
            )
            # The validator model_validate calls, without its Python frame and options.
            self.validate = model.__pydantic_validator__.validate_python
            self.exact = self.validate
            self.flat = payload_is_flat(model)
            self.dump = _dumper(model)
            if self.flat:
                self.canonical = _canonical_fields(tuple(model.model_fields))
            self.bound = payload_size_bound(model)
            capped = capped_validator(model, limits.max_payload_bytes) if self.flat else None
            if capped is not None:
                self.validate = capped
                self.capped = True


def check_inputs(
    governor: Governor,
    instance_id: str,
    event: str,
    payload: Mapping[str, Any] | Payload | None,
    actor: str,
    event_id: str | None,
    idempotency_key: str | None,
    expected_version: int | None,
    record_rejection: bool,
) -> _UnitInputs:
    """Check the identifiers and the event, validate the payload and its bounds (nothing is
    stored yet): what the unit of work (`_step`) takes."""
    # An instance the memory store holds was checked when it was created.
    if type(instance_id) is not str or instance_id not in governor._records:
        check_identifier("instance id", instance_id)
    if actor is not DEFAULT_ACTOR:
        check_identifier("actor", actor)
    if event_id is not None:
        check_identifier("event id", event_id)
    if idempotency_key is not None:
        check_identifier("idempotency key", idempotency_key)
    plan = governor._event_inputs.get(event)
    if plan is None:
        raise governor._unknown_event(event)
    event = plan.name
    model = plan.model
    validated: Payload | None
    fits = False  # the validator refused any payload over the size limit (plan.capped)
    if model is None:
        validated = None
        if payload is not None:
            governor._refuse_payload(event, payload)
    elif type(payload) is model:
        validated = payload
    else:
        if payload is not None and not plan.flat:
            check_payload_depth(payload, governor.runtime._limits)
        data = {} if payload is None else payload
        try:
            validated = plan.validate(data)
        except ValidationError as exc:
            validated = governor._refused(plan, payload, data, exc)
        else:
            fits = plan.capped
    digest = EMPTY_PAYLOAD_DIGEST
    compared = digest  # what an idempotency key's request holds of the payload
    if validated is not None:
        limits = governor.runtime._limits
        if governor._sealed or idempotency_key is not None:
            dumped = plan.dump(validated)
            encoded = plan.canonical(dumped)
            check_payload_size(len(encoded), limits)
            compared = digest = hashlib.sha256(PAYLOAD_TAG + encoded).digest()
            if idempotency_key is not None and plan.decimals:
                compared = _by_value(validated, dumped, plan.decimals, digest)
        elif not fits:
            # Nothing records a digest: the size bound needs only the JSON's length, and
            # a flat payload's is bounded by its values' text (see inputs.py) unless long.
            bound = plan.bound
            if (
                bound is None
                or bound + 6 * sum(map(len, map(str, validated.__dict__.values())))
                > limits.max_payload_bytes
            ):
                check_payload_size(_json_size(validated), limits)
    request = None if idempotency_key is None else _request_digest(instance_id, event, compared)
    return (
        instance_id,
        event,
        validated,
        digest,
        actor,
        event_id,
        idempotency_key,
        request,
        expected_version,
        record_rejection,
        None,
    )


def _by_value(
    validated: Payload, dumped: dict[str, Any], decimals: tuple[str, ...], digest: bytes
) -> bytes:
    """The payload's digest with its Decimal fields by value ("30.00", "30", 30 and "3E+1"
    are one amount; the ledger's `digest` keeps the text as sent): `digest` itself when each
    is written in its canonical form already, as a request stored before this rule was."""
    changed = False
    for name in decimals:
        value = getattr(validated, name)
        if value is not None:
            canonical = canonical_decimal(value)
            if dumped[name] != canonical:
                dumped[name] = canonical
                changed = True
    if not changed:
        return digest
    return hashlib.sha256(PAYLOAD_TAG + canonical_json(dumped)).digest()


def canonical_decimal(value: Decimal) -> str:
    """One text per finite value, however it was written, without rounding (Decimal's
    `normalize` rounds to the context's precision, which would make two amounts one): the
    plain digits when the value is whole or written with its fraction's trailing zeros
    removed ("30.00" and "3E+1" -> "30", "0.50" -> "0.5", "-0" -> "0"), else
    <coefficient>E<exponent>."""
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        return str(value)  # NaN or Infinity, which a validated payload never holds
    text = "".join(map(str, digits)).lstrip("0")
    stripped = text.rstrip("0")
    if not stripped:
        return "0"
    exponent += len(text) - len(stripped)
    minus = "-" if sign else ""
    if exponent >= 0 and exponent <= _PLAIN_ZEROS:
        return f"{minus}{stripped}{'0' * exponent}"
    if exponent < 0 and -exponent <= _PLAIN_ZEROS:
        whole, fraction = stripped[:exponent], stripped[exponent:]
        return f"{minus}{whole or '0'}.{fraction.rjust(-exponent, '0')}"
    return f"{minus}{stripped}E{exponent}"


def refused(
    governor: Governor,
    plan: _EventInput,
    payload: Mapping[str, Any] | Payload | None,
    data: object,
    error: ValidationError,
) -> Payload:
    """A payload the event's validator refused: valid after all if only a cap of a capped
    validator refused it (the caller then measures its JSON), else PayloadInvalid with the
    model's own errors."""
    if plan.capped:
        try:
            return plan.exact(data)
        except ValidationError as exc:
            error = exc
    # A flat model walks no nested input, so its depth is checked only now: a payload
    # nested too deeply is refused as such, whatever else is wrong.
    if payload is not None and plan.flat:
        check_payload_depth(payload, governor.runtime._limits)
    raise PayloadInvalid(governor.name, plan.name, _validation_problems(error)) from None


def refuse_payload(governor: Governor, event: str, payload: Mapping[str, Any] | Payload) -> None:
    """PayloadInvalid for a payload with fields given to an event that takes none."""
    if isinstance(payload, Payload):
        fields = tuple(type(payload).model_fields)
    elif isinstance(payload, Mapping):
        fields = tuple(str(k) for k in payload)
    else:
        raise PayloadInvalid(
            governor.name, event, (("(payload)", f"expected a mapping, not {type(payload)}"),)
        )
    if fields:
        raise PayloadInvalid(
            governor.name,
            event,
            tuple((f, "unexpected field: the event takes no payload") for f in fields),
        )


def unknown_event(governor: Governor, event: object) -> UnknownEvent:
    close = difflib.get_close_matches(str(event), sorted(governor._events), n=1, cutoff=0.6)
    hint = (
        f"did you mean '{close[0]}'?"
        if close
        else (f"{governor.name} declares: {', '.join(sorted(governor._events))}")
    )
    return UnknownEvent(governor.name, str(event), hint)
