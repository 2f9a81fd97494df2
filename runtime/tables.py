"""The contract between generated governor modules and the runtime: the only module they import.

Generated modules hold plain data built from these types. Every table is immutable
(MappingProxyType, tuples, frozensets, frozen dataclasses). State and Event enums are
StrEnums, so a member hashes and compares like its plain string value and the runtime can
key its dispatch dicts by `str`.

The typed face of a generated module builds on the last section here: `TransitionContext`
(what a guard or action receives, generic in its payload model), `TypedGovernor` (the base of
each module's `Governor`, whose `dispatch` takes an Event member and that event's payload
model) and `Outcome` (a result whose states are the machine's State enum). They name the
runtime's classes for the type checker only, so this module imports nothing of the runtime.
"""

from __future__ import annotations

import contextlib
import datetime as _datetime
import decimal as _decimal
import enum
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Generic,
    Literal,
    NamedTuple,
    TypedDict,
    TypeVar,
    cast,
)

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, model_validator
from typing_extensions import TypeVar as DefaultedTypeVar

if TYPE_CHECKING:
    from typing import Self

    from .dispatch import Governor
    from .ledger import LedgerEntry
    from .results import DispatchResult, EmittedEvent, Notification
    from .runtime import Runtime
    from .timers import ArmedTimer

__all__ = [
    "ELSE",
    "ActionPolicy",
    "Decimal",
    "DispatchOptions",
    "Emit",
    "EmitArg",
    "EmitSource",
    "EscalationLadder",
    "EscalationStepSpec",
    "FlowSpec",
    "FlowStepSpec",
    "GovernorEnum",
    "Literal",
    "MachineSpec",
    "Notify",
    "Outcome",
    "Payload",
    "RetryLadderSpec",
    "RetryStepSpec",
    "SettingSpec",
    "SourceRef",
    "TimerKind",
    "TimerSpec",
    "Transition",
    "TransitionContext",
    "TypedGovernor",
    "datetime",
    "frozen_map",
    "timedelta",
]

Decimal = _decimal.Decimal
datetime = _datetime.datetime
timedelta = _datetime.timedelta  # the type of `duration` payload fields

# The guard name of an `else` branch.
ELSE = "else"

K = TypeVar("K")
V = TypeVar("V")


def frozen_map(items: Mapping[K, V]) -> Mapping[K, V]:
    """An immutable view of a dict built once at import time."""
    return MappingProxyType(dict(items))


class GovernorEnum(enum.StrEnum):
    """Base of generated State and Event enums: members are their own string values."""


def _text_kind(annotation: object) -> type | None:
    """Decimal, datetime or timedelta when a field of that type (or an optional one) is
    annotated."""
    if annotation in (_decimal.Decimal, _datetime.datetime, _datetime.timedelta):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            found = _text_kind(member)
            if found is not None:
                return found
    return None


class Payload(BaseModel):
    """Base of generated event payload models: strict, no unknown fields, immutable.

    A payload goes into a signed ledger, so it must mean exactly what it says: validation is
    pydantic's strict mode, with two documented text forms for the types JSON lacks.

    - str: a string. int: an integer (never a bool, a float or a numeric string).
    - bool: true or false (never "no", 0 or 1). Literal choices: one of the exact strings.
    - Decimal: a Decimal, an integer, or a string in decimal notation ("12.50"); never a
      float, whose binary value is not the decimal the sender wrote; never NaN or Infinity.
    - datetime: a datetime, or an ISO 8601 string ("2025-01-31T09:30:00+00:00", "...Z").
    - timedelta (`duration` fields): a timedelta, or an ISO 8601 duration string ("PT2H",
      "P1DT12H"); never a number, whose unit would be a guess.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    # Per class: the fields holding a Decimal or a datetime (found once, on first validation).
    _text_fields: ClassVar[dict[type[BaseModel], dict[str, type]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        fields = Payload._text_fields.get(cls)
        if fields is None:
            fields = {
                name: kind
                for name, info in cls.model_fields.items()
                if (kind := _text_kind(info.annotation)) is not None
            }
            Payload._text_fields[cls] = fields
        if not fields or not isinstance(data, Mapping):
            return data
        converted = dict(data)
        for name, kind in fields.items():
            if name not in converted:
                continue  # missing: strict validation says so (or takes the default)
            value = converted[name]
            if kind is _decimal.Decimal:
                converted[name] = _decimal_from(value)
            elif type(value) is str and kind is _datetime.timedelta:
                # Text that is no ISO 8601 duration stays text: strict validation rejects it.
                with contextlib.suppress(ValidationError):
                    converted[name] = _DURATION_TEXT.validate_python(value)
            elif type(value) is str:
                # Text that is no ISO 8601 time stays text: strict validation rejects it.
                with contextlib.suppress(ValueError):
                    converted[name] = _datetime.datetime.fromisoformat(value)
        return converted


# pydantic's own ISO 8601 duration parser (lax mode reads "PT2H"); used for text only.
_DURATION_TEXT: TypeAdapter[_datetime.timedelta] = TypeAdapter(_datetime.timedelta)

_DECIMAL_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _decimal_from(value: object) -> object:
    """A Decimal from an integer or decimal text; anything else unchanged (strict rejects it)."""
    if type(value) is int:
        return _decimal.Decimal(value)
    if type(value) is str and _DECIMAL_TEXT.fullmatch(value):
        return _decimal.Decimal(value)
    return value


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where something was written in its machine file (for load-time errors)."""

    path: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"


EmitSource = Literal[
    "field", "literal", "instance", "actor", "event", "refusal_code", "refusal_message", "data"
]


@dataclass(frozen=True, slots=True)
class EmitArg:
    """One payload field of an emitted event and where its value comes from.

    `source` "field": `value` names a field of the causing event's payload; "literal": `value`
    is the value itself (a decimal as its string, which the payload model converts);
    "instance", "actor", "event": the emitting instance's id, the actor of the causing
    dispatch (the timer actor for timers), the causing event's name (the timer id for
    timers), with `value` None; "refusal_code", "refusal_message" (a refusal notice's
    arguments only): the code and message of the receiver's refusal of the delivery; "data":
    `value` names a data field the instance keeps (`$data.FIELD`, read as of the emit, after
    the row's own `keep`s).
    """

    field: str
    source: EmitSource
    value: str | int | bool | None


@dataclass(frozen=True, slots=True)
class Emit:
    """An event sent to another governor (or this one) after a transition commits.

    `args` is the full payload mapping, implicit same-name fields included (the compiler
    resolves them): the runtime builds the emitted payload from these alone.
    """

    machine: str
    event: str
    args: tuple[EmitArg, ...] = ()
    # The emitting instance's data field that holds the receiver's id (`emit ... to FIELD`);
    # None: the instance with the emitting instance's id.
    to: str | None = None
    # `emit ... if refused Notice(...)`: the event of the emitting machine (and its payload,
    # built from the same cause) the emitting instance receives if the receiver refuses.
    refused: Emit | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of the transition table. `guard` is None (unguarded), a guard name, or ELSE.

    Rows for one (state, event) key are ordered: guarded rows in source order, ELSE last.
    """

    source: str
    event: str
    target: str
    guard: str | None
    actions: tuple[str, ...]
    emits: tuple[Emit, ...]
    ref: SourceRef
    # (data field, causing event field) for each `keep` of the row: kept with the move.
    keep: tuple[tuple[str, str], ...] = ()


TimerKind = Literal[
    "timeout", "escalation_step", "escalation_end", "retry_step", "retry_timeout", "entry"
]
# What a timer is measured from: entry into its state, entry into its group, or creation.
TimerScope = Literal["state", "group", "creation"]


@dataclass(frozen=True, slots=True)
class Notify:
    """Whom an escalation step notifies, and how long they have to act (None: no deadline)."""

    kind: Literal["queue", "role"]
    recipient: str
    within_ms: int | None
    message: str | None


@dataclass(frozen=True, slots=True)
class TimerSpec:
    """A deadline armed on entry to `state`, `after_ms` later; cancelled when the state is left.

    `target` None means the timer runs its actions (and notifications) and stays in the state.
    `id` is stable within its machine, so stores can key armed timers by it.
    """

    id: str
    state: str
    after_ms: int
    kind: TimerKind
    target: str | None
    actions: tuple[str, ...]
    emits: tuple[Emit, ...]
    notify: Notify | None
    ladder: str | None
    step: int | None
    ref: SourceRef
    # A group timer (`state` is then the group's name) stays armed while the instance moves
    # inside its group; a creation timer (`state` ""), until the instance ends.
    scope: TimerScope = "state"
    group: str | None = None
    # The delay is the entering event's duration field, or a setting given at load time;
    # `after_ms` is then 0.
    after_field: str | None = None
    after_setting: str | None = None


@dataclass(frozen=True, slots=True)
class EscalationStepSpec:
    step: int
    after_ms: int
    notify: Notify
    timer_id: str


@dataclass(frozen=True, slots=True)
class EscalationLadder:
    """An escalation ladder of one state: steps measured from entry, then an optional end."""

    name: str
    state: str
    steps: tuple[EscalationStepSpec, ...]
    end_after_ms: int | None
    end_target: str | None
    end_timer_id: str | None
    ref: SourceRef


@dataclass(frozen=True, slots=True)
class RetryStepSpec:
    step: int
    state: str
    after_ms: int
    actions: tuple[str, ...]
    timer_id: str
    # With an attempt state, the step waits in `state`, runs the attempt into
    # `attempt_state`, and an attempt unanswered for `timeout_ms` counts as failed.
    attempt_state: str | None = None
    timeout_ms: int | None = None
    timeout_timer_id: str | None = None
    # `repeat N every E`: the attempt is made again every `every_ms` while it has no answer,
    # `repeat` attempts in all (timers `timer_id.2`, `.3`, ... of kind retry_step).
    repeat: int = 1
    every_ms: int | None = None


@dataclass(frozen=True, slots=True)
class SettingSpec:
    """A duration the host supplies when it loads the machine, within [min_ms, max_ms]."""

    name: str
    doc: str | None
    min_ms: int
    max_ms: int
    ref: SourceRef


@dataclass(frozen=True, slots=True)
class RetryLadderSpec:
    """A retry ladder: `event` advances entry -> step 1 -> ... -> step n -> exhausted."""

    name: str
    event: str
    entry_states: tuple[str, ...]
    steps: tuple[RetryStepSpec, ...]
    exhausted_target: str | None
    ref: SourceRef


@dataclass(frozen=True, slots=True)
class ActionPolicy:
    """A `policy` of the machine file: how the runtime runs each of `actions` when they call
    the outside world (see autonomic.runtime.resilience.policies). None: no such clause."""

    name: str
    actions: tuple[str, ...]
    attempts: int = 1
    backoff: Literal["exponential", "jitter"] = "jitter"
    backoff_max_ms: int | None = None
    tolerated_failures: int | None = None
    cooldown_ms: int | None = None
    fallback: str | None = None
    bulkhead: int | None = None
    ref: SourceRef | None = None


@dataclass(frozen=True, slots=True)
class MachineSpec:
    """Everything the runtime needs about one governor, as generated from its machine file."""

    name: str
    doc: str | None
    source_path: str
    source_sha256: str
    compiler_version: str
    state_type: type[GovernorEnum]
    event_type: type[GovernorEnum]
    initial: str
    finals: frozenset[str]
    transitions: Mapping[tuple[str, str], tuple[Transition, ...]]
    timers: Mapping[str, tuple[TimerSpec, ...]]
    ignored: Mapping[str, frozenset[str]]
    payloads: Mapping[str, type[Payload]]
    escalations: Mapping[str, EscalationLadder]
    retries: Mapping[str, RetryLadderSpec]
    guards: Mapping[str, SourceRef]
    actions: Mapping[str, SourceRef]
    # By policy name; empty for machines without `policy` declarations.
    policies: Mapping[str, ActionPolicy] = field(default_factory=lambda: MappingProxyType({}))
    # Resting states: valid places to stop that can be left (unlike finals).
    resting: frozenset[str] = frozenset()
    groups: Mapping[str, frozenset[str]] = field(default_factory=lambda: frozen_map({}))
    group_timers: Mapping[str, tuple[TimerSpec, ...]] = field(
        default_factory=lambda: frozen_map({})
    )
    creation_timers: tuple[TimerSpec, ...] = ()
    settings: Mapping[str, SettingSpec] = field(default_factory=lambda: frozen_map({}))
    # The `data` fields an instance keeps beside its state (set by rows' `keep`).
    data: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Flows: generated from `flow` declarations, run by autonomic.runtime.flows.

FlowKind = Literal["sequence", "parallel", "conditional", "fanout", "saga"]
StepKind = Literal["send", "await", "compute"]


class FlowInput(NamedTuple):
    """A flow input's declared type: `kind` is one of the language's field types (str, int,
    decimal, bool, datetime, duration, enum with its `literals`); the flow's start checks
    its value as an event payload's field of that type (runtime/flows/inputs.py). An int or
    decimal input may be bounded (`at least` / `at most`): each bound is a number's text
    ("0", "-2.50") or the name of another input whose value bounds it."""

    kind: str
    literals: tuple[str, ...] = ()
    optional: bool = False
    at_least: str | None = None
    at_most: str | None = None


@dataclass(frozen=True, slots=True)
class FlowStepSpec:
    """One step. `send`: dispatch `send` (its args: "field" names a flow input or a compute
    step's result) to the flow's instance of its machine, or to the instance named by the input
    `to`; `compensate` undoes it. `await`: wait until `machine` is in one of `states`, at most
    `within_ms`; in one of `fails` (its outcome known) it fails at once. `compute`: call the
    registered pure function `function`."""

    name: str
    kind: StepKind
    machine: str | None = None
    send: Emit | None = None
    to: str | None = None
    compensate: Emit | None = None
    irreversible: bool = False
    states: frozenset[str] = frozenset()
    within_ms: int | None = None
    function: str | None = None
    fails: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """Everything the runtime needs about one flow, as generated from its declaration.
    `steps` is empty for a conditional flow, whose `branches` map each value of the input
    `on` to its steps; `within_ms` and `quorum` belong to fanout flows."""

    name: str
    kind: FlowKind
    doc: str | None
    source_path: str
    source_sha256: str
    compiler_version: str
    inputs: tuple[str, ...]
    steps: tuple[FlowStepSpec, ...] = ()
    on: str | None = None
    branches: Mapping[str, tuple[FlowStepSpec, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    within_ms: int | None = None
    quorum: int | None = None
    # Each input's declared type (empty in modules generated before types were carried).
    input_types: Mapping[str, FlowInput] = field(default_factory=lambda: frozen_map({}))


# ---------------------------------------------------------------------------------------------
# The typed face: what generated Bindings protocols and Governor handles are built from.

# A bare `TransitionContext` is one whose payload may be any model or None.
P_co = DefaultedTypeVar("P_co", bound=Payload | None, covariant=True, default=Payload | None)
S = TypeVar("S", bound=GovernorEnum)
E = TypeVar("E", bound=GovernorEnum)
B = TypeVar("B")


class TransitionContext(NamedTuple, Generic[P_co]):
    """The event as guards and actions see it. `payload` is the event's validated payload
    model, or None for an event without fields and for timers. `target` is None while guards
    run, and the state being entered (None when a timer stays) while actions run. `version` is
    the instance's version before this change; `timer` names the timer that fired, if any.
    `event_id` and `idempotency_key` are the dispatch's, as its caller gave them (None
    without; None for guards and creates): an action that calls the outside world
    sends one as its request's idempotency key, so that a call made again after a crash
    (outside calls are at-least-once) is deduplicated by the service. A flow's step and
    compensation always have an event id, derived from the run, the step and the phase: the
    same at every attempt, retry and resume. A timer's firing has both, its firing's id
    (derived from the machine, instance, timer and the version that armed it: its ledger
    entry's event id), the same at every attempt of that firing, another for the next.
    (A named tuple: immutable, and built in a tenth of the time a frozen dataclass takes, once
    or twice per dispatch.)"""

    machine: str
    instance: str
    state: str
    event: str
    payload: P_co
    actor: str
    version: int
    now_ms: int
    target: str | None = None
    timer: str | None = None
    event_id: str | None = None
    idempotency_key: str | None = None


class DispatchOptions(TypedDict, total=False):
    """The keyword options of a typed dispatch, as `Governor.dispatch` of the runtime takes them."""

    actor: str
    event_id: str | None
    idempotency_key: str | None
    expected_version: int | None
    record_rejection: bool


@dataclass(frozen=True, slots=True)
class Outcome(Generic[S]):
    """What a typed dispatch or create did: `result` with its states as the State enum."""

    state: S
    from_state: S | None  # None for a create
    result: DispatchResult

    @property
    def version(self) -> int:
        return self.result.version

    @property
    def seq(self) -> int | None:
        return self.result.seq

    @property
    def event_id(self) -> str | None:
        return self.result.event_id

    @property
    def duplicate(self) -> bool:
        return self.result.duplicate

    @property
    def ignored(self) -> bool:
        return self.result.ignored

    @property
    def emitted(self) -> tuple[EmittedEvent, ...]:
        return self.result.emitted

    @property
    def notifications(self) -> tuple[Notification, ...]:
        return self.result.notifications

    @property
    def action_results(self) -> Mapping[str, object]:
        return self.result.action_results

    @property
    def armed(self) -> tuple[ArmedTimer, ...]:
        return self.result.armed


class TypedGovernor(Generic[S, E, B]):
    """Base of the `Governor` of each generated module: a loaded governor of one machine whose
    events, payloads and states are that machine's types. `load` binds a `Bindings` object's
    methods by name (the load-time check, R010-R014, still reports every problem); the
    runtime's untyped `Governor` stays available as `governor`."""

    MACHINE: ClassVar[MachineSpec]
    __slots__ = ("governor",)

    def __init__(self, governor: Governor) -> None:
        if governor.spec is not self.MACHINE:
            raise TypeError(f"{type(self).__name__} wraps a {self.MACHINE.name} governor")
        self.governor = governor

    @classmethod
    def load(
        cls,
        runtime: Runtime,
        bindings: B,
        settings: Mapping[str, int | str | _datetime.timedelta] | None = None,
    ) -> Self:
        """Load the machine into `runtime`, its guards and actions bound to the methods (or
        module functions) of `bindings` that carry their names, with the machine's settings
        (durations, each within its declared bounds) if it declares any."""
        spec = cls.MACHINE
        guards = {n: getattr(bindings, n) for n in spec.guards if hasattr(bindings, n)}
        actions = {n: getattr(bindings, n) for n in spec.actions if hasattr(bindings, n)}
        return cls(runtime.load(spec, guards, actions, settings))

    def _state(self, value: str) -> S:
        return cast(S, self.MACHINE.state_type(value))

    def _outcome(self, result: DispatchResult) -> Outcome[S]:
        before = self._state(result.from_state) if result.from_state else None
        return Outcome(self._state(result.to_state), before, result)

    def _dispatch(
        self, instance_id: str, event: E, payload: Payload | None, options: DispatchOptions
    ) -> Outcome[S]:
        return self._outcome(self.governor.dispatch(instance_id, event, payload, **options))

    def create(
        self, instance_id: str, actor: str = "system", *, event_id: str | None = None
    ) -> Outcome[S]:
        """A new instance in the initial state; raises InstanceExists (R003)."""
        return self._outcome(self.governor.create(instance_id, actor, event_id=event_id))

    def state(self, instance_id: str) -> S | None:
        """The instance's current state, or None if there is no such instance."""
        record = self.governor.get(instance_id)
        return None if record is None else self._state(record.state)

    def version(self, instance_id: str) -> int | None:
        """The instance's current version, or None if there is no such instance."""
        record = self.governor.get(instance_id)
        return None if record is None else record.version

    def history(self, instance_id: str) -> list[LedgerEntry]:
        """The instance's ledger entries in order."""
        return self.governor.history(instance_id)

    def timers(self, instance_id: str) -> list[ArmedTimer]:
        """The instance's armed timers, earliest first."""
        return self.governor.timers(instance_id)
