"""The IR: frozen pydantic models of a machine file; every node carries its SourceSpan."""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from .errors import SourceSpan

FieldKind = Literal["str", "int", "decimal", "bool", "datetime", "duration", "enum"]
FIELD_KINDS: tuple[str, ...] = ("str", "int", "decimal", "bool", "datetime", "duration")

_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def snake_case(name: str) -> str:
    """The generated module (and file stem) of a machine: QuotaSla -> quota_sla,
    HTTPGateway -> http_gateway, E104UnknownState -> e104_unknown_state."""
    return _WORD_BOUNDARY.sub("_", name).lower()


ModelT = TypeVar("ModelT", bound=BaseModel)
_new = object.__new__
_set = object.__setattr__


class _Shape:
    """What `construct` needs to know about a model class."""

    def __init__(self, cls: type[BaseModel]) -> None:
        fields = cls.model_fields
        self.size = len(fields)
        self.defaults = {name: f.default for name, f in fields.items() if not f.is_required()}
        self.every_field = set(fields)
        # A `__dict__` made attribute by attribute shares its keys with every other one of
        # its class (CPython's key-sharing dictionaries); copies of it share them too.
        prototype = _new(cls)
        for name in fields:
            _set(prototype, name, self.defaults.get(name))
        self.template: dict[str, Any] = prototype.__dict__


_SHAPES: dict[type[BaseModel], _Shape] = {}


def construct(cls: type[ModelT], **values: Any) -> ModelT:
    """`cls.model_construct(**values)` without its per-field alias bookkeeping, which costs a
    third of parsing a large machine. Unset fields take their (immutable) defaults.

    Given every field, the node's `__dict__` is a copy of a key-sharing one: it holds only
    values, the keys live once per class. A large machine then takes a quarter less memory,
    and walks over it (checks, lowering) look up fields in keys that stay in the cache. Such
    nodes also share one fields-set object: pydantic copies it before changing it
    (`model_copy`), and frozen models never add to it."""
    shape = _SHAPES.get(cls)
    if shape is None:
        shape = _SHAPES[cls] = _Shape(cls)
    node = _new(cls)
    if len(values) == shape.size:
        _set(node, "__dict__", shape.template | values)
        _set(node, "__pydantic_fields_set__", shape.every_field)
    else:
        _set(node, "__dict__", shape.defaults | values)
        _set(node, "__pydantic_fields_set__", set(values))
    _set(node, "__pydantic_extra__", None)
    _set(node, "__pydantic_private__", None)
    return node


_SPAN_FIELDS = set(SourceSpan.model_fields)


def construct_span(path: str, line: int, column: int, end_line: int, end_column: int) -> SourceSpan:
    """`construct(SourceSpan, ...)` for the parser's hottest node: one per token it keeps.
    Built as one plain dict: filled attribute by attribute, a key-sharing one (see
    `construct`) would cost half as much again and save nothing for five small values."""
    span = _new(SourceSpan)
    _set(
        span,
        "__dict__",
        {
            "path": path,
            "line": line,
            "column": column,
            "end_line": end_line,
            "end_column": end_column,
        },
    )
    _set(span, "__pydantic_fields_set__", _SPAN_FIELDS)
    _set(span, "__pydantic_extra__", None)
    _set(span, "__pydantic_private__", None)
    return span


class Node(BaseModel):
    model_config = ConfigDict(frozen=True)

    span: SourceSpan


class Name(Node):
    """An identifier as written, with the span of that one token."""

    value: str


_NAME_FIELDS = set(Name.model_fields)


def construct_name(value: str, path: str, line: int, column: int, end_column: int) -> Name:
    """A Name with the span of its one-line token: the parser's most frequent node, built
    with its span in one go (as `construct_span` and `construct` would)."""
    span = _new(SourceSpan)
    _set(
        span,
        "__dict__",
        {"path": path, "line": line, "column": column, "end_line": line, "end_column": end_column},
    )
    _set(span, "__pydantic_fields_set__", _SPAN_FIELDS)
    _set(span, "__pydantic_extra__", None)
    _set(span, "__pydantic_private__", None)
    name = _new(Name)
    _set(name, "span", span)  # attribute by attribute: a key-sharing dict (see `construct`)
    _set(name, "value", value)
    _set(name, "__pydantic_fields_set__", _NAME_FIELDS)
    _set(name, "__pydantic_extra__", None)
    _set(name, "__pydantic_private__", None)
    return name


class Suppression(Node):
    code: str
    reason: str


class Duration(Node):
    millis: int
    text: str


class Delay(Node):
    """A timer's delay that is not written as a duration: `event.NAME`, a duration field of
    the event that entered the state, or `setting NAME`, supplied when the machine is loaded."""

    kind: Literal["field", "setting"]
    name: Name


class FieldType(Node):
    kind: FieldKind
    literals: tuple[Name, ...] = ()
    optional: bool = False


EmitValueKind = Literal["field", "string", "number", "bool", "ref"]


class EmitValue(Node):
    """The value of an emit argument as written: a field of the causing event (`note`), a
    string, a number (its text: `12`, `0.50`), `true`/`false`, or a `$reference` (its name
    without the `$`)."""

    kind: EmitValueKind
    text: str


class Field(Node):
    """A payload, data or flow input field. Only a flow input carries bounds (`at least`,
    `at most`): each a number (an EmitValue of kind "number") or another input's Name."""

    name: Name
    type: FieldType
    doc: str | None = None
    at_least: EmitValue | Name | None = None
    at_most: EmitValue | Name | None = None


class Event(Node):
    name: Name
    doc: str | None = None
    fields: tuple[Field, ...] = ()
    suppressions: tuple[Suppression, ...] = ()


class EmitArgument(Node):
    """`field = value` in `emit Machine.Event(...)`."""

    field: Name
    value: EmitValue


class EventRef(Node):
    """`Machine.Event` in an `emit` clause; machine is None for the same machine. `args` are
    the payload arguments as written (the other target fields come from same-named causing
    fields). `to` names the data field that holds the receiving instance's id (`emit ... to
    customer_id`); None sends to the instance with the emitting instance's id. `refused` is
    the notice of a refused delivery (`emit ... if refused Event(...)`)."""

    machine: Name | None
    event: Name
    args: tuple[EmitArgument, ...] = ()
    to: Name | None = None
    # `if refused Event(...)`: this machine's event that the emitting instance receives when
    # the receiver refuses the delivery (its arguments as an emit's, with the same cause).
    refused: EventRef | None = None


class Keep(Node):
    """`keep field` or `keep field = causing_field` on a row: the instance's data field
    `field` takes the value of the causing event's field `source` when the row is taken."""

    field: Name
    source: Name


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
    keeps: tuple[Keep, ...] = ()
    emits: tuple[EventRef, ...] = ()
    suppressions: tuple[Suppression, ...] = ()


class Timer(Node):
    """`after D [-> Target]`: measured from entry into the enclosing state. With a `delay`
    (`after event.snooze_for`, `after setting grace`), `after` holds its text and no millis."""

    after: Duration
    delay: Delay | None = None
    target: Name | None = None
    actions: tuple[Name, ...] = ()
    emits: tuple[EventRef, ...] = ()
    suppressions: tuple[Suppression, ...] = ()


class Ignore(Node):
    events: tuple[Name, ...]
    suppressions: tuple[Suppression, ...] = ()


class Repeat(Node):
    """`repeat COUNT every D`: a step that fires COUNT times in all, D apart."""

    count: int
    count_span: SourceSpan
    every: Duration


class EscalationStep(Node):
    after: Duration
    recipient_kind: Literal["queue", "role"]
    recipient: Name
    within: Duration | None = None
    message: str | None = None
    repeat: Repeat | None = None

    @property
    def last(self) -> int:
        """When its last repetition fires, from entry."""
        if self.repeat is None:
            return self.after.millis
        return self.after.millis + (self.repeat.count - 1) * self.repeat.every.millis


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


class Entry(Node):
    """`entry do ... emit ...`: runs when the state is entered (t = 0)."""

    actions: tuple[Name, ...] = ()
    emits: tuple[EventRef, ...] = ()
    suppressions: tuple[Suppression, ...] = ()


class State(Node):
    name: Name
    doc: str | None = None
    initial: bool = False
    final: bool = False
    perpetual: bool = False
    resting: bool = False
    transitions: tuple[Transition, ...] = ()
    timers: tuple[Timer, ...] = ()
    ignores: tuple[Ignore, ...] = ()
    escalations: tuple[Escalation, ...] = ()
    entries: tuple[Entry, ...] = ()
    suppressions: tuple[Suppression, ...] = ()


class RetryStep(Node):
    """`step W after D do A [attempt S timeout T]`: wait in W for D, run A; with `attempt`,
    the attempt is in flight in S until the failure event, or T without an answer, moves on."""

    state: Name
    after: Duration
    actions: tuple[Name, ...] = ()
    attempt: Name | None = None
    timeout: Duration | None = None
    # `repeat N every E`: the attempt is made again every E while it has no answer.
    repeat: Repeat | None = None

    @property
    def attempts(self) -> int:
        """How many attempts the step makes at most."""
        return 1 if self.repeat is None else self.repeat.count


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
    cap: int | None = None  # `at most N attempts`
    cap_span: SourceSpan | None = None
    suppressions: tuple[Suppression, ...] = ()


class Group(Node):
    """`group Name { A, B, C }`: states that a group timer treats as one."""

    name: Name
    doc: str | None = None
    states: tuple[Name, ...] = ()
    suppressions: tuple[Suppression, ...] = ()


class AlwaysAccept(Node):
    """`always accept Event [except A, B]`: every state but the final ones and the ones
    listed handles or ignores the event (E123 names a state that does neither)."""

    event: Name
    exceptions: tuple[Name, ...] = ()
    doc: str | None = None


class Setting(Node):
    """`setting name between LOW and HIGH`: a duration supplied when the machine is loaded."""

    name: Name
    doc: str | None = None
    low: Duration
    high: Duration
    suppressions: tuple[Suppression, ...] = ()


class MachineTimer(Node):
    """`after D in Group -> T` (armed on entering the group, kept while moving inside it,
    cancelled on leaving it) or `after D from creation -> T` (armed at creation)."""

    after: Duration
    delay: Delay | None = None
    scope: Literal["group", "creation"]
    group: Name | None = None
    target: Name
    actions: tuple[Name, ...] = ()
    emits: tuple[EventRef, ...] = ()
    suppressions: tuple[Suppression, ...] = ()


class PolicyRetry(Node):
    """`retry N attempts [backoff exponential|jitter [max D]]`."""

    attempts: EmitValue
    backoff: str = "jitter"
    backoff_max: Duration | None = None


class PolicyBreaker(Node):
    """`breaker tolerates N failures cooldown D`: the (N+1)th consecutive failure opens it."""

    tolerated: EmitValue
    cooldown: Duration


class PolicyFallback(Node):
    action: Name


class PolicyBulkhead(Node):
    limit: EmitValue


PolicyClause = PolicyRetry | PolicyBreaker | PolicyFallback | PolicyBulkhead


class Policy(Node):
    """A resilience policy applied by the runtime around each of `actions` when it runs."""

    name: Name
    actions: tuple[Name, ...]
    doc: str | None = None
    clauses: tuple[PolicyClause, ...] = ()
    suppressions: tuple[Suppression, ...] = ()


class Machine(Node):
    name: Name
    doc: str | None = None
    perpetual: bool = False
    events: tuple[Event, ...] = ()
    states: tuple[State, ...] = ()
    retries: tuple[RetryLadder, ...] = ()
    policies: tuple[Policy, ...] = ()
    groups: tuple[Group, ...] = ()
    settings: tuple[Setting, ...] = ()
    machine_timers: tuple[MachineTimer, ...] = ()
    # `data { ... }`: what each instance keeps beside its state (set by `keep`).
    data: tuple[Field, ...] = ()
    always: tuple[AlwaysAccept, ...] = ()
    suppressions: tuple[Suppression, ...] = ()
    path: str
    source_sha256: str


# ---------------------------------------------------------------- flows

FlowKind = Literal["sequence", "parallel", "conditional", "fanout", "saga"]
FLOW_KINDS: tuple[str, ...] = ("sequence", "parallel", "conditional", "fanout", "saga")
StepKind = Literal["send", "await", "compute"]


class FlowStep(Node):
    """One step of a flow. `send`: dispatch `target` (Machine.Event with arguments) to the
    flow's instance of that machine; `await`: wait, durably, until `machine` is in one of
    `states` (at most `within`; failing at once in one of `unless`); `compute`: call the pure
    function `function`, whose result later arguments may name. `compensate` undoes a send;
    `irreversible` says none can."""

    name: Name
    kind: StepKind
    target: EventRef | None = None
    to: Name | None = None  # the input field naming the instance; None: the flow's own
    machine: Name | None = None
    states: tuple[Name, ...] = ()
    unless: tuple[Name, ...] = ()  # an await's states that end it as failed
    within: Duration | None = None
    function: Name | None = None
    compensate: EventRef | None = None
    irreversible: bool = False
    doc: str | None = None
    suppressions: tuple[Suppression, ...] = ()

    @property
    def receiver(self) -> Name | None:
        """The machine this step acts on or watches (None for compute and bare events)."""
        if self.kind == "send":
            return None if self.target is None else self.target.machine
        return self.machine if self.kind == "await" else None


class FlowBranch(Node):
    """`when Case { steps }` of a conditional flow."""

    case: Name
    steps: tuple[FlowStep, ...] = ()


class Flow(Node):
    name: Name
    kind: FlowKind
    doc: str | None = None
    inputs: tuple[Field, ...] = ()
    on: Name | None = None  # the input field a conditional flow branches on
    within: Duration | None = None  # a fanout's deadline for its replies
    quorum: EmitValue | None = None  # how many fanout replies must succeed
    steps: tuple[FlowStep, ...] = ()
    branches: tuple[FlowBranch, ...] = ()
    suppressions: tuple[Suppression, ...] = ()
    path: str
    source_sha256: str

    def all_steps(self) -> tuple[FlowStep, ...]:
        return self.steps + tuple(step for branch in self.branches for step in branch.steps)
