"""The IR: frozen pydantic models of a machine file; every node carries its SourceSpan."""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from .errors import SourceSpan

FieldKind = Literal["str", "int", "decimal", "bool", "datetime", "enum"]
FIELD_KINDS: tuple[str, ...] = ("str", "int", "decimal", "bool", "datetime")

_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def snake_case(name: str) -> str:
    """The generated module (and file stem) of a machine: QuotaSla -> quota_sla,
    HTTPGateway -> http_gateway, E104UnknownState -> e104_unknown_state."""
    return _WORD_BOUNDARY.sub("_", name).lower()


ModelT = TypeVar("ModelT", bound=BaseModel)
_SHAPES: dict[type[BaseModel], tuple[int, dict[str, Any]]] = {}
_new = object.__new__
_set = object.__setattr__


def construct(cls: type[ModelT], **values: Any) -> ModelT:
    """`cls.model_construct(**values)` without its per-field alias bookkeeping, which costs a
    third of parsing a large machine. Unset fields take their (immutable) defaults."""
    shape = _SHAPES.get(cls)
    if shape is None:
        fields = cls.model_fields
        defaults = {name: f.default for name, f in fields.items() if not f.is_required()}
        shape = _SHAPES[cls] = (len(fields), defaults)
    node = _new(cls)
    _set(node, "__dict__", values if len(values) == shape[0] else shape[1] | values)
    _set(node, "__pydantic_fields_set__", set(values))
    _set(node, "__pydantic_extra__", None)
    _set(node, "__pydantic_private__", None)
    return node


class Node(BaseModel):
    model_config = ConfigDict(frozen=True)

    span: SourceSpan


class Name(Node):
    """An identifier as written, with the span of that one token."""

    value: str


class Suppression(Node):
    code: str
    reason: str


class Duration(Node):
    millis: int
    text: str


class FieldType(Node):
    kind: FieldKind
    literals: tuple[Name, ...] = ()
    optional: bool = False


class Field(Node):
    name: Name
    type: FieldType
    doc: str | None = None


class Event(Node):
    name: Name
    doc: str | None = None
    fields: tuple[Field, ...] = ()
    suppressions: tuple[Suppression, ...] = ()


class EventRef(Node):
    """`Machine.Event` in an `emit` clause; machine is None for the same machine."""

    machine: Name | None
    event: Name


class Guard(Node):
    name: Name | None  # None means `else`

    @property
    def is_else(self) -> bool:
        return self.name is None


class Transition(Node):
    event: Name
    target: Name
    guard: Guard | None = None
    actions: tuple[Name, ...] = ()
    emits: tuple[EventRef, ...] = ()
    suppressions: tuple[Suppression, ...] = ()


class Timer(Node):
    """`after D [-> Target]`: measured from entry into the enclosing state."""

    after: Duration
    target: Name | None = None
    actions: tuple[Name, ...] = ()
    emits: tuple[EventRef, ...] = ()
    suppressions: tuple[Suppression, ...] = ()


class Ignore(Node):
    events: tuple[Name, ...]
    suppressions: tuple[Suppression, ...] = ()


class EscalationStep(Node):
    after: Duration
    recipient_kind: Literal["queue", "role"]
    recipient: Name
    within: Duration | None = None
    message: str | None = None


class EscalationEnd(Node):
    after: Duration
    target: Name
    actions: tuple[Name, ...] = ()
    emits: tuple[EventRef, ...] = ()


class Escalation(Node):
    name: Name | None
    steps: tuple[EscalationStep, ...] = ()
    end: EscalationEnd | None = None
    suppressions: tuple[Suppression, ...] = ()


class State(Node):
    name: Name
    doc: str | None = None
    initial: bool = False
    final: bool = False
    perpetual: bool = False
    transitions: tuple[Transition, ...] = ()
    timers: tuple[Timer, ...] = ()
    ignores: tuple[Ignore, ...] = ()
    escalations: tuple[Escalation, ...] = ()
    suppressions: tuple[Suppression, ...] = ()


class RetryStep(Node):
    state: Name
    after: Duration
    actions: tuple[Name, ...] = ()


class RetryEnd(Node):
    target: Name
    actions: tuple[Name, ...] = ()
    emits: tuple[EventRef, ...] = ()


class RetryLadder(Node):
    """Failure `event` in an entry state enters step 1; in step i it moves to step i+1;
    in the last step it goes to `exhausted`. Each step's timer runs its retry actions."""

    name: Name
    event: Name
    entry_states: tuple[Name, ...]
    steps: tuple[RetryStep, ...] = ()
    exhausted: RetryEnd | None = None
    suppressions: tuple[Suppression, ...] = ()


class Machine(Node):
    name: Name
    doc: str | None = None
    perpetual: bool = False
    events: tuple[Event, ...] = ()
    states: tuple[State, ...] = ()
    retries: tuple[RetryLadder, ...] = ()
    suppressions: tuple[Suppression, ...] = ()
    path: str
    source_sha256: str
